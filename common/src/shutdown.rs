//! The signal to stop.
//!
//! Kubernetes stops a pod by sending SIGTERM, waiting
//! `terminationGracePeriodSeconds`, then sending SIGKILL. A person at a
//! terminal presses Ctrl-C (SIGINT). Both mean "finish what you are doing
//! and exit", so both complete the same future.
//!
//! SIGHUP is different: by convention (nginx, HAProxy) it means "read your
//! config again", yet its default action kills the process on the spot,
//! dropping every request in flight. [`survive_hangups`], first thing in
//! the runtime, replaces that for good; [`ignore_hangup`] also says so in
//! the log when no config watcher will act on it.

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

/// From now on SIGHUP no longer kills the process. tokio's handler replaces
/// the default action for the rest of the process's life, even once the
/// stream is dropped; a SIGHUP before the config watcher runs is lost, and
/// harmless: the watcher reads the file when it starts. Call it first thing
/// inside the runtime, before binding or discovery.
pub fn survive_hangups() {
    if let Err(error) = signal(SignalKind::hangup()) {
        tracing::warn!(%error, "cannot handle SIGHUP; it would stop the process");
    }
}

/// From now on SIGHUP no longer kills the process: it is logged and ignored,
/// since there is no live config reload (yet) to run. Call it first thing
/// inside the runtime.
pub fn ignore_hangup() {
    match signal(SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::warn!(
                        "SIGHUP received and ignored: live config reload is not built yet; \
                         restart the process to apply a new config"
                    );
                }
            });
        }
        Err(error) => tracing::warn!(%error, "cannot handle SIGHUP; it would stop the process"),
    }
}
