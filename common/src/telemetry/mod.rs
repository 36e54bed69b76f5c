//! One logging setup for both binaries.
//!
//! Logs go to stdout, where `kubectl logs` and `docker logs` look for them.
//! What is logged and how come from the config file (`logLevel`,
//! `logFormat`) or from the environment (`RUST_LOG`, `LOG_FORMAT`); the
//! environment wins, as an operator's override at deploy time should. The
//! level can change while running ([`Logging::set_level`]), through a reload
//! layer around the filter; the format is fixed at startup.
//!
//! Lines are written by a thread of their own (`tracing-appender`'s
//! non-blocking writer): the request path only queues a line, so a slow
//! stdout (a full pipe, a slow log collector) never stalls the event loop.
//! If the queue fills up, lines are dropped rather than requests held.
//! The one line per request is put together by hand ([`line`]): the same
//! format at a third of the cost.

use std::io::IsTerminal;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use line::Style;
use serde::{Deserialize, Serialize};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

pub mod line;

/// How many log lines may wait for stdout before new ones are dropped.
const QUEUED_LINES: usize = 8192;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors (and our tests).
    Json,
}

/// Changes the running log level; made by [`init`].
#[derive(Debug)]
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` is set, so the config's level is not used.
    env_level: bool,
    /// Writes out the queued lines when dropped, at exit.
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

/// Checks a `logLevel` value: a level (`info`), or a filter such as
/// `info,loadbalancer=debug`. A bare word that is not a level is refused:
/// `EnvFilter` would take a typo such as `debgu` for a target name and
/// quietly log nothing.
pub fn parse_level(level: &str) -> Result<EnvFilter, String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let refuse = |why: String| {
        format!(
            "{level:?} is not a log level or filter ({why}); use one of {LEVELS:?}, or target=level pairs such as \"info,loadbalancer=debug\""
        )
    };
    for directive in level.split(',').map(str::trim) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(refuse(format!(
                "{directive:?} is neither a level nor target=level"
            )));
        }
    }
    EnvFilter::try_new(quiet_dependencies(level)).map_err(|e| refuse(e.to_string()))
}

/// kube's HTTP client logs an ERROR for every failed request to the API
/// server: several a second while it is away. The load balancer's watch
/// loop says the same once, with what to do, so kube's lines are off unless
/// a filter names `kube_client` itself.
fn quiet_dependencies(filter: &str) -> String {
    if filter.contains("kube_client") {
        filter.to_owned()
    } else {
        format!("{filter},kube_client=off")
    }
}

/// Installs the global subscriber with the config's `level` and `format`,
/// unless `RUST_LOG` or `LOG_FORMAT` say otherwise. Call once, right after
/// the config is read.
pub fn init(level: &str, format: LogFormat) -> Logging {
    let env_level = std::env::var("RUST_LOG").is_ok_and(|v| !v.is_empty());
    let filter = if env_level {
        let from_env = std::env::var("RUST_LOG").unwrap_or_default();
        EnvFilter::try_new(quiet_dependencies(&from_env))
            .unwrap_or_else(|_| EnvFilter::from_default_env())
    } else {
        parse_level(level).unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let format = match std::env::var("LOG_FORMAT") {
        Ok(value) if value.eq_ignore_ascii_case("json") => LogFormat::Json,
        Ok(value) if value.eq_ignore_ascii_case("text") => LogFormat::Text,
        _ => format,
    };
    let (filter, handle) = reload::Layer::new(filter);
    // The queue's slots are allocated up front: 8192 lines (a few hundred
    // KiB) ride out a burst; the crate's default, 128,000, costs 5 MiB.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .finish(std::io::stdout());
    let style = Style {
        format,
        // Colours for a person at a terminal.
        ansi: format == LogFormat::Text && std::io::stdout().is_terminal(),
    };
    line::install(writer.clone(), style);
    tracing_subscriber::registry()
        .with(filter)
        .with(output(style, writer))
        .init();
    Logging {
        filter: handle,
        env_level,
        _writer: guard,
    }
}

/// The layer that formats and writes lines in `style`.
fn output<S, W>(style: Style, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let output = tracing_subscriber::fmt::layer().with_writer(writer);
    match style.format {
        LogFormat::Json => output.json().flatten_event(true).boxed(),
        LogFormat::Text if style.ansi => output.boxed(),
        LogFormat::Text => output.with_ansi(false).fmt_fields(plain_fields()).boxed(),
    }
}

/// `key=value` fields, unstyled. The default field formatter runs every
/// field name through a styler even with colours off: a third of the cost
/// of an access log line (callgrind).
fn plain_fields()
-> impl for<'writer> tracing_subscriber::fmt::FormatFields<'writer> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt as _;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        if field.name() == "message" {
            write!(writer, "{value:?}")
        } else {
            write!(writer, "{field}={value:?}")
        }
    })
    .delimited(" ")
}

impl Logging {
    /// Logs at `level` from now on, unless `RUST_LOG` fixes the level.
    /// Returns whether the level changed.
    pub fn set_level(&self, level: &str) -> Result<bool, String> {
        if self.env_level {
            tracing::info!(
                level,
                "logLevel changed in the config, but RUST_LOG is set and wins"
            );
            return Ok(false);
        }
        let filter = parse_level(level)?;
        self.filter.reload(filter).map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// Lets a repeated log line through at most once per period, counting the
/// ones it held back, so a flood of identical errors (say, at the file
/// descriptor limit) cannot flood the log too.
#[derive(Debug)]
pub struct Throttle {
    period_ms: u64,
    /// When the next line may pass, in ms since the first use of any throttle.
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    pub const fn new(period: Duration) -> Throttle {
        Throttle {
            period_ms: period.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held
    /// back since the last one; `None` when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        static START: LazyLock<Instant> = LazyLock::new(Instant::now);
        let now = START.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.period_ms, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.held_back.swap(0, Relaxed))
        } else {
            self.held_back.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_level_is_a_level_or_target_level_pairs() {
        assert!(parse_level("info").is_ok());
        assert!(parse_level("WARN").is_ok());
        assert!(parse_level("info,loadbalancer=debug,kube=warn").is_ok());
        let error = parse_level("debgu").unwrap_err();
        assert!(
            error.starts_with("\"debgu\" is not a log level or filter"),
            "{error}"
        );
        assert!(parse_level("").is_err());
        assert!(parse_level("info,loadbalancer=loud").is_err());
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(3600));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        let every_time = Throttle::new(Duration::ZERO);
        assert_eq!(every_time.allow(), Some(0));
        assert_eq!(every_time.allow(), Some(0));
    }
}
