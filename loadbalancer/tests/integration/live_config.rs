//! Configuration that changes without a restart. The config is laid out as
//! a ConfigMap volume and updated as the kubelet updates one: a new version
//! directory and an atomic swap of the `..data` symlink.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::*;
use common::testkit::{Http, PATIENCE, poll_async};
use http_body_util::Full;
use hyper::Request;
use serde_json::{Value, json};

fn lb_config(backends: &[&Backend], extra: Value) -> Value {
    let mut config = json!({
        "port": 0,
        "adminPort": 0,
        "discovery": "static",
        "backends": backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(),
        "logFormat": "json",
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    config
}

/// Sends a GET with `id` as its request id; panics unless it is a 200.
async fn get_with_id(lb: &LoadBalancer, id: &str) {
    let request = Request::get(lb.url("/"))
        .header("x-request-id", id)
        .body(Full::default())
        .unwrap();
    assert_eq!(Http::new().send(request).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_to_the_file_gets_traffic_without_a_restart() {
    let backends = start_backends(2);
    let mut configmap = ConfigMapDir::new(&lb_config(&[&backends[0]], json!({})));
    let mut lb = start_load_balancer_from(&configmap);
    let http = Http::new();
    assert_eq!(
        http.get(&lb.url("/")).await.header("x-served-by"),
        Some(backends[0].addr.to_string().as_str())
    );

    let mark = lb.process.mark();
    configmap.write(&lb_config(&[&backends[0], &backends[1]], json!({})).to_string());
    lb.process.wait_for_log_since(mark, "config reloaded", |l| {
        l["applied"]
            .as_str()
            .is_some_and(|a| a.contains("backends"))
    });
    let second = backends[1].addr.to_string();
    let reached = poll_async(PATIENCE, || async {
        let reply = http.get(&lb.url("/")).await;
        (reply.header("x-served-by") == Some(second.as_str())).then_some(())
    })
    .await;
    assert!(reached.is_some(), "the new backend gets traffic");
    let metrics =
        String::from_utf8(http.get(&lb.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("loadbalancer_config_reloads_total{result=\"applied\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_edit_is_rejected_while_traffic_keeps_flowing() {
    let backends = start_backends(2);
    let mut configmap = ConfigMapDir::new(&lb_config(&[&backends[0], &backends[1]], json!({})));
    let mut lb = start_load_balancer_from(&configmap);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, url) = (stop.clone(), lb.url("/"));
            tokio::spawn(async move {
                let http = Http::new();
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    answers.push(http.try_get(&url).await.map(|r| r.status.as_u16()));
                }
                answers
            })
        })
        .collect();

    let mark = lb.process.mark();
    configmap.write("{\n  \"discovery\": \"static\",\n  \"retries\": \"many\"\n}");
    let rejected = lb
        .process
        .wait_for_log_since(mark, "config change rejected", |_| true);
    let error = rejected["error"].as_str().unwrap();
    assert!(
        error.contains("config.json")
            && error.contains("field `retries`")
            && error.contains("line 3"),
        "{error}"
    );
    // Still in force: both backends, serving.
    let mark = lb.process.mark();
    configmap.write(&lb_config(&[&backends[0], &backends[1]], json!({ "retries": 3 })).to_string());
    lb.process
        .wait_for_log_since(mark, "config reloaded", |_| true);

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let answers = client.await.unwrap();
        assert!(!answers.is_empty());
        assert!(
            answers.iter().all(|a| a == &Ok(200)),
            "every request answered 200: {:?}",
            answers
                .iter()
                .filter(|a| a != &&Ok(200))
                .collect::<Vec<_>>()
        );
    }
    let metrics = Http::new().get(&lb.admin_url("/metrics")).await;
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(metrics.contains("loadbalancer_config_reloads_total{result=\"rejected\"} 1"));
}

#[tokio::test]
async fn log_level_and_access_log_change_live_and_a_port_change_waits_for_a_restart() {
    let backends = start_backends(1);
    let mut configmap = ConfigMapDir::new(&lb_config(&[&backends[0]], json!({})));
    let mut lb = start_load_balancer_from(&configmap);

    // Each change is awaited through the reload counter, which does not
    // depend on the log level being changed.
    let mut reloads = 0;
    let mut apply = async |extra: Value, lb: &LoadBalancer| {
        configmap.write(&lb_config(&[&backends[0]], extra).to_string());
        reloads += 1;
        let expected = format!("loadbalancer_config_reloads_total{{result=\"applied\"}} {reloads}");
        let seen = poll_async(PATIENCE, || async {
            let metrics = Http::new().get(&lb.admin_url("/metrics")).await;
            String::from_utf8_lossy(&metrics.body)
                .contains(&expected)
                .then_some(())
        })
        .await;
        assert!(seen.is_some(), "{expected}");
    };
    // With the level at warn, a request logs no `proxied` line...
    apply(json!({ "logLevel": "warn" }), &lb).await;
    get_with_id(&lb, "while-warn").await;
    // ...and back at info it does; log lines are in order, so the one above
    // would come first.
    apply(json!({ "logLevel": "info" }), &lb).await;
    get_with_id(&lb, "back-at-info").await;
    lb.process
        .wait_for_log("proxied", |l| l["request_id"] == "back-at-info");
    let ids: Vec<Value> = lb
        .process
        .logs()
        .iter()
        .filter(|l| l["message"] == "proxied")
        .map(|l| l["request_id"].clone())
        .collect();
    assert!(!ids.contains(&json!("while-warn")), "{ids:?}");

    apply(json!({ "accessLog": false }), &lb).await;
    get_with_id(&lb, "no-access-log").await;
    apply(json!({}), &lb).await;
    get_with_id(&lb, "access-log-again").await;
    lb.process
        .wait_for_log("proxied", |l| l["request_id"] == "access-log-again");
    assert!(
        !lb.process
            .logs()
            .iter()
            .any(|l| l["request_id"] == "no-access-log"),
        "accessLog: false logs no request"
    );

    apply(json!({ "port": 1 }), &lb).await;
    let warned = lb
        .process
        .wait_for_log("config change needs a restart", |_| true);
    assert!(
        warned["fields"].as_str().unwrap().contains("port"),
        "{warned}"
    );
    get_with_id(&lb, "same-port").await;
}

#[tokio::test]
async fn the_backend_answers_with_its_new_service_name_without_a_restart() {
    let mut configmap = ConfigMapDir::new(&json!({ "port": 0, "serviceName": "catalog" }));
    let mut command = std::process::Command::new(common::testkit::binary("backend"));
    command
        .args(["--host", "127.0.0.1", "--config"])
        .arg(configmap.path());
    let mut backend = common::testkit::Process::start("backend", command);
    let addr = backend.listening_on("addr");
    let http = Http::new();
    let url = format!("http://{addr}/");
    assert_eq!(http.get(&url).await.json()["serviceName"], "catalog");

    configmap.write(&json!({ "port": 0, "serviceName": "inventory" }).to_string());
    let renamed = poll_async(PATIENCE, || async {
        (http.get(&url).await.json()["serviceName"] == "inventory").then_some(())
    })
    .await;
    assert!(renamed.is_some(), "serviceName follows the file");
    backend.wait_for_log("config reloaded", |l| {
        l["applied"]
            .as_str()
            .is_some_and(|a| a.contains("serviceName"))
    });
}
