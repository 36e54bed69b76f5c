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
//! - **HTTP/2 streams a client cancels count until their work has ended**,
//!   and a connection that cancels most of what it opens is closed: the
//!   rapid reset defence, see [`streams`].
//! - **A send timeout**: a client that takes none of what we send for
//!   [`Limits::send_timeout`] (its TCP window stays shut) is disconnected,
//!   as nginx's `send_timeout` does, instead of holding its connection, and
//!   whatever stands behind the answer, for ever.
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
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::{HttpService, Service, service_fn};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tower::ServiceExt;

use crate::telemetry::Throttle;
use streams::{Budgeted, Streams};
pub use streams::{EARLY_RESETS, Slot};
pub use tracker::{Ticket, Tracker};

mod streams;
mod tracker;

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

/// The default [`Limits::send_timeout`], nginx's `send_timeout`.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a connection that cancelled too many HTTP/2 streams may take to
/// finish the streams it has left, after the GOAWAY.
const ABUSE_GRACE: Duration = Duration::from_secs(1);

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

/// What a listener allows its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a client may take to send each request head.
    pub header_read_timeout: Duration,
    /// How long a client may leave what we send untaken.
    pub send_timeout: Duration,
    /// Whether HTTP/2 with prior knowledge is served, or HTTP/1.1 alone.
    pub http2: bool,
}

impl Limits {
    /// `header_read_timeout`, the default send timeout, and HTTP/2 on.
    pub fn new(header_read_timeout: Duration) -> Limits {
        Limits {
            header_read_timeout,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            http2: true,
        }
    }
}

/// How each protocol is served (`h2`: `None` when HTTP/2 is off).
#[derive(Debug)]
struct Protocols {
    http: http1::Builder,
    h2: Option<http2::Builder<TokioExecutor>>,
    header_read_timeout: Duration,
    /// [`Limits::send_timeout`], in ms: it may change while running.
    send_timeout_ms: AtomicU64,
}

/// Serves HTTP/1.1 and h2c connections and keeps track of them for shutdown.
#[derive(Debug)]
pub struct Server {
    /// Shared by every connection task: one reference count per connection.
    protocols: Arc<Protocols>,
    /// Every connection task holds a ticket; closed at shutdown.
    connections: Tracker,
}

impl Server {
    /// A server whose clients have `limits`.
    pub fn new(limits: Limits) -> Server {
        let header_read_timeout = limits.header_read_timeout;
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
                h2: limits.http2.then_some(h2),
                header_read_timeout,
                send_timeout_ms: AtomicU64::new(limits.send_timeout.as_millis() as u64),
            }),
            connections: Tracker::default(),
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
        S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
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
            let closing = self.connections.ticket();
            tokio::spawn(async move {
                if let Err(error) = serve_connection(stream, service, &protocols, closing).await {
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

    /// The send timeout for connections accepted from now on.
    pub fn set_send_timeout(&self, timeout: Duration) {
        let ms = timeout.as_millis() as u64;
        self.protocols.send_timeout_ms.store(ms, Relaxed);
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.connections.open()
    }

    /// Tells every connection to close once its request in flight is
    /// answered (idle ones close at once) and waits for all of them, at most
    /// `timeout`. Returns whether they all finished in time.
    pub async fn finish(&self, timeout: Option<Duration>) -> bool {
        self.connections.close_and_wait(timeout).await
    }
}

/// Serves one connection in the protocol its first bytes say, until it
/// ends or (after `closing` changes) has finished its requests.
async fn serve_connection<S, B>(
    stream: TcpStream,
    service: S,
    protocols: &Protocols,
    closing: Ticket,
) -> hyper::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let protocol = sniff(&stream, protocols.header_read_timeout).await;
    let send_timeout = protocols.send_timeout_ms.load(Relaxed);
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(Duration::from_millis(send_timeout)));
    let io = TokioIo::new(Box::pin(stream));
    match (protocol, &protocols.h2) {
        (None, _) => Ok(()),
        (Some(Protocol::Http2), Some(h2)) => {
            let streams = Streams::new();
            let service = Budgeted::new(service, streams.clone());
            let connection = h2.serve_connection(io, service);
            until_closing(connection, closing, streams.abusive()).await
        }
        // With HTTP/2 off, its preface reads as a bad HTTP/1.1 request.
        (Some(_), _) => {
            let connection = protocols.http.serve_connection(io, service).with_upgrades();
            until_closing(connection, closing, std::future::pending()).await
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
/// in flight and closes. Once `abusive` completes, it says GOAWAY and
/// closes after at most [`ABUSE_GRACE`].
async fn until_closing<C>(
    connection: C,
    mut closing: Ticket,
    abusive: impl Future<Output = ()>,
) -> hyper::Result<()>
where
    C: Graceful<Output = hyper::Result<()>>,
{
    let mut connection = pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        _ = closing.closing() => {
            connection.as_mut().shut_down();
            connection.await
        }
        () = abusive => {
            static THROTTLE: Throttle = Throttle::new(Duration::from_secs(1));
            if let Some(held_back) = THROTTLE.allow() {
                tracing::warn!(held_back, limit = EARLY_RESETS, "closing an HTTP/2 connection that cancelled most of its streams before their answer (rapid reset)");
            }
            connection.as_mut().shut_down();
            tokio::time::timeout(ABUSE_GRACE, connection).await.unwrap_or(Ok(()))
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
