//! Server-side printing: what `kubectl get` shows in its columns.
//!
//! kubectl asks for a `Table` (`Accept: application/json;as=Table;...`) and
//! prints the columns the server chose: for pods READY, STATUS, RESTARTS,
//! AGE and IP, as on a real cluster. Without it, kubectl shows only NAME
//! and AGE. Lists and each watch event are answered this way when asked.

use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::Kind;

/// Whether the client asked for a Table.
pub fn wanted(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=Table"))
}

/// `objects` as one Table.
pub fn of(kind: Kind, objects: &[&Value], resource_version: &str) -> Value {
    let columns: Vec<Value> = columns(kind)
        .iter()
        .map(|(name, description)| json!({ "name": name, "type": "string", "format": "", "description": description, "priority": 0 }))
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let metadata = json!({ "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"] });
            json!({ "cells": cells(kind, object), "object": metadata })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": resource_version },
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// A watch event line (`{"type": ..., "object": ...}`) with its object as a
/// one-row Table.
pub fn event(kind: Kind, line: &str) -> String {
    let Ok(mut event) = serde_json::from_str::<Value>(line) else {
        return line.to_owned();
    };
    if event["type"] != "BOOKMARK" && event["type"] != "ERROR" {
        let version = event["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        event["object"] = of(kind, &[&event["object"]], &version);
    }
    event.to_string() + "\n"
}

fn columns(kind: Kind) -> &'static [(&'static str, &'static str)] {
    match kind {
        Kind::Pods => &[
            ("Name", "the pod"),
            ("Ready", "ready containers"),
            ("Status", "its phase"),
            ("Restarts", "container restarts"),
            ("Age", "since it was made"),
            ("IP", "the pod's IP"),
        ],
        Kind::Deployments => &[
            ("Name", "the Deployment"),
            ("Ready", "ready of desired replicas"),
            ("Up-to-date", "replicas of the current template"),
            ("Available", "ready replicas"),
            ("Age", "since it was made"),
        ],
        _ => &[("Name", "the object"), ("Age", "since it was made")],
    }
}

fn cells(kind: Kind, object: &Value) -> Vec<Value> {
    let name = object["metadata"]["name"].clone();
    let age = age(&object["metadata"]["creationTimestamp"]);
    let status = &object["status"];
    match kind {
        Kind::Pods => {
            let ready = status["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            let restarts = status["containerStatuses"][0]["restartCount"]
                .as_u64()
                .unwrap_or(0);
            let deleting = object["metadata"]["deletionTimestamp"].is_string();
            let phase = match deleting {
                true => "Terminating",
                false => status["phase"].as_str().unwrap_or("Pending"),
            };
            let ip = status["podIP"].as_str().unwrap_or("<none>");
            vec![
                name,
                json!(if ready { "1/1" } else { "0/1" }),
                json!(phase),
                json!(restarts.to_string()),
                json!(age),
                json!(ip),
            ]
        }
        Kind::Deployments => {
            let count = |field: &str| status[field].as_u64().unwrap_or(0);
            let desired = object["spec"]["replicas"].as_u64().unwrap_or(1);
            let ready = format!("{}/{desired}", count("readyReplicas"));
            vec![
                name,
                json!(ready),
                json!(count("updatedReplicas")),
                json!(count("availableReplicas")),
                json!(age),
            ]
        }
        _ => vec![name, json!(age)],
    }
}

/// How long ago `created` was, as kubectl writes it: `42s`, `7m`, `3h`, `2d`.
fn age(created: &Value) -> String {
    let Some(at) = created
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    else {
        return "<unknown>".into();
    };
    let seconds = jiff::Timestamp::now()
        .as_second()
        .saturating_sub(at.as_second())
        .max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}
