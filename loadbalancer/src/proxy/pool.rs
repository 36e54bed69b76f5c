//! Connections to the backends, kept open between requests.
//!
//! Each backend keeps its own [`Connections`], so a backend that leaves the
//! set takes its connections with it, and a request finds its backend's
//! connections without a lookup.
//!
//! - **HTTP/1.1**: a stack of idle keep-alive connections. A request takes
//!   the most recently used one (so a few stay warm and the rest age out),
//!   or opens a new one within `connectTimeoutMs`. When its response body
//!   has been read to the end, the connection goes back ([`Lease`]). One
//!   that is closed, or idle longer than `poolIdleTimeoutMs`, is dropped
//!   instead of used.
//! - **HTTP/2** (`"backendProtocol": "h2c"`): one connection per backend
//!   carries every request to it at once. The first request that needs it
//!   makes it, the others wait for that one instead of each opening their
//!   own; it is made again when it closes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;

use super::UpstreamBody;
use crate::balancer::Backend;

pub type Http1 = http1::SendRequest<UpstreamBody>;
pub type Http2 = http2::SendRequest<UpstreamBody>;

/// One backend's open connections.
#[derive(Debug, Default)]
pub struct Connections {
    /// Idle HTTP/1.1 connections, the most recently used at the back.
    idle: Mutex<VecDeque<(Http1, Instant)>>,
    /// The HTTP/2 connection every request shares.
    http2: Mutex<Option<Http2>>,
    /// Held while the HTTP/2 connection is being made, so only one is.
    making_http2: tokio::sync::Mutex<Option<Failed>>,
}

/// The last failure to make the HTTP/2 connection, for the requests that
/// waited on it: they fail with it rather than each try again in turn.
#[derive(Debug, Clone)]
struct Failed {
    at: Instant,
    error: String,
}

/// Why no connection could be had. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    // The cause follows as the source: not in the message too.
    #[error("tcp connect error")]
    Io(#[from] std::io::Error),
    #[error("tcp connect timed out after {} ms (connectTimeoutMs)", .0.as_millis())]
    TimedOut(Duration),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Shared(String),
}

impl Connections {
    /// A new HTTP/1.1 connection to `addr`.
    pub async fn connect_http1(
        addr: SocketAddr,
        timeouts: Timeouts,
    ) -> Result<Http1, ConnectError> {
        let stream = connect(addr, timeouts).await?;
        // The handshake of HTTP/1.1 sends nothing, so it cannot fail here.
        let (sender, connection) = http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|e| ConnectError::Io(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            // `with_upgrades`: a 101 answer hands the socket to the tunnel.
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(backend = %addr, %error, "backend connection ended");
            }
        });
        Ok(sender)
    }

    /// The most recently used idle HTTP/1.1 connection, if one is still
    /// open and was idle for less than `idle_timeout`.
    pub fn take_idle(&self, idle_timeout: Duration) -> Option<Http1> {
        let mut idle = lock(&self.idle);
        while let Some((sender, since)) = idle.pop_back() {
            if since.elapsed() >= idle_timeout {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps `sender` for the next request, and drops connections idle for
    /// longer than `idle_timeout`.
    fn put_back(&self, sender: Http1, idle_timeout: Duration) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= idle_timeout)
        {
            idle.pop_front();
        }
        idle.push_back((sender, now));
    }

    /// The backend's HTTP/2 connection, made if there is none.
    pub async fn http2(&self, addr: SocketAddr, timeouts: Timeouts) -> Result<Http2, ConnectError> {
        if let Some(sender) = self.current_http2() {
            return Ok(sender);
        }
        let asked = Instant::now();
        let mut making = self.making_http2.lock().await;
        // Made, or failed, while we waited for our turn.
        if let Some(sender) = self.current_http2() {
            return Ok(sender);
        }
        if let Some(failed) = making.as_ref().filter(|failed| failed.at >= asked) {
            return Err(ConnectError::Shared(failed.error.clone()));
        }
        let made = async {
            let stream = connect(addr, timeouts).await?;
            http2::Builder::new(TokioExecutor::new())
                .handshake(stream)
                .await
                .map_err(ConnectError::Handshake)
        };
        match made.await {
            Ok((sender, connection)) => {
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(backend = %addr, %error, "backend HTTP/2 connection ended");
                    }
                });
                *lock(&self.http2) = Some(sender.clone());
                *making = None;
                Ok(sender)
            }
            Err(error) => {
                *making = Some(Failed {
                    at: Instant::now(),
                    error: super::source_chain(&error),
                });
                Err(error)
            }
        }
    }

    fn current_http2(&self) -> Option<Http2> {
        lock(&self.http2)
            .as_ref()
            .filter(|sender| !sender.is_closed())
            .cloned()
    }

    /// Forgets the HTTP/2 connection (it refused a request): the next
    /// request makes a new one.
    pub fn drop_http2(&self) {
        lock(&self.http2).take();
    }
}

/// An HTTP/1.1 connection lent to one exchange; it goes back to its
/// backend's idle connections once the response has been read to the end.
#[derive(Debug)]
pub struct Lease {
    sender: Http1,
    backend: Arc<Backend>,
    idle_timeout: Duration,
}

impl Lease {
    pub fn new(sender: Http1, backend: Arc<Backend>, idle_timeout: Duration) -> Lease {
        Lease {
            sender,
            backend,
            idle_timeout,
        }
    }

    /// The exchange is over: the connection may carry the next request.
    pub fn give_back(self) {
        self.backend
            .connections
            .put_back(self.sender, self.idle_timeout);
    }
}

/// How long a connection may take to be made, and how long the backend
/// may leave what we send untaken (then the exchange fails).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub send: Duration,
}

type Socket = TokioIo<Pin<Box<TimeoutStream<TcpStream>>>>;

async fn connect(addr: SocketAddr, timeouts: Timeouts) -> Result<Socket, ConnectError> {
    let stream = tokio::time::timeout(timeouts.connect, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::TimedOut(timeouts.connect))??;
    stream.set_nodelay(true)?;
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(timeouts.send));
    Ok(TokioIo::new(Box::pin(stream)))
}

/// A poisoned lock still holds valid connections (or a usable body): a
/// panic elsewhere must not stop traffic.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
