//! Applying a changed config file to the running backend.
//!
//! [`common::reload`] notices the change (a ConfigMap updated in place);
//! [`Live::apply`] checks it as at startup and applies `serviceName`,
//! `responseDelayMs`, `logLevel` and `accessLog` at once. `port`, `tcpPort`, `headerReadTimeoutMs` and
//! `logFormat` need a restart and are reported as such.

use std::path::PathBuf;

use common::config::ConfigError;
use common::reload::Outcome;
use common::telemetry::Logging;

use crate::config::Config;
use crate::routes::AppState;

/// The running backend, as far as a config change can reach it.
#[derive(Debug)]
pub struct Live {
    pub path: PathBuf,
    /// The config in force.
    pub config: Config,
    pub state: AppState,
    pub logging: Logging,
    /// `--response-delay-ms`, which wins over the file.
    pub response_delay_flag: Option<u64>,
}

impl Live {
    /// Checks the config `text` and applies what can change while running.
    pub fn apply(&mut self, text: &str) -> Result<Outcome, ConfigError> {
        let mut new = Config::parse(&self.path, text)?;
        if let Some(delay) = self.response_delay_flag {
            new.response_delay_ms = delay;
        }
        let old = &self.config;
        let mut outcome = Outcome::default();
        for (field, changed) in [
            ("port", old.port != new.port),
            ("tcpPort", old.tcp_port != new.tcp_port),
            (
                "headerReadTimeoutMs",
                old.header_read_timeout_ms != new.header_read_timeout_ms,
            ),
            ("logFormat", old.log_format != new.log_format),
        ] {
            if changed {
                outcome.need_restart.push(field);
            }
        }
        if old.service_name != new.service_name {
            self.state.set_service_name(&new.service_name);
            outcome.applied.push("serviceName");
        }
        if old.log_level != new.log_level {
            // Checked when parsed, so this cannot fail.
            let _ = self.logging.set_level(&new.log_level);
            outcome.applied.push("logLevel");
        }
        if old.response_delay_ms != new.response_delay_ms {
            self.state
                .set_response_delay(std::time::Duration::from_millis(new.response_delay_ms));
            outcome.applied.push("responseDelayMs");
        }
        if old.access_log != new.access_log {
            self.state.set_access_log(new.access_log);
            outcome.applied.push("accessLog");
        }
        // What needs a restart keeps its running value.
        self.config = Config {
            port: old.port,
            tcp_port: old.tcp_port,
            header_read_timeout_ms: old.header_read_timeout_ms,
            log_format: old.log_format,
            ..new
        };
        Ok(outcome)
    }
}
