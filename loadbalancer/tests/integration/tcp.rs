//! TCP mode: a backend per connection, bytes both ways, half-close,
//! draining, and no leak, against real processes on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use common::testkit::{Http, PATIENCE, poll};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// `n` backends with their TCP echo port on; each with that port's address.
fn start_tcp_backends(n: usize) -> Vec<(Backend, SocketAddr)> {
    (1..=n)
        .map(|i| {
            let mut backend =
                start_backend_named(&format!("backend-{i}"), json!({ "port": 0, "tcpPort": 0 }));
            let tcp = backend.process.listening_on("tcp");
            (backend, tcp)
        })
        .collect()
}

/// A TCP-mode load balancer over `backends` with `extra` config.
fn start_tcp_load_balancer(
    backends: &[(Backend, SocketAddr)],
    extra: serde_json::Value,
) -> LoadBalancer {
    let addrs: Vec<SocketAddr> = backends.iter().map(|(_, tcp)| *tcp).collect();
    let mut config = json!({ "mode": "tcp" });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    start_load_balancer(&addrs, config)
}

/// A connection through the load balancer, and the pod that greeted it.
async fn connect(lb: &LoadBalancer) -> (BufReader<TcpStream>, String) {
    let stream = TcpStream::connect(lb.addr).await.unwrap();
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    tokio::time::timeout(PATIENCE, stream.read_line(&mut greeting))
        .await
        .expect("a greeting")
        .unwrap();
    let pod = greeting
        .trim_end()
        .strip_prefix("hello from ")
        .unwrap_or_else(|| panic!("unexpected greeting {greeting:?}"))
        .to_owned();
    (stream, pod)
}

/// Sends a line and reads it back.
async fn echo(stream: &mut BufReader<TcpStream>, text: &str) -> String {
    stream
        .get_mut()
        .write_all(format!("{text}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_line(&mut line)).await;
    match read {
        Ok(Ok(_)) => line.trim_end().to_owned(),
        _ => String::new(),
    }
}

/// Whether the load balancer closes `stream` (EOF or reset) within `within`.
async fn closes_within(stream: &mut BufReader<TcpStream>, within: Duration) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test]
async fn long_lived_connections_spread_evenly_with_least_connections() {
    let backends = start_tcp_backends(3);
    let lb = start_tcp_load_balancer(&backends, json!({}));
    let mut open = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..90 {
        let (stream, pod) = connect(&lb).await;
        *counts.entry(pod).or_default() += 1;
        open.push(stream);
    }
    let expected: BTreeMap<String, usize> = (1..=3).map(|i| (format!("backend-{i}"), 30)).collect();
    assert_eq!(counts, expected);

    // Every connection is live, and the metrics count them per backend.
    for stream in open.iter_mut().step_by(7) {
        assert_eq!(echo(stream, "still there").await, "still there");
    }
    let reply = Http::new().get(&lb.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&reply.body);
    for (_, tcp) in &backends {
        let series = format!("loadbalancer_tcp_connections{{backend=\"{tcp}\"}} 30");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    assert!(
        metrics.contains("loadbalancer_tcp_bytes_total{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_half_closed_connection_still_receives_the_rest() {
    let backends = start_tcp_backends(1);
    let lb = start_tcp_load_balancer(&backends, json!({}));
    let (mut stream, _) = connect(&lb).await;
    let big = "x".repeat(200_000);
    let sent = format!("one\n{big}\nthree\n");
    stream.get_mut().write_all(sent.as_bytes()).await.unwrap();
    // Done sending: the backend sees EOF, echoes what is left, and closes.
    stream.get_mut().shutdown().await.unwrap();
    let mut received = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut received))
        .await
        .expect("the rest, then EOF")
        .unwrap();
    assert_eq!(received.len(), sent.len());
    assert_eq!(received, sent);
}

#[tokio::test]
async fn a_killed_backend_closes_its_connections_and_new_ones_go_elsewhere() {
    let mut backends = start_tcp_backends(3);
    let lb = start_tcp_load_balancer(&backends, json!({}));
    let mut open = Vec::new();
    for _ in 0..9 {
        open.push(connect(&lb).await);
    }
    backends[0].0.process.kill();
    for (stream, pod) in open.iter_mut() {
        if pod == "backend-1" {
            assert!(
                closes_within(stream, PATIENCE).await,
                "a connection to the killed backend closes"
            );
        } else {
            assert_eq!(echo(stream, "fine").await, "fine");
        }
    }
    for _ in 0..12 {
        let (_, pod) = connect(&lb).await;
        assert_ne!(pod, "backend-1", "new connections go to the living");
    }
}

#[tokio::test]
async fn a_backend_that_leaves_discovery_keeps_its_connections_until_the_drain_timeout() {
    let backends = start_tcp_backends(2);
    let tcp: Vec<String> = backends.iter().map(|(_, a)| a.to_string()).collect();
    let config = |list: &[String]| {
        json!({
            "port": 0, "adminPort": 0, "mode": "tcp", "discovery": "static",
            "backends": list, "drainTimeoutMs": 1500, "logLevel": "info",
        })
    };
    let mut configmap = ConfigMapDir::new(&config(&tcp));
    let mut lb = start_load_balancer_from(&configmap);
    let (first, pod_1) = connect(&lb).await;
    let (second, pod_2) = connect(&lb).await;
    assert_ne!(pod_1, pod_2);
    let (mut leaving, mut staying) = if pod_1 == "backend-1" {
        (first, second)
    } else {
        (second, first)
    };

    let mark = lb.process.mark();
    configmap.write(&config(&tcp[1..]).to_string());
    lb.process
        .wait_for_log_since(mark, "backends changed", |l| l["total"] == 1);
    let left_at = std::time::Instant::now();
    // Removed, but still served: the connection drains.
    assert_eq!(echo(&mut leaving, "draining").await, "draining");
    for _ in 0..4 {
        assert_eq!(connect(&lb).await.1, "backend-2");
    }
    assert!(
        closes_within(&mut leaving, PATIENCE).await,
        "closed after the drain timeout"
    );
    assert!(
        left_at.elapsed() >= Duration::from_millis(1400),
        "not before it"
    );
    assert_eq!(echo(&mut staying, "unaffected").await, "unaffected");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let backends = start_tcp_backends(1);
    let lb = start_tcp_load_balancer(&backends, json!({ "tcpIdleTimeoutMs": 300 }));
    let (mut stream, _) = connect(&lb).await;
    // Talking keeps it open past the timeout...
    for _ in 0..4 {
        assert_eq!(echo(&mut stream, "busy").await, "busy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...silence closes it.
    assert!(closes_within(&mut stream, PATIENCE).await);
}

#[tokio::test]
async fn ten_thousand_short_connections_leak_no_file_descriptor() {
    let backends = start_tcp_backends(2);
    let lb = start_tcp_load_balancer(&backends, json!({ "accessLog": false }));
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let pid = lb.process.pid();
    let before = fds(pid);
    let addr = lb.addr;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..500 {
                    let mut stream = TcpStream::connect(addr).await.unwrap();
                    let mut greeting = [0u8; 6];
                    stream.read_exact(&mut greeting).await.unwrap();
                    assert_eq!(&greeting, b"hello ");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let settled = poll(PATIENCE, || (fds(pid) <= before + 2).then_some(()));
    assert!(
        settled.is_some(),
        "open descriptors: {} before, {} after 10,000 connections",
        before,
        fds(pid)
    );
}

#[tokio::test]
async fn on_sigterm_open_connections_finish_and_new_ones_are_refused() {
    let backends = start_tcp_backends(1);
    let mut lb = start_tcp_load_balancer(&backends, json!({ "drainDelayMs": 0 }));
    let (mut stream, _) = connect(&lb).await;
    lb.process.terminate();
    lb.process.wait_for_log("stopped accepting", |_| true);
    assert!(
        TcpStream::connect(lb.addr).await.is_err(),
        "no longer accepting"
    );
    assert_eq!(echo(&mut stream, "after sigterm").await, "after sigterm");
    assert!(lb.process.is_running(), "waits for the open connection");
    drop(stream);
    assert!(lb.process.wait_exit().success());
    let said = |text: &str| {
        lb.process
            .logs()
            .iter()
            .any(|l| l["message"].as_str().unwrap_or("").starts_with(text))
    };
    assert!(said("all connections closed"), "{:?}", lb.process.logs());
}

#[tokio::test]
async fn a_connection_that_moves_no_first_byte_is_closed_long_before_the_idle_timeout() {
    let upstream = mute_upstream().await;
    let lb = start_load_balancer(
        &[upstream],
        json!({ "mode": "tcp", "tcpFirstByteTimeoutMs": 300, "tcpIdleTimeoutMs": 600000 }),
    );
    let closed = wait_for_close(lb.addr, b"").await;
    assert!(
        closed.is_some(),
        "a client that said nothing to a backend that said nothing kept its connection"
    );
}

#[tokio::test]
async fn out_of_file_descriptors_tcp_mode_never_ejects_a_backend_and_still_stops_on_sigterm() {
    let backends = start_tcp_backends(1);
    let config = json!({
        "port": 0, "adminPort": 0, "drainDelayMs": 200, "mode": "tcp",
        "discovery": "static", "backends": [backends[0].1.to_string()],
        "cooldownMs": 30000, "shutdownTimeoutMs": 1000,
    });
    let file = write_config(&config);
    let mut command = common::testkit::tool("prlimit");
    command
        .arg("--nofile=64:64")
        .arg("--")
        .arg(common::testkit::binary("loadbalancer"))
        .args(["--host", "127.0.0.1", "--config"])
        .arg(file.path());
    let mut lb = LoadBalancer::start(command, Some(file));
    lb.process
        .wait_for_log("open file limit", |l| l["limit"] == 64);

    // Each relayed connection takes two descriptors (client, backend), so
    // whether the last free one goes to an accept or to a connect depends on
    // how many were free. Fill them; if an accept was what failed, free them
    // all, hold one more descriptor with an idle admin connection, and fill
    // again: now a connect to the backend is what fails.
    let open_fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let at_rest = open_fds(lb.process.pid());
    let mut admin = None;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mark = lb.process.mark();
        for _ in 0..60 {
            clients.push(TcpStream::connect(lb.addr).await.unwrap());
        }
        let connect_failed = poll(PATIENCE / 3, || {
            let logs = lb.process.logs();
            logs.iter()
                .skip(mark)
                .any(|l| l["level"] == "ERROR")
                .then_some(())
        });
        if connect_failed.is_some() {
            break;
        }
        clients.clear();
        let pid = lb.process.pid();
        let freed = poll(PATIENCE, || (open_fds(pid) <= at_rest).then_some(()));
        assert!(freed.is_some(), "the relays never closed");
        admin = Some(TcpStream::connect(lb.admin).await.unwrap());
    }
    lb.process
        .wait_for_log("the load balancer is out of file descriptors", |l| {
            l["level"] == "ERROR"
        });
    // (The admin port cannot accept now either: the logs tell.)
    let blamed: Vec<_> = lb
        .process
        .logs()
        .into_iter()
        .filter(|l| {
            l["message"] == "cannot connect to backend; trying another"
                || l["message"] == "backend ejected from the rotation"
                // One throttled line says it; not one per client.
                || l["message"] == "no backend could take the TCP connection; closing it"
        })
        .collect();
    assert!(
        blamed.is_empty(),
        "our own shortage was blamed on the backend, or logged per client: {blamed:?}"
    );

    // Starved, it still stops when told to, within its shutdown timeout.
    lb.process.terminate();
    let exited = poll(PATIENCE, || (!lb.process.is_running()).then_some(()));
    assert!(
        exited.is_some(),
        "SIGTERM did not stop a starved load balancer"
    );
    drop((clients, admin));
}
