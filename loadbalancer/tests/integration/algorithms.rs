//! Balancing algorithms against a slow backend: round robin gives it its
//! third of the requests whatever it costs; least connections sees its
//! requests pile up and sends it fewer. The switch is a config edit, made
//! while traffic flows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::*;
use common::testkit::{Http, PATIENCE, poll_async};
use serde_json::{Value, json};

/// `total` GETs from 8 concurrent clients; how many each backend served.
async fn spread(lb: &LoadBalancer, total: usize) -> BTreeMap<String, usize> {
    let per_client = total / 8;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = lb.url("/");
            tokio::spawn(async move {
                let http = Http::new();
                let mut served = Vec::new();
                for _ in 0..per_client {
                    let reply = http.get(&url).await;
                    assert_eq!(reply.status, 200);
                    served.push(reply.header("x-served-by").unwrap().to_owned());
                }
                served
            })
        })
        .collect();
    let mut counts = BTreeMap::new();
    for client in clients {
        for backend in client.await.unwrap() {
            *counts.entry(backend).or_default() += 1;
        }
    }
    counts
}

fn config(backends: &[&Backend], algorithm: &str) -> Value {
    json!({
        "port": 0,
        "adminPort": 0,
        "discovery": "static",
        "backends": backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(),
        "algorithm": algorithm,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_connections_sends_a_slow_backend_far_fewer_requests_than_round_robin() {
    let fast = start_backends(2);
    let slow = start_backend_named("slow", json!({ "port": 0, "responseDelayMs": 100 }));
    let all = [&fast[0], &fast[1], &slow];
    let mut configmap = ConfigMapDir::new(&config(&all, "round_robin"));
    let lb = start_load_balancer_from(&configmap);
    let slow_addr = slow.addr.to_string();

    let round_robin = spread(&lb, 240).await;
    assert_eq!(
        round_robin[&slow_addr], 80,
        "a third, whatever it costs: {round_robin:?}"
    );

    // Traffic flows while the config changes.
    let stop = Arc::new(AtomicBool::new(false));
    let background = tokio::spawn({
        let (stop, url) = (stop.clone(), lb.url("/"));
        async move {
            let http = Http::new();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(http.try_get(&url).await.map(|r| r.status.as_u16()));
            }
            statuses
        }
    });
    configmap.write(&config(&all, "least_connections").to_string());
    let switched = poll_async(PATIENCE, || async {
        let listed = Http::new().get(&lb.admin_url("/backends")).await.json();
        (listed["algorithm"] == "least_connections").then_some(())
    })
    .await;
    assert!(switched.is_some(), "the algorithm follows the config");

    let least = spread(&lb, 240).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = background.await.unwrap();
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|s| s == &Ok(200)),
        "no request failed across the switch"
    );
    let slow_share = least.get(&slow_addr).copied().unwrap_or(0);
    assert!(
        slow_share < 240 / 10,
        "least connections routes around the slow backend: {least:?}"
    );
    let metrics = Http::new().get(&lb.admin_url("/metrics")).await;
    assert!(
        String::from_utf8_lossy(&metrics.body)
            .contains("loadbalancer_algorithm{algorithm=\"least_connections\"} 1")
    );
}
