//! The load balancer's tests: real binaries and in-process servers on
//! loopback, one module per subject.
//!
//! One test binary rather than one per file: the dependencies are linked
//! once (a cold `make test` is minutes faster and a gigabyte smaller), and
//! what every test module shares is said once, here. Run one module with
//! `cargo test -p loadbalancer --test integration tcp::`.

// A test's helpers unwrap: a broken assumption is a failed test.
#![expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

mod support;

mod algorithms;
mod dashboard;
mod discovery;
mod docs;
mod failures;
mod grpc;
mod health;
mod hostile;
mod http2;
mod layers;
mod listeners;
mod live_config;
mod local_cluster;
mod manifests;
mod observability;
mod proxying;
mod shared_counter;
mod sources;
mod tcp;
mod tools;
