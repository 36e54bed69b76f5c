//! The signal to stop.
//!
//! Kubernetes stops a pod by sending SIGTERM, waiting
//! `terminationGracePeriodSeconds`, then sending SIGKILL. A person at a
//! terminal presses Ctrl-C (SIGINT). Both mean "finish what you are doing
//! and exit", so both complete the same future.

use tokio::signal::unix::{SignalKind, signal};

/// Completes on the first SIGTERM or SIGINT.
pub async fn signal_received() {
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received, shutting down"),
    }
}
