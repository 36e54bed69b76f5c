//! HTTP/2 with prior knowledge (h2c): one client connection whose requests
//! are balanced one by one, bodies and trailers both ways, h2c backends,
//! and HTTP/1.1 clients on the same port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::support::*;
use bytes::Bytes;
use common::testkit::Http;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};

/// One HTTP/2 connection to `addr`, prior knowledge, as
/// `curl --http2-prior-knowledge` opens it.
async fn h2_connection(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .version(Version::HTTP_2)
        .body(Full::default())
        .unwrap()
}

/// Sends `request` on `sender` and reads the whole answer.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> (Response<()>, Bytes, Option<hyper::HeaderMap>) {
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (
        Response::from_parts(parts, ()),
        collected.to_bytes(),
        trailers,
    )
}

#[tokio::test]
async fn the_requests_of_one_http2_connection_are_spread_over_every_backend() {
    let backends = start_backends(3);
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = start_load_balancer(&addrs, json!({}));
    let sender = h2_connection(lb.addr).await;

    // 300 requests at once, as streams of one connection.
    let requests = (0..300).map(|_| {
        let mut sender = sender.clone();
        let request = get(lb.addr, "/");
        async move { exchange(&mut sender, request).await }
    });
    let answers = futures_util::future::join_all(requests).await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (response, body, _) in answers {
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), Version::HTTP_2);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        *counts
            .entry(answer["podName"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let expected: BTreeMap<String, usize> =
        (1..=3).map(|i| (format!("backend-{i}"), 100)).collect();
    assert_eq!(counts, expected, "one connection, every backend");
}

#[tokio::test]
async fn http2_bodies_stream_both_ways_intact_and_http1_shares_the_port() {
    let backends = start_backends(2);
    let lb = start_load_balancer(&[backends[0].addr, backends[1].addr], json!({}));
    let mut sender = h2_connection(lb.addr).await;
    let sent = pseudo_random(5 << 20, 7);
    let request = Request::post(format!("http://{}/echo", lb.addr))
        .version(Version::HTTP_2)
        .body(Full::new(Bytes::from(sent.clone())))
        .unwrap();
    let (response, body, _) = exchange(&mut sender, request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(Sha256::digest(&body), Sha256::digest(&sent));

    // The host the client named (`:authority`) reaches the backend as Host.
    let (_, body, _) = exchange(&mut sender, get(lb.addr, "/headers")).await;
    let headers: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(headers["host"][0], lb.addr.to_string(), "{headers}");
    assert!(headers.get("x-forwarded-for").is_some(), "{headers}");

    // An HTTP/1.1 client on the same port, meanwhile.
    let reply = Http::new().get(&lb.url("/")).await;
    assert_eq!(reply.status, 200);
}

/// An h2c upstream that answers every request with its name, the HTTP
/// version and `te` it received, and a trailer; it echoes request trailers
/// back as `echoed-*` trailers. Returns its address and the connections it
/// accepted.
async fn h2c_upstream(name: &'static str) -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Mutex::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            *counted.lock().unwrap() += 1;
            let service =
                hyper::service::service_fn(move |request: Request<Incoming>| async move {
                    let version = format!("{:?}", request.version());
                    let te = request
                        .headers()
                        .get("te")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let collected = request.into_body().collect().await.unwrap();
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    for (key, value) in collected.trailers().into_iter().flatten() {
                        let echoed = format!("echoed-{key}");
                        trailers.insert(
                            hyper::header::HeaderName::from_bytes(echoed.as_bytes()).unwrap(),
                            value.clone(),
                        );
                    }
                    let body = json!({ "name": name, "version": version, "te": te }).to_string();
                    let frames = futures_util::stream::iter([
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(body))),
                        Ok(Frame::trailers(trailers)),
                    ]);
                    Ok::<_, std::convert::Infallible>(Response::new(StreamBody::new(frames)))
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn h2c_backends_take_every_request_over_one_connection_and_trailers_pass_both_ways() {
    let (first, first_connections) = h2c_upstream("first").await;
    let (second, second_connections) = h2c_upstream("second").await;
    let lb = start_load_balancer(&[first, second], json!({ "backendProtocol": "h2c" }));
    // 40 at once from a cold start: the first request to each backend makes
    // its connection, the others wait for it rather than open their own.
    let sender = h2_connection(lb.addr).await;

    let requests = (0..40).map(|_| {
        let mut sender = sender.clone();
        let request = Request::get(format!("http://{}/", lb.addr))
            .version(Version::HTTP_2)
            .header("te", "trailers")
            .body(Full::default())
            .unwrap();
        async move { exchange(&mut sender, request).await }
    });
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (response, body, trailers) in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), 200);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["version"], "HTTP/2.0");
        assert_eq!(answer["te"], "trailers", "gRPC's te: trailers is kept");
        assert_eq!(
            trailers.unwrap()["grpc-status"],
            "0",
            "response trailers pass"
        );
        *names
            .entry(answer["name"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        names,
        BTreeMap::from([("first".into(), 20), ("second".into(), 20)])
    );
    assert_eq!(*first_connections.lock().unwrap(), 1, "multiplexed");
    assert_eq!(*second_connections.lock().unwrap(), 1, "multiplexed");

    // Request trailers reach the backend.
    let stream = TcpStream::connect(lb.addr).await.unwrap();
    let (mut streaming, connection) =
        hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("checksum", "abc".parse().unwrap());
    let frames = futures_util::stream::iter([
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let request = Request::post(format!("http://{}/", lb.addr))
        .version(Version::HTTP_2)
        .header("te", "trailers")
        .body(StreamBody::new(frames))
        .unwrap();
    let response = streaming.send_request(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["echoed-checksum"], "abc");

    // An HTTP/1.1 client, through to the same h2c backends.
    let reply = Http::new().get(&lb.url("/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["version"], "HTTP/2.0");
}

#[tokio::test]
async fn the_backend_serves_h2c_on_its_port() {
    let backends = start_backends(1);
    let mut sender = h2_connection(backends[0].addr).await;
    let (response, body, _) = exchange(&mut sender, get(backends[0].addr, "/")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_2);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["podName"], "backend-1");
}

#[tokio::test]
async fn a_backend_killed_while_http2_streams_flow_loses_no_get() {
    let mut backends = start_backends(3);
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = start_load_balancer(&addrs, json!({}));
    let sender = h2_connection(lb.addr).await;
    let mut statuses = Vec::new();
    for batch in 0..10 {
        if batch == 3 {
            backends[1].process.kill();
        }
        let requests = (0..30).map(|_| {
            let mut sender = sender.clone();
            let request = get(lb.addr, "/work?ms=20");
            async move { exchange(&mut sender, request).await.0.status() }
        });
        statuses.extend(futures_util::future::join_all(requests).await);
    }
    assert_eq!(statuses.len(), 300);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every GET answered 200: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn an_upgrade_to_h2c_backends_is_refused_clearly() {
    let (backend, _) = h2c_upstream("h2c").await;
    let lb = start_load_balancer(&[backend], json!({ "backendProtocol": "h2c" }));
    let answer = raw_exchange(
        lb.addr,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("need HTTP/1.1 backends"), "{answer}");
}
