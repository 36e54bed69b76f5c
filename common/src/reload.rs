//! Noticing a changed config file while running.
//!
//! In Kubernetes a ConfigMap volume is updated in place, a minute or so
//! after `kubectl apply`: the kubelet writes the new files into a fresh
//! directory and atomically swaps the `..data` symlink to it. The file we
//! opened is never written to, so watching it with inotify would see
//! nothing; instead we read the file by its path once a second (following
//! the symlinks anew each time) and compare the text. A SIGHUP asks for a
//! read at once, as it does for nginx and HAProxy.
//!
//! What a change means is the binary's business: it passes `apply`, which
//! parses and checks the new text, applies what can change live and says
//! what needs a restart. A file that does not parse or check is rejected
//! with one log line naming the file and the field; the running config stays
//! in force, and traffic never notices.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::{ConfigError, read};

/// How often the file is read.
pub const POLL: Duration = Duration::from_secs(1);

/// What [`watch`]'s `apply` did with a changed file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The fields applied while running.
    pub applied: Vec<&'static str>,
    /// The fields that changed but only take effect after a restart.
    pub need_restart: Vec<&'static str>,
}

/// Reads `path` every [`POLL`] and on SIGHUP; when its text differs from
/// `last`, hands it to `apply`. The future runs until the process exits;
/// SIGHUP is handled from the moment this is called (inside the runtime).
pub fn watch(
    path: PathBuf,
    last: String,
    apply: impl FnMut(&str) -> Result<Outcome, ConfigError> + Send,
) -> impl Future<Output = ()> + Send {
    // Registered now, not at the first poll: a SIGHUP must never find its
    // default action, which kills the process.
    let hangups = signal(SignalKind::hangup()).ok();
    poll_for_changes(path, last, hangups, apply)
}

async fn poll_for_changes(
    path: PathBuf,
    mut last: String,
    mut hangups: Option<tokio::signal::unix::Signal>,
    mut apply: impl FnMut(&str) -> Result<Outcome, ConfigError> + Send,
) {
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hangup = async {
            match &mut hangups {
                Some(hangups) => hangups.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticks.tick() => {}
            _ = hangup => tracing::info!(config = %path.display(), "SIGHUP received: reading the config again"),
        }
        let text = match read(&path) {
            Ok(text) => text,
            Err(error) => {
                // Mid-swap, or removed: say so once, keep what we have.
                if !last.is_empty() {
                    tracing::warn!(%error, "cannot read the config; the running config stays in force");
                    last.clear();
                }
                continue;
            }
        };
        if text == last {
            continue;
        }
        match apply(&text) {
            Ok(outcome) => {
                if !outcome.applied.is_empty() {
                    tracing::info!(config = %path.display(), applied = ?outcome.applied, "config reloaded");
                }
                if !outcome.need_restart.is_empty() {
                    tracing::warn!(
                        config = %path.display(),
                        fields = ?outcome.need_restart,
                        "config change needs a restart to take effect; not applied"
                    );
                }
            }
            Err(error) => tracing::error!(
                %error,
                "config change rejected; the running config stays in force"
            ),
        }
        last = text;
    }
}
