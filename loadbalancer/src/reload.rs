//! Applying a changed config file to the running load balancer.
//!
//! [`common::reload`] notices the change; [`Live::apply`] decides what it
//! means. The new file is checked exactly as at startup (same parser, same
//! ranges, same flags over it); if it fails, nothing changes. Otherwise:
//!
//! | changes live | needs a restart |
//! |---|---|
//! | `algorithm`, `weights`, `healthCheck`, `backends` (static discovery), `connectTimeoutMs`, `requestTimeoutMs`, `bodyIdleTimeoutMs`, `retries`, `cooldownMs`, `consecutive5xx`, `maxEjectionPercent`, `poolIdleTimeoutMs`, `drainDelayMs`, `shutdownTimeoutMs`, `backendProtocol`, `drainTimeoutMs`, `tcpIdleTimeoutMs` and `tcpFirstByteTimeoutMs` (new connections), `logLevel`, `accessLog` | `port`, `adminPort`, `listenBacklog`, `headerReadTimeoutMs`, `http2`, `logFormat`, `sharedCounter`, `mode`, `discovery` and its source settings |
//!
//! Requests already in flight finish with the settings they started with;
//! the next request reads the new ones (one atomic load).

use std::sync::Arc;

use arc_swap::ArcSwap;
use common::config::ConfigError;
use common::reload::Outcome;
use common::serve::Server;
use common::telemetry::Logging;

use crate::balancer::Balancer;
use crate::config::{Cli, Settings, Source};
use crate::discovery;
use crate::proxy::Proxy;
use crate::tcp::TcpProxy;

/// The running load balancer, as far as a config change can reach it.
#[derive(Debug)]
pub struct Live {
    /// The settings in force; shutdown reads its delays from here.
    pub settings: ArcSwap<Settings>,
    pub cli: Cli,
    pub proxy: Arc<Proxy>,
    /// The proxy port's HTTP server (its send timeout is `bodyIdleTimeoutMs`).
    pub server: Arc<Server>,
    /// In TCP mode.
    pub tcp: Option<Arc<TcpProxy>>,
    pub balancer: Arc<Balancer>,
    pub logging: Logging,
}

impl Live {
    /// Checks the config `text` and applies what can change while running.
    pub fn apply(&self, text: &str) -> Result<Outcome, ConfigError> {
        let old = self.settings.load_full();
        let path = old
            .file
            .as_ref()
            .map(|f| f.path.clone())
            .unwrap_or_default();
        let new = match Settings::parse(path, text.to_owned(), &self.cli) {
            Ok(new) => new,
            Err(error) => {
                self.balancer.totals.config_reloaded(false);
                return Err(error);
            }
        };

        let static_lists = match (&old.source, &new.source) {
            (Source::Static(before), Source::Static(after)) => Some((before, after)),
            _ => None,
        };
        let mut outcome = Outcome::default();
        let restart_only = [
            ("port", old.listen != new.listen),
            ("adminPort", old.admin_listen != new.admin_listen),
            ("listenBacklog", old.listen_backlog != new.listen_backlog),
            (
                "headerReadTimeoutMs",
                old.header_read_timeout != new.header_read_timeout,
            ),
            ("logFormat", old.log_format != new.log_format),
            ("http2", old.http2 != new.http2),
            ("sharedCounter", old.shared_counter != new.shared_counter),
            ("mode", old.mode != new.mode),
            (
                "discovery",
                static_lists.is_none() && old.source != new.source,
            ),
        ];
        let live = [
            ("algorithm", old.algorithm != new.algorithm),
            ("healthCheck", old.health_check != new.health_check),
            ("weights", old.weights != new.weights),
            (
                "backends",
                static_lists.is_some_and(|(before, after)| before != after),
            ),
            (
                "connectTimeoutMs",
                old.connect_timeout != new.connect_timeout,
            ),
            (
                "requestTimeoutMs",
                old.request_timeout != new.request_timeout,
            ),
            (
                "bodyIdleTimeoutMs",
                old.body_idle_timeout != new.body_idle_timeout,
            ),
            ("retries", old.retries != new.retries),
            ("cooldownMs", old.cooldown != new.cooldown),
            ("consecutive5xx", old.consecutive_5xx != new.consecutive_5xx),
            (
                "maxEjectionPercent",
                old.max_ejection_percent != new.max_ejection_percent,
            ),
            (
                "poolIdleTimeoutMs",
                old.pool_idle_timeout != new.pool_idle_timeout,
            ),
            ("drainDelayMs", old.drain_delay != new.drain_delay),
            (
                "shutdownTimeoutMs",
                old.shutdown_timeout != new.shutdown_timeout,
            ),
            ("drainTimeoutMs", old.drain_timeout != new.drain_timeout),
            (
                "backendProtocol",
                old.backend_protocol != new.backend_protocol,
            ),
            (
                "tcpIdleTimeoutMs",
                old.tcp_idle_timeout != new.tcp_idle_timeout,
            ),
            (
                "tcpFirstByteTimeoutMs",
                old.tcp_first_byte_timeout != new.tcp_first_byte_timeout,
            ),
            ("logLevel", old.log_level != new.log_level),
            ("accessLog", old.access_log != new.access_log),
        ];
        outcome.need_restart = changed(&restart_only);
        outcome.applied = changed(&live);

        // What needs a restart keeps its running value.
        let settings = Settings {
            listen: old.listen,
            admin_listen: old.admin_listen,
            listen_backlog: old.listen_backlog,
            header_read_timeout: old.header_read_timeout,
            http2: old.http2,
            log_format: old.log_format,
            shared_counter: old.shared_counter.clone(),
            mode: old.mode,
            source: match static_lists {
                Some(_) => new.source.clone(),
                None => old.source.clone(),
            },
            ..new
        };
        if let Source::Static(addrs) = &settings.source
            && outcome.applied.contains(&"backends")
        {
            discovery::publish(&self.balancer, &discovery::static_set(addrs));
        }
        if outcome.applied.contains(&"algorithm") || outcome.applied.contains(&"weights") {
            self.balancer
                .set_algorithm(settings.algorithm, &settings.weights);
        }
        if outcome.applied.contains(&"healthCheck") {
            self.balancer
                .checker
                .configure(settings.health_check.clone());
        }
        self.proxy.configure(&settings);
        self.server.set_send_timeout(settings.body_idle_timeout);
        if let Some(tcp) = &self.tcp {
            tcp.configure(&settings);
        }
        self.balancer.set_outlier_policy(settings.outlier_policy());
        if outcome.applied.contains(&"logLevel") {
            // Checked when parsed, so this cannot fail.
            let _ = self.logging.set_level(&settings.log_level);
        }
        self.settings.store(Arc::new(settings));
        self.balancer.totals.config_reloaded(true);
        Ok(outcome)
    }
}

fn changed(fields: &[(&'static str, bool)]) -> Vec<&'static str> {
    fields
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect()
}
