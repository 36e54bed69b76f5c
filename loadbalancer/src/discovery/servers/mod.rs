//! `"discovery": "servers"`: backends declared as `Server` custom resources,
//! their health written back.
//!
//! The load balancer watches the Servers in its namespace ([`resource`]),
//! turns each one's URL into an address ([`dns`]), health-checks each one
//! (active checks are always on in this mode; `healthCheck` tunes them) and
//! routes only to those whose checks pass. Whenever a Server's verdict
//! changes, it is written to the Server's status ([`status`]), so
//! `kubectl get servers -w` shows HEALTHY flip.

pub mod dns;
pub mod resource;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::watcher;
use kube::{Api, Client};

use super::kubernetes::{self, Watched};
use super::{DiscoveryError, Status};
use crate::admin::Readiness;
use crate::balancer::{BackendSet, Balancer, Pod};
use dns::Dns;
pub use resource::{Server, ServerSpec, ServerStatus};
use status::StatusWriter;

/// Watches the Servers in `namespace` and publishes the healthy ones.
pub fn start(
    client: Client,
    namespace: &str,
    dns_server: Option<std::net::SocketAddr>,
    status_write_interval: Duration,
    balancer: Arc<Balancer>,
    readiness: Arc<Readiness>,
    status: Arc<Status>,
) -> Result<(), DiscoveryError> {
    let dns = Dns::new(dns_server).map_err(DiscoveryError::Dns)?;
    let api: Api<Server> = Api::namespaced(client, namespace);
    let writer = Arc::new(StatusWriter::new(api.clone(), status_write_interval));
    if let Some(verdicts) = balancer.checker.observe() {
        tokio::spawn(writer.clone().run(verdicts));
    }
    let watched = Watched {
        resource: "servers.lb.example.com",
        namespace: namespace.to_owned(),
        selector: "all".into(),
    };
    tracing::info!(namespace, dns = ?dns_server, "watching Servers");
    status.start("servers");
    let checker = balancer.checker.clone();
    tokio::spawn(kubernetes::watch(
        api,
        watcher::Config::default(),
        watched,
        move |servers: Vec<Arc<Server>>| {
            writer.observed(&servers);
            let (dns, path) = (dns.clone(), checker.path());
            async move { backends(&dns, &servers, &path).await }
        },
        balancer,
        readiness,
        status,
    ));
    Ok(())
}

/// The address of each Server, with its name, weight and health URL. A
/// Server whose URL does not resolve is left out, and says why in the log.
async fn backends(dns: &Dns, servers: &[Arc<Server>], check_path: &str) -> BackendSet {
    let mut set = BackendSet::new();
    for server in servers {
        let name = server.metadata.name.clone().unwrap_or_default();
        match resolve(dns, &server.spec, check_path).await {
            Ok((addr, health_url)) => {
                let about = Pod {
                    name: Some(name),
                    weight: server.spec.weight,
                    health_url: Some(health_url),
                    ..Pod::default()
                };
                set.insert(addr, about);
            }
            Err(reason) => {
                tracing::warn!(server = name, "Server left out: {reason}");
            }
        }
    }
    set
}

/// The Server's address, and the URL its checks probe.
async fn resolve(
    dns: &Dns,
    spec: &ServerSpec,
    check_path: &str,
) -> Result<(std::net::SocketAddr, String), String> {
    let target = dns.resolve(&spec.url).await?;
    let health_url = match &spec.health_url {
        Some(url) => {
            let health = dns.resolve(url).await?;
            format!("http://{}{}", health.addr, health.path)
        }
        None => format!("http://{}{check_path}", target.addr),
    };
    Ok((target.addr, health_url))
}
