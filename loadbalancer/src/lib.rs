//! The load balancer: discovers backends, picks one per request, proxies.
//!
//! Follow a request: [`server`] accepts the connection and hands each request
//! to [`proxy::Proxy::handle`], which asks the [`balancer`] for a backend
//! (the configured algorithm, skipping ejected ones) and forwards the request
//! to it over one of that backend's [`connections`], streaming the bodies.
//! Follow a change: a [`discovery`] source turns what the API server says
//! into a whole set of backends and publishes it; the balancer swaps in a
//! new snapshot, which the next request reads. Beside that, [`admin`] serves
//! the health endpoints, metrics and live page.
//!
//! # Layout
//!
//! In layer order: each module uses only those listed before it
//! (`tests/integration/layers.rs` holds that).
//!
//! - [`connections`]: open connections to a backend, by address, and
//!   whether a failed connect was our own shortage; no knowledge of the
//!   balancer.
//! - [`balancer`]: the immutable snapshot; `balancer/algorithm.rs` and one
//!   file per algorithm; `balancer/health.rs` (ejection, probing),
//!   `balancer/checker.rs` (active checks), `balancer/stats.rs` (what the
//!   request path counts per backend); no knowledge of HTTP.
//! - [`config`]: the config file and flags, checked into [`config::Settings`].
//! - [`discovery`]: where backends come from; publishes whole sets.
//! - [`proxy`]: the HTTP path: `proxy/send.rs` (one attempt),
//!   `proxy/failure.rs` (whose fault, what is retried), `proxy/headers.rs`,
//!   `proxy/body.rs` (the bodies, timed), `proxy/detach.rs`.
//! - [`tcp`]: the TCP path (`"mode": "tcp"`): a backend per connection.
//! - [`metrics`]: `/metrics`, encoded from the counters at scrape time.
//! - [`admin`]: `/`, `/healthz`, `/readyz`, `/backends`, `/metrics` on the
//!   admin port (the page is `dashboard.html`).
//! - [`reload`]: a changed config file, applied while running.
//! - [`server`]: the two listeners (through `common::serve`), wiring, and
//!   graceful shutdown.

pub mod admin;
pub mod balancer;
pub mod config;
pub mod connections;
pub mod discovery;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod tcp;
