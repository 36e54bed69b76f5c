//! `"discovery": "servers"`: backends declared as `Server` custom resources,
//! their health written back.
//!
//! The load balancer watches the Servers in its namespace ([`resource`]),
//! turns each one's URL into an address ([`dns`]), health-checks each one
//! (active checks are always on in this mode; `healthCheck` tunes them) and
//! routes only to those whose checks pass. Whenever a Server's verdict
//! changes, it is written to the Server's status ([`status`]), so
//! `kubectl get servers -w` shows HEALTHY flip.
//!
//! Names are resolved again every 30 s (every second while one fails), so
//! a DNS change or a name that appears later is picked up without any
//! change to the Servers.

pub mod dns;
pub mod resource;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::watcher;
use kube::{Api, Client};

use super::kubernetes::{self, Watched};
use super::{DiscoveryError, Status};
use crate::balancer::{BackendSet, Balancer, Origin};
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
    let resolver = Arc::new(Resolver {
        dns,
        checker: balancer.checker.clone(),
        latest: tokio::sync::Mutex::new(None),
    });
    tokio::spawn(resolver.clone().refresh(balancer.clone()));
    tokio::spawn(kubernetes::watch(
        api,
        watcher::Config::default(),
        watched,
        move |servers: Vec<Arc<Server>>| {
            writer.observed(&servers);
            let resolver = resolver.clone();
            async move { resolver.backends(servers).await }
        },
        balancer,
        status,
    ));
    Ok(())
}

/// Turns the latest Servers into backends, from the watch and on a timer.
#[derive(Debug)]
struct Resolver {
    dns: Dns,
    checker: Arc<crate::balancer::checker::Checker>,
    /// The Servers last seen, and whether each one resolved. The lock also
    /// keeps the watch and the timer from publishing out of order.
    latest: tokio::sync::Mutex<Option<(Vec<Arc<Server>>, bool)>>,
}

impl Resolver {
    /// The backends for `servers`, which become the latest.
    async fn backends(&self, servers: Vec<Arc<Server>>) -> BackendSet {
        let mut latest = self.latest.lock().await;
        let (set, all_resolved) = backends(&self.dns, &servers, &self.checker.path()).await;
        *latest = Some((servers, all_resolved));
        set
    }

    /// Resolves the latest Servers again and publishes the result: every
    /// 30 s, or every second while a name does not resolve.
    async fn refresh(self: Arc<Self>, balancer: Arc<Balancer>) {
        loop {
            let failing = matches!(*self.latest.lock().await, Some((_, false)));
            let pause = if failing { 1 } else { 30 };
            tokio::time::sleep(Duration::from_secs(pause)).await;
            let mut latest = self.latest.lock().await;
            let Some((servers, _)) = latest.take() else {
                continue;
            };
            let (set, all_resolved) = backends(&self.dns, &servers, &self.checker.path()).await;
            super::publish(&balancer, &set);
            *latest = Some((servers, all_resolved));
        }
    }
}

/// The address of each Server, with its name, weight and health URL, and
/// whether every one resolved. A Server whose URL does not resolve is left
/// out, and says why in the log.
async fn backends(dns: &Dns, servers: &[Arc<Server>], check_path: &str) -> (BackendSet, bool) {
    let mut set = BackendSet::new();
    let mut all_resolved = true;
    for server in servers {
        let name = server.metadata.name.clone().unwrap_or_default();
        match resolve(dns, &server.spec, check_path).await {
            Ok((addr, health_url)) => {
                // The CRD's schema allows 1 to 100; a cluster without it
                // (or a hand-made object) could say anything.
                let weight = server.spec.weight.map(|weight| {
                    if !(1..=100).contains(&weight) {
                        tracing::warn!(
                            server = name,
                            weight,
                            "spec.weight is outside 1 to 100; using the nearest of those"
                        );
                    }
                    weight.clamp(1, 100)
                });
                let about = Origin {
                    name: Some(name),
                    weight,
                    health_url: Some(health_url),
                    ..Origin::default()
                };
                set.insert(addr, about);
            }
            Err(reason) => {
                tracing::warn!(server = name, "Server left out: {reason}");
                all_resolved = false;
            }
        }
    }
    (set, all_resolved)
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
