//! What the request path counts, where it happens: plain atomics.
//!
//! The request path must stay cheap, so every number it moves is a plain
//! atomic: each backend carries its own [`BackendStats`] (requests by status
//! code, in flight, retries, errors, a latency histogram, TCP mode's
//! numbers), and the numbers that belong to no backend are in [`Totals`].
//! Nothing is looked up by label on the request path, and nothing is locked.
//! Some of these numbers steer the balancer too: least connections reads
//! the requests in flight, power of two choices the peak-EWMA latency.
//! `crate::metrics` reads them all at scrape time.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use common::sync::lock;

use super::health::now_ms;
use super::{Backend, Reason};

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

impl TcpStats {
    pub fn open(&self) -> i64 {
        self.open.load(Relaxed)
    }

    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// Bytes copied `(to the backend, from the backend)`.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_to_backend.load(Relaxed),
            self.bytes_from_backend.load(Relaxed),
        )
    }
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

fn counted_codes(codes: &[AtomicU64]) -> impl Iterator<Item = (u16, u64)> {
    (100u16..)
        .zip(codes)
        .map(|(code, count)| (code, count.load(Relaxed)))
        .filter(|(_, count)| *count > 0)
}

/// A histogram as read at one moment: the sum in seconds, the count, and
/// per-bucket counts (upper bound, count), the last bucket being `+Inf`.
/// Not cumulative; the encoder makes them so, as OpenMetrics wants.
pub type HistogramSnapshot = (f64, u64, Vec<(f64, u64)>);

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
        *lock(&self.last_error) = Some(cause.to_owned());
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
        lock(&self.last_error).clone()
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Relaxed)
    }

    /// Times it was ejected for `reason`.
    pub fn ejections(&self, reason: Reason) -> u64 {
        self.ejections[reason as usize].load(Relaxed)
    }

    /// Answers by status code, 100 to 599; those with none left out.
    pub fn codes(&self) -> impl Iterator<Item = (u16, u64)> {
        counted_codes(&self.codes)
    }

    /// The latency histogram, as [`Histogram::snapshot`] gives it.
    pub fn duration(&self) -> HistogramSnapshot {
        self.duration.snapshot()
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
        let mut errors = lock(&self.discovery_errors);
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

    /// Answers given without a backend, by status code (as [`BackendStats::codes`]).
    pub fn unrouted_codes(&self) -> impl Iterator<Item = (u16, u64)> {
        counted_codes(&self.unrouted)
    }

    pub fn fail_open(&self) -> u64 {
        self.fail_open.load(Relaxed)
    }

    pub fn set_changes(&self) -> u64 {
        self.set_changes.load(Relaxed)
    }

    /// Discovery errors by reason.
    pub fn discovery_errors(&self) -> Vec<(String, u64)> {
        lock(&self.discovery_errors).clone()
    }

    /// Config reloads `(applied, rejected)`.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_applied.load(Relaxed),
            self.reloads_rejected.load(Relaxed),
        )
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

    fn snapshot(&self) -> HistogramSnapshot {
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
