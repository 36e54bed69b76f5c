//! From a Server's URL to an address, through DNS.
//!
//! `http://10.244.1.7:8080` needs no lookup. `http://backend.lb-demo.svc.cluster.local`
//! does: its address from A/AAAA records, and, with no port in the URL, its
//! port from the SRV record Kubernetes DNS publishes for every named port of
//! a Service (`_http._tcp.backend.lb-demo.svc.cluster.local` for a port named
//! `http`); with no SRV record, the scheme's default, 80.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use hyper::Uri;

/// A DNS resolver: the system's, or one server's.
#[derive(Debug, Clone)]
pub struct Dns(TokioResolver);

/// A URL taken apart: where to connect, and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
}

impl Dns {
    /// Uses `server` (UDP and TCP) when given, else `/etc/resolv.conf`.
    pub fn new(server: Option<SocketAddr>) -> Result<Dns, String> {
        let builder = match server {
            Some(server) => {
                let connection = |mut config: ConnectionConfig| {
                    config.port = server.port();
                    config
                };
                let name_server = NameServerConfig::new(
                    server.ip(),
                    true,
                    vec![
                        connection(ConnectionConfig::udp()),
                        connection(ConnectionConfig::tcp()),
                    ],
                );
                Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![name_server]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system's DNS settings: {e}"))?,
        };
        let mut builder = builder;
        // A lookup stalls the watch loop, so fail fast: 1 s, twice.
        builder.options_mut().timeout = std::time::Duration::from_secs(1);
        builder.options_mut().attempts = 2;
        builder
            .build()
            .map(Dns)
            .map_err(|e| format!("cannot set up DNS: {e}"))
    }

    /// Where `url` points: `http://host[:port][/path]`.
    pub async fn resolve(&self, url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{url:?}: only http:// is supported (the load balancer speaks plain HTTP to backends)"
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("{url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let literal = host.parse::<IpAddr>().ok();
        let port = match (uri.port_u16(), literal) {
            (Some(port), _) => port,
            (None, Some(_)) => 80,
            (None, None) => self.srv_port(host).await.unwrap_or(80),
        };
        let ip = match literal {
            Some(ip) => ip,
            None => self.address(host).await?,
        };
        Ok(Target {
            addr: SocketAddr::new(ip, port),
            path,
        })
    }

    /// The port of `_http._tcp.<host>`, if DNS publishes one.
    async fn srv_port(&self, host: &str) -> Option<u16> {
        let lookup = self.0.srv_lookup(format!("_http._tcp.{host}")).await.ok()?;
        lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some(srv),
                _ => None,
            })
            // The lowest priority first; among equals, the heaviest.
            .min_by_key(|srv| (srv.priority, std::cmp::Reverse(srv.weight)))
            .map(|srv| srv.port)
    }

    async fn address(&self, host: &str) -> Result<IpAddr, String> {
        let found = self
            .0
            .lookup_ip(host)
            .await
            .map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
        found
            .iter()
            .next()
            .ok_or_else(|| format!("{host:?} has no address in DNS"))
    }
}
