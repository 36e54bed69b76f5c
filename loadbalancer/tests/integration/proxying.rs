//! What the load balancer does to a request on the way to a backend and
//! back, with real `backend` processes and the real `loadbalancer` binary.

use std::collections::BTreeMap;

use crate::support::*;
use bytes::Bytes;
use common::testkit::{Http, streaming_body};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::Request;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

fn count_by_pod(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn sequential_requests_are_spread_exactly_evenly() {
    let backends = start_backends(3);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = start_load_balancer(&addrs, json!({}));
    let http = Http::new();

    let mut names = Vec::new();
    for _ in 0..300 {
        let reply = http.get(&lb.url("/")).await;
        assert_eq!(reply.status, 200);
        let pod = reply.json()["podName"].as_str().unwrap().to_owned();
        let served_by = reply.header("x-served-by").unwrap().to_owned();
        let backend = backends.iter().find(|b| b.name == pod).unwrap();
        assert_eq!(
            served_by,
            backend.addr.to_string(),
            "x-served-by names the backend"
        );
        names.push(pod);
    }
    let expected: BTreeMap<String, usize> =
        backends.iter().map(|b| (b.name.clone(), 100)).collect();
    assert_eq!(count_by_pod(names.clone()), expected);
    assert_ne!(
        names[0], names[1],
        "consecutive requests go to different pods"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_spread_exactly_evenly() {
    let backends = start_backends(3);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = start_load_balancer(&addrs, json!({}));
    let url = lb.url("/");

    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = Http::new();
                let mut names = Vec::new();
                for _ in 0..60 {
                    let reply = http.get(&url).await;
                    assert_eq!(reply.status, 200);
                    names.push(reply.json()["podName"].as_str().unwrap().to_owned());
                }
                names
            })
        })
        .collect();
    let mut names = Vec::new();
    for task in tasks {
        names.extend(task.await.unwrap());
    }
    let expected: BTreeMap<String, usize> =
        backends.iter().map(|b| (b.name.clone(), 160)).collect();
    assert_eq!(count_by_pod(names), expected);
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_arrive_intact_both_ways() {
    let backends = start_backends(2);
    let lb = start_load_balancer(&[backends[0].addr, backends[1].addr], json!({}));
    let http = Http::new();

    for size in [0, 1024, 10 << 20] {
        let body = pseudo_random(size, size as u64);
        let request = Request::post(lb.url("/echo"))
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let reply = http.send(request).await.unwrap();
        assert_eq!(reply.status, 200, "{size} bytes");
        assert_eq!(
            sha256(&reply.body),
            sha256(&body),
            "{size} bytes echoed intact"
        );
    }

    // A chunked upload of unknown length, sent piece by piece.
    let (mut sender, body) = streaming_body();
    let request = Request::post(lb.url("/echo")).body(body).unwrap();
    let upload = tokio::spawn({
        let http = http.clone();
        async move { http.send(request).await }
    });
    let mut sent = Sha256::new();
    for i in 0..20 {
        let chunk = Bytes::from(pseudo_random(100_000, i));
        sent.update(&chunk);
        sender.send_data(chunk).await.unwrap();
    }
    drop(sender);
    let reply = upload.await.unwrap().unwrap();
    assert_eq!(reply.body.len(), 2_000_000);
    assert_eq!(sha256(&reply.body), sent.finalize().to_vec());

    // A large streamed download.
    let n = 64 << 20;
    let reply = http.get(&lb.url(&format!("/bytes?n={n}"))).await;
    let expected: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    assert_eq!(reply.body.len(), n);
    assert_eq!(sha256(&reply.body), sha256(&expected));
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set() {
    let mut upstream = raw_upstream(Some(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-internal\r\nX-Internal: secret\r\n\
         Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: x-sum\r\nX-App: kept\r\n\r\nok",
    ))
    .await;
    let lb = start_load_balancer(&[upstream.addr], json!({}));

    let response = raw_exchange(
        lb.addr,
        b"GET /path?q=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: close, x-secret\r\n\
          X-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\n\
          Proxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.1\r\nX-Custom: kept\r\n\r\n",
    )
    .await;

    let head = upstream.heads.recv().await.unwrap();
    assert!(head.starts_with("GET /path?q=1 HTTP/1.1\r\n"), "{head}");
    for dropped in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert_eq!(
            raw_header(&head, dropped),
            None,
            "{dropped} forwarded:\n{head}"
        );
    }
    assert_eq!(
        raw_headers(&head, "x-forwarded-for"),
        ["203.0.113.1, 127.0.0.1"]
    );
    assert_eq!(raw_header(&head, "x-forwarded-proto"), Some("http"));
    assert_eq!(raw_header(&head, "x-forwarded-host"), Some("shop.example"));
    assert_eq!(
        raw_header(&head, "host"),
        Some("shop.example"),
        "client's Host kept"
    );
    assert_eq!(raw_header(&head, "x-custom"), Some("kept"));

    let (response_head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(response_head.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert_eq!(body, "ok");
    for dropped in ["x-internal", "keep-alive", "proxy-authenticate", "trailer"] {
        assert_eq!(
            raw_header(response_head, dropped),
            None,
            "{dropped} returned:\n{response_head}"
        );
    }
    assert_eq!(raw_header(response_head, "x-app"), Some("kept"));
    assert_eq!(
        raw_header(response_head, "x-served-by"),
        Some(upstream.addr.to_string().as_str())
    );
}

#[tokio::test]
async fn head_204_and_304_have_no_body_and_keep_the_connection_usable() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({}));
    // One keep-alive connection: a stray body byte would corrupt the next answer.
    let http = Http::new();
    let head = http
        .send(
            Request::head(lb.url("/"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!((head.status.as_u16(), head.body.len()), (200, 0));
    for code in [204, 304] {
        let reply = http.get(&lb.url(&format!("/status/{code}"))).await;
        assert_eq!((reply.status.as_u16(), reply.body.len()), (code, 0));
    }
    assert_eq!(http.get(&lb.url("/")).await.json()["podName"], "backend-1");
}

#[tokio::test]
async fn an_http_1_0_client_gets_a_complete_answer() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({}));
    // /bytes is chunked from the backend; an HTTP/1.0 client cannot read chunked.
    // n=120 keeps the pattern ASCII, so the raw response reads as text.
    let response = raw_exchange(lb.addr, b"GET /bytes?n=120 HTTP/1.0\r\n\r\n").await;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 OK"),
        "{head}"
    );
    assert_eq!(raw_header(head, "transfer-encoding"), None, "{head}");
    let expected: Vec<u8> = (0..120u8).collect();
    assert_eq!(body.as_bytes(), expected);
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let backends = start_backends(2);
    let lb = start_load_balancer(&[backends[0].addr, backends[1].addr], json!({}));
    let (mut socket, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", lb.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-served-by"));
    for text in ["hello", "through the load balancer"] {
        socket.send(Message::text(text)).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(text));
    }
    socket.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn health_is_served_on_the_admin_port_only() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({}));
    let http = Http::new();
    let ready = http.get(&lb.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json(), json!({ "status": "ready", "backends": 1 }));
    let listed = http.get(&lb.admin_url("/backends")).await.json();
    assert_eq!(
        listed["backends"][0]["address"],
        backends[0].addr.to_string()
    );
    // On the proxy port, /healthz is just another path for the backend.
    let proxied = http.get(&lb.url("/healthz")).await;
    assert_eq!(
        proxied.header("x-served-by"),
        Some(backends[0].addr.to_string().as_str())
    );
}

/// An HTTP/1.1 upstream that answers `ok` (nothing to HEAD) and counts the
/// connections it accepted.
async fn counting_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_backend_connection_is_reused_until_it_idles_past_the_pool_timeout() {
    use std::sync::atomic::Ordering;
    let (upstream, accepted) = counting_upstream().await;
    let lb = start_load_balancer(&[upstream], json!({ "poolIdleTimeoutMs": 300 }));
    let http = Http::new();
    for i in 0..20 {
        // HEAD answers have no body to read: the connection goes back at once.
        let method = if i % 2 == 0 { "GET" } else { "HEAD" };
        let request = Request::builder()
            .method(method)
            .uri(lb.url("/"))
            .body(Full::<Bytes>::default())
            .unwrap();
        assert_eq!(http.send(request).await.unwrap().status, 200);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );

    // Idle for longer than poolIdleTimeoutMs: not reused. (The wait is the
    // behaviour under test, not a guess at how long something takes.)
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(http.get(&lb.url("/")).await.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a fresh connection");
}
