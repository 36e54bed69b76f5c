//! Accepting connections, serving them, and shutting down without losing a
//! request.
//!
//! Each accepted connection is served by hyper (HTTP/1.1 with upgrades, or
//! HTTP/2 with prior knowledge) on its own task, with [`Proxy::handle`]
//! answering every request on it. The
//! listeners, limits and connection tracking are [`common::serve`]'s, shared
//! with the backend: a client that does not send a request head within
//! `headerReadTimeoutMs` is disconnected, on the admin port too.
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

use arc_swap::ArcSwap;
use common::serve::{Limits, Server};
use common::telemetry::Logging;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState, Readiness};
use crate::balancer::Balancer;
use crate::config::{Cli, Mode, Settings};
use crate::discovery::{self, DiscoveryError};
use crate::proxy::{Peer, Proxy};
use crate::reload::Live;
use crate::tcp::TcpProxy;

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
    /// Binds both ports; must run inside the runtime.
    pub fn bind(settings: &Settings) -> Result<Listeners, BindError> {
        let bind = |addr: SocketAddr, role, flag| {
            common::serve::bind(addr, settings.listen_backlog).map_err(|source| BindError {
                addr,
                role,
                flag,
                source,
            })
        };
        Ok(Listeners {
            proxy: bind(settings.listen, "proxy", "port")?,
            admin: bind(settings.admin_listen, "admin", "admin-port")?,
        })
    }
}

/// Runs the load balancer until `shutdown` completes and in-flight requests
/// have finished. `cli` and `logging` are for applying config changes.
pub async fn run(
    settings: Settings,
    cli: Cli,
    logging: Logging,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DiscoveryError> {
    let balancer = Arc::new(Balancer::new(settings.cooldown));
    balancer.set_algorithm(settings.algorithm, &settings.weights);
    balancer.set_outlier_policy(settings.outlier_policy());
    balancer.checker.configure(settings.health_check.clone());
    if let Some(url) = &settings.shared_counter {
        let key = format!("loadbalancer:round-robin:{}", settings.source.name());
        // The URL was checked with the config, so this does not fail.
        if let Ok(counter) = crate::balancer::shared_counter::SharedCounter::start(url, key) {
            balancer.shared_counter.store(Some(counter));
        }
    }
    let readiness = Arc::new(Readiness::default());
    let status = Arc::new(discovery::Status::default());
    discovery::start(
        &settings.source,
        balancer.clone(),
        readiness.clone(),
        status.clone(),
    )
    .await?;
    let proxy = Arc::new(Proxy::new(balancer.clone(), &settings));
    let tcp =
        (settings.mode == Mode::Tcp).then(|| Arc::new(TcpProxy::new(balancer.clone(), &settings)));
    // A client that takes nothing of an answer for `bodyIdleTimeoutMs` is
    // disconnected, as one that sends nothing of its upload is.
    let server = Arc::new(Server::new(Limits {
        header_read_timeout: settings.header_read_timeout,
        send_timeout: settings.body_idle_timeout,
        http2: settings.http2,
    }));
    let live = Arc::new(Live {
        settings: ArcSwap::from_pointee(settings.clone()),
        cli,
        proxy: proxy.clone(),
        server: server.clone(),
        tcp: tcp.clone(),
        balancer: balancer.clone(),
        logging,
    });
    match &settings.file {
        Some(file) => {
            let live = live.clone();
            tokio::spawn(common::reload::watch(
                file.path.clone(),
                file.text.clone(),
                move |text| live.apply(text),
            ));
        }
        None => common::shutdown::ignore_hangup(),
    }

    let address = |listener: &TcpListener| {
        listener
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    };
    let (proxy_addr, admin_addr) = (address(&listeners.proxy), address(&listeners.admin));
    let admin_app = admin::app(AdminState {
        readiness: readiness.clone(),
        balancer,
        discovery: status,
        tcp: tcp.is_some(),
    });
    let admin_server = Server::new(Limits::new(settings.header_read_timeout));
    // The admin listener lives until the process exits, so /readyz keeps
    // answering 503 throughout the drain.
    tokio::spawn(async move {
        admin_server
            .serve_router_until(&listeners.admin, admin_app, std::future::pending())
            .await;
    });
    tracing::info!(
        proxy = proxy_addr,
        admin = admin_addr,
        mode = ?settings.mode,
        backlog = settings.listen_backlog,
        "listening"
    );
    if let Some(tcp) = tcp {
        serve_tcp(tcp, listeners.proxy, &readiness, &live, shutdown).await;
        return Ok(());
    }

    let service_for = |addr: SocketAddr| {
        let proxy = proxy.clone();
        let peer = Arc::new(Peer::new(addr));
        service_fn(move |request| {
            let proxy = proxy.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, &peer).await) }
        })
    };

    server
        .serve_until(&listeners.proxy, service_for, shutdown)
        .await;
    readiness.mark_shutting_down();
    let settings = live.settings.load_full();
    tracing::info!(drain_delay = ?settings.drain_delay, "readiness now failing; still accepting during the drain delay");
    server
        .serve_until(
            &listeners.proxy,
            service_for,
            tokio::time::sleep(settings.drain_delay),
        )
        .await;
    drop(listeners.proxy);

    tracing::info!(
        connections = server.connections(),
        "stopped accepting; waiting for in-flight requests"
    );
    if server.finish(Some(settings.shutdown_timeout)).await {
        tracing::info!("all requests answered, exiting");
    } else {
        tracing::warn!(timeout = ?settings.shutdown_timeout, "in-flight requests still running at the shutdown timeout; exiting anyway");
    }
    Ok(())
}

/// TCP mode's serving and shutdown: the same steps, with connections in
/// place of requests.
async fn serve_tcp(
    tcp: Arc<TcpProxy>,
    listener: TcpListener,
    readiness: &Readiness,
    live: &Live,
    shutdown: impl Future<Output = ()> + Send,
) {
    tcp.serve_until(&listener, shutdown).await;
    readiness.mark_shutting_down();
    let settings = live.settings.load_full();
    tracing::info!(drain_delay = ?settings.drain_delay, "readiness now failing; still accepting during the drain delay");
    tcp.serve_until(&listener, tokio::time::sleep(settings.drain_delay))
        .await;
    drop(listener);
    tracing::info!(
        connections = tcp.connections(),
        "stopped accepting; waiting for open connections to finish"
    );
    if tcp.finish(settings.shutdown_timeout).await {
        tracing::info!("all connections closed, exiting");
    } else {
        tracing::warn!(timeout = ?settings.shutdown_timeout, connections = tcp.connections(), "connections still open at the shutdown timeout; closing them");
    }
}
