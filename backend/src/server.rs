//! Serving the routes on a listener until shutdown.
//!
//! The listener and the shutdown signal are passed in, so `main` binds the
//! real port and waits for SIGTERM, while tests bind `127.0.0.1:0` and stop
//! the server when they like.
//!
//! Connections are served by [`common::serve`], as the load balancer's are:
//! HTTP/1.1 or HTTP/2 (h2c), and a client that does not send its request head within
//! `headerReadTimeoutMs` is disconnected.
//!
//! Shutdown follows what Kubernetes expects: readiness turns 503 first, the
//! server stops accepting, requests already in flight run to completion, and
//! only then does the process exit (with 0).

use std::time::Duration;

use common::serve::{Limits, Server};
use tokio::net::TcpListener;

use crate::routes::{AppState, app};

/// Serves `state`'s routes on `listener` until `shutdown` completes and every
/// in-flight request has been answered.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let server = Server::new(Limits::new(header_read_timeout));
    server
        .serve_router_until(&listener, app(state.clone()), shutdown)
        .await;
    state.stop_being_ready();
    drop(listener);
    tracing::info!("no longer ready; finishing in-flight requests");
    server.finish(None).await;
    tracing::info!("all requests answered, exiting");
    Ok(())
}
