//! Clients that misbehave on purpose: HTTP/2 streams opened and cancelled
//! in a loop (rapid reset), readers that never take their answer, hosts
//! that carry a password or disagree with `:authority`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use common::serve::MAX_STREAMS;
use common::testkit::{Http, PATIENCE, poll, poll_async};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A backend that takes `delay` over every answer, counting the requests
/// it is working on (and the most at once) and the connections made to it.
#[derive(Default)]
struct Counting {
    working: AtomicUsize,
    most: AtomicUsize,
    connections: AtomicUsize,
}

/// Ends one request's count, also when hyper drops the handler.
struct Working(Arc<Counting>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.working.fetch_sub(1, Relaxed);
    }
}

async fn slow_backend(delay: Duration) -> (SocketAddr, Arc<Counting>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counting = Arc::new(Counting::default());
    let counts = counting.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counts.connections.fetch_add(1, Relaxed);
            let counts = counts.clone();
            let service = service_fn(move |_request| {
                let counts = counts.clone();
                async move {
                    let now = counts.working.fetch_add(1, Relaxed) + 1;
                    counts.most.fetch_max(now, Relaxed);
                    let _working = Working(counts.clone());
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"done"),
                    )))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (addr, counting)
}

/// An h2c client connection to `addr`, driven on its own task.
async fn h2_client(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    h2_client_pinging(addr, window).await.0
}

/// [`h2_client`], and a way to send PINGs on its connection.
async fn h2_client_pinging(
    addr: SocketAddr,
    window: u32,
) -> (h2::client::SendRequest<Bytes>, h2::PingPong) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, mut connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .unwrap();
    let ping_pong = connection.ping_pong().unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, ping_pong)
}

fn get(authority: &str, path: &str) -> hyper::Request<()> {
    hyper::Request::get(format!("http://{authority}{path}"))
        .body(())
        .unwrap()
}

/// Opens streams ten at a time, cancelling the ten opened before each time,
/// until `limit` streams or until the server closes the connection; returns
/// how many streams were opened. Before cancelling, a PING answered says the
/// server has read them, and `taken(opened)` may wait until it has started
/// on them: h2's own defence only counts streams cancelled before the
/// server accepted them, so an attacker waits that long.
async fn rapid_reset(
    addr: SocketAddr,
    path: &str,
    limit: usize,
    mut taken: impl FnMut(usize),
) -> usize {
    let (mut client, mut pings) = h2_client_pinging(addr, 65_535).await;
    let mut previous = Vec::new();
    let mut opened = 0;
    while opened < limit {
        let mut batch = Vec::new();
        for _ in 0..10 {
            let Ok(ready) = client.ready().await else {
                return opened;
            };
            client = ready;
            match client.send_request(get(&addr.to_string(), path), true) {
                Ok((response, _)) => batch.push(response),
                Err(_) => return opened,
            }
            opened += 1;
        }
        if pings.ping(h2::Ping::opaque()).await.is_err() {
            return opened;
        }
        taken(opened);
        // Dropping a response future cancels its stream (RST_STREAM).
        drop(std::mem::replace(&mut previous, batch));
    }
    opened
}

#[tokio::test]
async fn rapid_reset_cannot_keep_more_exchanges_busy_than_the_stream_limit() {
    let (backend, counting) = slow_backend(Duration::from_millis(500)).await;
    let mut lb = start_load_balancer(&[backend], json!({ "retries": 0 }));

    let opened = tokio::time::timeout(PATIENCE, rapid_reset(lb.addr, "/", 5_000, |_| {}))
        .await
        .expect("the rapid reset loop ran out of time");
    assert!(
        opened < 5_000,
        "the connection was never closed: {opened} streams opened and cancelled"
    );
    let most = counting.most.load(Relaxed);
    assert!(
        most <= MAX_STREAMS as usize,
        "the backend worked on {most} requests at once for one client connection (limit {MAX_STREAMS})"
    );
    lb.process
        .wait_for_log("closing an HTTP/2 connection", |l| l["level"] == "WARN");
    // Every cancelled exchange ends, and other clients are served.
    let finished = poll_async(PATIENCE, || async {
        (counting.working.load(Relaxed) == 0).then_some(())
    })
    .await;
    assert!(finished.is_some(), "exchanges still running");
    assert_eq!(Http::new().get(&lb.url("/")).await.status, 200);
}

#[tokio::test]
async fn the_backend_binary_closes_a_rapid_reset_connection_too() {
    let backend = start_backend_with(json!({ "port": 0, "logLevel": "debug" }));
    // Each stream is cancelled only once its handler has started.
    let started = |opened: usize| {
        let count = || {
            let logs = backend.process.logs();
            logs.iter()
                .filter(|l| l["message"] == "work started")
                .count()
        };
        poll(PATIENCE, || (count() >= opened).then_some(()));
    };
    let attack = rapid_reset(backend.addr, "/work?ms=500", 1_000, started);
    let opened = tokio::time::timeout(PATIENCE * 2, attack)
        .await
        .expect("the rapid reset loop ran out of time");
    assert!(
        opened < 1_000,
        "the backend never closed the connection: {opened} streams opened and cancelled"
    );
}

/// `inFlight` of the only backend, from `/backends`.
async fn in_flight(lb: &LoadBalancer) -> i64 {
    let listed = Http::new().get(&lb.admin_url("/backends")).await.json();
    listed["backends"][0]["inFlight"].as_i64().unwrap()
}

/// Waits until the load balancer has an exchange in flight, then until it
/// has none: the exchange a reader that never reads had pinned has ended.
async fn pinned_then_freed(lb: &LoadBalancer) {
    let pinned = poll_async(PATIENCE, || async {
        (in_flight(lb).await == 1).then_some(())
    })
    .await;
    assert!(pinned.is_some(), "the download never started");
    let freed = poll_async(PATIENCE, || async {
        (in_flight(lb).await == 0).then_some(())
    })
    .await;
    assert!(
        freed.is_some(),
        "a client that takes nothing still holds its backend exchange"
    );
}

#[tokio::test]
async fn an_http1_client_that_never_reads_is_cut_off_and_frees_its_backend() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({ "bodyIdleTimeoutMs": 500 }));
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(lb.addr).await.unwrap();
    client
        .write_all(b"GET /bytes?n=500000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    pinned_then_freed(&lb).await;
    drop(client);
}

#[tokio::test]
async fn an_http2_client_that_keeps_its_window_shut_frees_its_backend() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({ "bodyIdleTimeoutMs": 500 }));
    // A window of 0: the client answers pings, but takes no data.
    let mut client = h2_client(lb.addr, 0).await.ready().await.unwrap();
    let (response, _) = client
        .send_request(get("x", "/bytes?n=500000000"), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    pinned_then_freed(&lb).await;
    drop((response, client));
}

#[tokio::test]
async fn a_backend_that_never_reads_an_upload_gets_it_cut_off() {
    let upstream = mute_upstream().await;
    let lb = start_load_balancer(
        &[upstream],
        json!({ "bodyIdleTimeoutMs": 500, "requestTimeoutMs": 600000 }),
    );
    let mut client = TcpStream::connect(lb.addr).await.unwrap();
    client
        .write_all(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = client.into_split();
    let uploading = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        while writer.write_all(&chunk).await.is_ok() {}
    });
    let answer = tokio::time::timeout(PATIENCE, read_response_from(&mut reader))
        .await
        .expect("no answer while the backend took nothing");
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    uploading.abort();
}

async fn read_response_from(reader: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if reader.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn a_host_with_a_password_or_another_authority_is_refused() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({}));
    for request in [
        &b"GET / HTTP/1.1\r\nHost: user:pw@shop.example\r\n\r\n"[..],
        b"GET http://user:pw@shop.example/ HTTP/1.1\r\nHost: shop.example\r\n\r\n",
    ] {
        let answer = raw_exchange(lb.addr, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("user name or password"), "{answer}");
    }

    let mut client = h2_client(lb.addr, 65_535).await.ready().await.unwrap();
    let mut both = get("a.example", "/headers");
    both.headers_mut()
        .insert("host", "b.example".parse().unwrap());
    let (response, _) = client.send_request(both, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 400);
    // The same host in both is fine.
    let mut same = get("a.example", "/");
    same.headers_mut()
        .insert("host", "a.example".parse().unwrap());
    let (response, _) = client.send_request(same, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
}

#[tokio::test]
async fn http2_can_be_switched_off() {
    let backends = start_backends(1);
    let lb = start_load_balancer(&[backends[0].addr], json!({ "http2": false }));
    let tcp = TcpStream::connect(lb.addr).await.unwrap();
    let refused = match h2::client::handshake(tcp).await {
        Ok((mut client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            match client.send_request(get("x", "/"), true) {
                Ok((response, _)) => response.await.is_err(),
                Err(_) => true,
            }
        }
        Err(_) => true,
    };
    assert!(refused, "an HTTP/2 request was answered with http2: false");
    assert_eq!(Http::new().get(&lb.url("/")).await.status, 200);

    let on = start_load_balancer(&[backends[0].addr], json!({}));
    let mut client = h2_client(on.addr, 65_535).await.ready().await.unwrap();
    let (response, _) = client.send_request(get("x", "/"), true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
}
