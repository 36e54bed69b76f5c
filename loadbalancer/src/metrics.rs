//! Prometheus metrics: encoded when scraped, from numbers counted elsewhere.
//!
//! The numbers are counted where things happen, by the layer that owns
//! them: each backend's [`BackendStats`](crate::balancer::stats::BackendStats)
//! and the balancer's [`Totals`](crate::balancer::stats::Totals), plain
//! atomics on the request path. This module only reads them. At scrape time, [`encode`] walks the *current* snapshot and writes one
//! series per backend and label, in the OpenMetrics text format (the
//! `prometheus-client` crate does the writing). A backend that leaves the
//! set therefore takes its series with it: under churn the output stays as
//! large as the set is.
//!
//! The names are part of the interface (dashboards and the docs use them):
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `loadbalancer_requests_total` | `backend`, `code` | answered requests, by the backend that answered (`none` when none could be picked) |
//! | `loadbalancer_request_duration_seconds` | `backend` | histogram: request start to response head |
//! | `loadbalancer_in_flight_requests` | `backend` | until the response body is sent or dropped |
//! | `loadbalancer_retries_total` | `backend` | failed attempts retried on another backend |
//! | `loadbalancer_backends` | `state` | backends per health state: `healthy`, `ejected`, `probing` |
//! | `loadbalancer_ejections_total` | `backend`, `reason` | `connect`, `5xx`, `active_check` |
//! | `loadbalancer_fail_open_total` | | requests routed while every backend was ejected |
//! | `loadbalancer_algorithm` | `algorithm` | 1 for the algorithm in use |
//! | `loadbalancer_backend_set_changes_total` | | new snapshots published |
//! | `loadbalancer_discovery_errors_total` | `reason` | watch and list errors |
//! | `loadbalancer_discovery_synced` | | 1 while discovery is in sync, 0 while it retries |
//! | `loadbalancer_discovery_last_event_timestamp_seconds` | | when the last list or watch event arrived |
//! | `loadbalancer_config_reloads_total` | `result` | `applied` or `rejected` |
//! | `loadbalancer_shared_counter_fallbacks_total` | | round-robin numbers taken locally because Redis failed (with `sharedCounter`) |
//! | `loadbalancer_tcp_connections` | `backend` | TCP mode: connections open now |
//! | `loadbalancer_tcp_opened_connections_total` | `backend` | TCP mode: connections made to the backend |
//! | `loadbalancer_tcp_bytes_total` | `backend`, `direction` | TCP mode: bytes copied `to_backend` and `from_backend` |

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::balancer::{Backend, Balancer, Reason, Snapshot, State};
use crate::discovery;

type Encoded = Result<(), std::fmt::Error>;

/// The whole exposition, in OpenMetrics text, for `GET /metrics`; the
/// `loadbalancer_tcp_*` families only in TCP mode.
pub fn encode(balancer: &Arc<Balancer>, discovery: &Arc<discovery::Status>, tcp: bool) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        balancer: balancer.clone(),
        discovery: discovery.clone(),
        tcp,
    }));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Reads the current snapshot and discovery status at scrape time.
#[derive(Debug)]
struct Scrape {
    balancer: Arc<Balancer>,
    discovery: Arc<discovery::Status>,
    tcp: bool,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Encoded {
        let snapshot = self.balancer.snapshot();
        encode_requests(&mut encoder, &self.balancer, &snapshot.backends)?;
        encode_rotation(&mut encoder, &snapshot)?;
        encode_discovery(&mut encoder, &self.balancer, &self.discovery)?;
        if let Some(counter) = self.balancer.shared_counter.load_full() {
            counter_family(
                &mut encoder,
                "loadbalancer_shared_counter_fallbacks",
                "Requests whose round-robin number came from the local counter because Redis failed.",
                counter.fallbacks(),
            )?;
        }
        if self.tcp {
            encode_tcp(&mut encoder, &snapshot.backends)?;
        }
        let (applied, rejected) = self.balancer.totals.reloads();
        let mut family = encoder.encode_descriptor(
            "loadbalancer_config_reloads",
            "Changed config files read while running, by whether they were applied.",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [("applied", applied), ("rejected", rejected)] {
            ConstCounter::new(count).encode(family.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// The request path's families: answers by code, latency, in flight, retries.
fn encode_requests(
    encoder: &mut DescriptorEncoder,
    balancer: &Balancer,
    backends: &[Arc<Backend>],
) -> Encoded {
    let mut family = encoder.encode_descriptor(
        "loadbalancer_requests",
        "Answered requests, by the backend that answered and the status code.",
        None,
        MetricType::Counter,
    )?;
    let mut code_text = String::new();
    let by_backend = backends
        .iter()
        .map(|b| (b.label_str(), b.stats.codes().collect()));
    let unrouted = ("none", balancer.totals.unrouted_codes().collect());
    for (backend, codes) in by_backend.chain(std::iter::once(unrouted)) {
        let codes: Vec<(u16, u64)> = codes;
        for (code, count) in codes {
            code_text.clear();
            let _ = write!(code_text, "{code}");
            let labels = [("backend", backend), ("code", code_text.as_str())];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "loadbalancer_request_duration_seconds",
        "Time from the request's arrival to the response head, by backend.",
        None,
        MetricType::Histogram,
    )?;
    for backend in backends {
        let (sum, count, buckets) = backend.stats.duration();
        family
            .encode_family(&[("backend", backend.label_str())])?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    per_backend(
        encoder,
        ("loadbalancer_in_flight_requests", MetricType::Gauge),
        "Requests sent to the backend whose response body is not finished yet.",
        backends,
        |b| b.stats.in_flight(),
    )?;
    per_backend(
        encoder,
        ("loadbalancer_retries", MetricType::Counter),
        "Attempts on the backend that failed and were retried on another.",
        backends,
        |b| b.stats.retries() as i64,
    )
}

/// The balancer's families: the algorithm, health states, ejections, fail open.
fn encode_rotation(encoder: &mut DescriptorEncoder, snapshot: &Snapshot) -> Encoded {
    let backends = &snapshot.backends;
    let mut family = encoder.encode_descriptor(
        "loadbalancer_algorithm",
        "The balancing algorithm in use (1 for the current one).",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(1)
        .encode(family.encode_family(&[("algorithm", snapshot.algorithm.as_str())])?)?;
    let mut family = encoder.encode_descriptor(
        "loadbalancer_backends",
        "Backends in the current set, by health state.",
        None,
        MetricType::Gauge,
    )?;
    for state in [
        State::Healthy,
        State::Ejected(Reason::Connect),
        State::Probing,
    ] {
        let count = backends
            .iter()
            .filter(|b| b.state().as_str() == state.as_str())
            .count();
        ConstGauge::new(count as i64)
            .encode(family.encode_family(&[("state", state.as_str())])?)?;
    }
    let mut family = encoder.encode_descriptor(
        "loadbalancer_ejections",
        "Times a backend was taken out of the rotation, by reason.",
        None,
        MetricType::Counter,
    )?;
    for backend in backends.iter() {
        for reason in [Reason::Connect, Reason::FiveXx, Reason::ActiveCheck] {
            let labels = [
                ("backend", backend.label_str()),
                ("reason", reason.as_str()),
            ];
            ConstCounter::new(backend.stats.ejections(reason))
                .encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// Discovery's families, and the fail-open count it leads to.
fn encode_discovery(
    encoder: &mut DescriptorEncoder,
    balancer: &Balancer,
    status: &discovery::Status,
) -> Encoded {
    let totals = &balancer.totals;
    counter_family(
        encoder,
        "loadbalancer_fail_open",
        "Requests routed while every backend was ejected (failing open).",
        totals.fail_open(),
    )?;
    counter_family(
        encoder,
        "loadbalancer_backend_set_changes",
        "New backend sets published by discovery.",
        totals.set_changes(),
    )?;
    let mut family = encoder.encode_descriptor(
        "loadbalancer_discovery_errors",
        "Errors listing or watching the backends, by reason.",
        None,
        MetricType::Counter,
    )?;
    for (reason, count) in totals.discovery_errors() {
        ConstCounter::new(count).encode(family.encode_family(&[("reason", reason.as_str())])?)?;
    }
    let report = status.report();
    ConstGauge::new(i64::from(report.state == "synced")).encode(encoder.encode_descriptor(
        "loadbalancer_discovery_synced",
        "1 while discovery is in sync with its source, 0 while it retries.",
        None,
        MetricType::Gauge,
    )?)?;
    let last_event = report
        .last_event
        .map_or(0.0, |t| t.as_millisecond() as f64 / 1e3);
    ConstGauge::new(last_event).encode(encoder.encode_descriptor(
        "loadbalancer_discovery_last_event_timestamp_seconds",
        "When the last list or watch event arrived, in seconds since 1970.",
        None,
        MetricType::Gauge,
    )?)
}

/// TCP mode's families: open connections, connections made, bytes.
fn encode_tcp(encoder: &mut DescriptorEncoder, backends: &[Arc<Backend>]) -> Encoded {
    per_backend(
        encoder,
        ("loadbalancer_tcp_connections", MetricType::Gauge),
        "TCP connections open now, by backend.",
        backends,
        |b| b.stats.tcp.open(),
    )?;
    per_backend(
        encoder,
        ("loadbalancer_tcp_opened_connections", MetricType::Counter),
        "TCP connections made to each backend.",
        backends,
        |b| b.stats.tcp.opened() as i64,
    )?;
    let mut family = encoder.encode_descriptor(
        "loadbalancer_tcp_bytes",
        "Bytes copied in TCP mode, by backend and direction.",
        None,
        MetricType::Counter,
    )?;
    for backend in backends {
        let (to_backend, from_backend) = backend.stats.tcp.bytes();
        for (direction, bytes) in [("to_backend", to_backend), ("from_backend", from_backend)] {
            let labels = [("backend", backend.label_str()), ("direction", direction)];
            ConstCounter::new(bytes).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// A family with one series per backend, labelled `backend`.
fn per_backend(
    encoder: &mut DescriptorEncoder,
    (name, kind): (&str, MetricType),
    help: &str,
    backends: &[Arc<Backend>],
    value: impl Fn(&Backend) -> i64,
) -> Encoded {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for backend in backends {
        let labels = [("backend", backend.label_str())];
        let series = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value(backend) as u64).encode(series)?,
            _ => ConstGauge::new(value(backend)).encode(series)?,
        }
    }
    Ok(())
}

/// A family of one unlabelled counter.
fn counter_family(encoder: &mut DescriptorEncoder, name: &str, help: &str, count: u64) -> Encoded {
    ConstCounter::new(count).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_histogram_encodes_cumulative_buckets_ending_with_infinity() {
        let balancer = Arc::new(Balancer::new(Duration::from_secs(1)));
        let addr = "10.0.0.1:80".parse().unwrap();
        balancer.publish(&crate::balancer::BackendSet::from([(
            addr,
            Default::default(),
        )]));
        let backend = balancer.snapshot().backends[0].clone();
        for ms in [0, 3, 3, 40, 20_000] {
            backend.stats.answered(200, Duration::from_millis(ms));
        }
        let text = encode(&balancer, &Arc::default(), false);
        let bucket = |le: &str| {
            let prefix = format!(
                "loadbalancer_request_duration_seconds_bucket{{le=\"{le}\",backend=\"10.0.0.1:80\"}} "
            );
            let line = text.lines().find(|l| l.starts_with(&prefix));
            line.unwrap_or_else(|| panic!("{prefix} in {text}"))[prefix.len()..].to_owned()
        };
        assert_eq!(bucket("0.0005"), "1");
        assert_eq!(bucket("0.005"), "3");
        assert_eq!(bucket("0.05"), "4");
        assert_eq!(bucket("10.0"), "4");
        assert_eq!(bucket("+Inf"), "5");
        assert!(
            text.contains("loadbalancer_request_duration_seconds_count{backend=\"10.0.0.1:80\"} 5")
        );
        assert!(
            text.contains("loadbalancer_requests_total{backend=\"10.0.0.1:80\",code=\"200\"} 5")
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
