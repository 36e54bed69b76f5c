//! Choosing a backend: an immutable snapshot and an atomic round robin.
//!
//! Discovery (on its own task) publishes the whole set of backends as a new
//! [`Snapshot`] whenever it changes; the request path only ever *reads* the
//! current one. The swap is one atomic pointer store (`arc-swap`), so a
//! request never waits for discovery and never sees a half-updated list.
//!
//! Round robin is one shared counter: each request takes the next number with
//! `fetch_add` and uses `number % len`. With N healthy backends, N sequential
//! requests reach each backend exactly once.
//!
//! Each backend also carries *passive* health: when connecting to it fails,
//! it sits out a cool-down that doubles with every further failure (up to
//! 30 s), and the rotation skips it meanwhile. The first request after the
//! cool-down is the probe; a success clears the record. Real load balancers
//! add *active* health checks too (periodic probes); in Kubernetes the
//! readiness probe already does that job upstream of us, so we rely on it.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::header::HeaderValue;
use hyper::http::uri::Authority;

/// The longest a failing backend is left out of the rotation.
const MAX_COOLDOWN: Duration = Duration::from_secs(30);

/// One backend, and what the request path has learned about its health.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once rather than per request.
    pub authority: Authority,
    /// `addr` as a header value, for `x-served-by`.
    pub label: HeaderValue,
    /// Connection failures in a row.
    failures: AtomicU32,
    /// Left out of the rotation until this many ms after [`EPOCH`].
    cool_until_ms: AtomicU64,
}

/// The immutable set of backends requests are spread over.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub backends: Box<[Arc<Backend>]>,
}

/// What changed when a new set of backends was published.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
    pub total: usize,
}

/// The current snapshot, the round-robin counter and the cool-down policy.
#[derive(Debug)]
pub struct Balancer {
    current: ArcSwap<Snapshot>,
    next: AtomicUsize,
    cooldown: Duration,
}

/// Times are stored as ms since this instant, so they fit in an atomic.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

// === impl Backend ===

impl Backend {
    pub fn new(addr: SocketAddr) -> Backend {
        let text = addr.to_string();
        Backend {
            addr,
            // An IP:port always forms a valid authority and header value.
            authority: text
                .parse()
                .unwrap_or_else(|_| Authority::from_static("invalid")),
            label: HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("invalid")),
            failures: AtomicU32::new(0),
            cool_until_ms: AtomicU64::new(0),
        }
    }

    /// Whether the backend is out of the rotation at `now_ms`.
    fn cooling_down(&self, now_ms: u64) -> bool {
        self.cool_until_ms.load(Relaxed) > now_ms
    }

    /// Whether the backend is out of the rotation now.
    pub fn is_cooling_down(&self) -> bool {
        self.cooling_down(now_ms())
    }
}

// === impl Balancer ===

impl Balancer {
    /// A balancer with no backends yet; `cooldown` is the first cool-down.
    pub fn new(cooldown: Duration) -> Balancer {
        Balancer {
            current: ArcSwap::from_pointee(Snapshot::default()),
            next: AtomicUsize::new(0),
            cooldown,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the backend set with `addrs`. Backends that stay keep their
    /// health record; the others are dropped once no request holds them.
    /// Publishing the same set again changes nothing.
    pub fn publish(&self, addrs: &BTreeSet<SocketAddr>) -> Change {
        let old = self.current.load();
        let mut change = Change {
            total: addrs.len(),
            ..Change::default()
        };
        let backends: Box<[Arc<Backend>]> = addrs
            .iter()
            .map(|addr| match old.backends.iter().find(|b| b.addr == *addr) {
                Some(kept) => kept.clone(),
                None => {
                    change.added.push(*addr);
                    Arc::new(Backend::new(*addr))
                }
            })
            .collect();
        change.removed = old
            .backends
            .iter()
            .map(|b| b.addr)
            .filter(|addr| !addrs.contains(addr))
            .collect();
        if !change.added.is_empty() || !change.removed.is_empty() {
            self.current.store(Arc::new(Snapshot { backends }));
        }
        change
    }

    /// The next backend in the rotation, skipping those cooling down and
    /// those in `tried`. `None` when no backend is left.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let snapshot = self.current.load();
        let backends = &snapshot.backends;
        if backends.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed);
        let now = now_ms();
        (0..backends.len())
            .map(|offset| &backends[start.wrapping_add(offset) % backends.len()])
            .find(|b| !b.cooling_down(now) && !tried.contains(&b.addr))
            .cloned()
    }

    /// Records a failed connection: the backend sits out a cool-down that
    /// doubles with each failure in a row. Returns the cool-down.
    pub fn failed(&self, backend: &Backend) -> Duration {
        let failures = backend.failures.fetch_add(1, Relaxed) + 1;
        let cooldown = self
            .cooldown
            .saturating_mul(1 << (failures - 1).min(16))
            .min(MAX_COOLDOWN);
        backend
            .cool_until_ms
            .store(now_ms() + cooldown.as_millis() as u64, Relaxed);
        cooldown
    }

    /// Records an answer from the backend: its failure record is cleared.
    pub fn succeeded(&self, backend: &Backend) {
        // Read first: writing on every request would make the cache line
        // bounce between cores for nothing.
        if backend.failures.load(Relaxed) != 0 {
            backend.failures.store(0, Relaxed);
            backend.cool_until_ms.store(0, Relaxed);
        }
    }
}

impl fmt::Display for Change {
    /// `+10.244.1.7:8080 -10.244.1.3:8080 (3 backends)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for addr in &self.added {
            write!(f, "+{addr} ")?;
        }
        for addr in &self.removed {
            write!(f, "-{addr} ")?;
        }
        write!(f, "({} backends)", self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn picks(balancer: &Balancer, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                balancer
                    .pick(&[])
                    .map(|b| b.addr.to_string())
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn sequential_picks_rotate_exactly_evenly() {
        let balancer = Balancer::new(Duration::from_secs(1));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80", "[fd00::3]:80"]));
        let picked = picks(&balancer, 300);
        for addr in ["10.0.0.1:80", "10.0.0.2:80", "[fd00::3]:80"] {
            assert_eq!(picked.iter().filter(|p| *p == addr).count(), 100, "{addr}");
        }
        assert_ne!(picked[0], picked[1]);
    }

    #[test]
    fn no_backends_means_no_pick() {
        let balancer = Balancer::new(Duration::from_secs(1));
        assert!(balancer.pick(&[]).is_none());
        balancer.publish(&addrs(&["10.0.0.1:80"]));
        balancer.publish(&addrs(&[]));
        assert!(balancer.pick(&[]).is_none());
    }

    #[test]
    fn publishing_reports_the_change_and_keeps_surviving_backends() {
        let balancer = Balancer::new(Duration::from_secs(1));
        let first = balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        assert_eq!(first.to_string(), "+10.0.0.1:80 +10.0.0.2:80 (2 backends)");
        let kept = balancer.snapshot().backends[1].clone();
        balancer.failed(&kept);

        let second = balancer.publish(&addrs(&["10.0.0.2:80", "10.0.0.3:80"]));
        assert_eq!(second.to_string(), "+10.0.0.3:80 -10.0.0.1:80 (2 backends)");
        let snapshot = balancer.snapshot();
        assert!(
            Arc::ptr_eq(&snapshot.backends[0], &kept),
            "health record kept"
        );

        let before = balancer.snapshot();
        let same = balancer.publish(&addrs(&["10.0.0.2:80", "10.0.0.3:80"]));
        assert_eq!(
            same,
            Change {
                total: 2,
                ..Change::default()
            }
        );
        assert!(
            Arc::ptr_eq(&before, &balancer.snapshot()),
            "no new snapshot for no change"
        );
    }

    #[test]
    fn a_failed_backend_is_skipped_until_it_succeeds() {
        let balancer = Balancer::new(Duration::from_secs(60));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        let bad = balancer.snapshot().backends[1].clone();
        assert_eq!(balancer.failed(&bad), Duration::from_secs(30), "capped");
        let picked = picks(&balancer, 100);
        assert!(!picked.contains(&"10.0.0.2:80".to_string()));
        assert!(bad.is_cooling_down());

        balancer.succeeded(&bad);
        assert!(!bad.is_cooling_down());
        assert!(picks(&balancer, 3).contains(&"10.0.0.2:80".to_string()));
    }

    #[test]
    fn cooldown_doubles_with_each_failure() {
        let balancer = Balancer::new(Duration::from_millis(100));
        balancer.publish(&addrs(&["10.0.0.1:80"]));
        let backend = balancer.snapshot().backends[0].clone();
        let cooldowns: Vec<_> = (0..4)
            .map(|_| balancer.failed(&backend).as_millis())
            .collect();
        assert_eq!(cooldowns, [100, 200, 400, 800]);
    }

    #[test]
    fn tried_backends_are_not_picked_again() {
        let balancer = Balancer::new(Duration::from_secs(1));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        let first = balancer.pick(&[]).unwrap();
        let second = balancer.pick(&[first.addr]).unwrap();
        assert_ne!(first.addr, second.addr);
        assert!(balancer.pick(&[first.addr, second.addr]).is_none());
    }

    #[test]
    fn when_all_backends_cool_down_none_is_picked() {
        let balancer = Balancer::new(Duration::from_secs(60));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        for backend in balancer.snapshot().backends.iter() {
            balancer.failed(backend);
        }
        assert!(balancer.pick(&[]).is_none());
    }
}
