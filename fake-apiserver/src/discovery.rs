//! The discovery documents a real client reads before anything else.
//!
//! `kubectl` does not know where `endpointslices` live until the server
//! says so: it reads `/api` and `/apis` (the groups and versions), then
//! `/api/v1` and `/apis/{group}/{version}` (the resources of each, with
//! their kind, short names and verbs). These answers are the legacy,
//! unaggregated form, which every client falls back to.

use serde_json::{Value, json};

use super::Kind;

/// `GET /version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-fake-apiserver",
        "platform": "linux/amd64",
    })
}

/// `GET /api`: the core group's versions.
pub fn core_versions() -> Value {
    json!({ "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [] })
}

/// `GET /apis`: every other group this server serves.
pub fn groups() -> Value {
    let mut groups: Vec<&str> = Kind::ALL
        .iter()
        .map(|kind| kind.api_version())
        .filter(|version| version.contains('/'))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let groups: Vec<Value> = groups
        .iter()
        .map(|group_version| {
            let (name, version) = group_version.split_once('/').unwrap_or((group_version, ""));
            let version = json!({ "groupVersion": group_version, "version": version });
            json!({ "name": name, "versions": [version], "preferredVersion": version })
        })
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`: the resources there.
pub fn resources(group_version: &str) -> Option<Value> {
    let resources: Vec<Value> = Kind::ALL
        .iter()
        .filter(|kind| kind.api_version() == group_version)
        .map(|kind| {
            json!({
                "name": kind.resource(),
                "singularName": kind.singular(),
                "namespaced": true,
                "kind": kind.kind(),
                "verbs": ["get", "list", "watch", "update", "patch", "delete"],
                "shortNames": kind.short_names(),
            })
        })
        .chain((group_version == "apps/v1").then(|| {
            json!({
                "name": "deployments/scale",
                "singularName": "",
                "namespaced": true,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            })
        }))
        .collect();
    (!resources.is_empty()).then(|| {
        json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources })
    })
}
