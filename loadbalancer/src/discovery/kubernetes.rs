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
//! Errors never end the watch: after an error we pause ([`backoff`]) and
//! poll the stream again, which retries; meanwhile the load balancer keeps
//! serving the last set it knew. Never `try_for_each` or `?` on a watch
//! stream: the first recoverable error would end it for good.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::{self, Event, ExponentialBackoff};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{Status, publish};
use crate::balancer::{BackendSet, Balancer};

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
/// every change (a future: a source may need DNS to get there). Runs until
/// the process exits.
pub async fn watch<K, F>(
    api: Api<K>,
    config: watcher::Config,
    watched: Watched,
    to_backends: impl Fn(Vec<Arc<K>>) -> F,
    balancer: Arc<Balancer>,
    status: Arc<Status>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
    F: Future<Output = BackendSet>,
{
    let (store, writer) = reflector::store();
    let events = watcher::watcher(api, config)
        // Only the spec matters to us; keep memory small.
        .modify(|object: &mut K| {
            object.managed_fields_mut().clear();
            object.annotations_mut().clear();
        })
        .reflect(writer);
    let mut events = std::pin::pin!(events);
    // The kind of trouble we are in (a `reason` word), logged once.
    let mut trouble: Option<&'static str> = None;
    let mut backoff = backoff();

    while let Some(event) = events.next().await {
        match event {
            // kube-runtime yields `Init` before every list, also each time it
            // retries one against an API server that is away: not progress.
            // The store is swapped in whole at `InitDone`; until then it
            // still holds the previous list.
            Ok(Event::Init | Event::InitApply(_)) => {}
            Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => {
                backoff.reset();
                if trouble.take().is_some() {
                    tracing::info!(resource = watched.resource, "watch restored");
                }
                publish(&balancer, &to_backends(store.state()).await);
                status.event();
            }
            Err(error) => {
                let reason = reason(&error);
                let message = describe(&error, &watched);
                balancer.totals.discovery_error(reason);
                status.error(&message);
                // One line per kind of trouble, not one per retry.
                if trouble.replace(reason) != Some(reason) {
                    say_trouble(&error, &message, &balancer);
                }
                // After 410 Gone the watcher lists again at once, as
                // client-go does: the server is answering, nothing to wait for.
                if status_code(&error) != Some(410) {
                    tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)).await;
                }
            }
        }
    }
}

/// A refusal is an error (someone must fix the RBAC); the rest are
/// warnings that the last set is still served.
fn say_trouble(error: &watcher::Error, message: &str, balancer: &Balancer) {
    if is_forbidden(error) {
        tracing::error!("{message}");
    } else {
        tracing::warn!(kept = balancer.snapshot().backends.len(), "{message}");
    }
}

/// The longest pause between two attempts, before jitter.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The pauses after errors: 250 ms, doubling up to [`MAX_BACKOFF`], each
/// plus up to as much again at random so that replicas do not retry in
/// step (so from 250 ms to 2 s apart); reset by a list or watch event that
/// really arrives.
///
/// client-go (and kube-rs's `default_backoff`) grow to 30 s, because
/// thousands of kubelets and controllers reconnect to one API server when it
/// restarts, and a herd retrying every second would keep it down. We are one
/// load balancer (or a few replicas) per namespace, and every second we miss
/// a change we route to pods that are gone or miss new ones; a short cap lets
/// us see a change within a few seconds of the API server coming back, even
/// through the 403s and 410s a restarting server answers at first.
fn backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(MAX_BACKOFF)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
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

/// A word for the metrics' `reason` label: a small, fixed set.
fn reason(error: &watcher::Error) -> &'static str {
    match status_code(error) {
        Some(403) => "forbidden",
        Some(410) => "expired",
        Some(_) => "api_error",
        None => "unreachable",
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
             apply k8s/base/loadbalancer-rbac.yaml (a Role granting get, list and watch on {resource}, \
             bound to the load balancer's service account). Retrying; serving the last known backends meanwhile"
        ),
        Some(410) => format!("watch of {resource} ({selector}) expired (410 Gone): listing again"),
        _ => format!(
            "cannot {verb} {resource} ({selector}) in namespace {namespace}: {error}; \
             retrying with backoff, serving the last known backends meanwhile"
        ),
    }
}
