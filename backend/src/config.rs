//! The backend's config file.
//!
//! In Kubernetes it is the `backend-config` ConfigMap mounted at
//! `/etc/config/config.json`; locally, `backend/config.json`. Unknown fields
//! are errors, so a typo such as `"prot"` stops the pod with a message
//! instead of being ignored.

use std::path::Path;
use std::time::Duration;

use common::config::ConfigError;
use common::telemetry::LogFormat;
use serde::Deserialize;

/// Where the ConfigMap is mounted in the pod.
pub const DEFAULT_PATH: &str = "/etc/config/config.json";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// The TCP port to listen on; 0 picks a free one (tests use that).
    pub port: u16,
    /// The name this service reports in every answer.
    pub service_name: String,
    /// How long a client may take to send a request head (or, on an idle
    /// keep-alive connection, to start the next one) before it is
    /// disconnected.
    pub header_read_timeout_ms: u64,
    /// `info`, `debug`, or a filter (`RUST_LOG` wins when set).
    pub log_level: String,
    /// `text` or `json` (`LOG_FORMAT` wins when set).
    pub log_format: LogFormat,
    /// One log line per request.
    pub access_log: bool,
    /// Added to every `GET /`, to make one replica slow for a lesson.
    pub response_delay_ms: u64,
    /// A TCP port that greets with the pod name and echoes lines, for the
    /// load balancer's TCP mode; off when absent (0 picks a free one).
    pub tcp_port: Option<u16>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: 8080,
            service_name: "backend".into(),
            header_read_timeout_ms: 10_000,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            access_log: true,
            response_delay_ms: 0,
            tcp_port: None,
        }
    }
}

impl Config {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        common::config::load::<Config>(path)?.checked(path)
    }

    /// Parses and checks config `text`; `path` is only named in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        common::config::parse::<Config>(path, text)?.checked(path)
    }

    fn checked(self, path: &Path) -> Result<Config, ConfigError> {
        if self.service_name.trim().is_empty() {
            return Err(common::config::invalid(
                path,
                "serviceName",
                "must not be empty",
            ));
        }
        common::config::in_range(
            path,
            "headerReadTimeoutMs",
            self.header_read_timeout_ms,
            1..=600_000,
            " ms",
        )?;
        common::config::in_range(
            path,
            "responseDelayMs",
            self.response_delay_ms,
            0..=60_000,
            " ms",
        )?;
        common::telemetry::parse_level(&self.log_level)
            .map_err(|reason| common::config::invalid(path, "logLevel", reason))?;
        Ok(self)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("config.json"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn fields_are_read_and_missing_ones_take_defaults() {
        assert_eq!(
            parse(r#"{"port": 9001, "serviceName": "echo"}"#),
            Ok(Config {
                port: 9001,
                service_name: "echo".into(),
                ..Config::default()
            })
        );
        assert_eq!(parse("{}"), Ok(Config::default()));
    }

    #[test]
    fn the_shipped_local_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.json");
        Config::load(&path).expect("backend/config.json should load");
    }

    #[test]
    fn a_typo_in_a_field_name_is_reported_by_name() {
        assert_eq!(
            parse("{\n  \"prot\": 80\n}"),
            Err(
                "reading config config.json: field `prot`: line 2, column 8: \
                 unknown field `prot`, expected one of `port`, `serviceName`, `headerReadTimeoutMs`, \
                 `logLevel`, `logFormat`, `accessLog`, `responseDelayMs`, `tcpPort`"
                    .into()
            )
        );
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        assert_eq!(
            parse(r#"{"port": "eighty"}"#),
            Err(
                "reading config config.json: field `port`: line 1, column 17: \
                 invalid type: string \"eighty\", expected u16"
                    .into()
            )
        );
    }

    #[test]
    fn a_port_out_of_range_names_the_field() {
        let error = parse(r#"{"port": 65536}"#).unwrap_err();
        assert!(error.contains("field `port`"), "{error}");
        assert!(error.contains("65536"), "{error}");
    }

    #[test]
    fn invalid_json_gives_line_and_column() {
        assert_eq!(
            parse("{\"port\": 80,\n}"),
            Err("reading config config.json: line 2, column 1: trailing comma".into())
        );
    }

    #[test]
    fn an_empty_service_name_is_rejected() {
        assert_eq!(
            parse(r#"{"serviceName": " "}"#),
            Err("config config.json: field `serviceName`: must not be empty".into())
        );
    }

    #[test]
    fn the_header_read_timeout_is_bounded() {
        assert_eq!(
            parse(r#"{"headerReadTimeoutMs": 0}"#),
            Err(
                "config config.json: field `headerReadTimeoutMs`: 0 ms is out of range: \
                 use 1 ms to 600000 ms"
                    .into()
            )
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Config::load(Path::new("/no/such/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("reading config /no/such/config.json: No such file"),
            "{error}"
        );
    }
}
