//! A Deployment's `scale` subresource: what `kubectl scale` reads and patches.
//!
//! The real API server exposes `spec.replicas` of a Deployment as an
//! `autoscaling/v1` `Scale` object; a change to it is a change to the
//! Deployment, seen by its watchers as MODIFIED.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Kind, Refused, Shared, change, merge_patch, stored};

/// `GET .../deployments/{name}/scale`.
pub fn get(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    match deployment(&shared, &namespace, &name) {
        Ok(deployment) => Json(scale_of(&deployment)).into_response(),
        Err(missing) => missing.into_response(),
    }
}

/// `PATCH .../deployments/{name}/scale` with `{"spec": {"replicas": n}}`.
pub fn patch(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let patched = merge_patch(&headers, &body).and_then(|patch| {
        let deployment = deployment(&shared, &namespace, &name)?;
        let replicas = patch["spec"]["replicas"].as_u64().filter(|n| *n <= 1000);
        let message = "the patch must set spec.replicas to a number from 0 to 1000";
        let replicas = replicas.ok_or(Refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            message.into(),
        ))?;
        Ok((deployment, replicas))
    });
    let (mut deployment, replicas) = match patched {
        Ok(patched) => patched,
        Err(refused) => return refused.into_response(),
    };
    deployment["spec"]["replicas"] = replicas.into();
    let stored = change(&shared, Kind::Deployments, deployment);
    Json(scale_of(&stored)).into_response()
}

fn deployment(shared: &Shared, namespace: &str, name: &str) -> Result<Value, Refused> {
    stored(shared, Kind::Deployments, namespace, name)
}

/// The Deployment's replicas as an `autoscaling/v1` `Scale`.
fn scale_of(deployment: &Value) -> Value {
    let metadata = &deployment["metadata"];
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "resourceVersion": metadata["resourceVersion"],
        },
        "spec": { "replicas": deployment["spec"]["replicas"].as_u64().unwrap_or(1) },
        "status": { "replicas": deployment["status"]["replicas"].as_u64().unwrap_or(0) },
    })
}
