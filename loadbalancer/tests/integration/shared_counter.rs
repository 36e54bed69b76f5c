//! Two load balancer replicas and one rotation: with a shared counter in a
//! real Redis (Debian's `redis-server`), requests alternating between the
//! replicas still reach the backends in strict turn; killing Redis fails no
//! request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::*;
use common::testkit::{Http, PATIENCE, Process, poll};
use serde_json::json;

fn start_redis() -> (Process, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = common::testkit::tool("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    let redis = Process::start("redis-server", command);
    let up = poll(PATIENCE, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(
        up.is_some(),
        "redis-server listens (apt-get install redis-server)"
    );
    (redis, port)
}

/// `n` requests alternating between the two load balancers, in order;
/// which backend served each.
async fn alternate(lbs: [&LoadBalancer; 2], n: usize) -> Vec<String> {
    let http = Http::new();
    let mut served = Vec::new();
    for i in 0..n {
        let reply = http.get(&lbs[i % 2].url("/")).await;
        assert_eq!(reply.status, 200);
        served.push(reply.header("x-served-by").unwrap().to_owned());
    }
    served
}

fn is_strict_rotation(served: &[String], n: usize) -> bool {
    served.windows(n).all(|w| {
        let distinct: std::collections::BTreeSet<_> = w.iter().collect();
        distinct.len() == n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_sharing_redis_make_one_strict_rotation_and_survive_its_loss() {
    let backends = start_backends(3);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();

    // Without a shared counter each replica counts alone: both start at
    // the same backend, so the global order is not a rotation.
    let alone = [
        start_load_balancer(&addrs, json!({})),
        start_load_balancer(&addrs, json!({})),
    ];
    let served = alternate([&alone[0], &alone[1]], 12).await;
    assert!(!is_strict_rotation(&served, 3), "{served:?}");
    drop(alone);

    let (mut redis, port) = start_redis();
    let shared = json!({ "sharedCounter": format!("redis://127.0.0.1:{port}") });
    let mut lbs = [
        start_load_balancer(&addrs, shared.clone()),
        start_load_balancer(&addrs, shared),
    ];
    for lb in &mut lbs {
        lb.process
            .wait_for_log("shared round-robin counter connected", |_| true);
    }
    let served = alternate([&lbs[0], &lbs[1]], 30).await;
    assert!(is_strict_rotation(&served, 3), "one rotation: {served:?}");

    // Redis goes away under load: every request is still answered.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, url) = (stop.clone(), lbs[i % 2].url("/"));
            tokio::spawn(async move {
                let http = Http::new();
                let mut failed = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match http.try_get(&url).await {
                        Ok(reply) if reply.status == 200 => {}
                        other => failed.push(format!("{other:?}")),
                    }
                }
                failed
            })
        })
        .collect();
    redis.kill();
    for lb in &mut lbs {
        lb.process.wait_for_log(
            "shared round-robin counter unavailable; using the local counter",
            |_| true,
        );
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let failed = client.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
    }
    let metrics = Http::new().get(&lbs[0].admin_url("/metrics")).await;
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    let fallbacks: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("loadbalancer_shared_counter_fallbacks_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(fallbacks >= 1.0, "{metrics}");
}
