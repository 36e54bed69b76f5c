//! The admin listener: health for Kubernetes, and a look inside.
//!
//! It runs on its own port (`adminPort`, default 8081) so that no path on the
//! proxied port is reserved: every request there goes to a backend.
//!
//! - `GET /healthz`: liveness, 200 while the process runs.
//! - `GET /readyz`: readiness. 503 until discovery has delivered the first
//!   full list of backends, and again from the moment shutdown starts, so
//!   Kubernetes stops sending us new traffic before we stop accepting it.
//! - `GET /backends`: the current snapshot as JSON: each backend with its
//!   pod, state and numbers, how discovery is doing, and the latest changes
//!   of the set.
//! - `GET /metrics`: Prometheus metrics (see [`crate::metrics`]).
//! - `GET /`: a live page of the distribution (`dashboard.html`, embedded in
//!   the binary; it reads `/backends` twice a second).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::balancer::Balancer;
use crate::discovery;
use crate::metrics;

/// Whether shutdown has started; with discovery's first list, that makes
/// `/readyz`.
#[derive(Debug, Default)]
pub struct Readiness {
    shutting_down: AtomicBool,
}

impl Readiness {
    /// Shutdown has started: fail readiness from now on.
    pub fn mark_shutting_down(&self) {
        self.shutting_down.store(true, Relaxed);
    }
}

impl AdminState {
    fn ready(&self) -> Result<(), &'static str> {
        if self.readiness.shutting_down.load(Relaxed) {
            Err("shutting down")
        } else if !self.discovery.has_listed() {
            Err("waiting for the first list of backends")
        } else {
            Ok(())
        }
    }
}

/// What the admin routes read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub readiness: Arc<Readiness>,
    pub balancer: Arc<Balancer>,
    pub discovery: Arc<discovery::Status>,
    /// TCP mode: `/metrics` adds the connection families.
    pub tcp: bool,
}

/// The admin routes.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/backends", get(backends))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": "admin routes: /, /healthz, /readyz, /backends, /metrics" })),
            )
        })
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, Json<Value>) {
    match state.ready() {
        Ok(()) => (
            StatusCode::OK,
            Json(
                json!({ "status": "ready", "backends": state.balancer.snapshot().backends.len() }),
            ),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": reason })),
        ),
    }
}

async fn backends(State(state): State<AdminState>) -> Json<Value> {
    let snapshot = state.balancer.snapshot();
    let list: Vec<Value> = snapshot
        .backends
        .iter()
        .map(|b| {
            json!({
                "address": b.addr,
                "pod": b.origin.name,
                "node": b.origin.node,
                "zone": b.origin.zone,
                "state": b.state().as_str(),
                "ejectedFor": match b.state() {
                    crate::balancer::State::Ejected(reason) => Some(reason.as_str()),
                    _ => None,
                },
                "weight": state.balancer.weight_of(b),
                "coolingDown": b.is_cooling_down(),
                "requests": b.stats.requests(),
                "inFlight": b.stats.in_flight(),
                "errors": b.stats.errors(),
                "lastError": b.stats.last_error(),
            })
        })
        .collect();
    let mut changes = state.balancer.recent_changes();
    changes.reverse();
    Json(json!({
        "discovery": state.discovery.report(),
        "algorithm": snapshot.algorithm.as_str(),
        "failingOpen": state.balancer.failing_open(),
        "generation": snapshot.generation,
        "changedAt": snapshot.changed_at,
        "backends": list,
        "changes": changes,
    }))
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    common::exposition::respond(
        &headers,
        metrics::encode(&state.balancer, &state.discovery, state.tcp),
    )
}
