//! Prometheus metrics: counted where things happen, encoded when scraped.
//!
//! The request path must stay cheap, so every number it moves is a plain
//! atomic: each backend carries its own [`BackendStats`] (requests by status
//! code, in flight, retries, errors, a latency histogram), and the numbers
//! that belong to no backend are in [`Totals`]. Nothing is looked up by
//! label on the request path, and nothing is locked.
//!
//! At scrape time, [`encode`] walks the *current* snapshot and writes one
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
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::balancer::health::now_ms;
use crate::balancer::{Backend, Balancer, Reason, State};
use crate::discovery;

/// How fast the latency average forgets, in ms (Linkerd's default is 10 s).
const LATENCY_DECAY_MS: f64 = 10_000.0;

/// Status codes 100 to 599, one counter each.
const CODES: usize = 500;

/// Upper bounds of the latency histogram's buckets, in seconds (Prometheus's
/// defaults, with finer steps below 5 ms, where a proxy on loopback lives).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What the request path counts for one backend.
#[derive(Debug)]
pub struct BackendStats {
    codes: Box<[AtomicU64]>,
    in_flight: AtomicI64,
    retries: AtomicU64,
    errors: AtomicU64,
    /// Ejections by reason: connect, 5xx, active check.
    ejections: [AtomicU64; 3],
    duration: Histogram,
    /// Peak-EWMA of the time to the response head, in µs (power of two
    /// choices weighs backends by it): a slower answer raises it at once,
    /// faster ones lower it gradually, and it decays while no answer comes.
    latency_micros: AtomicU64,
    /// When the last answer came (ms, the health clock).
    latency_at_ms: AtomicU64,
    /// Only written when something fails, never on the happy path.
    last_error: Mutex<Option<String>>,
    /// TCP mode's numbers.
    pub tcp: TcpStats,
}

/// What TCP mode counts for one backend.
#[derive(Debug, Default)]
pub struct TcpStats {
    pub open: AtomicI64,
    pub opened: AtomicU64,
    pub bytes_to_backend: AtomicU64,
    pub bytes_from_backend: AtomicU64,
}

/// The numbers that belong to no one backend.
#[derive(Debug)]
pub struct Totals {
    /// Answers given when no backend could be picked, by status code.
    unrouted: Box<[AtomicU64]>,
    set_changes: AtomicU64,
    fail_open: AtomicU64,
    discovery_errors: Mutex<Vec<(String, u64)>>,
    reloads_applied: AtomicU64,
    reloads_rejected: AtomicU64,
}

/// A latency histogram of atomics: one `fetch_add` per bucket, count and sum.
#[derive(Debug)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Counts one request in flight on a backend, until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn code_index(code: u16) -> Option<usize> {
    (100..600).contains(&code).then(|| usize::from(code - 100))
}

// === impl BackendStats ===

impl Default for BackendStats {
    fn default() -> Self {
        BackendStats {
            codes: counters(CODES),
            in_flight: AtomicI64::new(0),
            retries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ejections: std::array::from_fn(|_| AtomicU64::new(0)),
            duration: Histogram::default(),
            latency_micros: AtomicU64::new(0),
            latency_at_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            tcp: TcpStats::default(),
        }
    }
}

impl BackendStats {
    /// An answer with `code`, whose head came `elapsed` after the request.
    pub fn answered(&self, code: u16, elapsed: Duration) {
        if let Some(i) = code_index(code) {
            self.codes[i].fetch_add(1, Relaxed);
        }
        self.duration.observe(elapsed);
        // Peak-EWMA, as in Finagle and Linkerd: a slower sample is taken
        // whole, a faster one blends in by how long ago the last one was.
        // A lost update between two racing requests only blurs an average.
        let now = now_ms();
        let since = now.saturating_sub(self.latency_at_ms.swap(now, Relaxed));
        let old = self.latency_micros.load(Relaxed) as f64;
        let sample = elapsed.as_micros() as f64;
        let new = if sample > old {
            sample
        } else {
            let keep = (-(since as f64) / LATENCY_DECAY_MS).exp();
            old * keep + sample * (1.0 - keep)
        };
        self.latency_micros.store(new as u64, Relaxed);
    }

    /// The peak-EWMA time to the response head in µs, decayed by the time
    /// since the last answer: a backend that was slow and then left alone
    /// is tried again after a while, instead of being shunned for ever.
    pub fn latency_micros(&self) -> f64 {
        let since = now_ms().saturating_sub(self.latency_at_ms.load(Relaxed));
        self.latency_micros.load(Relaxed) as f64 * (-(since as f64) / LATENCY_DECAY_MS).exp()
    }

    /// An attempt on this backend failed and was retried on another.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// An attempt on this backend failed; `cause` says how.
    pub fn failed(&self, cause: &str) {
        self.errors.fetch_add(1, Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(cause.to_owned());
        }
    }

    /// The backend was taken out of the rotation for `reason`.
    pub fn ejected(&self, reason: Reason) {
        self.ejections[reason as usize].fetch_add(1, Relaxed);
    }

    /// Requests answered, of any status.
    pub fn requests(&self) -> u64 {
        self.codes.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }
}

// === impl Totals ===

impl Default for Totals {
    fn default() -> Self {
        Totals {
            unrouted: counters(CODES),
            set_changes: AtomicU64::new(0),
            fail_open: AtomicU64::new(0),
            discovery_errors: Mutex::new(Vec::new()),
            reloads_applied: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
        }
    }
}

impl Totals {
    /// An answer given without any backend (503 with none available).
    pub fn unrouted(&self, code: u16) {
        if let Some(i) = code_index(code) {
            self.unrouted[i].fetch_add(1, Relaxed);
        }
    }

    /// A request was routed with every backend ejected.
    pub fn failed_open(&self) {
        self.fail_open.fetch_add(1, Relaxed);
    }

    pub fn set_changed(&self) {
        self.set_changes.fetch_add(1, Relaxed);
    }

    /// A discovery error; `reason` is one of a few fixed words.
    pub fn discovery_error(&self, reason: &str) {
        let Ok(mut errors) = self.discovery_errors.lock() else {
            return;
        };
        match errors.iter_mut().find(|(r, _)| r == reason) {
            Some((_, count)) => *count += 1,
            None => errors.push((reason.to_owned(), 1)),
        }
    }

    pub fn config_reloaded(&self, applied: bool) {
        let counter = if applied {
            &self.reloads_applied
        } else {
            &self.reloads_rejected
        };
        counter.fetch_add(1, Relaxed);
    }
}

// === impl Histogram ===

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        // Non-cumulative here; made cumulative when encoded.
        if let Some(i) = BUCKETS.iter().position(|&bound| seconds <= bound) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    /// `(sum in seconds, count, per-bucket counts)`, the last bucket being
    /// `+Inf`. (The encoder makes them cumulative, as OpenMetrics wants.)
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, n)| (bound, n.load(Relaxed)))
            .collect();
        let count = self.count.load(Relaxed);
        let below: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(below)));
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

// === impl InFlight ===

impl InFlight {
    pub fn start(backend: Arc<Backend>) -> InFlight {
        backend.stats.in_flight.fetch_add(1, Relaxed);
        InFlight(backend)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The word for a health state in metrics and `/backends`.
pub fn state_label(state: State) -> &'static str {
    match state {
        State::Healthy => "healthy",
        State::Ejected(_) => "ejected",
        State::Probing => "probing",
    }
}

// === Encoding ===

/// The whole exposition, in OpenMetrics text, for `GET /metrics`; the
/// `loadbalancer_tcp_*` families only in TCP mode.
pub fn encode(balancer: &Arc<Balancer>, discovery: &Arc<discovery::Status>, tcp: bool) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(balancer.clone(), discovery.clone(), tcp)));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Reads the current snapshot and discovery status at scrape time.
#[derive(Debug)]
struct Scrape(Arc<Balancer>, Arc<discovery::Status>, bool);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.snapshot();
        let backends = &snapshot.backends;
        let totals = &self.0.totals;

        let mut family = encoder.encode_descriptor(
            "loadbalancer_requests",
            "Answered requests, by the backend that answered and the status code.",
            None,
            MetricType::Counter,
        )?;
        let mut code_text = String::new();
        let labelled = backends
            .iter()
            .map(|b| (b.label_str(), &b.stats.codes))
            .chain(std::iter::once(("none", &totals.unrouted)));
        for (backend, codes) in labelled {
            for (i, count) in codes.iter().enumerate() {
                let count = count.load(Relaxed);
                if count == 0 {
                    continue;
                }
                code_text.clear();
                let _ = write!(code_text, "{}", i + 100);
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
        for backend in backends.iter() {
            let (sum, count, buckets) = backend.stats.duration.snapshot();
            family
                .encode_family(&[("backend", backend.label_str())])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }

        let mut family = encoder.encode_descriptor(
            "loadbalancer_in_flight_requests",
            "Requests sent to the backend whose response body is not finished yet.",
            None,
            MetricType::Gauge,
        )?;
        for backend in backends.iter() {
            ConstGauge::new(backend.stats.in_flight())
                .encode(family.encode_family(&[("backend", backend.label_str())])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "loadbalancer_retries",
            "Attempts on the backend that failed and were retried on another.",
            None,
            MetricType::Counter,
        )?;
        for backend in backends.iter() {
            ConstCounter::new(backend.stats.retries.load(Relaxed))
                .encode(family.encode_family(&[("backend", backend.label_str())])?)?;
        }

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
        for state in ["healthy", "ejected", "probing"] {
            let count = backends
                .iter()
                .filter(|b| state_label(b.state()) == state)
                .count();
            ConstGauge::new(count as i64).encode(family.encode_family(&[("state", state)])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "loadbalancer_ejections",
            "Times a backend was taken out of the rotation, by reason.",
            None,
            MetricType::Counter,
        )?;
        for backend in backends.iter() {
            for reason in [Reason::Connect, Reason::FiveXx, Reason::ActiveCheck] {
                let count = backend.stats.ejections[reason as usize].load(Relaxed);
                let labels = [
                    ("backend", backend.label_str()),
                    ("reason", reason.as_str()),
                ];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }

        ConstCounter::new(totals.fail_open.load(Relaxed)).encode(encoder.encode_descriptor(
            "loadbalancer_fail_open",
            "Requests routed while every backend was ejected (failing open).",
            None,
            MetricType::Counter,
        )?)?;

        ConstCounter::new(totals.set_changes.load(Relaxed)).encode(encoder.encode_descriptor(
            "loadbalancer_backend_set_changes",
            "New backend sets published by discovery.",
            None,
            MetricType::Counter,
        )?)?;

        let mut family = encoder.encode_descriptor(
            "loadbalancer_discovery_errors",
            "Errors listing or watching the backends, by reason.",
            None,
            MetricType::Counter,
        )?;
        let errors = totals
            .discovery_errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        for (reason, count) in &errors {
            ConstCounter::new(*count)
                .encode(family.encode_family(&[("reason", reason.as_str())])?)?;
        }

        let report = self.1.report();
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
        )?)?;

        if let Some(counter) = self.0.shared_counter.load_full() {
            ConstCounter::new(counter.fallbacks.load(Relaxed)).encode(encoder.encode_descriptor(
                "loadbalancer_shared_counter_fallbacks",
                "Requests whose round-robin number came from the local counter because Redis failed.",
                None,
                MetricType::Counter,
            )?)?;
        }

        if self.2 {
            encode_tcp(&mut encoder, backends)?;
        }

        let mut family = encoder.encode_descriptor(
            "loadbalancer_config_reloads",
            "Changed config files read while running, by whether they were applied.",
            None,
            MetricType::Counter,
        )?;
        for (result, counter) in [
            ("applied", &totals.reloads_applied),
            ("rejected", &totals.reloads_rejected),
        ] {
            ConstCounter::new(counter.load(Relaxed))
                .encode(family.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// TCP mode's families: open connections, connections made, bytes.
fn encode_tcp(
    encoder: &mut DescriptorEncoder,
    backends: &[Arc<Backend>],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "loadbalancer_tcp_connections",
        "TCP connections open now, by backend.",
        None,
        MetricType::Gauge,
    )?;
    for backend in backends {
        ConstGauge::new(backend.stats.tcp.open.load(Relaxed))
            .encode(family.encode_family(&[("backend", backend.label_str())])?)?;
    }
    let mut family = encoder.encode_descriptor(
        "loadbalancer_tcp_opened_connections",
        "TCP connections made to each backend.",
        None,
        MetricType::Counter,
    )?;
    for backend in backends {
        ConstCounter::new(backend.stats.tcp.opened.load(Relaxed))
            .encode(family.encode_family(&[("backend", backend.label_str())])?)?;
    }
    let mut family = encoder.encode_descriptor(
        "loadbalancer_tcp_bytes",
        "Bytes copied in TCP mode, by backend and direction.",
        None,
        MetricType::Counter,
    )?;
    for backend in backends {
        let tcp = &backend.stats.tcp;
        for (direction, bytes) in [
            ("to_backend", &tcp.bytes_to_backend),
            ("from_backend", &tcp.bytes_from_backend),
        ] {
            let labels = [("backend", backend.label_str()), ("direction", direction)];
            ConstCounter::new(bytes.load(Relaxed)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
