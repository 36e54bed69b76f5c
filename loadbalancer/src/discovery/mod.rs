//! Where the list of backends comes from.
//!
//! A discovery source produces the *whole* set of backend addresses whenever
//! it changes and hands it to [`publish`], which swaps in a new snapshot and
//! logs what changed. The request path never talks to a source; it only
//! reads the latest snapshot. That is why a new source slots in without
//! touching the proxy.
//!
//! - `static`: the fixed list from `--backends` or the config's `backends`.
//! - `endpointslices` (default): watch the `discovery.k8s.io/v1`
//!   EndpointSlices of the backend Service ([`endpoint_slices`]).
//! - `endpoints`: watch the Service's v1 Endpoints object ([`endpoints`]),
//!   the older, deprecated API.
//!
//! Both Kubernetes sources share the watch loop in [`kubernetes`].

pub mod endpoint_slices;
pub mod endpoints;
pub mod kubernetes;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client};

use crate::admin::Readiness;
use crate::balancer::Balancer;
use crate::config::{Source, WatchedApi};
use kubernetes::Watched;

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "cannot set up a Kubernetes client: {0}. Outside a cluster, point KUBECONFIG at a kubeconfig, \
         or use --backends for a fixed list"
    )]
    Client(#[source] kube::Error),
}

/// Starts the configured source. It publishes into `balancer` and marks
/// `readiness` synced once the first full list is in.
pub async fn start(
    source: &Source,
    balancer: Arc<Balancer>,
    readiness: Arc<Readiness>,
) -> Result<(), DiscoveryError> {
    let (api, service, port) = match source {
        Source::Static(addrs) => {
            publish(&balancer, &addrs.iter().copied().collect());
            readiness.mark_synced();
            return Ok(());
        }
        Source::Kubernetes { api, service, port } => (*api, service.clone(), port.clone()),
    };

    // A kubeconfig (KUBECONFIG or ~/.kube/config) if there is one, else the
    // in-cluster service account.
    let client = Client::try_default()
        .await
        .map_err(DiscoveryError::Client)?;
    let namespace = ["NAMESPACE", "POD_NAMESPACE"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| client.default_namespace().to_owned());

    match api {
        WatchedApi::Endpoints => {
            let watched = Watched {
                resource: "endpoints",
                namespace: namespace.clone(),
                selector: format!("metadata.name={service}"),
            };
            tracing::info!(namespace, selector = watched.selector, %port, "watching v1 Endpoints");
            let config = watcher::Config::default().fields(&watched.selector);
            #[allow(deprecated)] // v1 Endpoints, kept on purpose: see endpoints.rs
            let api: Api<k8s_openapi::api::core::v1::Endpoints> =
                Api::namespaced(client, &namespace);
            tokio::spawn(kubernetes::watch(
                api,
                config,
                watched,
                move |objects| endpoints::backends(objects.iter().map(|o| o.as_ref()), &port),
                balancer,
                readiness,
            ));
        }
        WatchedApi::EndpointSlices => {
            let watched = Watched {
                resource: "endpointslices.discovery.k8s.io",
                namespace: namespace.clone(),
                selector: format!("kubernetes.io/service-name={service}"),
            };
            tracing::info!(namespace, selector = watched.selector, %port, "watching EndpointSlices");
            let config = watcher::Config::default().labels(&watched.selector);
            let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
            tokio::spawn(kubernetes::watch(
                api,
                config,
                watched,
                move |slices| endpoint_slices::backends(slices.iter().map(|s| s.as_ref()), &port),
                balancer,
                readiness,
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    /// rustls panics at the first TLS client when no crypto provider, or
    /// more than one, is compiled in; in-cluster the API server is https.
    #[tokio::test]
    async fn a_tls_kubernetes_client_builds_without_panicking() {
        let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        assert!(kube::Client::try_from(config).is_ok());
    }
}
