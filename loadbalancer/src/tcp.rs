//! TCP mode (`"mode": "tcp"`): L4 pass-through for long-lived connections.
//!
//! A database client, a message queue consumer or a game holds one TCP
//! connection for hours; there are no requests in it to balance. So here a
//! backend is picked per *connection* (by default the one with the fewest
//! open connections), and bytes are copied both ways until both sides are
//! done. Discovery, health checks, ejection and metrics are the same as in
//! HTTP mode.
//!
//! - **Half-close.** When one side shuts down its write half (EOF), the
//!   other side's write half is shut down too, and the other direction goes
//!   on: a client that sends its query and then `shutdown(SHUT_WR)` still
//!   receives the whole answer.
//! - **Idle timeout.** A connection that moves no byte either way for
//!   `tcpIdleTimeoutMs` is closed; before its first byte (either way: a
//!   database greets first), the shorter `tcpFirstByteTimeoutMs` applies,
//!   as nginx `stream`'s and HAProxy's client timeouts do, so clients that
//!   connect and say nothing cannot pile up.
//! - **Our own shortage is not the backend's fault.** Out of file
//!   descriptors or local ports, a connect fails whichever backend we ask:
//!   the backend is not ejected, no other is tried, and one line a second
//!   says so.
//! - **Draining.** When its backend leaves the set, a connection goes on
//!   for up to `drainTimeoutMs`, then is closed; new connections go to the
//!   backends that remain.
//! - **Shutdown.** On SIGTERM the listener stops accepting (after the drain
//!   delay, as in HTTP mode), and open connections get up to
//!   `shutdownTimeoutMs` to finish.
//! - **Memory.** A buffer is held only while bytes are flowing, so a
//!   thousand idle connections cost little more than their sockets.
//! - **System calls.** A read shorter than the buffer means the socket is
//!   empty: its readiness is cleared then, without one more read to learn
//!   it; and once both directions are done, closing the sockets says so
//!   without a second `shutdown`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use common::serve::Tracker;
use common::telemetry::Throttle;
use futures_util::FutureExt;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::balancer::stats::InFlight;
use crate::balancer::{Backend, Balancer, Outcome};
use crate::config::Settings;
use crate::connections::is_local_io;

/// The most read from one side before it is written to the other.
const BUFFER: usize = 64 * 1024;

/// What TCP mode reads from the config; changes apply to new connections.
#[derive(Debug, Clone)]
struct TcpSettings {
    connect_timeout: Duration,
    retries: u32,
    drain_timeout: Duration,
    idle_timeout: Duration,
    first_byte_timeout: Duration,
    access_log: bool,
}

/// Accepts connections and relays each one to a backend.
#[derive(Debug)]
pub struct TcpProxy {
    balancer: Arc<Balancer>,
    settings: ArcSwap<TcpSettings>,
    /// Each connection's task holds a ticket until it ends.
    connections: Tracker,
}

/// Why no backend connection could be made for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoConnection {
    /// None is left to try (none known, or every one tried failed).
    NoBackend,
    /// We are out of file descriptors or local ports: no backend is to blame.
    OwnShortage,
}

/// Why a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both sides finished sending.
    Done,
    /// A side reset the connection or a write failed.
    Broken,
    Idle,
    /// Its backend left the set and the drain timeout passed.
    Drained,
}

impl TcpProxy {
    pub fn new(balancer: Arc<Balancer>, settings: &Settings) -> TcpProxy {
        TcpProxy {
            balancer,
            settings: ArcSwap::from_pointee(TcpSettings::from(settings)),
            connections: Tracker::default(),
        }
    }

    /// Uses `settings` for connections accepted from now on.
    pub fn configure(&self, settings: &Settings) {
        self.settings.store(Arc::new(TcpSettings::from(settings)));
    }

    /// Accepts connections on `listener` until `stop` completes.
    pub async fn serve_until(
        self: &Arc<Self>,
        listener: &TcpListener,
        stop: impl Future<Output = ()>,
    ) {
        let mut stop = std::pin::pin!(stop);
        loop {
            let (client, peer) = tokio::select! {
                accepted = common::serve::accept(listener) => accepted,
                () = &mut stop => return,
            };
            let proxy = self.clone();
            let ticket = self.connections.ticket();
            tokio::spawn(async move {
                proxy.handle(client, peer).await;
                drop(ticket);
            });
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.open()
    }

    /// Waits until every connection has closed, or `timeout`; whether they did.
    /// (A TCP connection has no requests to finish first: it is given the time.)
    pub async fn finish(&self, timeout: Duration) -> bool {
        self.connections.close_and_wait(Some(timeout)).await
    }

    /// One client connection: a backend, then bytes both ways.
    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let settings = self.settings.load_full();
        let (backend, mut upstream) = match self.connect(&settings).await {
            Ok(connected) => connected,
            Err(NoConnection::NoBackend) => {
                tracing::warn!(client = %peer, "no backend could take the TCP connection; closing it");
                return;
            }
            // Said in `connect`, once a second.
            Err(NoConnection::OwnShortage) => return,
        };
        let _in_flight = InFlight::start(backend.clone());
        let tcp = &backend.stats.tcp;
        tcp.opened.fetch_add(1, Relaxed);
        tcp.open.fetch_add(1, Relaxed);
        let started = Instant::now();
        let end = relay(&mut client, &mut upstream, &backend, &settings).await;
        tcp.open.fetch_sub(1, Relaxed);
        if settings.access_log {
            tracing::info!(
                client = %peer,
                backend = %backend.addr,
                end = ?end,
                duration = ?started.elapsed(),
                "tcp connection closed"
            );
        }
    }

    /// A connection to a backend: the algorithm's pick, and on a failed
    /// connect another backend (nothing was sent yet), up to `retries` more.
    async fn connect(
        &self,
        settings: &TcpSettings,
    ) -> Result<(Arc<Backend>, TcpStream), NoConnection> {
        let mut tried = Vec::new();
        for attempt in 0..=settings.retries {
            let backend = if attempt == 0 {
                self.balancer.pick_first().await
            } else {
                self.balancer.pick(&tried)
            }
            .ok_or(NoConnection::NoBackend)?;
            let connect = TcpStream::connect(backend.addr);
            let error = match tokio::time::timeout(settings.connect_timeout, connect).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    self.balancer.record(&backend, Outcome::Success);
                    return Ok((backend, stream));
                }
                Ok(Err(error)) if is_local_io(&error) => {
                    static THROTTLE: Throttle = Throttle::new(Duration::from_secs(1));
                    if let Some(held_back) = THROTTLE.allow() {
                        tracing::error!(%error, held_back, "the load balancer is out of file descriptors or local ports (not the backend's fault); closing the client's connection; raise the open file limit (ulimit -n) or lower the load");
                    }
                    return Err(NoConnection::OwnShortage);
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no connection within {:?}", settings.connect_timeout),
            };
            tracing::warn!(backend = %backend.addr, error, "cannot connect to backend; trying another");
            self.balancer.record(&backend, Outcome::ConnectFailure);
            tried.push(backend.addr);
        }
        Err(NoConnection::NoBackend)
    }
}

impl From<&Settings> for TcpSettings {
    fn from(settings: &Settings) -> Self {
        TcpSettings {
            connect_timeout: settings.connect_timeout,
            retries: settings.retries,
            drain_timeout: settings.drain_timeout,
            idle_timeout: settings.tcp_idle_timeout,
            first_byte_timeout: settings.tcp_first_byte_timeout,
            access_log: settings.access_log,
        }
    }
}

/// Copies bytes both ways until both sides are done, or the connection
/// idles, breaks, or outlives its departed backend's drain timeout.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    backend: &Backend,
    settings: &TcpSettings,
) -> End {
    let activity = Activity::new();
    let finished = AtomicUsize::new(0);
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let tcp = &backend.stats.tcp;
    let up = pump(
        client_read,
        upstream_write,
        &tcp.bytes_to_backend,
        &activity,
        &finished,
    );
    let down = pump(
        upstream_read,
        client_write,
        &tcp.bytes_from_backend,
        &activity,
        &finished,
    );
    let both = async {
        match tokio::try_join!(up, down) {
            Ok(_) => End::Done,
            Err(_) => End::Broken,
        }
    };
    let drained = async {
        backend.departed().await;
        tokio::time::sleep(settings.drain_timeout).await;
    };
    tokio::select! {
        end = both => end,
        () = activity.idle_for(settings.first_byte_timeout, settings.idle_timeout) => End::Idle,
        () = drained => End::Drained,
    }
}

/// Copies from `from` to `to` until EOF, then passes the half-close on by
/// shutting down `to`'s write side; `finished` counts the directions done.
/// The buffer exists only while data flows.
async fn pump(
    from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counter: &AtomicU64,
    activity: &Activity,
    finished: &AtomicUsize,
) -> io::Result<()> {
    let mut buffer = Vec::new();
    loop {
        // While bytes keep coming the buffer is kept; a connection that goes
        // quiet gives it back before it waits.
        if from.readable().now_or_never().is_none() {
            buffer = Vec::new();
            from.readable().await?;
        }
        buffer.reserve_exact(BUFFER);
        loop {
            buffer.clear();
            match read(&from, &mut buffer) {
                Read::Data { drained } => {
                    to.write_all(&buffer).await?;
                    counter.fetch_add(buffer.len() as u64, Relaxed);
                    activity.touch();
                    if drained {
                        break;
                    }
                }
                Read::End => {
                    // The other direction done too: both sockets close right
                    // after this, which sends the FIN; no need to say it twice.
                    if finished.fetch_add(1, Relaxed) == 0 {
                        to.shutdown().await?;
                    }
                    return Ok(());
                }
                Read::Empty => break,
                Read::Failed(error) => return Err(error),
            }
        }
    }
}

/// What one read found.
enum Read {
    /// Bytes; `drained` when fewer than asked for: the socket is empty.
    Data {
        drained: bool,
    },
    /// The peer shut down its sending side.
    End,
    /// Nothing to read yet.
    Empty,
    Failed(io::Error),
}

/// Reads what is there into `buffer`. A read shorter than the buffer
/// drained the socket, so its readiness is cleared then and there (as
/// tokio's own `poll_read` does) instead of by one more read that finds
/// nothing: one system call less per burst.
fn read(from: &ReadHalf<'_>, buffer: &mut Vec<u8>) -> Read {
    let mut got = None;
    let outcome = from.as_ref().try_io(Interest::READABLE, || {
        let n = from.try_read_buf(buffer)?;
        got = Some(n);
        if n > 0 && n < BUFFER {
            // Reported as "would block" only to clear the readiness.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (got, outcome) {
        (Some(0), _) => Read::End,
        (Some(n), outcome) => Read::Data {
            drained: n < BUFFER || outcome.is_err(),
        },
        (None, Err(error)) if error.kind() == io::ErrorKind::WouldBlock => Read::Empty,
        (None, Err(error)) => Read::Failed(error),
        (None, Ok(())) => Read::Empty,
    }
}

/// When bytes last moved on a connection, in ms since it opened, and
/// whether any ever did.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
    moved: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            moved: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Relaxed);
        self.moved.store(true, Relaxed);
    }

    /// Completes once nothing has moved for `limit`, or for `first` when
    /// nothing has moved yet.
    async fn idle_for(&self, first: Duration, limit: Duration) {
        let (first_ms, limit_ms) = (first.as_millis() as u64, limit.as_millis() as u64);
        loop {
            let allowed = if self.moved.load(Relaxed) {
                limit_ms
            } else {
                first_ms
            };
            let quiet = self.now_ms().saturating_sub(self.last_ms.load(Relaxed));
            if quiet >= allowed {
                return;
            }
            // A first byte may come meanwhile and bring in `limit`: look
            // again by then too.
            let mut wait = allowed - quiet;
            if quiet < limit_ms {
                wait = wait.min(limit_ms - quiet);
            }
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}
