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

/// The names of the fields whose values differ between `$old` and `$new`.
macro_rules! differing {
    ($old:ident, $new:ident; $($name:literal => $field:ident),* $(,)?) => {
        [$(($name, $old.$field != $new.$field)),*]
            .into_iter()
            .filter(|(_, differs)| *differs)
            .map(|(name, _)| name)
            .collect::<Vec<&'static str>>()
    };
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
        let outcome = compare(&old, &new);
        let settings = kept_running(&old, new);
        self.put_in_force(&settings, &outcome);
        self.settings.store(Arc::new(settings));
        self.balancer.totals.config_reloaded(true);
        Ok(outcome)
    }

    /// Hands the new settings to each running part.
    fn put_in_force(&self, settings: &Settings, outcome: &Outcome) {
        let applied = |field| outcome.applied.contains(&field);
        if let Source::Static(addrs) = &settings.source
            && applied("backends")
        {
            discovery::publish(&self.balancer, &discovery::static_set(addrs));
        }
        if applied("algorithm") || applied("weights") {
            self.balancer
                .set_algorithm(settings.algorithm, &settings.weights);
        }
        if applied("healthCheck") {
            let check = settings.health_check.clone();
            self.balancer.checker.configure(check);
        }
        self.proxy.configure(settings);
        self.server.set_send_timeout(settings.body_idle_timeout);
        if let Some(tcp) = &self.tcp {
            tcp.configure(settings);
        }
        self.balancer.set_outlier_policy(settings.outlier_policy());
        if applied("logLevel") {
            // Checked when parsed, so this cannot fail.
            let _ = self.logging.set_level(&settings.log_level);
        }
    }
}

/// Which changed fields apply now and which need a restart.
fn compare(old: &Settings, new: &Settings) -> Outcome {
    let static_lists = matches!(
        (&old.source, &new.source),
        (Source::Static(_), Source::Static(_))
    );
    let mut need_restart = differing!(old, new;
        "port" => listen, "adminPort" => admin_listen, "listenBacklog" => listen_backlog,
        "headerReadTimeoutMs" => header_read_timeout, "logFormat" => log_format,
        "http2" => http2, "sharedCounter" => shared_counter, "mode" => mode,
    );
    let mut applied = differing!(old, new;
        "algorithm" => algorithm, "healthCheck" => health_check, "weights" => weights,
        "connectTimeoutMs" => connect_timeout, "requestTimeoutMs" => request_timeout,
        "bodyIdleTimeoutMs" => body_idle_timeout, "retries" => retries,
        "cooldownMs" => cooldown, "consecutive5xx" => consecutive_5xx,
        "maxEjectionPercent" => max_ejection_percent, "poolIdleTimeoutMs" => pool_idle_timeout,
        "drainDelayMs" => drain_delay, "shutdownTimeoutMs" => shutdown_timeout,
        "drainTimeoutMs" => drain_timeout, "backendProtocol" => backend_protocol,
        "tcpIdleTimeoutMs" => tcp_idle_timeout, "tcpFirstByteTimeoutMs" => tcp_first_byte_timeout,
        "logLevel" => log_level, "accessLog" => access_log,
    );
    // A static list changes live; any other change of source needs a restart.
    if old.source != new.source {
        match static_lists {
            true => applied.push("backends"),
            false => need_restart.push("discovery"),
        }
    }
    Outcome {
        applied,
        need_restart,
    }
}

/// The new settings, with what needs a restart kept at its running value.
fn kept_running(old: &Settings, new: Settings) -> Settings {
    let static_lists = matches!(
        (&old.source, &new.source),
        (Source::Static(_), Source::Static(_))
    );
    Settings {
        listen: old.listen,
        admin_listen: old.admin_listen,
        listen_backlog: old.listen_backlog,
        header_read_timeout: old.header_read_timeout,
        http2: old.http2,
        log_format: old.log_format,
        shared_counter: old.shared_counter.clone(),
        mode: old.mode,
        source: match static_lists {
            true => new.source.clone(),
            false => old.source.clone(),
        },
        ..new
    }
}
