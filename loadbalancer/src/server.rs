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
use std::time::Duration;

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
    let balancer = balancer_for(&settings);
    let status = Arc::new(discovery::Status::default());
    discovery::start(&settings.source, balancer.clone(), status.clone()).await?;
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
    watch_config_file(&settings, &live);
    let readiness = Arc::new(Readiness::default());
    let admin = AdminState {
        readiness: readiness.clone(),
        balancer,
        discovery: status,
        tcp: tcp.is_some(),
    };
    say_listening(&listeners, &settings);
    serve_admin(listeners.admin, admin, &settings);
    match tcp {
        Some(tcp) => drain(&tcp, listeners.proxy, &readiness, &live, shutdown).await,
        None => {
            let http = Http { server, proxy };
            drain(&http, listeners.proxy, &readiness, &live, shutdown).await;
        }
    }
    Ok(())
}

/// The balancer, with the algorithm, health policy and shared counter of
/// `settings`.
fn balancer_for(settings: &Settings) -> Arc<Balancer> {
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
    balancer
}

/// Applies the config file's changes while running; without a file,
/// SIGHUP has nothing to reload and is ignored.
fn watch_config_file(settings: &Settings, live: &Arc<Live>) {
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
}

fn say_listening(listeners: &Listeners, settings: &Settings) {
    let address = |listener: &TcpListener| {
        listener
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string())
    };
    tracing::info!(
        proxy = address(&listeners.proxy),
        admin = address(&listeners.admin),
        mode = ?settings.mode,
        backlog = settings.listen_backlog,
        "listening"
    );
}

/// The admin listener lives until the process exits, so `/readyz` keeps
/// answering 503 throughout the drain.
fn serve_admin(listener: TcpListener, state: AdminState, settings: &Settings) {
    let app = admin::app(state);
    let server = Server::new(Limits::new(settings.header_read_timeout));
    tokio::spawn(async move {
        server
            .serve_router_until(&listener, app, std::future::pending())
            .await;
    });
}

/// What shutdown needs of a data plane: accept until told, count what is
/// open, and wait for it to finish.
trait Plane {
    /// What is waited for at the end, and what it is once done, for the
    /// log lines.
    const OPEN: &'static str;
    const DONE: &'static str;
    fn serve_until(
        &self,
        listener: &TcpListener,
        stop: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = ()>;
    fn open(&self) -> usize;
    fn finish(&self, timeout: Duration) -> impl Future<Output = bool>;
}

/// HTTP mode: the proxy port's server, answering with the proxy.
struct Http {
    server: Arc<Server>,
    proxy: Arc<Proxy>,
}

impl Plane for Http {
    const OPEN: &'static str = "in-flight requests";
    const DONE: &'static str = "all requests answered";

    async fn serve_until(&self, listener: &TcpListener, stop: impl Future<Output = ()> + Send) {
        let service_for = |addr: SocketAddr| {
            let proxy = self.proxy.clone();
            let peer = Arc::new(Peer::new(addr));
            service_fn(move |request| {
                let proxy = proxy.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(proxy.handle(request, &peer).await) }
            })
        };
        self.server.serve_until(listener, service_for, stop).await;
    }

    fn open(&self) -> usize {
        self.server.connections()
    }

    async fn finish(&self, timeout: Duration) -> bool {
        self.server.finish(Some(timeout)).await
    }
}

impl Plane for Arc<TcpProxy> {
    const OPEN: &'static str = "open connections to finish";
    const DONE: &'static str = "all connections closed";

    async fn serve_until(&self, listener: &TcpListener, stop: impl Future<Output = ()> + Send) {
        TcpProxy::serve_until(self, listener, stop).await;
    }

    fn open(&self) -> usize {
        self.connections()
    }

    async fn finish(&self, timeout: Duration) -> bool {
        TcpProxy::finish(self, timeout).await
    }
}

/// Shutdown, in the order Kubernetes needs it (see the module doc): serve
/// until `shutdown`, fail readiness but keep accepting for the drain delay,
/// stop accepting, and wait for what is open, at most the shutdown timeout.
async fn drain<P: Plane>(
    plane: &P,
    listener: TcpListener,
    readiness: &Readiness,
    live: &Live,
    shutdown: impl Future<Output = ()> + Send,
) {
    plane.serve_until(&listener, shutdown).await;
    readiness.mark_shutting_down();
    let settings = live.settings.load_full();
    tracing::info!(drain_delay = ?settings.drain_delay, "readiness now failing; still accepting during the drain delay");
    plane
        .serve_until(&listener, tokio::time::sleep(settings.drain_delay))
        .await;
    drop(listener);
    tracing::info!(
        connections = plane.open(),
        "stopped accepting; waiting for {}",
        P::OPEN
    );
    if plane.finish(settings.shutdown_timeout).await {
        tracing::info!("{}, exiting", P::DONE);
    } else {
        tracing::warn!(timeout = ?settings.shutdown_timeout, connections = plane.open(), "still waiting for {} at the shutdown timeout; exiting anyway", P::OPEN);
    }
}
