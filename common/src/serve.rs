//! Serving HTTP/1.1 and HTTP/2 on a listener, with the limits every listener
//! needs.
//!
//! All three listeners of the two binaries (the backend's port, the load
//! balancer's proxy and admin ports) serve through this module, so they share
//! the same defences against clients that misbehave:
//!
//! - **HTTP/1.1, and HTTP/2 with prior knowledge (h2c), told apart per
//!   connection** by its first bytes: the HTTP/2 preface
//!   (`PRI * HTTP/2.0...`), or anything else. Each is served by hyper's own
//!   builder with its own limits; not by hyper-util's "auto" builder, which
//!   would wait for those bytes with no time limit.
//! - **A header read timeout from the first moment.** A client has
//!   `headerReadTimeout` to send its first bytes; then, over HTTP/1.1,
//!   hyper's timer runs while it waits for a request head, and again while a
//!   keep-alive connection waits for its next request. A client that
//!   connects and sends nothing, or half a request line, is disconnected, so
//!   idle sockets cannot pile up until the process runs out of file
//!   descriptors. Over HTTP/2, a peer that stops answering pings (every
//!   `headerReadTimeout`, 20 s to answer) is disconnected.
//! - **HTTP/2 limits**: at most [`MAX_STREAMS`] streams at once per
//!   connection, header lists of at most [`MAX_HEAD_BYTES`], 1 MiB flow
//!   control windows, and h2's defences against rapid resets.
//! - **A cap on the request head** (`431` beyond [`MAX_HEAD_BYTES`]).
//! - **Accept errors pause the loop**: at the file-descriptor limit `accept`
//!   fails at once, again and again; we pause briefly and log at most once a
//!   second instead of spinning.
//! - **A listen backlog that can be set** (the kernel's queue of connections
//!   not yet accepted), larger than the 128 many libraries use.
//!
//! Shutdown is graceful: [`Server::serve_until`] stops accepting, then
//! [`Server::finish`] tells each connection to close after the request it is
//! on and waits for them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::{HttpService, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;

use crate::telemetry::Throttle;

/// The largest request head (request line and headers) accepted; beyond it
/// the client gets 431. nginx allows 32 KiB by default.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The default listen backlog. nginx uses 511 and HAProxy its `maxconn`;
/// the kernel caps it at `net.core.somaxconn` (4096 on current kernels).
pub const DEFAULT_BACKLOG: u32 = 1024;

/// The most HTTP/2 streams (requests) one connection may have open at once.
pub const MAX_STREAMS: u32 = 128;

/// The HTTP/2 connection preface (RFC 9113, 3.4): how an h2c client opens.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long the accept loop pauses after a failed `accept`.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Binds `addr` with a listen backlog of `backlog`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted process may bind while old connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// How each protocol is served, and how long the first bytes may take.
#[derive(Debug)]
struct Protocols {
    http: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

/// Serves HTTP/1.1 and h2c connections and keeps track of them for shutdown.
#[derive(Debug)]
pub struct Server {
    /// Shared by every connection task: one reference count per connection.
    protocols: Arc<Protocols>,
    /// Changed once, at shutdown; every connection task holds a receiver.
    closing: watch::Sender<()>,
}

impl Server {
    /// A server whose clients have `header_read_timeout` to send each
    /// request head.
    pub fn new(header_read_timeout: Duration) -> Server {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            // Both: the buffer limit alone is only checked while a head is
            // incomplete, so one large read can slip past it.
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(2 << 20)
            .keep_alive_interval(header_read_timeout)
            .keep_alive_timeout(Duration::from_secs(20));
        Server {
            protocols: Arc::new(Protocols {
                http,
                h2,
                header_read_timeout,
            }),
            closing: watch::Sender::new(()),
        }
    }

    /// Accepts connections on `listener` until `until` completes, serving
    /// each with the service `service_for(peer)` on a task of its own.
    /// Upgrades (WebSocket) are allowed.
    pub async fn serve_until<S, B>(
        &self,
        listener: &TcpListener,
        service_for: impl Fn(SocketAddr) -> S,
        until: impl Future<Output = ()>,
    ) where
        S: HttpService<Incoming, ResBody = B> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut until = pin!(until);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut until => return,
                accepted = accept(listener) => accepted,
            };
            let service = service_for(peer);
            let protocols = self.protocols.clone();
            let closing = self.closing.subscribe();
            tokio::spawn(async move {
                let result = match sniff(&stream, protocols.header_read_timeout).await {
                    Some(Protocol::Http1) => {
                        let connection = protocols
                            .http
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades();
                        until_closing(connection, closing).await
                    }
                    Some(Protocol::Http2) => {
                        let connection =
                            protocols.h2.serve_connection(TokioIo::new(stream), service);
                        until_closing(connection, closing).await
                    }
                    None => return,
                };
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
            });
        }
    }

    /// Serves an axum `Router` until `until` completes. Handlers can read
    /// the client's address with `ConnectInfo<SocketAddr>`.
    pub async fn serve_router_until(
        &self,
        listener: &TcpListener,
        router: Router,
        until: impl Future<Output = ()>,
    ) {
        let service_for = |peer: SocketAddr| {
            let router = router.clone();
            service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let response = router.clone().oneshot(request);
                async move { Ok::<_, Infallible>(response.await.unwrap_or_else(|e| match e {})) }
            })
        };
        self.serve_until(listener, service_for, until).await;
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.closing.receiver_count()
    }

    /// Tells every connection to close once its request in flight is
    /// answered (idle ones close at once) and waits for all of them, at most
    /// `timeout`. Returns whether they all finished in time.
    pub async fn finish(self, timeout: Option<Duration>) -> bool {
        self.closing.send_replace(());
        let all_closed = self.closing.closed();
        match timeout {
            Some(timeout) => tokio::time::timeout(timeout, all_closed).await.is_ok(),
            None => {
                all_closed.await;
                true
            }
        }
    }
}

/// Which protocol a connection speaks.
enum Protocol {
    Http1,
    Http2,
}

/// Tells HTTP/2 from HTTP/1.1 by the first bytes, without consuming them;
/// `None` if the client sends nothing within `within` or goes away.
async fn sniff(stream: &TcpStream, within: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + within;
    let mut first = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if first[..n] != PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // The start of the preface (or of `PUT`, `POST`...): peek again
        // shortly; peeking at once would return the same bytes.
        let pause = tokio::time::Instant::now() + Duration::from_millis(2);
        if pause >= deadline {
            return None;
        }
        tokio::time::sleep_until(pause).await;
    }
}

/// A connection that can be told to finish what it is doing and close.
trait Graceful: Future {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Drives `connection`; once `closing` changes, it finishes the requests
/// in flight and closes.
async fn until_closing<C: Graceful>(connection: C, mut closing: watch::Receiver<()>) -> C::Output {
    let mut connection = pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = closing.changed() => {
            connection.as_mut().shut_down();
            connection.await
        }
    }
}

/// The next connection. A failed `accept` (usually out of file descriptors)
/// is logged, throttled, and followed by a short pause, and the loop goes on:
/// the connections already open keep being served meanwhile.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    static THROTTLE: Throttle = Throttle::new(Duration::from_secs(1));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Small requests and answers go out at once (no Nagle delay).
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(error) => {
                if let Some(held_back) = THROTTLE.allow() {
                    tracing::warn!(%error, held_back, "accept failed; pausing the accept loop briefly (out of file descriptors? see ulimit -n)");
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}
