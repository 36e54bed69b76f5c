//! Watching the Kubernetes API, with kube-rs.
//!
//! A *watcher* lists the objects once, then keeps a watch open and receives
//! every change as an event; when the watch breaks it resumes, and when the
//! API server says our place in history is gone (410 Gone) it lists again.
//! A *reflector* applies those events to an in-memory store, so at any
//! moment we hold the current set of objects. After each event we turn the
//! store into a set of backend addresses and publish it; publishing the same
//! set twice changes nothing.
//!
//! Errors never end the watch: `default_backoff()` retries with growing
//! pauses, and meanwhile the load balancer keeps serving the last set it
//! knew. Never `try_for_each` or `?` on a watch stream: the first
//! recoverable error would end it for good.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::publish;
use crate::admin::Readiness;
use crate::balancer::Balancer;

/// What is being watched, for log lines and error messages.
#[derive(Debug, Clone)]
pub struct Watched {
    /// `endpointslices.discovery.k8s.io` or `endpoints`, as RBAC names it.
    pub resource: &'static str,
    pub namespace: String,
    /// The selector, such as `kubernetes.io/service-name=backend`.
    pub selector: String,
}

/// Watches `api` and publishes `to_backends` of the current objects after
/// every change. Runs until the process exits.
pub async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    watched: Watched,
    to_backends: impl Fn(&[Arc<K>]) -> BTreeSet<SocketAddr>,
    balancer: Arc<Balancer>,
    readiness: Arc<Readiness>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let events = watcher::watcher(api, config)
        .default_backoff()
        // Only the spec matters to us; keep memory small.
        .modify(|object: &mut K| {
            object.managed_fields_mut().clear();
            object.annotations_mut().clear();
        })
        .reflect(writer);
    let mut events = std::pin::pin!(events);
    let mut last_error: Option<String> = None;

    while let Some(event) = events.next().await {
        match event {
            // The store is swapped in whole at InitDone; before it, it still
            // holds the previous list.
            Ok(Event::Init | Event::InitApply(_)) => {}
            Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => {
                if last_error.take().is_some() {
                    tracing::info!(resource = watched.resource, "watch restored");
                }
                publish(&balancer, &to_backends(&store.state()));
                readiness.mark_synced();
            }
            Err(error) => {
                let message = describe(&error, &watched);
                // One line per kind of trouble, not one per retry.
                if last_error.as_deref() != Some(message.as_str()) {
                    if is_forbidden(&error) {
                        tracing::error!("{message}");
                    } else {
                        tracing::warn!(kept = balancer.snapshot().backends.len(), "{message}");
                    }
                    last_error = Some(message);
                }
            }
        }
    }
}

fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

fn is_forbidden(error: &watcher::Error) -> bool {
    status_code(error) == Some(403)
}

/// One readable line that says what went wrong and what happens next.
fn describe(error: &watcher::Error, watched: &Watched) -> String {
    let Watched {
        resource,
        namespace,
        selector,
    } = watched;
    let verb = match error {
        watcher::Error::InitialListFailed(_) => "list",
        _ => "watch",
    };
    match status_code(error) {
        Some(403) => format!(
            "forbidden: this pod's service account may not {verb} {resource} in namespace {namespace}; \
             apply k8s/loadbalancer-rbac.yaml (a Role granting get, list and watch on {resource}, \
             bound to the load balancer's service account). Retrying; serving the last known backends meanwhile"
        ),
        Some(410) => format!("watch of {resource} ({selector}) expired (410 Gone): listing again"),
        _ => format!(
            "cannot {verb} {resource} ({selector}) in namespace {namespace}: {error}; \
             retrying with backoff, serving the last known backends meanwhile"
        ),
    }
}
