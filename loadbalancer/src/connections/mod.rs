//! Connections to the backends, kept open between requests.
//!
//! This room knows nothing of the balancer: it keeps connections by the
//! address they go to, and the HTTP path ([`crate::proxy`]) asks it for the
//! connections of the backend it was handed. A backend's connections live
//! as long as it stays in the set: the proxy forgets them when it leaves.
//!
//! - **HTTP/1.1**: a stack of idle keep-alive connections per address. A
//!   request takes the most recently used one (so a few stay warm and the
//!   rest age out), or opens a new one within `connectTimeoutMs`. When its
//!   response body has been read to the end, the connection goes back
//!   ([`Lease`]). One that is closed, or idle longer than
//!   `poolIdleTimeoutMs`, is dropped instead of used.
//! - **HTTP/2** (`"backendProtocol": "h2c"`): one connection per backend
//!   carries every request to it at once. The first request that needs it
//!   makes it, the others wait for that one instead of each opening their
//!   own (a *single flight*, [`SingleFlight`]); it is made again when it
//!   closes.
//!
//! Also here, because TCP mode's connects need it too: whether a failed
//! connect was our own shortage ([`is_local_io`]) rather than the backend's.

mod single_flight;
mod table;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sync::lock;
use hyper::body::Body;
use hyper::client::conn::{http1, http2};
use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::errno::Errno;
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;

pub use single_flight::SingleFlight;
pub use table::Table;

/// What a request body must be to go over these connections.
pub trait RequestBody: Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static {}
impl<B: Body<Data: Send, Error: Into<BoxError>> + Send + Unpin + 'static> RequestBody for B {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One backend's open connections, for requests with bodies of type `B`,
/// and its address as HTTP names it.
#[derive(Debug)]
pub struct Connections<B> {
    /// The address as a `Host` (and `x-served-by`) value, built once.
    pub host: HeaderValue,
    /// The address as an HTTP/2 `:authority`, built once.
    pub authority: Authority,
    /// Idle HTTP/1.1 connections, the most recently used at the back.
    idle: Mutex<VecDeque<(http1::SendRequest<B>, Instant)>>,
    /// The HTTP/2 connection every request shares, made by one of them.
    http2: SingleFlight<http2::SendRequest<B>, ConnectError>,
}

/// Why no connection could be had. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    // The cause follows as the source: not in the message too.
    #[error("tcp connect error")]
    Io(#[from] std::io::Error),
    #[error("tcp connect timed out after {} ms (connectTimeoutMs)", .0.as_millis())]
    TimedOut(Duration),
    #[error("HTTP/2 handshake failed")]
    Handshake(#[source] hyper::Error),
}

impl<B> Connections<B> {
    /// None open yet, to `addr`.
    pub fn new(addr: SocketAddr) -> Connections<B> {
        let text = addr.to_string();
        Connections {
            // An IP:port always forms a valid header value and authority.
            host: HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("invalid")),
            authority: text
                .parse()
                .unwrap_or_else(|_| Authority::from_static("invalid")),
            idle: Mutex::new(VecDeque::new()),
            http2: SingleFlight::default(),
        }
    }
}

impl<B: RequestBody> Connections<B> {
    /// A new HTTP/1.1 connection to `addr`.
    pub async fn connect_http1(
        addr: SocketAddr,
        timeouts: Timeouts,
    ) -> Result<http1::SendRequest<B>, ConnectError> {
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
    pub fn take_idle(&self, idle_timeout: Duration) -> Option<http1::SendRequest<B>> {
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
    fn put_back(&self, sender: http1::SendRequest<B>, idle_timeout: Duration) {
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

    /// The backend's HTTP/2 connection, made if there is none (or it closed).
    pub async fn http2(
        &self,
        addr: SocketAddr,
        timeouts: Timeouts,
    ) -> Result<http2::SendRequest<B>, Arc<ConnectError>> {
        let make = move || async move {
            let stream = connect(addr, timeouts).await?;
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .handshake(stream)
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(backend = %addr, %error, "backend HTTP/2 connection ended");
                }
            });
            Ok(sender)
        };
        self.http2
            .get_or_make(|sender| !sender.is_closed(), make)
            .await
    }

    /// Forgets the HTTP/2 connection (it refused a request): the next
    /// request makes a new one.
    pub fn drop_http2(&self) {
        self.http2.forget();
    }
}

/// An HTTP/1.1 connection lent to one exchange; it goes back to its
/// backend's idle connections once the response has been read to the end.
#[derive(Debug)]
pub struct Lease<B: RequestBody> {
    sender: http1::SendRequest<B>,
    connections: Arc<Connections<B>>,
    idle_timeout: Duration,
}

impl<B: RequestBody> Lease<B> {
    pub fn new(
        sender: http1::SendRequest<B>,
        connections: Arc<Connections<B>>,
        idle_timeout: Duration,
    ) -> Lease<B> {
        Lease {
            sender,
            connections,
            idle_timeout,
        }
    }

    /// The exchange is over: the connection may carry the next request.
    pub fn give_back(self) {
        self.connections.put_back(self.sender, self.idle_timeout);
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

/// Out of file descriptors, of kernel buffers or memory, or of local ports
/// to connect from: all local, whichever backend we asked.
pub fn is_local_io(error: &std::io::Error) -> bool {
    const LOCAL: [Errno; 5] = [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOBUFS,
        Errno::ENOMEM,
        Errno::EADDRNOTAVAIL,
    ];
    error
        .raw_os_error()
        .is_some_and(|code| LOCAL.contains(&Errno::from_raw(code)))
}
