//! One logging setup for both binaries.
//!
//! Logs go to stdout, where `kubectl logs` and `docker logs` look for them.
//! `RUST_LOG` filters them (default `info`); `LOG_FORMAT=json` prints one JSON
//! object per line for log collectors (and for our tests, which read them).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    if std::env::var("LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json")) {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(std::io::stdout().is_terminal()).init();
    }
}
