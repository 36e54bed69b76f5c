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
//! - `pods`: watch the Pods matching a label selector ([`pods`]): no
//!   Service needed, the readiness rule applied by us.
//! - `servers`: watch `Server` custom resources ([`servers`]), check each
//!   one and write its health to its status.
//!
//! The Kubernetes sources share the watch loop in [`kubernetes`].

pub mod endpoint_slices;
pub mod endpoints;
pub mod kubernetes;
pub mod pods;
pub mod servers;

use std::sync::{Arc, Mutex};

use common::sync::lock;
use jiff::Timestamp;
use serde::Serialize;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client};

use crate::balancer::{BackendSet, Balancer, Origin};
use crate::config::{BackendPort, Source, WatchedApi};
use kubernetes::Watched;

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "cannot set up a Kubernetes client: {0}. Outside a cluster, point KUBECONFIG at a kubeconfig, \
         or use --backends for a fixed list"
    )]
    Client(#[source] kube::Error),
    #[error("{0}; set `dnsServer` to an IP:port, or fix /etc/resolv.conf")]
    Dns(String),
}

/// How discovery is doing, for `/readyz`, `/backends` and the admin page:
/// the one place that says whether the first full list is in.
#[derive(Debug, Default)]
pub struct Status(Mutex<StatusReport>);

/// What [`Status`] reports.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// `static`, `endpointslices`, `endpoints`, `pods` or `servers`.
    pub source: &'static str,
    /// `starting` (no full list yet), `synced`, or `retrying` after an error.
    pub state: &'static str,
    pub last_error: Option<String>,
    /// Since when the current state holds.
    pub since: Option<Timestamp>,
    /// When the last list or watch event arrived.
    pub last_event: Option<Timestamp>,
    /// Whether a first full list has been published (it stays so while
    /// retrying: the last set is still served).
    #[serde(skip)]
    pub listed: bool,
}

impl Status {
    fn update(&self, change: impl FnOnce(&mut StatusReport)) {
        change(&mut lock(&self.0));
    }

    fn start(&self, source: &'static str) {
        self.update(|report| {
            *report = StatusReport {
                source,
                state: "starting",
                since: Some(Timestamp::now()),
                ..StatusReport::default()
            }
        });
    }

    /// A list or watch event arrived: we are in sync again.
    fn event(&self) {
        self.update(|report| {
            let now = Timestamp::now();
            if report.state != "synced" {
                report.state = "synced";
                report.since = Some(now);
                report.last_error = None;
            }
            report.last_event = Some(now);
            report.listed = true;
        });
    }

    /// The watch failed with `message`; it is retried.
    fn error(&self, message: &str) {
        self.update(|report| {
            if report.state != "retrying" {
                report.state = "retrying";
                report.since = Some(Timestamp::now());
            }
            report.last_error = Some(message.to_owned());
        });
    }

    pub fn report(&self) -> StatusReport {
        lock(&self.0).clone()
    }

    /// Whether the first full list of backends is in.
    pub fn has_listed(&self) -> bool {
        lock(&self.0).listed
    }
}

/// Starts the configured source. It publishes into `balancer` and keeps
/// `status`.
pub async fn start(
    source: &Source,
    balancer: Arc<Balancer>,
    status: Arc<Status>,
) -> Result<(), DiscoveryError> {
    match source {
        Source::Static(addrs) => {
            status.start("static");
            publish(&balancer, &static_set(addrs));
            status.event();
        }
        Source::Servers {
            dns_server,
            status_write_interval,
        } => {
            let to = Targets::connect(balancer, status).await?;
            let interval = *status_write_interval;
            servers::start(
                to.client,
                &to.namespace,
                *dns_server,
                interval,
                to.balancer,
                to.status,
            )?;
        }
        Source::Pods { selector, port } => {
            watch_pods(Targets::connect(balancer, status).await?, selector, port);
        }
        Source::Kubernetes { api, service, port } => {
            watch_service(
                Targets::connect(balancer, status).await?,
                *api,
                service,
                port,
            );
        }
    }
    Ok(())
}

/// The client, the namespace, and where a watch publishes.
struct Targets {
    client: Client,
    namespace: String,
    balancer: Arc<Balancer>,
    status: Arc<Status>,
}

impl Targets {
    /// A kubeconfig (KUBECONFIG or ~/.kube/config) if there is one, else the
    /// in-cluster service account; the namespace from the environment
    /// (the Downward API), else the client's.
    async fn connect(
        balancer: Arc<Balancer>,
        status: Arc<Status>,
    ) -> Result<Targets, DiscoveryError> {
        let client = Client::try_default()
            .await
            .map_err(DiscoveryError::Client)?;
        let namespace = ["NAMESPACE", "POD_NAMESPACE"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Targets {
            client,
            namespace,
            balancer,
            status,
        })
    }
}

/// The Pods that match `selector`, ready ones as backends on `port`.
fn watch_pods(targets: Targets, selector: &str, port: &BackendPort) {
    let Targets {
        client,
        namespace,
        balancer,
        status,
    } = targets;
    tracing::info!(namespace, selector, %port, "watching Pods");
    status.start("pods");
    let watched = Watched {
        resource: "pods",
        namespace: namespace.clone(),
        selector: selector.to_owned(),
    };
    let config = watcher::Config::default().labels(selector);
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, &namespace);
    let port = port.clone();
    let to_backends = move |objects: Vec<Arc<k8s_openapi::api::core::v1::Pod>>| {
        std::future::ready(pods::backends(objects.iter().map(|o| o.as_ref()), &port))
    };
    let watch = kubernetes::watch(api, config, watched, to_backends, balancer, status);
    tokio::spawn(watch);
}

/// The endpoints of the Service named `service`, from EndpointSlices or
/// from the older v1 Endpoints.
fn watch_service(targets: Targets, api: WatchedApi, service: &str, port: &BackendPort) {
    let Targets {
        client,
        namespace,
        balancer,
        status,
    } = targets;
    let port = port.clone();
    match api {
        WatchedApi::EndpointSlices => {
            let selector = format!("kubernetes.io/service-name={service}");
            tracing::info!(namespace, selector, %port, "watching EndpointSlices");
            status.start("endpointslices");
            let config = watcher::Config::default().labels(&selector);
            let watched = Watched {
                resource: "endpointslices.discovery.k8s.io",
                namespace: namespace.clone(),
                selector,
            };
            let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
            let to_backends = move |slices: Vec<Arc<EndpointSlice>>| {
                let slices = slices.iter().map(|s| s.as_ref());
                std::future::ready(endpoint_slices::backends(slices, &port))
            };
            tokio::spawn(kubernetes::watch(
                api,
                config,
                watched,
                to_backends,
                balancer,
                status,
            ));
        }
        WatchedApi::Endpoints => {
            let selector = format!("metadata.name={service}");
            tracing::info!(namespace, selector, %port, "watching v1 Endpoints");
            status.start("endpoints");
            let config = watcher::Config::default().fields(&selector);
            let watched = Watched {
                resource: "endpoints",
                namespace: namespace.clone(),
                selector,
            };
            let api: Api<k8s_openapi::api::core::v1::Endpoints> =
                Api::namespaced(client, &namespace);
            let to_backends = move |objects: Vec<Arc<k8s_openapi::api::core::v1::Endpoints>>| {
                let objects = objects.iter().map(|o| o.as_ref());
                std::future::ready(endpoints::backends(objects, &port))
            };
            tokio::spawn(kubernetes::watch(
                api,
                config,
                watched,
                to_backends,
                balancer,
                status,
            ));
        }
    }
}

/// The pod an endpoint's `targetRef` names, if it names a pod.
pub fn pod_name(target: Option<&k8s_openapi::api::core::v1::ObjectReference>) -> Option<String> {
    target
        .filter(|target| target.kind.as_deref() == Some("Pod"))
        .and_then(|target| target.name.clone())
}

/// A fixed list as a backend set: addresses, no pods.
pub fn static_set(addrs: &[std::net::SocketAddr]) -> BackendSet {
    addrs
        .iter()
        .map(|addr| (*addr, Origin::default()))
        .collect()
}

/// Publishes `set` as the new backend set and logs the change, if any.
pub fn publish(balancer: &Balancer, set: &BackendSet) {
    let change = balancer.publish(set);
    if !change.is_empty() {
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
