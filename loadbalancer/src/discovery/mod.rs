//! Where the list of backends comes from.
//!
//! A discovery source produces the *whole* set of backend addresses whenever
//! it changes and hands it to [`publish`], which swaps in a new snapshot and
//! logs what changed. The request path never talks to a source; it only
//! reads the latest snapshot. That is why a new source (Kubernetes, DNS, a
//! file) slots in without touching the proxy.
//!
//! - `static`: the fixed list from `--backends` or the config's `backends`.
//! - `endpointslices` / `endpoints`: watch the Kubernetes API (next
//!   milestone).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::admin::Readiness;
use crate::balancer::Balancer;
use crate::config::Source;

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "discovery {0:?} is not built yet: use \"discovery\": \"static\" with a `backends` list, or --backends"
    )]
    NotBuilt(&'static str),
}

/// Starts the configured source. It publishes into `balancer` and marks
/// `readiness` synced once the first full list is in.
pub fn start(
    source: &Source,
    balancer: Arc<Balancer>,
    readiness: Arc<Readiness>,
) -> Result<(), DiscoveryError> {
    match source {
        Source::Static(addrs) => {
            publish(&balancer, &addrs.iter().copied().collect());
            readiness.mark_synced();
            Ok(())
        }
        Source::Kubernetes { kind, .. } => Err(DiscoveryError::NotBuilt(match kind {
            crate::config::DiscoveryKind::Endpoints => "endpoints",
            _ => "endpointslices",
        })),
    }
}

/// Publishes `addrs` as the new backend set and logs the change, if any.
pub fn publish(balancer: &Balancer, addrs: &BTreeSet<SocketAddr>) {
    let change = balancer.publish(addrs);
    if !change.added.is_empty() || !change.removed.is_empty() {
        tracing::info!(
            added = change.added.len(),
            removed = change.removed.len(),
            total = change.total,
            "backends changed: {change}"
        );
    }
}
