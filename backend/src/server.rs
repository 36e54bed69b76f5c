//! Serving the routes on a listener until shutdown.
//!
//! The listener and the shutdown signal are passed in, so `main` binds the
//! real port and waits for SIGTERM, while tests bind `127.0.0.1:0` and stop
//! the server when they like.
//!
//! Shutdown follows what Kubernetes expects: readiness turns 503 first, the
//! server stops accepting, requests already in flight run to completion, and
//! only then does the process exit (with 0).

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::routes::{AppState, app};

/// Serves `state`'s routes on `listener` until `shutdown` completes and every
/// in-flight request has been answered.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let router = app(state.clone());
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        state.stop_being_ready();
        tracing::info!("no longer ready; finishing in-flight requests");
    })
    .await?;
    tracing::info!("all requests answered, exiting");
    Ok(())
}
