//! Serving metrics in the format the scraper asks for.
//!
//! `prometheus-client` writes OpenMetrics, where a counter family `x` is
//! described as `# TYPE x counter` and its samples are `x_total`. Prometheus
//! asks for OpenMetrics in its `Accept` header and reads that. Older tools,
//! `promtool check metrics` and people with `curl` expect the classic
//! Prometheus text format (0.0.4), where the description names the sample,
//! `x_total`, and there is no `# EOF`. The two differ in nothing else for
//! the metrics we export, so the classic one is made from the other.

use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers a scrape with `openmetrics` text, or its classic form when the
/// request's `Accept` header does not ask for OpenMetrics.
pub fn respond(request_headers: &HeaderMap, openmetrics: String) -> Response {
    let wants_openmetrics = request_headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], openmetrics).into_response()
    } else {
        let text = classic(&openmetrics);
        ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
    }
}

/// The classic Prometheus text form of an OpenMetrics exposition.
pub fn classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(described.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_described_by_their_sample_name_and_eof_is_dropped() {
        let openmetrics = "# HELP requests Answered requests.\n\
                           # TYPE requests counter\n\
                           requests_total{code=\"200\"} 3\n\
                           # HELP in_flight Requests in flight.\n\
                           # TYPE in_flight gauge\n\
                           in_flight 1\n\
                           # EOF\n";
        assert_eq!(
            classic(openmetrics),
            "# HELP requests_total Answered requests.\n\
             # TYPE requests_total counter\n\
             requests_total{code=\"200\"} 3\n\
             # HELP in_flight Requests in flight.\n\
             # TYPE in_flight gauge\n\
             in_flight 1\n"
        );
    }
}
