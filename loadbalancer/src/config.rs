//! The load balancer's settings: a JSON config file, overridden by flags.
//!
//! In Kubernetes the file is the `loadbalancer-config` ConfigMap mounted at
//! `/etc/config/config.json`. Locally you can skip it entirely:
//! `loadbalancer --port 8080 --backends 127.0.0.1:9001,127.0.0.1:9002`.
//! Everything is checked once at startup, so a mistake stops the process with
//! a message naming the field or flag, instead of surfacing on a request.
//! Every duration and count has an upper bound too ([`LIMITS`]): a drain
//! delay of 584 million years is a typo, not a wish.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use common::config::{ConfigError, in_range, invalid};
use common::telemetry::LogFormat;

use crate::balancer::checker::HealthCheck;
use crate::balancer::{Algorithm, Weights};
use serde::{Deserialize, Serialize};

/// Where the ConfigMap is mounted in the pod.
pub const DEFAULT_PATH: &str = "/etc/config/config.json";

/// An HTTP and TCP load balancer that discovers its backends from Kubernetes
/// (EndpointSlices, Endpoints, Pods or Server resources) or a fixed list, and
/// picks one per request or connection (round robin, least connections,
/// power of two, weighted, random).
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Cli {
    /// The JSON config file. Without this flag, /etc/config/config.json is
    /// read if it exists and defaults are used if it does not.
    #[arg(long, env = "LOADBALANCER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen for traffic on this port instead of the config's `port`.
    #[arg(long)]
    pub port: Option<u16>,
    /// Serve the admin port (`/`, `/healthz`, `/readyz`, `/backends`,
    /// `/metrics`) here instead of on the config's `adminPort`.
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// A fixed list of backends (IP:port, comma-separated); implies static discovery.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub backends: Option<Vec<String>>,
    /// The address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
}

/// Where the list of backends comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    /// Watch `discovery.k8s.io/v1` EndpointSlices of the backend Service.
    EndpointSlices,
    /// Watch the v1 Endpoints object of the backend Service (deprecated API).
    Endpoints,
    /// The fixed `backends` list.
    Static,
    /// Watch Pods matching `podSelector` directly.
    Pods,
    /// Watch `Server` custom resources (`lb.example.com/v1alpha1`).
    Servers,
}

/// What the load balancer speaks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/1.1: one request at a time per pooled connection.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge: many requests multiplexed over one
    /// connection per backend.
    H2c,
}

/// What the load balancer speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// HTTP/1.1: a backend is picked per request.
    #[default]
    Http,
    /// TCP pass-through: a backend is picked per connection.
    Tcp,
}

/// The config file, as written. Field names are camelCase in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FileConfig {
    /// Port for proxied traffic.
    pub port: u16,
    /// Port for `/`, `/healthz`, `/readyz`, `/backends` and `/metrics`, kept apart so no
    /// proxied path is reserved.
    pub admin_port: u16,
    pub discovery: DiscoveryKind,
    /// The Service whose endpoints are the backends.
    pub backend_service_name: String,
    /// The backend port, by number.
    pub backend_port: u16,
    /// The backend port, by name (as in the Service's `ports[].name`, or
    /// the container's `ports[].name` with `discovery: "pods"`); takes
    /// precedence over `backendPort` when set.
    pub backend_port_name: Option<String>,
    /// The fixed backends for `discovery: "static"`, as `IP:port`.
    pub backends: Vec<String>,
    /// For `discovery: "pods"`: a label selector, such as
    /// `app.kubernetes.io/name=backend`.
    pub pod_selector: Option<String>,
    /// For `discovery: "servers"`: the DNS server (`IP:port`) that resolves
    /// Server URLs; the system's resolver when absent.
    pub dns_server: Option<String>,
    /// For `discovery: "servers"`: the least time between two status
    /// writes for one Server.
    pub status_write_interval_ms: u64,
    /// `http` (a backend per request) or `tcp` (a backend per connection).
    pub mode: Mode,
    /// `http1` or `h2c`: how requests reach the backends.
    pub backend_protocol: BackendProtocol,
    /// Whether clients may speak HTTP/2 (h2c) on the proxy port; HTTP/1.1
    /// alone when false.
    pub http2: bool,
    /// TCP mode: how long a connection to a backend that left the set may
    /// go on before it is closed.
    pub drain_timeout_ms: u64,
    /// TCP mode: a connection that moves no byte either way for this long
    /// is closed.
    pub tcp_idle_timeout_ms: u64,
    /// TCP mode: a new connection that moves no byte either way for this
    /// long is closed (before the first byte, `tcpIdleTimeoutMs` is too long).
    pub tcp_first_byte_timeout_ms: u64,
    /// How long to wait for a TCP connection to a backend.
    pub connect_timeout_ms: u64,
    /// How long to wait for a backend's response headers before answering 504.
    pub request_timeout_ms: u64,
    /// How many other backends to try when a connection cannot be made.
    pub retries: u32,
    /// How long a backend's first ejection lasts; each further ejection in
    /// a row lasts this much longer (up to 5 minutes).
    pub cooldown_ms: u64,
    /// 5xx answers in a row that eject a backend (a refused connection
    /// ejects at once).
    pub consecutive_5xx: u64,
    /// At most this share of the backends is ejected by traffic at once.
    pub max_ejection_percent: u64,
    /// How long an idle keep-alive connection to a backend is kept.
    pub pool_idle_timeout_ms: u64,
    /// How long a client may take to send its request headers.
    pub header_read_timeout_ms: u64,
    /// How long a body (the client's upload or the backend's answer) may
    /// send nothing before the exchange is ended.
    pub body_idle_timeout_ms: u64,
    /// The kernel's queue of connections not yet accepted.
    pub listen_backlog: u64,
    /// On SIGTERM: how long to keep accepting while readiness is failing.
    pub drain_delay_ms: u64,
    /// On SIGTERM: how long in-flight requests may take to finish.
    pub shutdown_timeout_ms: u64,
    /// `info`, `debug`, or a filter such as `info,loadbalancer=debug`
    /// (`RUST_LOG` wins when set).
    pub log_level: String,
    /// `text` or `json` (`LOG_FORMAT` wins when set).
    pub log_format: LogFormat,
    /// One `proxied` line per request.
    pub access_log: bool,
    /// How a backend is picked for each request (or connection); when
    /// absent, `round_robin` in HTTP mode and `least_connections` in TCP mode.
    pub algorithm: Option<Algorithm>,
    /// For `weighted_round_robin`: weights by `IP:port` or pod-name prefix.
    pub weights: Weights,
    /// Active health checks; off when absent.
    pub health_check: Option<HealthCheck>,
    /// `redis://host:6379`: round robin counts in Redis, one rotation for
    /// all replicas.
    pub shared_counter: Option<String>,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            port: 8080,
            admin_port: 8081,
            discovery: DiscoveryKind::EndpointSlices,
            backend_service_name: "backend".into(),
            backend_port: 8080,
            backend_port_name: None,
            backends: Vec::new(),
            pod_selector: None,
            dns_server: None,
            status_write_interval_ms: 5_000,
            mode: Mode::Http,
            backend_protocol: BackendProtocol::Http1,
            http2: true,
            drain_timeout_ms: 30_000,
            tcp_idle_timeout_ms: 600_000,
            tcp_first_byte_timeout_ms: 30_000,
            connect_timeout_ms: 1_000,
            request_timeout_ms: 30_000,
            retries: 2,
            cooldown_ms: 1_000,
            consecutive_5xx: 5,
            max_ejection_percent: 50,
            pool_idle_timeout_ms: 30_000,
            header_read_timeout_ms: 10_000,
            body_idle_timeout_ms: 60_000,
            listen_backlog: u64::from(common::serve::DEFAULT_BACKLOG),
            drain_delay_ms: 1_000,
            shutdown_timeout_ms: 30_000,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            access_log: true,
            algorithm: None,
            weights: Weights::new(),
            health_check: None,
            shared_counter: None,
        }
    }
}

/// Where the backends come from, checked and ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Static(Vec<SocketAddr>),
    /// The endpoints of a Service.
    Kubernetes {
        api: WatchedApi,
        service: String,
        port: BackendPort,
    },
    /// Pods by label selector.
    Pods {
        selector: String,
        port: BackendPort,
    },
    /// `Server` custom resources.
    Servers {
        dns_server: Option<SocketAddr>,
        status_write_interval: Duration,
    },
}

impl Source {
    /// A short name for what is balanced, for the shared counter's key.
    pub fn name(&self) -> &str {
        match self {
            Source::Static(_) => "static",
            Source::Kubernetes { service, .. } => service,
            Source::Pods { selector, .. } => selector,
            Source::Servers { .. } => "servers",
        }
    }
}

/// Which Kubernetes API lists the backend Service's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchedApi {
    EndpointSlices,
    Endpoints,
}

/// Which port of the backend Service to send traffic to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendPort {
    Number(u16),
    Name(String),
}

impl BackendPort {
    /// Whether an endpoint port with this `number` and `name` is the one.
    pub fn matches(&self, number: u16, name: Option<&str>) -> bool {
        match self {
            BackendPort::Number(wanted) => number == *wanted,
            BackendPort::Name(wanted) => name == Some(wanted.as_str()),
        }
    }
}

impl Settings {
    /// Outlier detection's settings.
    pub fn outlier_policy(&self) -> crate::balancer::health::Policy {
        crate::balancer::health::Policy {
            consecutive_5xx: self.consecutive_5xx,
            base_ejection: self.cooldown,
            max_ejection_percent: self.max_ejection_percent,
        }
    }
}

impl std::fmt::Display for BackendPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendPort::Number(number) => write!(f, "{number}"),
            BackendPort::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// Everything the load balancer needs to run, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub source: Source,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub cooldown: Duration,
    pub consecutive_5xx: u32,
    pub max_ejection_percent: u32,
    pub pool_idle_timeout: Duration,
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub listen_backlog: u32,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    pub access_log: bool,
    pub algorithm: Algorithm,
    pub weights: Weights,
    pub health_check: Option<HealthCheck>,
    pub shared_counter: Option<String>,
    pub mode: Mode,
    pub backend_protocol: BackendProtocol,
    pub drain_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub tcp_first_byte_timeout: Duration,
    pub http2: bool,
    /// The file these settings came from, if any: it is watched for changes.
    pub file: Option<ConfigFile>,
}

/// A config file and the text it had when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
}

impl Settings {
    /// Reads the config file named by `cli` (or the default one, if present)
    /// and applies the flags over it.
    pub fn load(cli: &Cli) -> Result<Settings, ConfigError> {
        let path = match &cli.config {
            Some(path) => path.clone(),
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => {
                let none = Path::new("(no config file)");
                return Settings::resolve(none, FileConfig::default(), cli);
            }
        };
        let text = common::config::read(&path)?;
        Settings::parse(path, text, cli)
    }

    /// Parses config `text` read from `path` and applies the flags over it.
    pub fn parse(path: PathBuf, text: String, cli: &Cli) -> Result<Settings, ConfigError> {
        let file = common::config::parse(&path, &text)?;
        let mut settings = Settings::resolve(&path, file, cli)?;
        settings.file = Some(ConfigFile { path, text });
        Ok(settings)
    }

    /// Applies the flags in `cli` over `file` and checks the result; `path`
    /// names the file in errors.
    pub fn resolve(path: &Path, mut file: FileConfig, cli: &Cli) -> Result<Settings, ConfigError> {
        apply_flags(&mut file, cli);
        let bounded = |limit: &Limit, value: u64| {
            let unit = if limit.field.ends_with("Ms") {
                " ms"
            } else {
                ""
            };
            in_range(path, limit.field, value, limit.range.clone(), unit)
        };
        let ms = |limit: &Limit, value: u64| bounded(limit, value).map(Duration::from_millis);
        let status_write_interval = ms(&STATUS_WRITE_INTERVAL, file.status_write_interval_ms)?;
        let source = source(path, &file, cli, status_write_interval)?;
        check_ports(path, &file, cli)?;
        check_the_rest(path, &file)?;
        Ok(Settings {
            listen: SocketAddr::new(cli.host, file.port),
            admin_listen: SocketAddr::new(cli.host, file.admin_port),
            connect_timeout: ms(&CONNECT_TIMEOUT, file.connect_timeout_ms)?,
            request_timeout: ms(&REQUEST_TIMEOUT, file.request_timeout_ms)?,
            retries: bounded(&RETRIES, u64::from(file.retries))? as u32,
            cooldown: ms(&COOLDOWN, file.cooldown_ms)?,
            consecutive_5xx: bounded(&CONSECUTIVE_5XX, file.consecutive_5xx)? as u32,
            max_ejection_percent: bounded(&MAX_EJECTION_PERCENT, file.max_ejection_percent)? as u32,
            pool_idle_timeout: ms(&POOL_IDLE_TIMEOUT, file.pool_idle_timeout_ms)?,
            header_read_timeout: ms(&HEADER_READ_TIMEOUT, file.header_read_timeout_ms)?,
            body_idle_timeout: ms(&BODY_IDLE_TIMEOUT, file.body_idle_timeout_ms)?,
            listen_backlog: bounded(&LISTEN_BACKLOG, file.listen_backlog)? as u32,
            drain_delay: ms(&DRAIN_DELAY, file.drain_delay_ms)?,
            shutdown_timeout: ms(&SHUTDOWN_TIMEOUT, file.shutdown_timeout_ms)?,
            drain_timeout: ms(&DRAIN_TIMEOUT, file.drain_timeout_ms)?,
            tcp_idle_timeout: ms(&TCP_IDLE_TIMEOUT, file.tcp_idle_timeout_ms)?,
            tcp_first_byte_timeout: ms(&TCP_FIRST_BYTE_TIMEOUT, file.tcp_first_byte_timeout_ms)?,
            log_level: common::telemetry::parse_level(&file.log_level)
                .map(|_| file.log_level)
                .map_err(|reason| invalid(path, "logLevel", reason))?,
            log_format: file.log_format,
            access_log: file.access_log,
            algorithm: file.algorithm.unwrap_or(match file.mode {
                Mode::Http => Algorithm::RoundRobin,
                Mode::Tcp => Algorithm::LeastConnections,
            }),
            weights: file.weights,
            // Servers are only known healthy through the checks.
            health_check: match source {
                Source::Servers { .. } => Some(file.health_check.unwrap_or_default()),
                _ => file.health_check,
            },
            source,
            shared_counter: file.shared_counter,
            mode: file.mode,
            backend_protocol: file.backend_protocol,
            http2: file.http2,
            file: None,
        })
    }
}

/// The flags win over the file.
fn apply_flags(file: &mut FileConfig, cli: &Cli) {
    file.port = cli.port.unwrap_or(file.port);
    file.admin_port = cli.admin_port.unwrap_or(file.admin_port);
    if let Some(backends) = &cli.backends {
        file.discovery = DiscoveryKind::Static;
        file.backends = backends.clone();
    }
}

/// Where the backends come from, with the fields that only one kind uses
/// refused under the others.
fn source(
    path: &Path,
    file: &FileConfig,
    cli: &Cli,
    status_write_interval: Duration,
) -> Result<Source, ConfigError> {
    if file.pod_selector.is_some() && file.discovery != DiscoveryKind::Pods {
        return Err(invalid(
            path,
            "podSelector",
            "is only used with \"discovery\": \"pods\"; remove it or set discovery to pods",
        ));
    }
    match file.discovery {
        DiscoveryKind::Static => static_source(path, &file.backends, cli.backends.is_some()),
        _ if !file.backends.is_empty() => Err(invalid(
            path,
            "backends",
            "a fixed list is only used with \"discovery\": \"static\"; remove it or set discovery to static",
        )),
        kind => kubernetes_source(path, kind, file, status_write_interval),
    }
}

/// A fixed list, from the file or `--backends` (`from_flag`).
fn static_source(path: &Path, backends: &[String], from_flag: bool) -> Result<Source, ConfigError> {
    if backends.is_empty() {
        return Err(invalid(
            path,
            "backends",
            "static discovery needs at least one backend: list them in `backends` or pass --backends",
        ));
    }
    let parse = |(i, text): (usize, &String)| {
        parse_backend(text).map_err(|reason| match from_flag {
            true => ConfigError::Flag {
                flag: "--backends".into(),
                reason,
            },
            false => invalid(path, &format!("backends[{i}]"), reason),
        })
    };
    let addrs = backends
        .iter()
        .enumerate()
        .map(parse)
        .collect::<Result<_, _>>()?;
    Ok(Source::Static(addrs))
}

/// The two ports must differ (port 0, "any free one", excepted).
fn check_ports(path: &Path, file: &FileConfig, cli: &Cli) -> Result<(), ConfigError> {
    if file.port == 0 || file.port != file.admin_port {
        return Ok(());
    }
    let reason = format!("must differ from the proxy port (both are {})", file.port);
    Err(if cli.port.is_some() || cli.admin_port.is_some() {
        ConfigError::Flag {
            flag: "--admin-port".into(),
            reason,
        }
    } else {
        invalid(path, "adminPort", reason)
    })
}

/// The active checks, the shared counter's URL and the weights.
fn check_the_rest(path: &Path, file: &FileConfig) -> Result<(), ConfigError> {
    if let Some(check) = &file.health_check {
        if !check.path.starts_with('/') {
            let reason = "must start with /, as in \"/readyz\"";
            return Err(invalid(path, "healthCheck.path", reason));
        }
        let interval = check.interval_ms;
        in_range(path, "healthCheck.intervalMs", interval, 50..=HOUR, " ms")?;
        let timeout = check.timeout_ms;
        in_range(path, "healthCheck.timeoutMs", timeout, 1..=MINUTE, " ms")?;
        let thresholds = [
            ("healthCheck.unhealthyThreshold", check.unhealthy_threshold),
            ("healthCheck.healthyThreshold", check.healthy_threshold),
        ];
        for (field, value) in thresholds {
            in_range(path, field, u64::from(value), 1..=100, "")?;
        }
    }
    if let Some(url) = &file.shared_counter {
        crate::balancer::shared_counter::check_url(url)
            .map_err(|reason| invalid(path, "sharedCounter", reason))?;
    }
    for (key, weight) in &file.weights {
        let field = format!("weights.{key}");
        in_range(path, &field, u64::from(*weight), 1..=100, "")?;
    }
    Ok(())
}

/// The source for one of the Kubernetes discovery kinds.
fn kubernetes_source(
    path: &Path,
    kind: DiscoveryKind,
    file: &FileConfig,
    status_write_interval: Duration,
) -> Result<Source, ConfigError> {
    let port = || backend_port(path, file);
    let api = match kind {
        DiscoveryKind::Pods => {
            let selector = file.pod_selector.as_deref().unwrap_or("").trim();
            if selector.is_empty() {
                return Err(invalid(
                    path,
                    "podSelector",
                    "pods discovery needs a label selector, such as \"app.kubernetes.io/name=backend\"",
                ));
            }
            return Ok(Source::Pods {
                selector: selector.to_owned(),
                port: port()?,
            });
        }
        DiscoveryKind::Servers => {
            let dns_server = file.dns_server.as_deref().map(|text| {
                text.trim().parse::<SocketAddr>().map_err(|_| {
                    let reason =
                        format!("{text:?} is not an IP:port address (such as 10.96.0.10:53)");
                    invalid(path, "dnsServer", reason)
                })
            });
            return Ok(Source::Servers {
                dns_server: dns_server.transpose()?,
                status_write_interval,
            });
        }
        DiscoveryKind::Endpoints => WatchedApi::Endpoints,
        DiscoveryKind::EndpointSlices | DiscoveryKind::Static => WatchedApi::EndpointSlices,
    };
    if file.backend_service_name.trim().is_empty() {
        return Err(invalid(
            path,
            "backendServiceName",
            "must name the backend Service",
        ));
    }
    Ok(Source::Kubernetes {
        api,
        service: file.backend_service_name.clone(),
        port: port()?,
    })
}

/// The backends' port, by name or number.
fn backend_port(path: &Path, file: &FileConfig) -> Result<BackendPort, ConfigError> {
    match &file.backend_port_name {
        Some(name) if name.trim().is_empty() => Err(invalid(
            path,
            "backendPortName",
            "must not be empty when set",
        )),
        Some(name) => Ok(BackendPort::Name(name.clone())),
        None if file.backend_port == 0 => Err(invalid(
            path,
            "backendPort",
            "must be a port from 1 to 65535",
        )),
        None => Ok(BackendPort::Number(file.backend_port)),
    }
}

const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;

/// A duration (in ms) or count in the file, and the values it may take.
/// Each is a constant, so a misspelt one does not compile.
#[derive(Debug)]
pub struct Limit {
    pub field: &'static str,
    pub range: RangeInclusive<u64>,
}

const fn limit(field: &'static str, range: RangeInclusive<u64>) -> Limit {
    Limit { field, range }
}

const CONNECT_TIMEOUT: Limit = limit("connectTimeoutMs", 1..=MINUTE);
const REQUEST_TIMEOUT: Limit = limit("requestTimeoutMs", 1..=HOUR);
const RETRIES: Limit = limit("retries", 0..=10);
const COOLDOWN: Limit = limit("cooldownMs", 1..=MINUTE);
const CONSECUTIVE_5XX: Limit = limit("consecutive5xx", 1..=100);
const MAX_EJECTION_PERCENT: Limit = limit("maxEjectionPercent", 0..=100);
const POOL_IDLE_TIMEOUT: Limit = limit("poolIdleTimeoutMs", 1..=HOUR);
const HEADER_READ_TIMEOUT: Limit = limit("headerReadTimeoutMs", 1..=10 * MINUTE);
const BODY_IDLE_TIMEOUT: Limit = limit("bodyIdleTimeoutMs", 1..=HOUR);
const LISTEN_BACKLOG: Limit = limit("listenBacklog", 1..=65_535);
const DRAIN_DELAY: Limit = limit("drainDelayMs", 0..=10 * MINUTE);
const SHUTDOWN_TIMEOUT: Limit = limit("shutdownTimeoutMs", 1..=HOUR);
const DRAIN_TIMEOUT: Limit = limit("drainTimeoutMs", 0..=HOUR);
const TCP_IDLE_TIMEOUT: Limit = limit("tcpIdleTimeoutMs", 1..=24 * HOUR);
const TCP_FIRST_BYTE_TIMEOUT: Limit = limit("tcpFirstByteTimeoutMs", 1..=HOUR);
const STATUS_WRITE_INTERVAL: Limit = limit("statusWriteIntervalMs", 100..=HOUR);

/// Every bounded number in the file (the docs' table is checked against it).
pub const LIMITS: [&Limit; 16] = [
    &CONNECT_TIMEOUT,
    &REQUEST_TIMEOUT,
    &RETRIES,
    &COOLDOWN,
    &CONSECUTIVE_5XX,
    &MAX_EJECTION_PERCENT,
    &POOL_IDLE_TIMEOUT,
    &HEADER_READ_TIMEOUT,
    &BODY_IDLE_TIMEOUT,
    &LISTEN_BACKLOG,
    &DRAIN_DELAY,
    &SHUTDOWN_TIMEOUT,
    &DRAIN_TIMEOUT,
    &TCP_IDLE_TIMEOUT,
    &TCP_FIRST_BYTE_TIMEOUT,
    &STATUS_WRITE_INTERVAL,
];

/// `10.0.0.1:8080` or `[fd00::1]:8080`. Names are not resolved: a backend is
/// an address, as Kubernetes endpoints are.
fn parse_backend(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        format!("{text:?} is not an IP:port address (write 127.0.0.1:9001, or [::1]:9001 for IPv6)")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{text:?} has port 0; use the port the backend listens on"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("loadbalancer").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_help_says_what_the_binary_does_and_what_the_admin_port_serves() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("An HTTP and TCP load balancer"), "{help}");
        assert!(!help.contains("round-robin HTTP load balancer"), "{help}");
        for route in ["/healthz", "/readyz", "/backends", "/metrics"] {
            assert!(
                help.contains(route),
                "--admin-port help lacks {route}: {help}"
            );
        }
    }

    fn settings(json: &str, args: &[&str]) -> Result<Settings, String> {
        let path = Path::new("lb.json");
        common::config::parse::<FileConfig>(path, json)
            .and_then(|file| Settings::resolve(path, file, &cli(args)))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_watch_the_backend_service_in_kubernetes() {
        let settings = settings("{}", &[]).unwrap();
        assert_eq!(settings.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(settings.admin_listen, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(
            settings.source,
            Source::Kubernetes {
                api: WatchedApi::EndpointSlices,
                service: "backend".into(),
                port: BackendPort::Number(8080),
            }
        );
    }

    #[test]
    fn flags_alone_make_a_static_load_balancer() {
        let settings = settings(
            "{}",
            &[
                "--port",
                "9000",
                "--backends",
                "127.0.0.1:9001,[::1]:9002",
                "--host",
                "127.0.0.1",
            ],
        )
        .unwrap();
        assert_eq!(settings.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            settings.source,
            Source::Static(vec![
                "127.0.0.1:9001".parse().unwrap(),
                "[::1]:9002".parse().unwrap()
            ])
        );
    }

    #[test]
    fn the_shipped_local_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.json");
        let settings = Settings::load(&cli(&["--config", path.to_str().unwrap()])).unwrap();
        assert!(matches!(settings.source, Source::Static(ref b) if b.len() == 3));
    }

    #[test]
    fn a_bad_backend_address_names_its_position() {
        assert_eq!(
            settings(r#"{"discovery": "static", "backends": ["127.0.0.1:9001", "localhost:9002"]}"#, &[]),
            Err("config lb.json: field `backends[1]`: \"localhost:9002\" is not an IP:port address \
                 (write 127.0.0.1:9001, or [::1]:9001 for IPv6)"
                .into())
        );
        assert_eq!(
            settings("{}", &["--backends", "127.0.0.1:0"]),
            Err(
                "--backends: \"127.0.0.1:0\" has port 0; use the port the backend listens on"
                    .into()
            )
        );
    }

    #[test]
    fn static_discovery_needs_backends_and_kubernetes_discovery_rejects_them() {
        let error = settings(r#"{"discovery": "static"}"#, &[]).unwrap_err();
        assert!(
            error.contains("field `backends`: static discovery needs at least one backend"),
            "{error}"
        );
        let error = settings(r#"{"backends": ["127.0.0.1:9001"]}"#, &[]).unwrap_err();
        assert!(
            error.contains("only used with \"discovery\": \"static\""),
            "{error}"
        );
    }

    #[test]
    fn unknown_fields_and_values_are_named() {
        let error = settings(r#"{"discovery": "dns"}"#, &[]).unwrap_err();
        assert!(error.contains("field `discovery`"), "{error}");
        assert!(error.contains("unknown variant `dns`"), "{error}");
        let error = settings(r#"{"backendPrt": 80}"#, &[]).unwrap_err();
        assert!(error.contains("unknown field `backendPrt`"), "{error}");
        let error = settings(r#"{"port": 70000}"#, &[]).unwrap_err();
        assert!(
            error.contains("field `port`") && error.contains("70000"),
            "{error}"
        );
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        assert_eq!(
            settings(r#"{"requestTimeoutMs": 0}"#, &[]),
            Err(
                "config lb.json: field `requestTimeoutMs`: 0 ms is out of range: use 1 ms to 3600000 ms"
                    .into()
            )
        );
        assert_eq!(
            settings(r#"{"drainDelayMs": 18446744073709551615}"#, &[]),
            Err(
                "config lb.json: field `drainDelayMs`: 18446744073709551615 ms is out of range: \
                 use 0 ms to 600000 ms"
                    .into()
            )
        );
        assert_eq!(
            settings(r#"{"retries": 4294967295}"#, &[]),
            Err("config lb.json: field `retries`: 4294967295 is out of range: use 0 to 10".into())
        );
        assert_eq!(
            settings(r#"{"backendPort": 0}"#, &[]),
            Err("config lb.json: field `backendPort`: must be a port from 1 to 65535".into())
        );
        assert_eq!(
            settings(r#"{"port": 9000, "adminPort": 9000}"#, &[]),
            Err(
                "config lb.json: field `adminPort`: must differ from the proxy port (both are 9000)".into()
            )
        );
        assert_eq!(
            settings("{}", &["--port", "8081"]),
            Err("--admin-port: must differ from the proxy port (both are 8081)".into())
        );
    }

    #[test]
    fn pods_discovery_needs_a_selector_and_only_pods_discovery_takes_one() {
        let error = settings(r#"{"discovery": "pods"}"#, &[]).unwrap_err();
        assert!(
            error.contains("field `podSelector`: pods discovery needs a label selector"),
            "{error}"
        );
        let error = settings(r#"{"podSelector": "app=backend"}"#, &[]).unwrap_err();
        assert!(
            error.contains("only used with \"discovery\": \"pods\""),
            "{error}"
        );
        let pods = settings(
            r#"{"discovery": "pods", "podSelector": "app=backend", "backendPortName": "http"}"#,
            &[],
        )
        .unwrap();
        assert_eq!(
            pods.source,
            Source::Pods {
                selector: "app=backend".into(),
                port: BackendPort::Name("http".into()),
            }
        );
    }

    #[test]
    fn servers_discovery_checks_the_dns_server_and_always_health_checks() {
        let error =
            settings(r#"{"discovery": "servers", "dnsServer": "dns.local"}"#, &[]).unwrap_err();
        assert!(
            error.contains("field `dnsServer`: \"dns.local\" is not an IP:port"),
            "{error}"
        );
        let servers = settings(
            r#"{"discovery": "servers", "dnsServer": "127.0.0.1:53"}"#,
            &[],
        )
        .unwrap();
        assert_eq!(
            servers.source,
            Source::Servers {
                dns_server: Some("127.0.0.1:53".parse().unwrap()),
                status_write_interval: Duration::from_secs(5),
            }
        );
        assert_eq!(servers.health_check, Some(HealthCheck::default()));
    }

    #[test]
    fn tcp_mode_defaults_to_least_connections_unless_told_otherwise() {
        let tcp = settings(r#"{"mode": "tcp"}"#, &[]).unwrap();
        assert_eq!(
            (tcp.mode, tcp.algorithm),
            (Mode::Tcp, Algorithm::LeastConnections)
        );
        let chosen = settings(r#"{"mode": "tcp", "algorithm": "random"}"#, &[]).unwrap();
        assert_eq!(chosen.algorithm, Algorithm::Random);
        assert_eq!(
            settings("{}", &[]).unwrap().algorithm,
            Algorithm::RoundRobin
        );
        let error = settings(r#"{"mode": "udp"}"#, &[]).unwrap_err();
        assert!(error.contains("field `mode`"), "{error}");
    }

    #[test]
    fn every_number_in_the_file_has_a_bounded_range() {
        let defaults = serde_json::to_value(FileConfig::default()).unwrap();
        for Limit { field, range } in LIMITS {
            assert!(defaults.get(field).is_some(), "{field} is a config field");
            let default = defaults[field].as_u64().unwrap();
            assert!(range.contains(&default), "{field}'s default is allowed");
            let above = format!("{{\"{field}\": {}}}", range.end() + 1);
            let error = settings(&above, &[]).unwrap_err();
            assert!(error.contains(&format!("field `{field}`")), "{error}");
        }
        let numbers = defaults
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, value)| {
                value.is_u64() && !["port", "adminPort", "backendPort"].contains(&name.as_str())
            })
            .count();
        assert_eq!(
            numbers,
            LIMITS.len(),
            "every duration and count is in LIMITS"
        );
    }

    #[test]
    fn health_checks_are_off_unless_configured_and_checked_when_they_are() {
        assert_eq!(settings("{}", &[]).unwrap().health_check, None);
        let on = settings(r#"{"healthCheck": {"intervalMs": 500}}"#, &[]).unwrap();
        assert_eq!(on.health_check.unwrap().path, "/readyz");
        assert_eq!(
            settings_error(r#"{"healthCheck": {"unhealthyThreshold": 0}}"#),
            "config lb.json: field `healthCheck.unhealthyThreshold`: 0 is out of range: use 1 to 100"
        );
        assert!(
            settings_error(r#"{"healthCheck": {"path": "readyz"}}"#).contains("must start with /")
        );
        assert!(
            settings_error(r#"{"healthCheck": {"pth": "/x"}}"#).contains("unknown field `pth`")
        );
    }

    #[test]
    fn a_shared_counter_must_be_a_redis_url() {
        let on = settings(r#"{"sharedCounter": "redis://redis:6379"}"#, &[]).unwrap();
        assert_eq!(on.shared_counter.as_deref(), Some("redis://redis:6379"));
        let error = settings_error(r#"{"sharedCounter": "redis:6379"}"#);
        assert!(
            error.starts_with(
                "config lb.json: field `sharedCounter`: \"redis:6379\" is not a Redis URL"
            ),
            "{error}"
        );
    }

    #[test]
    fn the_algorithm_and_weights_are_read_and_checked() {
        let settings = settings(
            r#"{"algorithm": "weighted_round_robin", "weights": {"backend-a": 5}}"#,
            &[],
        )
        .unwrap();
        assert_eq!(settings.algorithm, Algorithm::WeightedRoundRobin);
        assert_eq!(settings.weights["backend-a"], 5);
        assert_eq!(
            settings_error(r#"{"weights": {"backend-a": 0}}"#),
            "config lb.json: field `weights.backend-a`: 0 is out of range: use 1 to 100"
        );
        assert!(
            settings_error(r#"{"algorithm": "fastest"}"#).contains("unknown variant `fastest`")
        );
    }

    #[test]
    fn log_settings_are_read_and_checked() {
        let settings = settings(
            r#"{"logLevel": "debug,kube=warn", "logFormat": "json", "accessLog": false}"#,
            &[],
        )
        .unwrap();
        assert_eq!(settings.log_level, "debug,kube=warn");
        assert_eq!(settings.log_format, LogFormat::Json);
        assert!(!settings.access_log);
        let error = settings_error(r#"{"logLevel": "loud!"}"#);
        assert!(
            error.starts_with("config lb.json: field `logLevel`: \"loud!\" is not a log level"),
            "{error}"
        );
        let error = settings_error(r#"{"logFormat": "xml"}"#);
        assert!(
            error.contains("unknown variant `xml`, expected `text` or `json`"),
            "{error}"
        );
    }

    fn settings_error(json: &str) -> String {
        settings(json, &[]).unwrap_err()
    }

    #[test]
    fn a_port_name_takes_precedence() {
        let settings = settings(r#"{"backendPortName": "http"}"#, &[]).unwrap();
        assert!(
            matches!(settings.source, Source::Kubernetes { port: BackendPort::Name(ref n), .. } if n == "http")
        );
    }

    #[test]
    fn an_explicit_config_file_must_exist() {
        let error = Settings::load(&cli(&["--config", "/no/such/lb.json"]))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("reading config /no/such/lb.json: No such file"),
            "{error}"
        );
    }
}
