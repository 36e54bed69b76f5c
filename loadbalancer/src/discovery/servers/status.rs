//! Writing each Server's health to its status, sparingly.
//!
//! The checker sends a verdict after every probe that confirms or changes
//! it; with 30 Servers probed every 2 s, writing each would be 15 writes a
//! second to the API server (and to etcd), for nothing. So:
//!
//! - a status is written only when the verdict *differs* from what the
//!   Server's status already says (as the watch shows it): a steady server
//!   costs no write at all, even across load balancer restarts;
//! - at most one write per Server per `statusWriteIntervalMs` (default
//!   5 s): a server flapping every probe gets one write per interval, the
//!   latest verdict, written when the interval ends;
//! - a failed write (403: the Role lacks `patch` on `servers/status`) is
//!   logged once per distinct error and tried again after the interval;
//!   traffic is never affected, since routing reads the checker, not the
//!   status.

use common::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::resource::Server;
use crate::balancer::checker::Verdict;

/// Writes verdicts to Server statuses, no more often than `interval`.
#[derive(Debug)]
pub struct StatusWriter {
    api: Api<Server>,
    interval: Duration,
    servers: Mutex<HashMap<String, Entry>>,
}

/// One Server's writing state.
#[derive(Debug, Default)]
struct Entry {
    /// `status.isHealthy` as the API server has it.
    current: Option<bool>,
    last_write: Option<Instant>,
    /// The latest verdict that differs from `current`, not yet written.
    pending: Option<Verdict>,
}

impl StatusWriter {
    pub fn new(api: Api<Server>, interval: Duration) -> StatusWriter {
        StatusWriter {
            api,
            interval,
            servers: Mutex::default(),
        }
    }

    /// The Servers as the watch shows them now: their statuses, and which
    /// ones exist at all.
    pub fn observed(&self, servers: &[Arc<Server>]) {
        let mut entries = lock(&self.servers);
        entries.retain(|name, _| {
            servers
                .iter()
                .any(|s| s.metadata.name.as_ref() == Some(name))
        });
        for server in servers {
            let Some(name) = server.metadata.name.clone() else {
                continue;
            };
            let entry = entries.entry(name).or_default();
            entry.current = server.status.as_ref().and_then(|s| s.is_healthy);
            if entry.pending.as_ref().map(|p| p.healthy) == entry.current {
                entry.pending = None;
            }
        }
    }

    /// Takes verdicts from the checker until it goes away.
    pub async fn run(self: Arc<Self>, mut verdicts: mpsc::UnboundedReceiver<Verdict>) {
        let mut last_error: Option<String> = None;
        loop {
            let due = self.next_due();
            tokio::select! {
                verdict = verdicts.recv() => match verdict {
                    Some(verdict) => self.take(verdict),
                    None => return,
                },
                () = sleep_until(due) => {}
            }
            for (name, verdict) in self.due_now() {
                match self.write(&name, &verdict).await {
                    Ok(()) => {
                        tracing::info!(
                            server = name,
                            healthy = verdict.healthy,
                            "server status written"
                        );
                        last_error = None;
                    }
                    Err(error) => {
                        let message = describe(&error, &name);
                        if last_error.as_deref() != Some(&message) {
                            tracing::error!("{message}");
                            last_error = Some(message);
                        }
                    }
                }
            }
        }
    }

    /// Notes a verdict: pending if it differs from the status.
    fn take(&self, verdict: Verdict) {
        let Some(name) = verdict
            .backend
            .upgrade()
            .and_then(|b| b.origin.name.clone())
        else {
            return;
        };
        let mut entries = lock(&self.servers);
        let entry = entries.entry(name).or_default();
        entry.pending = (entry.current != Some(verdict.healthy)).then_some(verdict);
    }

    /// When the next pending verdict may be written.
    fn next_due(&self) -> Option<Instant> {
        let entries = lock(&self.servers);
        entries
            .values()
            .filter(|entry| entry.pending.is_some())
            .map(|entry| {
                entry
                    .last_write
                    .map_or_else(Instant::now, |at| at + self.interval)
            })
            .min()
    }

    /// The pending verdicts whose interval has passed; marks them written.
    fn due_now(&self) -> Vec<(String, Verdict)> {
        let mut entries = lock(&self.servers);
        let now = Instant::now();
        let mut due = Vec::new();
        for (name, entry) in entries.iter_mut() {
            let ready = entry.last_write.is_none_or(|at| at + self.interval <= now);
            if ready && let Some(verdict) = entry.pending.take() {
                entry.last_write = Some(now);
                // Assume it lands; a failure restores the pending verdict.
                entry.current = Some(verdict.healthy);
                due.push((name.clone(), verdict));
            }
        }
        due
    }

    async fn write(&self, name: &str, verdict: &Verdict) -> Result<(), kube::Error> {
        let at = verdict.at.to_string();
        let (status, reason) = if verdict.healthy {
            ("True", "ChecksPassing")
        } else {
            ("False", "ChecksFailing")
        };
        let patch = json!({
            "status": {
                "isHealthy": verdict.healthy,
                "lastCheckTime": at,
                "message": verdict.message,
                "conditions": [{
                    "type": "Healthy",
                    "status": status,
                    "reason": reason,
                    "message": verdict.message,
                    "lastTransitionTime": at,
                }],
            }
        });
        let result = self
            .api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        if result.is_err()
            && let Some(entry) = lock(&self.servers).get_mut(name)
        {
            entry.current = None;
            entry.pending.get_or_insert_with(|| verdict.clone());
        }
        result.map(|_| ())
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

fn describe(error: &kube::Error, name: &str) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "cannot write the health of Server {name} to its status: forbidden. The load balancer's Role \
             needs `patch` on `servers/status` (see k8s/overlays/servers/rbac.yaml). Routing is not affected; \
             retrying later"
        ),
        _ => format!(
            "cannot write the health of Server {name} to its status: {error}; retrying later"
        ),
    }
}
