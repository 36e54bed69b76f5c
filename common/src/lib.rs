//! What the `backend` and the `loadbalancer` binaries share.
//!
//! Both binaries read a JSON config file mounted from a ConfigMap, log to
//! stdout the same way, and stop on the same signals, so that code lives here
//! once.
//!
//! # Layout
//!
//! - [`config`]: read a JSON config file into a typed struct, with errors that
//!   name the file, the field and the line.
//! - [`telemetry`]: one logging setup (`RUST_LOG`, `LOG_FORMAT=json`), and a
//!   throttle for log lines that can repeat in a flood.
//! - [`exposition`]: `/metrics` in OpenMetrics or the classic Prometheus
//!   text format, as the scraper asks.
//! - [`reload`]: noticing a changed config file (a ConfigMap updated in
//!   place) and handing it to the binary to apply.
//! - [`serve`]: serving HTTP/1.1 on a listener with the limits every
//!   listener needs (header read timeout, head size, backlog), and graceful
//!   shutdown.
//! - [`shutdown`]: a future that completes on SIGTERM or Ctrl-C; SIGHUP
//!   ignored instead of fatal.
//! - [`errors`]: an error as one line, its causes included.
//! - [`sync`]: the one policy for a poisoned lock.
//! - `testkit` (feature `testkit`, tests only): start the real binaries, wait
//!   for them, poll with a bound, talk HTTP.

pub mod config;
pub mod errors;
pub mod exposition;
pub mod reload;
pub mod serve;
pub mod shutdown;
pub mod sync;
pub mod telemetry;

#[cfg(feature = "testkit")]
pub mod testkit;
