//! The `Server` custom resource: a backend declared by hand.
//!
//! Some teams list backends that Kubernetes does not run (a database on a
//! VM, a service in another cluster) as objects of their own. This Rust type
//! is the source of truth: `k8s/crd/servers.yaml` is generated from it
//! (`make crd`), and a test fails when the two differ.
//!
//! ```yaml
//! apiVersion: lb.example.com/v1alpha1
//! kind: Server
//! metadata: {name: backend-a}
//! spec: {url: "http://10.244.1.7:8080", weight: 2}
//! ```
//!
//! The load balancer writes `status`: whether its checks pass, when the
//! verdict last changed, what the last check found, and a standard
//! `Healthy` condition. `kubectl get servers` shows URL, HEALTHY, LAST
//! CHECK and AGE.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a Server declares.
#[derive(CustomResource, Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "lb.example.com",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    status = "ServerStatus",
    shortname = "srv",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Healthy","type":"boolean","jsonPath":".status.isHealthy"}"#,
    printcolumn = r#"{"name":"Last Check","type":"date","jsonPath":".status.lastCheckTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Where to send traffic: `http://host[:port][/path]`. Without a port,
    /// the port comes from DNS (SRV `_http._tcp.<host>`, as Kubernetes
    /// publishes named Service ports), else 80.
    pub url: String,
    /// What active checks probe; by default the url's host and port with
    /// the health-check path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
    /// The weight under `weighted_round_robin` (1 to 100; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // `int32`: the API server warns about any format outside OpenAPI's list
    // (schemars would write `uint32`).
    #[schemars(range(min = 1, max = 100), extend("format" = "int32"))]
    pub weight: Option<u32>,
}

/// What the load balancer found, written to the status subresource.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    /// Whether the active checks pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_healthy: Option<bool>,
    /// When the check that set `isHealthy` ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<String>,
    /// What that check found, such as `GET http://10.244.1.7:8080/readyz: 200 OK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `Healthy` condition, for tools that read conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
