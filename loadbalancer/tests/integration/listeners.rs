//! Every listening port against clients that hold connections without
//! using them, speak the wrong protocol, or push the process to its file
//! descriptor limit.

use std::net::SocketAddr;

use crate::support::*;
use common::testkit::{Http, PATIENCE, binary, poll_async};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn a_client_that_sends_nothing_or_half_a_head_is_disconnected_on_every_port() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({ "headerReadTimeoutMs": 300 }));
    let backend = start_backend_with(json!({ "port": 0, "headerReadTimeoutMs": 300 }));

    for (port, addr) in [
        ("proxy", lb.addr),
        ("admin", lb.admin),
        ("backend", backend.addr),
    ] {
        for sent in [&b""[..], b"GET /hea"] {
            let closed = wait_for_close(addr, sent).await;
            assert!(
                closed.is_some(),
                "the {port} port kept a connection open that sent {:?}",
                String::from_utf8_lossy(sent)
            );
        }
    }
    // An idle keep-alive connection, between two requests, too.
    let mut kept = TcpStream::connect(lb.addr).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut kept).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut kept, &mut rest),
    )
    .await;
    assert!(closed.is_ok(), "an idle keep-alive connection stays open");
}

#[tokio::test]
async fn a_client_that_stops_inside_the_http2_preface_is_disconnected() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({ "headerReadTimeoutMs": 300 }));
    // The first half of the preface `curl --http2-prior-knowledge` sends:
    // not yet HTTP/2, not HTTP/1.1 either; then nothing.
    let started = std::time::Instant::now();
    let answer = wait_for_close(lb.addr, b"PRI * HTTP/2.0\r\n")
        .await
        .expect("the connection is closed");
    assert!(answer.is_empty(), "{answer:?}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
}

#[tokio::test]
async fn the_listen_backlog_is_large_by_default_and_configurable() {
    let backends = start_backends(1);
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let default = start_load_balancer(&[backends[0].addr], json!({}));
    assert_eq!(listen_backlog(default.addr), 1024.min(somaxconn));
    let small = start_load_balancer(&[backends[0].addr], json!({ "listenBacklog": 7 }));
    assert_eq!(listen_backlog(small.addr), 7);
    assert_eq!(listen_backlog(small.admin), 7);
}

/// The backlog of a listening socket, as `ss` reports it (the Send-Q of a
/// socket in LISTEN state).
fn listen_backlog(addr: SocketAddr) -> u32 {
    let output = common::testkit::tool("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .expect("ss (iproute2) is installed");
    let text = String::from_utf8_lossy(&output.stdout);
    let columns: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(columns.first(), Some(&"LISTEN"), "{text}");
    columns[2].parse().unwrap()
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let backends = start_backends(1);
    let mut lb = start_load_balancer_under(
        "--nofile=256:4096",
        json!({ "discovery": "static", "backends": [backends[0].addr.to_string()] }),
    );
    let line = lb
        .process
        .wait_for_log("raised the open file limit", |_| true);
    assert_eq!(
        (line["from"].as_u64(), line["to"].as_u64()),
        (Some(256), Some(4096))
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", lb.process.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["4096", "4096"]
    );
}

/// At its own file descriptor limit the load balancer cannot open a
/// connection to a backend. That is not the backend's fault: the client gets
/// a 503 that says so, and the backend stays in the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_not_blamed_on_the_backend() {
    let mut backends = start_backends(1);
    let backend = backends[0].addr;
    let mut lb = start_load_balancer_under(
        "--nofile=64:64",
        json!({
            "discovery": "static",
            "backends": [backend.to_string()],
            "cooldownMs": 30000,
            "headerReadTimeoutMs": 60000,
        }),
    );
    lb.process
        .wait_for_log("open file limit", |l| l["limit"] == 64);

    // Two client connections, accepted while descriptors are free.
    let mut idle = TcpStream::connect(lb.addr).await.unwrap();
    let mut busy = TcpStream::connect(lb.addr).await.unwrap();
    busy.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut busy).await.starts_with("HTTP/1.1 200"));

    // Fill every descriptor the load balancer has left.
    let mut fillers = Vec::new();
    for _ in 0..100 {
        fillers.push(TcpStream::connect(lb.addr).await.unwrap());
    }
    lb.process.wait_for_log("accept failed", |_| true);

    // The pooled backend connection is busy with a slow request...
    busy.write_all(b"GET /work?ms=2000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    backends[0].process.wait_for_log("work started", |_| true);
    // ...so this one needs a new connection, and there is no descriptor for it.
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let refused = read_response(&mut idle).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains("short of its own resources") && refused.contains("not at fault"),
        "{refused}"
    );
    lb.process
        .wait_for_log("the load balancer is out of file descriptors", |l| {
            l["level"] == "ERROR"
        });

    drop(fillers);
    assert!(read_response(&mut busy).await.starts_with("HTTP/1.1 200"));
    let http = Http::new();
    let served = poll_async(PATIENCE, || async {
        http.try_get(&lb.url("/"))
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    assert!(
        served.is_some(),
        "the backend was never taken out of the rotation"
    );
    let listed = http.get(&lb.admin_url("/backends")).await.json();
    assert_eq!(listed["backends"][0]["coolingDown"], false, "{listed}");
}

/// Starts the load balancer under `prlimit LIMIT`, with `config` over the
/// test defaults.
fn start_load_balancer_under(limit: &str, config: serde_json::Value) -> LoadBalancer {
    let mut full = json!({ "port": 0, "adminPort": 0, "drainDelayMs": 200 });
    full.as_object_mut()
        .unwrap()
        .extend(config.as_object().unwrap().clone());
    let file = write_config(&full);
    let mut command = common::testkit::tool("prlimit");
    command
        .arg(limit)
        .arg("--")
        .arg(binary("loadbalancer"))
        .args(["--host", "127.0.0.1", "--config"])
        .arg(file.path());
    LoadBalancer::start(command, Some(file))
}
