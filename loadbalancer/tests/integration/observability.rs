//! What an operator sees: Prometheus metrics on both binaries (read by a
//! real Prometheus and checked by `promtool`), request ids across both
//! logs, and `/backends`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::Stdio;

use crate::support::*;
use common::testkit::{Http, PATIENCE, Process, poll_async};
use http_body_util::Full;
use hyper::Request;
use serde_json::{Value, json};

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut promtool = common::testkit::tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[tokio::test]
async fn request_counters_move_exactly_with_the_requests_each_backend_served() {
    let backends = start_backends(3);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = start_load_balancer(&addrs, json!({}));
    let http = Http::new();
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..31 {
        let path = if i == 30 { "/status/503" } else { "/" };
        let reply = http.get(&lb.url(path)).await;
        if reply.status == 200 {
            *served
                .entry(reply.header("x-served-by").unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(served.values().sum::<u64>(), 30);

    let text = http.get(&lb.admin_url("/metrics")).await;
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(text.body.to_vec()).unwrap();
    for backend in &backends {
        let addr = backend.addr.to_string();
        let counted = sample(
            &text,
            &format!("loadbalancer_requests_total{{backend=\"{addr}\",code=\"200\"}}"),
        );
        assert_eq!(counted, Some(served[&addr] as f64), "{addr} in\n{text}");
        let histogram_count = sample(
            &text,
            &format!("loadbalancer_request_duration_seconds_count{{backend=\"{addr}\"}}"),
        )
        .unwrap();
        assert!(histogram_count >= served[&addr] as f64, "{text}");
        assert_eq!(
            sample(
                &text,
                &format!("loadbalancer_in_flight_requests{{backend=\"{addr}\"}}")
            ),
            Some(0.0)
        );
        // The backend counts the same requests on its side.
        let own = http.get(&format!("http://{addr}/metrics")).await;
        let own = String::from_utf8(own.body.to_vec()).unwrap();
        assert_eq!(
            sample(&own, "backend_requests_total{route=\"/\",code=\"200\"}"),
            Some(served[&addr] as f64),
            "{own}"
        );
        promtool_check(&own).unwrap_or_else(|e| panic!("backend metrics: {e}\n{own}"));
    }
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("loadbalancer_requests_total{") && l.contains("code=\"503\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(errors, 1.0, "the 503 the backend answered is counted");
    assert_eq!(
        sample(&text, "loadbalancer_backends{state=\"healthy\"}"),
        Some(3.0)
    );
    promtool_check(&text).unwrap_or_else(|e| panic!("load balancer metrics: {e}\n{text}"));

    let listed = http.get(&lb.admin_url("/backends")).await.json();
    assert_eq!(listed["discovery"]["source"], "static");
    assert_eq!(listed["discovery"]["state"], "synced");
    assert_eq!(listed["generation"], 1);
    let requests: u64 = listed["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 31);
}

#[tokio::test]
async fn a_request_id_goes_to_the_backend_comes_back_and_is_in_both_logs() {
    let mut backends = start_backends(1);
    let mut lb = start_load_balancer(&[backends[0].addr], json!({}));
    let http = Http::new();

    let request = Request::get(lb.url("/headers"))
        .header("x-request-id", "checkout-42")
        .body(Full::default())
        .unwrap();
    let reply = http.send(request).await.unwrap();
    assert_eq!(reply.header("x-request-id"), Some("checkout-42"));
    assert_eq!(reply.json()["x-request-id"], json!(["checkout-42"]));
    lb.process
        .wait_for_log("proxied", |l| l["request_id"] == "checkout-42");
    backends[0]
        .process
        .wait_for_log("request", |l| l["request_id"] == "checkout-42");

    // None sent, or one not safe to log: the load balancer makes one.
    for sent in [None, Some("two words")] {
        let mut request = Request::get(lb.url("/headers"));
        if let Some(id) = sent {
            request = request.header("x-request-id", id);
        }
        let reply = http
            .send(request.body(Full::default()).unwrap())
            .await
            .unwrap();
        let made = reply.header("x-request-id").unwrap().to_owned();
        assert_eq!(made.len(), 32, "{made}");
        assert_eq!(reply.json()["x-request-id"], json!([made]));
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_both_binaries() {
    let backends = start_backends(2);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = start_load_balancer(&addrs, json!({}));
    let http = Http::new();
    for _ in 0..10 {
        assert_eq!(http.get(&lb.url("/")).await.status, 200);
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    let backend_targets: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n\
             - job_name: loadbalancer\n  static_configs:\n  - targets: ['{}']\n\
             - job_name: backend\n  static_configs:\n  - targets: [{}]\n",
            lb.admin,
            backend_targets.join(", ")
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = common::testkit::tool("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let _prometheus = Process::start("prometheus", command);

    let query = |promql: &str| {
        let url = format!(
            "http://127.0.0.1:{port}/api/v1/query?query={}",
            promql
                .bytes()
                .map(|b| if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                })
                .collect::<String>()
        );
        let http = http.clone();
        // 503 while Prometheus is starting.
        async move {
            let reply = http.try_get(&url).await.ok()?;
            (reply.status == 200).then(|| reply.json())
        }
    };
    let by_backend = poll_async(PATIENCE * 2, || async {
        let answer: Value = query("sum by (backend) (loadbalancer_requests_total)").await?;
        let results = answer["data"]["result"].as_array()?.clone();
        let counts: BTreeMap<String, String> = results
            .iter()
            .map(|r| {
                (
                    r["metric"]["backend"].as_str().unwrap_or("").to_owned(),
                    r["value"][1].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        (counts.len() == 2).then_some(counts)
    })
    .await
    .expect("Prometheus scraped the load balancer");
    for addr in &addrs {
        assert_eq!(by_backend[&addr.to_string()], "5", "{by_backend:?}");
    }
    let backend_side = poll_async(PATIENCE * 2, || async {
        let answer: Value = query("sum(backend_requests_total{route=\"/\"})").await?;
        let value = answer["data"]["result"][0]["value"][1].as_str()?.to_owned();
        (value == "10").then_some(value)
    })
    .await;
    assert!(backend_side.is_some(), "Prometheus scraped the backends");
}
