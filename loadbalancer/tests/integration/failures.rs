//! How the load balancer behaves when things go wrong: dead and slow
//! backends, bad clients, bad config, and shutdown in the middle of work.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::*;
use bytes::Bytes;
use common::testkit::{Http, PATIENCE, Process, binary, poll_async, streaming_body};
use http_body_util::Full;
use hyper::Request;
use nix::sys::signal::Signal;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_backend_under_load_fails_no_get() {
    let mut backends = start_backends(3);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = start_load_balancer(&addrs, json!({}));
    let done = Arc::new(AtomicUsize::new(0));
    let total = 600;

    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (url, done) = (lb.url("/"), done.clone());
            tokio::spawn(async move {
                let http = Http::new();
                let mut failures = Vec::new();
                while done.fetch_add(1, Ordering::Relaxed) < total {
                    match http.try_get(&url).await {
                        Ok(reply) if reply.status == 200 => {}
                        Ok(reply) => failures.push(format!("{}: {:?}", reply.status, reply.body)),
                        Err(error) => failures.push(error),
                    }
                }
                failures
            })
        })
        .collect();

    poll_async(PATIENCE, || async {
        (done.load(Ordering::Relaxed) >= 150).then_some(())
    })
    .await
    .expect("load is running");
    backends[1].process.kill();

    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    let after: Vec<String> = futures_util::future::join_all(
        (0..6).map(|_| async { Http::new().get(&lb.url("/")).await.json()["podName"].to_string() }),
    )
    .await;
    assert!(
        !after.iter().any(|pod| pod.contains("backend-2")),
        "{after:?}"
    );
}

#[tokio::test]
async fn with_every_backend_down_requests_get_503_json() {
    let mut backends = start_backends(2);
    let lb = start_load_balancer(&[backends[0].addr, backends[1].addr], json!({}));
    for backend in &mut backends {
        backend.process.kill();
    }
    let http = Http::new();
    for _ in 0..3 {
        let reply = http.get(&lb.url("/")).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .starts_with("no backend"),
            "{:?}",
            reply.json()
        );
    }
    let listed = http.get(&lb.admin_url("/backends")).await.json();
    assert_eq!(listed["backends"][0]["coolingDown"], true);
    // The cause, said once: not "refused (os error 111): ...refused (os error 111)".
    let error = listed["backends"][0]["lastError"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(error.matches("os error").count(), 1, "{error}");
}

#[tokio::test]
async fn a_backend_that_comes_back_is_used_again_after_its_cooldown() {
    let backends = start_backends(1);
    // An address nothing listens on yet, which then starts listening.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let late_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let lb = start_load_balancer(&[backends[0].addr, late_addr], json!({ "cooldownMs": 100 }));
    let http = Http::new();
    for _ in 0..4 {
        assert_eq!(
            http.get(&lb.url("/")).await.status,
            200,
            "the dead one is skipped"
        );
    }
    let late = tokio::net::TcpListener::bind(late_addr).await.unwrap();
    let _upstream = tokio::spawn(async move {
        while let Ok((mut stream, _)) = late.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate",
                    )
                    .await;
            });
        }
    });
    let served = poll_async(PATIENCE, || async {
        let reply = http.get(&lb.url("/")).await;
        (reply.body == "late").then_some(())
    })
    .await;
    assert!(
        served.is_some(),
        "the recovered backend is back in the rotation"
    );
}

#[tokio::test]
async fn a_failure_after_sending_is_502_and_a_slow_backend_504() {
    // An upstream that reads the request and hangs up without answering.
    let hang_up = raw_upstream(None).await;
    let lb = start_load_balancer(&[hang_up.addr], json!({}));
    let reply = Http::new()
        .send(
            Request::post(lb.url("/echo"))
                .body(Full::new(Bytes::from("data")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 502);
    assert!(
        reply.json()["error"].as_str().unwrap().contains("failed"),
        "{:?}",
        reply.json()
    );

    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({ "requestTimeoutMs": 300 }));
    let reply = Http::new().get(&lb.url("/work?ms=5000")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.json()["error"],
        format!("backend {} did not answer within 300 ms", backends[0].addr)
    );
}

#[tokio::test]
async fn bad_requests_are_refused_and_everyone_else_is_still_served() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({ "headerReadTimeoutMs": 300 }));

    let garbage = raw_exchange(lb.addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let refused = raw_exchange(lb.addr, huge.as_bytes()).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");

    let connect = raw_exchange(
        lb.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert!(connect.contains("\"error\""), "{connect}");

    // A client that never finishes its headers is disconnected...
    let mut slow = TcpStream::connect(lb.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // ...while everyone else is served meanwhile.
    assert_eq!(Http::new().get(&lb.url("/")).await.status, 200);
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest))
        .await
        .expect("a slow client is disconnected after headerReadTimeoutMs")
        .ok();
    assert_eq!(Http::new().get(&lb.url("/")).await.status, 200);
}

#[tokio::test]
async fn an_absolute_form_target_never_reaches_another_host() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({}));
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = elsewhere.local_addr().unwrap();

    let request = format!(
        "GET http://{target}/secret HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    );
    let response = raw_exchange(lb.addr, request.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 404"),
        "the backend answered: {response}"
    );
    assert!(response.contains("no route for GET /secret"), "{response}");
    assert!(
        raw_header(&response, "x-served-by") == Some(backends[0].addr.to_string().as_str()),
        "{response}"
    );
    // The answer came from the backend, so any connection to `target` would
    // already be in its accept queue.
    let contacted = tokio::time::timeout(std::time::Duration::ZERO, elsewhere.accept()).await;
    assert!(
        contacted.is_err(),
        "the load balancer connected to {target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_upload_lets_it_finish_then_exits_zero() {
    let backends = start_backends(1);
    let mut lb = start_load_balancer(&[backends[0].addr], json!({ "drainDelayMs": 200 }));

    let (mut sender, body) = streaming_body();
    let request = Request::post(lb.url("/echo")).body(body).unwrap();
    let upload = tokio::spawn(async move { Http::new().send(request).await });
    let mut sent = Sha256::new();
    let mut send = async |i: u64| {
        let chunk = Bytes::from(pseudo_random(256 * 1024, i));
        sent.update(&chunk);
        sender.send_data(chunk).await.unwrap();
    };
    for i in 0..8 {
        send(i).await;
    }

    lb.process.terminate();
    lb.process.wait_for_log(
        "readiness now failing; still accepting during the drain delay",
        |_| true,
    );
    let readyz = Http::new().get(&lb.admin_url("/readyz")).await;
    assert_eq!(
        readyz.status, 503,
        "readiness fails as soon as shutdown starts"
    );
    lb.process
        .wait_for_log("stopped accepting; waiting for in-flight requests", |_| {
            true
        });
    assert!(
        TcpStream::connect(lb.addr).await.is_err(),
        "new connections are refused"
    );

    for i in 8..16 {
        send(i).await;
    }
    drop(sender);
    let reply = upload.await.unwrap().expect("the upload completes");
    assert_eq!(reply.status, 200);
    assert_eq!(
        Sha256::digest(&reply.body).to_vec(),
        sent.finalize().to_vec()
    );
    assert!(lb.process.wait_exit().success(), "exit status 0");
}

#[test]
fn bad_config_and_busy_ports_stop_startup_with_a_clear_message() {
    let config = write_config(
        &json!({ "discovery": "static", "backends": ["127.0.0.1:9001", "backend:80"] }),
    );
    let mut command = Command::new(binary("loadbalancer"));
    command.arg("--config").arg(config.path());
    let mut process = Process::start("loadbalancer", command);
    assert_eq!(process.wait_exit().code(), Some(1));
    let stderr = process.stderr();
    assert!(
        stderr.contains(&config.path().display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains("field `backends[1]`: \"backend:80\" is not an IP:port address"),
        "{stderr}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let mut command = Command::new(binary("loadbalancer"));
    command.args([
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--admin-port",
        "0",
        "--backends",
        "127.0.0.1:9001",
    ]);
    let mut process = Process::start("loadbalancer", command);
    assert_eq!(process.wait_exit().code(), Some(1));
    let stderr = process.stderr();
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (the proxy port)"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--port"), "{stderr}");
}

// === Broken backends ===

#[tokio::test]
async fn a_content_length_beside_chunked_encoding_never_truncates_the_body() {
    // RFC 9112, 6.3: Transfer-Encoding wins, the 5 is wrong.
    let upstream = raw_upstream(Some(
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
         14\r\nABCDEFGHIJKLMNOPQRST\r\n0\r\n\r\n",
    ))
    .await;
    let lb = start_load_balancer(&[upstream.addr], json!({}));
    let reply = Http::new().get(&lb.url("/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "ABCDEFGHIJKLMNOPQRST");
    assert_eq!(reply.header("content-length"), None);
}

#[tokio::test]
async fn a_101_to_a_request_that_did_not_ask_to_upgrade_is_a_502() {
    let upstream = raw_upstream(Some(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ))
    .await;
    let lb = start_load_balancer(&[upstream.addr], json!({}));
    let http = Http::new();
    for request in [
        Request::get(lb.url("/")).body(Full::default()).unwrap(),
        Request::post(lb.url("/"))
            .body(Full::new(Bytes::from("data")))
            .unwrap(),
    ] {
        let reply = http.send(request).await.unwrap();
        assert_eq!(reply.status, 502);
        assert_eq!(
            reply.json()["error"],
            format!(
                "backend {} failed: it answered 101 Switching Protocols to a request that did not ask to upgrade",
                upstream.addr
            )
        );
    }
}

#[tokio::test]
async fn a_get_to_a_backend_that_answers_garbage_gets_the_real_failure() {
    let upstream = raw_upstream(Some("\x16\x03\x01 not HTTP")).await;
    let lb = start_load_balancer(&[upstream.addr], json!({}));
    let reply = Http::new().get(&lb.url("/")).await;
    assert_eq!(reply.status, 502, "{:?}", reply.json());
    let error = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with(&format!("backend {} failed: ", upstream.addr)),
        "{error}"
    );
    assert!(error.contains("invalid HTTP"), "names the cause: {error}");
}

#[tokio::test]
async fn a_backend_that_stalls_mid_body_is_cut_off_after_the_body_idle_timeout() {
    // Headers and 3 of 100 body bytes, then nothing.
    let upstream = raw_upstream(Some("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")).await;
    let mut lb = start_load_balancer(&[upstream.addr], json!({ "bodyIdleTimeoutMs": 300 }));
    let answer = wait_for_close(lb.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("the client's connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nabc"), "{answer}");
    let logged = lb
        .process
        .wait_for_log("the backend's response body broke off", |_| true);
    assert_eq!(logged["backend"], upstream.addr.to_string());
    assert_eq!(logged["error"], "no data for 300 ms (bodyIdleTimeoutMs)");
}

// === Bad clients ===

#[tokio::test]
async fn an_upload_that_stalls_gets_408_and_one_that_is_malformed_400() {
    // A backend that reads but never answers: only the body can end it.
    let upstream = silent_upstream().await;
    let mut lb = start_load_balancer(&[upstream], json!({ "bodyIdleTimeoutMs": 300 }));

    let stalled = wait_for_close(
        lb.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
    )
    .await
    .expect("the connection is closed");
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(
        stalled.contains("the request body stalled: no data for 300 ms (bodyIdleTimeoutMs)"),
        "{stalled}"
    );

    let malformed = wait_for_close(
        lb.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    )
    .await
    .expect("the connection is closed");
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");
    assert!(
        malformed.contains("the request body could not be read"),
        "{malformed}"
    );
    lb.process
        .wait_for_log("the client's request body failed", |l| {
            l["level"] == "INFO" && l["error"].as_str().is_some_and(|e| e.contains("chunk"))
        });
    assert!(
        !lb.process
            .logs()
            .iter()
            .any(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
        "a client's fault is not logged against the backend: {:#?}",
        lb.process.logs()
    );
    let listed = Http::new().get(&lb.admin_url("/backends")).await.json();
    assert_eq!(listed["backends"][0]["coolingDown"], false);
}

#[tokio::test]
async fn an_upload_that_stalls_after_the_backend_answered_is_blamed_on_the_client() {
    // `/echo` answers at once and streams the upload back as it comes.
    let backends = start_backends(1);
    let mut lb = start_load_balancer(&[backends[0].addr], json!({ "bodyIdleTimeoutMs": 300 }));
    let answer = wait_for_close(
        lb.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
    )
    .await
    .expect("the exchange is ended");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nabc"), "{answer}");
    lb.process
        .wait_for_log("the client's request body failed", |l| {
            l["error"] == "no data for 300 ms (bodyIdleTimeoutMs)"
        });
    assert!(
        !lb.process.logs().iter().any(|l| l["level"] == "WARN"),
        "nothing is blamed on the backend: {:#?}",
        lb.process.logs()
    );
}

// === Config and signals ===

#[test]
fn a_config_that_is_not_a_small_regular_file_or_has_a_value_out_of_range_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("lb.json");
    assert!(
        common::testkit::tool("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let drain_forever = write_config(&json!({ "drainDelayMs": u64::MAX }));
    let cases = [
        (
            fifo.clone(),
            "not a regular file (it is a named pipe)".to_owned(),
        ),
        (
            "/dev/zero".into(),
            "not a regular file (it is a device)".to_owned(),
        ),
        (
            drain_forever.path().to_owned(),
            "field `drainDelayMs`: 18446744073709551615 ms is out of range: use 0 ms to 600000 ms"
                .to_owned(),
        ),
    ];
    for (path, expected) in cases {
        for binary_name in ["loadbalancer", "backend"] {
            if binary_name == "backend" && expected.contains("drainDelayMs") {
                continue;
            }
            let mut command = Command::new(binary(binary_name));
            command
                .env("LOADBALANCER_CONFIG", &path)
                .env("BACKEND_CONFIG", &path);
            let mut process = Process::start(binary_name, command);
            assert_eq!(
                process.wait_exit().code(),
                Some(1),
                "{binary_name} {path:?}"
            );
            let stderr = process.stderr();
            assert!(
                stderr.contains(&format!("{}", path.display())) && stderr.contains(&expected),
                "{binary_name}: {stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_config_and_stops_nothing_in_flight() {
    let mut backends = start_backends(1);
    let mut lb = start_load_balancer(&[backends[0].addr], json!({}));
    let http = Http::new();
    let slow = tokio::spawn({
        let (http, url) = (http.clone(), lb.url("/work?ms=1000"));
        async move { http.get(&url).await }
    });
    backends[0].process.wait_for_log("work started", |_| true);

    lb.process.signal(Signal::SIGHUP);
    backends[0].process.signal(Signal::SIGHUP);
    // Both read their config again (and find it unchanged).
    lb.process.wait_for_log("SIGHUP received", |_| true);
    backends[0]
        .process
        .wait_for_log("SIGHUP received", |_| true);

    assert_eq!(
        slow.await.unwrap().status,
        200,
        "the request in flight finished"
    );
    assert_eq!(http.get(&lb.url("/")).await.status, 200);
    assert!(lb.process.is_running() && backends[0].process.is_running());
}
