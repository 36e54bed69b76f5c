//! Accepting connections, serving them, and shutting down without losing a
//! request.
//!
//! Each accepted connection is served by hyper (HTTP/1.1, with upgrades) on
//! its own task, with [`Proxy::handle`] answering every request on it. The
//! connections are registered with a `GracefulShutdown` so that shutdown can
//! wait for them.
//!
//! Shutdown, in the order Kubernetes needs it:
//! 1. SIGTERM: `/readyz` starts failing. The endpoint controller takes a
//!    moment to remove us from the Service, and clients may still connect
//!    meanwhile, so we keep accepting for `drainDelayMs`.
//! 2. We stop accepting. Keep-alive connections are told to close after the
//!    request they are on; idle ones close at once.
//! 3. When every in-flight request (uploads included) has finished, or
//!    `shutdownTimeoutMs` has passed, the process exits 0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::admin::{self, Readiness};
use crate::balancer::Balancer;
use crate::config::Settings;
use crate::discovery::{self, DiscoveryError};
use crate::proxy::Proxy;

/// The largest request head (request line and headers) we accept; beyond it
/// the client gets 431. nginx allows 32 KiB by default.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The two listening sockets, bound before anything else starts so that a
/// port in use is reported at once.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

/// A port could not be bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr} (the {role} port): {source}; is another process using it? choose another with --{flag}"
)]
pub struct BindError {
    addr: SocketAddr,
    role: &'static str,
    flag: &'static str,
    source: std::io::Error,
}

impl Listeners {
    pub async fn bind(settings: &Settings) -> Result<Listeners, BindError> {
        let bind = |addr: SocketAddr, role, flag| async move {
            TcpListener::bind(addr).await.map_err(|source| BindError {
                addr,
                role,
                flag,
                source,
            })
        };
        Ok(Listeners {
            proxy: bind(settings.listen, "proxy", "port").await?,
            admin: bind(settings.admin_listen, "admin", "admin-port").await?,
        })
    }
}

/// Runs the load balancer until `shutdown` completes and in-flight requests
/// have finished.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DiscoveryError> {
    let balancer = Arc::new(Balancer::new(settings.cooldown));
    let readiness = Arc::new(Readiness::default());
    discovery::start(&settings.source, balancer.clone(), readiness.clone()).await?;
    let proxy = Arc::new(Proxy::new(balancer.clone(), &settings));

    let address = |listener: &TcpListener| {
        listener
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    };
    let (proxy_addr, admin_addr) = (address(&listeners.proxy), address(&listeners.admin));
    let admin_app = admin::app(readiness.clone(), balancer);
    // The admin listener lives until the process exits, so /readyz keeps
    // answering 503 throughout the drain.
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listeners.admin, admin_app).await {
            tracing::error!(%error, "admin listener failed");
        }
    });
    tracing::info!(proxy = proxy_addr, admin = admin_addr, "listening");

    let mut http = auto::Builder::new(TokioExecutor::new()).http1_only();
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let graceful = GracefulShutdown::new();
    let accept = |until| accept_until(&listeners.proxy, &http, &graceful, &proxy, until);

    accept(Box::pin(shutdown)).await;
    readiness.mark_shutting_down();
    tracing::info!(drain_delay = ?settings.drain_delay, "readiness now failing; still accepting during the drain delay");
    accept(Box::pin(tokio::time::sleep(settings.drain_delay))).await;
    drop(listeners.proxy);

    tracing::info!(
        connections = graceful.count(),
        "stopped accepting; waiting for in-flight requests"
    );
    match tokio::time::timeout(settings.shutdown_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all requests answered, exiting"),
        Err(_) => {
            tracing::warn!(timeout = ?settings.shutdown_timeout, "in-flight requests still running at the shutdown timeout; exiting anyway")
        }
    }
    Ok(())
}

/// Accepts and serves connections until `until` completes.
async fn accept_until(
    listener: &TcpListener,
    http: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    proxy: &Arc<Proxy>,
    mut until: std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut until => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning, and keep serving the connections we have.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
        });
        let connection = http.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
        });
    }
}
