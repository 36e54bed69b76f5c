//! The other discovery sources, end to end against the fake API server:
//! Pods by label selector, and `Server` custom resources with their health
//! written back to status (and their ports found in DNS, from a real
//! `dnsmasq` on loopback).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::support::*;
use common::testkit::{Http, PATIENCE, Process, poll, poll_async};
use fake_apiserver::{FakeApiServer, meta};
use http_body_util::Full;
use hyper::Request;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use loadbalancer::discovery::servers::{Server, ServerSpec};
use serde_json::{Value, json};

const NAMESPACE: &str = "lb-test";

/// A load balancer watching `api` with `config`.
fn watching(api: &FakeApiServer, config: Value) -> (LoadBalancer, tempfile::NamedTempFile) {
    let kubeconfig = api.kubeconfig(NAMESPACE);
    let lb = start_load_balancer_with(
        config,
        &[("KUBECONFIG", kubeconfig.path().to_str().unwrap())],
    );
    (lb, kubeconfig)
}

/// Who answers `n` requests, by pod name.
async fn answered_by(lb: &LoadBalancer, n: usize) -> BTreeSet<String> {
    let http = Http::new();
    let mut names = BTreeSet::new();
    for _ in 0..n {
        let reply = http.get(&lb.url("/")).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        names.insert(reply.json()["podName"].as_str().unwrap().to_owned());
    }
    names
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

// === Pods ===

/// A pod of `backend` with the `app.kubernetes.io/name` label `app`.
fn pod(backend: &Backend, app: &str, ready: bool) -> Pod {
    Pod {
        metadata: meta(&backend.name, &[("app.kubernetes.io/name", app)]),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "backend".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: backend.addr.port().into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(backend.addr.ip().to_string()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn pods_matching_the_selector_are_backends_while_ready_and_not_terminating() {
    let (pods, _) = start_pods(41, 4);
    let api = FakeApiServer::start(NAMESPACE).await;
    for backend in &pods[..3] {
        api.apply_pod(pod(backend, "backend", true));
    }
    // Ready, but not selected.
    api.apply_pod(pod(&pods[3], "other", true));
    let (mut lb, _kubeconfig) = watching(
        &api,
        json!({
            "discovery": "pods",
            "podSelector": "app.kubernetes.io/name=backend",
            "backendPortName": "http",
        }),
    );
    lb.process
        .wait_for_log("backends changed", |l| l["total"] == 3);
    assert_eq!(
        answered_by(&lb, 12).await,
        names(&["pod-41-1", "pod-41-2", "pod-41-3"])
    );

    // Not ready: out. Scaled down (deleted): out. Terminating: out at once.
    let mark = lb.process.mark();
    api.apply_pod(pod(&pods[0], "backend", false));
    lb.process
        .wait_for_log_since(mark, "backends changed", |l| l["total"] == 2);
    let mark = lb.process.mark();
    api.delete_pod(&pods[1].name);
    lb.process
        .wait_for_log_since(mark, "backends changed", |l| l["total"] == 1);
    assert_eq!(answered_by(&lb, 6).await, names(&["pod-41-3"]));

    // Scaled up again: a ready pod joins; a terminating one does not serve.
    let mark = lb.process.mark();
    let mut terminating = pod(&pods[2], "backend", true);
    terminating.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
    api.apply_pod(terminating);
    api.apply_pod(pod(&pods[0], "backend", true));
    lb.process
        .wait_for_log_since(mark, "backends changed", |l| {
            l["total"] == 1 && l["added"] == 1
        });
    assert_eq!(answered_by(&lb, 6).await, names(&["pod-41-1"]));
}

// === Servers ===

fn server(name: &str, url: &str) -> Server {
    let mut server = Server::new(
        name,
        ServerSpec {
            url: url.to_owned(),
            health_url: None,
            weight: None,
        },
    );
    server.metadata.namespace = Some(NAMESPACE.into());
    server
}

/// Config for Servers, checked every 100 ms.
fn servers_config(extra: Value) -> Value {
    let mut config = json!({
        "discovery": "servers",
        "healthCheck": { "path": "/readyz", "intervalMs": 100, "timeoutMs": 500,
                         "unhealthyThreshold": 1, "healthyThreshold": 1 },
        "statusWriteIntervalMs": 200,
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    config
}

/// `status.isHealthy` of Server `name`, once it is `wanted`.
fn wait_for_health(api: &FakeApiServer, name: &str, wanted: bool) -> Value {
    poll(PATIENCE, || {
        let status = api.server(name)?.get("status")?.clone();
        (status["isHealthy"] == wanted).then_some(status)
    })
    .unwrap_or_else(|| {
        panic!(
            "Server {name}: isHealthy never became {wanted}: {:?}",
            api.server(name)
        )
    })
}

async fn post(url: String) {
    let request = Request::post(url).body(Full::default()).unwrap();
    assert_eq!(Http::new().send(request).await.unwrap().status, 200);
}

#[tokio::test]
async fn servers_are_checked_only_healthy_ones_served_and_health_written_to_status() {
    let mut backends = start_backends(2);
    let api = FakeApiServer::start(NAMESPACE).await;
    for backend in &backends {
        api.apply_server(&server(&backend.name, &format!("http://{}", backend.addr)));
    }
    let (mut lb, _kubeconfig) = watching(&api, servers_config(json!({})));
    lb.process
        .wait_for_log("backends changed", |l| l["total"] == 2);

    let status = wait_for_health(&api, "backend-1", true);
    assert_eq!(status["conditions"][0]["type"], "Healthy");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert!(status["lastCheckTime"].is_string());
    wait_for_health(&api, "backend-2", true);

    // Broken: out of the rotation, and the status says so.
    post(format!("http://{}/admin/unready", backends[1].addr)).await;
    let status = wait_for_health(&api, "backend-2", false);
    assert_eq!(status["conditions"][0]["status"], "False");
    assert!(
        status["message"].as_str().unwrap().contains("503"),
        "{status}"
    );
    assert_eq!(answered_by(&lb, 8).await, names(&["backend-1"]));

    // A Server added while broken never gets a request: it waits for its
    // checks to pass, as a pod waits for its readiness probe.
    let mut late = start_backend_named("late", json!({ "port": 0 }));
    post(format!("http://{}/admin/unready", late.addr)).await;
    let mark = lb.process.mark();
    api.apply_server(&server("late", &format!("http://{}", late.addr)));
    lb.process
        .wait_for_log_since(mark, "backends changed", |l| l["total"] == 3);
    assert_eq!(answered_by(&lb, 8).await, names(&["backend-1"]));
    wait_for_health(&api, "late", false);
    late.process.kill();

    // Nothing changes: ten more probes of each, no status write.
    let writes = api.status_patches();
    for backend in backends.iter_mut() {
        for _ in 0..10 {
            let mark = backend.process.mark();
            backend
                .process
                .wait_for_log_since(mark, "request", |l| l["path"] == "/readyz");
        }
    }
    assert_eq!(
        api.status_patches(),
        writes,
        "no write while nothing changes"
    );

    // Back: in the rotation, and the status says so.
    post(format!("http://{}/admin/ready", backends[1].addr)).await;
    wait_for_health(&api, "backend-2", true);
    let lb = &lb;
    let both = poll_async(PATIENCE, || async move {
        (answered_by(lb, 6).await.len() == 2).then_some(())
    })
    .await;
    assert!(both.is_some(), "both served again");
}

#[tokio::test]
async fn a_flapping_server_gets_one_status_write_per_interval() {
    let backends = start_backends(1);
    let api = FakeApiServer::start(NAMESPACE).await;
    api.apply_server(&server("flappy", &format!("http://{}", backends[0].addr)));
    let (mut lb, _kubeconfig) = watching(
        &api,
        servers_config(json!({ "statusWriteIntervalMs": 1000, "healthCheck": {
            "path": "/readyz", "intervalMs": 50, "timeoutMs": 500,
            "unhealthyThreshold": 1, "healthyThreshold": 1 } })),
    );
    wait_for_health(&api, "flappy", true);
    let before = api.status_patches();
    let started = std::time::Instant::now();
    // Twenty verdict changes, each seen by the checker.
    for _ in 0..10 {
        let mark = lb.process.mark();
        post(format!("http://{}/admin/unready", backends[0].addr)).await;
        lb.process
            .wait_for_log_since(mark, "backend ejected", |_| true);
        let mark = lb.process.mark();
        post(format!("http://{}/admin/ready", backends[0].addr)).await;
        lb.process
            .wait_for_log_since(mark, "backend back in the rotation", |_| true);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = api.status_patches() - before;
    // One write per started interval at most, plus the last one after it.
    let allowed = elapsed.ceil() as usize + 1;
    assert!(
        writes <= allowed,
        "{writes} status writes for 20 changes in {elapsed:.1} s (at most {allowed})"
    );
    // The last verdict still lands.
    wait_for_health(&api, "flappy", true);
}

#[tokio::test]
async fn a_forbidden_status_write_is_logged_and_traffic_continues() {
    let backends = start_backends(1);
    let api = FakeApiServer::start(NAMESPACE).await;
    api.set_status_forbidden(true);
    api.apply_server(&server(
        "backend-1",
        &format!("http://{}", backends[0].addr),
    ));
    let (mut lb, _kubeconfig) = watching(&api, servers_config(json!({})));
    let line = lb.process.wait_for_log(
        "cannot write the health of Server backend-1 to its status: forbidden",
        |_| true,
    );
    assert_eq!(line["level"], "ERROR");
    assert!(line["message"].as_str().unwrap().contains("servers/status"));
    assert_eq!(answered_by(&lb, 4).await, names(&["backend-1"]));
}

// === DNS ===

/// `dnsmasq` on loopback, answering for `records` only.
struct Dnsmasq {
    _process: Process,
    addr: SocketAddr,
}

/// `dnsmasq` on a port free for both UDP and TCP (it binds both); tried
/// again on another port if it loses a race for that one.
fn start_dnsmasq(records: &[String]) -> Dnsmasq {
    for _ in 0..5 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        drop((tcp, udp));
        let mut command = common::testkit::tool("dnsmasq");
        command.args([
            "--keep-in-foreground",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            &format!("--port={port}"),
        ]);
        command.args(records);
        let mut process = Process::start("dnsmasq", command);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        if answers(addr, &mut process) {
            return Dnsmasq {
                _process: process,
                addr,
            };
        }
    }
    panic!("dnsmasq did not start on a free loopback port in 5 tries");
}

/// Whether the DNS server at `addr` answers (before `process` exits).
fn answers(addr: SocketAddr, process: &mut Process) -> bool {
    let answered = poll(PATIENCE, || {
        if !process.is_running() {
            return Some(false);
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .ok()?;
        // A query for `.` of type NS, id 1.
        socket
            .send_to(&[0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1], addr)
            .ok()?;
        let mut buffer = [0u8; 512];
        socket.recv(&mut buffer).ok().map(|_| true)
    });
    answered == Some(true)
}

#[tokio::test]
async fn a_server_url_without_a_port_finds_it_in_dns_srv() {
    let backends = start_backends(1);
    let name = "backend.lb-test.svc.cluster.local";
    let dns = start_dnsmasq(&[
        format!("--host-record={name},127.0.0.1"),
        format!(
            "--srv-host=_http._tcp.{name},{name},{}",
            backends[0].addr.port()
        ),
    ]);
    let api = FakeApiServer::start(NAMESPACE).await;
    api.apply_server(&server("by-name", &format!("http://{name}/")));
    let (mut lb, _kubeconfig) = watching(
        &api,
        servers_config(json!({ "dnsServer": dns.addr.to_string() })),
    );
    let line = lb
        .process
        .wait_for_log("backends changed", |l| l["total"] == 1);
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains(&backends[0].addr.to_string()),
        "{line}"
    );
    assert_eq!(answered_by(&lb, 3).await, names(&["backend-1"]));
    wait_for_health(&api, "by-name", true);
}
