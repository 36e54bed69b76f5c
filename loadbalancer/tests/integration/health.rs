//! Outlier ejection on real traffic: a backend that answers 500 again and
//! again leaves the rotation, comes back through one probe request, and when
//! every backend is out the load balancer fails open.

use crate::support::*;
use common::testkit::{Http, PATIENCE, poll_async};
use http_body_util::Full;
use hyper::Request;
use serde_json::{Value, json};

async fn post(url: String) {
    let request = Request::post(url).body(Full::default()).unwrap();
    assert_eq!(Http::new().send(request).await.unwrap().status, 200);
}

async fn listed(lb: &LoadBalancer) -> Value {
    Http::new().get(&lb.admin_url("/backends")).await.json()
}

fn backend_named<'a>(listed: &'a Value, addr: &str) -> &'a Value {
    listed["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .unwrap()
}

#[tokio::test]
async fn five_500s_in_a_row_eject_a_backend_and_a_probe_success_restores_it() {
    let backends = start_backends(2);
    let (good, bad) = (backends[0].addr.to_string(), backends[1].addr.to_string());
    let lb = start_load_balancer(
        &[backends[0].addr, backends[1].addr],
        json!({ "cooldownMs": 500, "consecutive5xx": 5 }),
    );
    post(format!("http://{bad}/admin/fail")).await;

    let http = Http::new();
    let mut errors = 0;
    for _ in 0..10 {
        if http.get(&lb.url("/")).await.status == 500 {
            errors += 1;
        }
    }
    assert_eq!(
        errors, 5,
        "five 500s reach the client, then the backend is out"
    );
    let state = listed(&lb).await;
    assert_eq!(backend_named(&state, &bad)["state"], "ejected", "{state}");
    assert_eq!(backend_named(&state, &bad)["ejectedFor"], "5xx");
    for _ in 0..10 {
        let reply = http.get(&lb.url("/")).await;
        assert_eq!(reply.header("x-served-by"), Some(good.as_str()));
    }
    let metrics =
        String::from_utf8(http.get(&lb.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains(&format!(
            "loadbalancer_ejections_total{{backend=\"{bad}\",reason=\"5xx\"}} 1"
        )),
        "{metrics}"
    );

    post(format!("http://{bad}/admin/recover")).await;
    let back = poll_async(PATIENCE, || async {
        let reply = http.get(&lb.url("/")).await;
        (reply.header("x-served-by") == Some(bad.as_str()) && reply.status == 200).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the probe succeeded and the backend is back"
    );
    assert_eq!(backend_named(&listed(&lb).await, &bad)["state"], "healthy");
}

#[tokio::test]
async fn with_every_backend_ejected_it_fails_open_instead_of_refusing_everyone() {
    let backends = start_backends(2);
    let lb = start_load_balancer(
        &[backends[0].addr, backends[1].addr],
        json!({ "cooldownMs": 60000, "consecutive5xx": 1, "maxEjectionPercent": 100 }),
    );
    for backend in &backends {
        post(format!("http://{}/admin/fail", backend.addr)).await;
    }
    let http = Http::new();
    for _ in 0..2 {
        assert_eq!(http.get(&lb.url("/")).await.status, 500);
    }
    let state = listed(&lb).await;
    assert_eq!(state["failingOpen"], true, "{state}");

    // Still routed to the backends (their 500s), never a 503 from us.
    for _ in 0..4 {
        let reply = http.get(&lb.url("/")).await;
        assert_eq!(reply.status, 500, "{:?}", reply.body);
        assert!(reply.header("x-served-by").is_some());
    }
    let metrics =
        String::from_utf8(http.get(&lb.admin_url("/metrics")).await.body.to_vec()).unwrap();
    let failed_open: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("loadbalancer_fail_open_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(failed_open >= 4.0, "{metrics}");
}

#[tokio::test]
async fn an_active_check_ejects_a_backend_whose_readyz_fails_and_brings_it_back() {
    let backends = start_backends(2);
    let (good, flaky) = (backends[0].addr.to_string(), backends[1].addr.to_string());
    let mut lb = start_load_balancer(
        &[backends[0].addr, backends[1].addr],
        json!({ "healthCheck": {
            "path": "/readyz", "intervalMs": 100, "timeoutMs": 500,
            "unhealthyThreshold": 2, "healthyThreshold": 2
        } }),
    );
    post(format!("http://{flaky}/admin/unready")).await;
    let out = poll_async(PATIENCE, || async {
        let state = listed(&lb).await;
        (backend_named(&state, &flaky)["ejectedFor"] == "active_check").then_some(())
    })
    .await;
    assert!(out.is_some(), "the failing /readyz ejects it");
    lb.process
        .wait_for_log("backend ejected: its health check failed", |l| {
            l["backend"] == flaky
        });
    let http = Http::new();
    for _ in 0..6 {
        let reply = http.get(&lb.url("/")).await;
        assert_eq!(
            reply.header("x-served-by"),
            Some(good.as_str()),
            "only the healthy one"
        );
    }

    post(format!("http://{flaky}/admin/ready")).await;
    let back = poll_async(PATIENCE, || async {
        let state = listed(&lb).await;
        (backend_named(&state, &flaky)["state"] == "healthy").then_some(())
    })
    .await;
    assert!(back.is_some(), "passing checks bring it back");
    let url = lb.url("/");
    let mut served = Vec::new();
    for _ in 0..4 {
        let reply = http.get(&url).await;
        served.push(reply.header("x-served-by").unwrap().to_owned());
    }
    assert!(served.contains(&flaky), "{served:?}");
}
