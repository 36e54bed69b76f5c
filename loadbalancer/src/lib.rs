//! The load balancer: discovers backends, picks one per request, proxies.
//!
//! Follow a request: [`server`] accepts the connection and hands each request
//! to [`proxy::Proxy::handle`], which asks the [`balancer`] for a backend
//! (the configured algorithm, skipping ejected ones) and forwards the request
//! to it over a pooled connection, streaming the bodies. Beside that, a
//! [`discovery`] source keeps the balancer's snapshot of backends up to
//! date, and [`admin`] serves the health endpoints, metrics and live page.
//!
//! # Layout
//!
//! - [`config`]: the config file and flags, checked into [`config::Settings`].
//! - [`discovery`]: where backends come from; publishes whole sets.
//! - [`balancer`]: the immutable snapshot; `balancer/algorithm.rs` and one
//!   file per algorithm; `balancer/health.rs` (ejection, probing) and
//!   `balancer/checker.rs` (active checks).
//! - [`proxy`]: the request path: retries, errors and whose fault they are,
//!   upgrades; `proxy/headers.rs` rewrites headers, `proxy/body.rs` times
//!   the bodies.
//! - [`reload`]: a changed config file, applied while running.
//! - [`server`]: the two listeners (through `common::serve`) and graceful
//!   shutdown.
//! - [`metrics`]: the numbers the request path counts, and `/metrics`.
//! - [`admin`]: `/`, `/healthz`, `/readyz`, `/backends`, `/metrics` on the
//!   admin port (the page is `dashboard.html`).

pub mod admin;
pub mod balancer;
pub mod config;
pub mod discovery;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod tcp;
