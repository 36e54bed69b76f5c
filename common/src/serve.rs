//! Serving HTTP/1.1 on a listener, with the limits every listener needs.
//!
//! All three listeners of the two binaries (the backend's port, the load
//! balancer's proxy and admin ports) serve through this module, so they share
//! the same defences against clients that misbehave:
//!
//! - **HTTP/1.1 only**, through hyper's `http1` connection builder. hyper-util's
//!   "auto" builder would also answer a client that opens with the HTTP/2
//!   preface, over HTTP/2, with none of the limits below.
//! - **A header read timeout from the first moment.** hyper's timer runs from
//!   when it starts waiting for a request head: right after the accept, and
//!   again while a keep-alive connection waits for its next request. A client
//!   that connects and sends nothing, or half a request line, is disconnected,
//!   so idle sockets cannot pile up until the process runs out of file
//!   descriptors.
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
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::{HttpService, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// Serves HTTP/1.1 connections and keeps track of them for shutdown.
#[derive(Debug)]
pub struct Server {
    http: http1::Builder,
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
        Server {
            http,
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
        S::Future: Send,
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
            let connection = self
                .http
                .serve_connection(TokioIo::new(stream), service_for(peer))
                .with_upgrades();
            let mut closing = self.closing.subscribe();
            tokio::spawn(async move {
                let mut connection = pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    _ = closing.changed() => {
                        // Finish the request in flight, then close.
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
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
