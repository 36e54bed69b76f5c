//! Discovery convergence: how long from the API server emitting a change to
//! the first request routed to the new backend.
//!
//! The fake API server from the tests plays Kubernetes; two real backends
//! stand in for pods. Each round removes pod B from the EndpointSlice, waits
//! until the load balancer has dropped it, then adds it back and sends
//! requests in a tight loop until one is answered by B. Run with
//! `cargo bench -p loadbalancer --bench convergence` (part of `make bench`).

#![expect(
    clippy::unwrap_used,
    dead_code,
    reason = "a bench's helpers unwrap, and it uses a part of the tests' support"
)]

#[path = "../tests/integration/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::testkit::{Http, PATIENCE, poll_async};
use fake_apiserver::{FakeApiServer, meta};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use serde_json::json;
use support::{Backend, start_load_balancer_with, start_pods};

const ROUNDS: usize = 200;

fn slice(port: u16, pods: &[&Backend]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            "backend-bench",
            &[("kubernetes.io/service-name", "backend")],
        ),
        address_type: "IPv4".into(),
        endpoints: Some(
            pods.iter()
                .map(|p| Endpoint {
                    addresses: vec![p.addr.ip().to_string()],
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            port: Some(port.into()),
            ..Default::default()
        }]),
    }
}

#[tokio::main]
async fn main() {
    let (pods, port) = start_pods(50, 2);
    let (a, b) = (&pods[0], &pods[1]);
    let api = FakeApiServer::start("bench").await;
    api.apply_slice(slice(port, &[a]));
    let kubeconfig = api.kubeconfig("bench");
    let lb = start_load_balancer_with(
        json!({ "backendServiceName": "backend", "backendPort": port }),
        &[
            ("KUBECONFIG", kubeconfig.path().to_str().unwrap()),
            ("RUST_LOG", "warn,loadbalancer::server=info"),
        ],
    );
    let http = Http::new();
    let served_by = |reply: &common::testkit::Reply| reply.header("x-served-by").map(str::to_owned);
    let b_addr = b.addr.to_string();

    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        api.apply_slice(slice(port, &[a]));
        let backends_url = lb.admin_url("/backends");
        poll_async(PATIENCE, || async {
            let listed = http.get(&backends_url).await.json();
            (listed["backends"].as_array().unwrap().len() == 1).then_some(())
        })
        .await
        .expect("B removed");

        let start = Instant::now();
        api.apply_slice(slice(port, &[a, b]));
        loop {
            let reply = http.get(&lb.url("/")).await;
            if served_by(&reply).as_deref() == Some(b_addr.as_str()) {
                break;
            }
            assert!(start.elapsed() < PATIENCE, "B never received traffic");
        }
        samples.push(start.elapsed());
    }

    report(samples);
}

/// Prints the percentiles and writes them to `target/bench/convergence.json`,
/// beside the other benches' results, never into a tracked file.
fn report(mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99, max) = (ms(at(0.5)), ms(at(0.99)), ms(at(1.0)));
    println!(
        "discovery convergence over {ROUNDS} changes (API server change -> first request to the new backend):"
    );
    println!("  p50 {p50:.2} ms   p99 {p99:.2} ms   max {max:.2} ms   (target: p99 < 50 ms)");
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    let out = workspace
        .unwrap_or(std::path::Path::new("."))
        .join("target/bench");
    let results = json!({ "changes": ROUNDS, "p50_ms": p50, "p99_ms": p99, "max_ms": max });
    let written = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("convergence.json"), results.to_string()));
    match written {
        Ok(()) => println!("written to {}", out.join("convergence.json").display()),
        Err(error) => eprintln!("could not write {}: {error}", out.display()),
    }
}
