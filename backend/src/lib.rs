//! The backend: a small HTTP service that says which pod answered.
//!
//! Run several copies behind a load balancer and every answer names the pod
//! that served it, so you can *see* the load being spread. In Kubernetes the
//! pod learns its own name and IP from the Downward API (environment
//! variables the kubelet fills in) and its service name from a ConfigMap
//! mounted as `/etc/config/config.json`.
//!
//! # Layout
//!
//! - [`config`]: the JSON config file (`port`, `serviceName`).
//! - [`identity`]: who this pod is, from the Downward API or local fallbacks.
//! - [`routes`]: the HTTP routes, as one axum `Router`.
//! - [`metrics`]: requests by route and status code, on `GET /metrics`.
//! - [`reload`]: a changed config file (`serviceName`, `logLevel`,
//!   `accessLog`) applied while running.
//! - [`server`]: serving a listener until shutdown, draining in-flight requests.
//! - [`tcp`]: with `tcpPort`, a TCP listener that greets and echoes lines.
//!
//! `src/main.rs` only parses flags, loads the config and calls [`server::run`].

pub mod config;
pub mod identity;
pub mod metrics;
pub mod reload;
pub mod routes;
pub mod server;
pub mod tcp;
