//! Choosing a backend: an immutable snapshot and a balancing algorithm.
//!
//! Discovery (on its own task) publishes the whole set of backends as a new
//! [`Snapshot`] whenever it changes; the request path only ever *reads* the
//! current one. The swap is one atomic pointer store (`arc-swap`), so a
//! request never waits for discovery and never sees a half-updated list.
//!
//! Each snapshot carries the state of the configured algorithm (see
//! [`algorithm`]): round robin (the default, one shared counter), least
//! connections, power of two choices, smooth weighted round robin, random,
//! one file each. Changing the algorithm or the weights builds a new
//! snapshot with the same backends.
//!
//! Each backend also carries *passive* health: when connecting to it fails,
//! it sits out a cool-down that doubles with every further failure (up to
//! 30 s), and the rotation skips it meanwhile. The first request after the
//! cool-down is the probe; a success clears the record. Real load balancers
//! add *active* health checks too (periodic probes); in Kubernetes the
//! readiness probe already does that job upstream of us, so we rely on it.
//!
//! Each backend also carries the pod it is (when discovery knows it) and its
//! [`BackendStats`], the numbers the metrics and the admin page show.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use jiff::Timestamp;
use serde::Serialize;

use crate::metrics::{BackendStats, Totals};

pub mod algorithm;
mod least_connections;
mod power_of_two;
mod random;
mod round_robin;
mod weighted;

use algorithm::Selection;
pub use algorithm::{Algorithm, Weights};

/// The longest a failing backend is left out of the rotation.
const MAX_COOLDOWN: Duration = Duration::from_secs(30);

/// How many recent changes of the set are kept for the admin page.
const CHANGES_KEPT: usize = 50;

/// Which pod a backend address is, where discovery knows it (EndpointSlices
/// name the pod, its node and zone; a static list knows nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub name: Option<String>,
    pub node: Option<String>,
    pub zone: Option<String>,
}

/// A whole set of backends, as discovery publishes it.
pub type BackendSet = BTreeMap<SocketAddr, Pod>;

/// One backend, and what the request path has learned about its health.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub pod: Pod,
    /// `addr` as a URI authority, built once rather than per request.
    pub authority: Authority,
    /// `addr` as a header value, for `x-served-by`.
    pub label: HeaderValue,
    pub stats: BackendStats,
    /// Connection failures in a row.
    failures: AtomicU32,
    /// Left out of the rotation until this many ms after [`EPOCH`].
    cool_until_ms: AtomicU64,
}

/// A backend's health, as the rotation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    CoolingDown,
}

/// The immutable set of backends requests are spread over.
#[derive(Debug)]
pub struct Snapshot {
    pub backends: Box<[Arc<Backend>]>,
    /// Counts up with every new snapshot.
    pub generation: u64,
    /// When the set last changed; `None` before the first one.
    pub changed_at: Option<Timestamp>,
    /// The algorithm, with its state for these backends.
    pub algorithm: Algorithm,
    selection: Box<dyn Selection>,
}

/// The algorithm and weights from the config.
#[derive(Debug, Clone, Default)]
struct Policy {
    algorithm: Algorithm,
    weights: Weights,
}

/// What changed when a new set of backends was published.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
    pub total: usize,
}

/// A change as the admin page lists it: when, and who joined or left.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeRecord {
    pub at: Timestamp,
    pub generation: u64,
    pub joined: Vec<Member>,
    pub left: Vec<Member>,
}

/// A backend in a [`ChangeRecord`].
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub address: SocketAddr,
    pub pod: Option<String>,
}

/// The current snapshot, the round-robin counter and the cool-down policy.
#[derive(Debug)]
pub struct Balancer {
    current: ArcSwap<Snapshot>,
    /// Read and written by discovery and config changes only.
    policy: Mutex<Policy>,
    /// The first cool-down, in ms; the config can change it while running.
    cooldown_ms: AtomicU64,
    /// The numbers that belong to no one backend.
    pub totals: Totals,
    /// The latest changes, newest last; written by discovery only.
    changes: Mutex<VecDeque<ChangeRecord>>,
}

/// Times are stored as ms since this instant, so they fit in an atomic.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

// === impl Backend ===

impl Backend {
    pub fn new(addr: SocketAddr, pod: Pod) -> Backend {
        let text = addr.to_string();
        Backend {
            addr,
            pod,
            // An IP:port always forms a valid authority and header value.
            authority: text
                .parse()
                .unwrap_or_else(|_| Authority::from_static("invalid")),
            label: HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("invalid")),
            stats: BackendStats::default(),
            failures: AtomicU32::new(0),
            cool_until_ms: AtomicU64::new(0),
        }
    }

    /// `addr` as text, for metric labels.
    pub fn label_str(&self) -> &str {
        self.label.to_str().unwrap_or("invalid")
    }

    pub fn state(&self) -> State {
        if self.is_cooling_down() {
            State::CoolingDown
        } else {
            State::Healthy
        }
    }

    fn member(&self) -> Member {
        Member {
            address: self.addr,
            pod: self.pod.name.clone(),
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

// === impl Snapshot ===

impl Snapshot {
    fn new(
        backends: Box<[Arc<Backend>]>,
        generation: u64,
        changed_at: Option<Timestamp>,
        policy: &Policy,
    ) -> Snapshot {
        Snapshot {
            selection: algorithm::build(policy.algorithm, &policy.weights, &backends),
            algorithm: policy.algorithm,
            backends,
            generation,
            changed_at,
        }
    }
}

// === impl State ===

impl State {
    pub const ALL: [State; 2] = [State::Healthy, State::CoolingDown];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::CoolingDown => "cooling_down",
        }
    }
}

// === impl Balancer ===

impl Balancer {
    /// A balancer with no backends yet; `cooldown` is the first cool-down.
    pub fn new(cooldown: Duration) -> Balancer {
        let policy = Policy::default();
        Balancer {
            current: ArcSwap::from_pointee(Snapshot::new(Box::default(), 0, None, &policy)),
            policy: Mutex::new(policy),
            cooldown_ms: AtomicU64::new(cooldown.as_millis() as u64),
            totals: Totals::default(),
            changes: Mutex::new(VecDeque::new()),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Uses `algorithm` (with `weights`) from the next request on.
    pub fn set_algorithm(&self, algorithm: Algorithm, weights: &Weights) {
        let policy = Policy {
            algorithm,
            weights: weights.clone(),
        };
        let unchanged = self
            .policy
            .lock()
            .is_ok_and(|current| current.algorithm == algorithm && current.weights == *weights);
        if unchanged {
            return;
        }
        let old = self.current.load();
        let snapshot = Snapshot::new(
            old.backends.clone(),
            old.generation + 1,
            old.changed_at,
            &policy,
        );
        if let Ok(mut current) = self.policy.lock() {
            *current = policy;
        }
        self.current.store(Arc::new(snapshot));
    }

    /// A backend's weight under the configured weights (1 when unweighted).
    pub fn weight_of(&self, backend: &Backend) -> u32 {
        self.policy
            .lock()
            .map_or(1, |policy| algorithm::weight_of(backend, &policy.weights))
    }

    /// Changes the first cool-down of failing backends from now on.
    pub fn set_cooldown(&self, cooldown: Duration) {
        self.cooldown_ms.store(cooldown.as_millis() as u64, Relaxed);
    }

    /// The latest changes of the set, newest last.
    pub fn recent_changes(&self) -> Vec<ChangeRecord> {
        self.changes
            .lock()
            .map(|changes| changes.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces the backend set with `set`. Backends that stay (same address,
    /// same pod) keep their health record and numbers; the others are
    /// dropped once no request holds them. Publishing the same set again
    /// changes nothing.
    pub fn publish(&self, set: &BackendSet) -> Change {
        let old = self.current.load();
        let kept = |addr: &SocketAddr, pod: &Pod| {
            old.backends
                .iter()
                .find(|b| b.addr == *addr && b.pod == *pod)
                .cloned()
        };
        let backends: Box<[Arc<Backend>]> = set
            .iter()
            .map(|(addr, pod)| {
                kept(addr, pod).unwrap_or_else(|| Arc::new(Backend::new(*addr, pod.clone())))
            })
            .collect();
        let is_new = |b: &&Arc<Backend>| !old.backends.iter().any(|o| Arc::ptr_eq(o, b));
        let is_gone = |b: &&Arc<Backend>| !backends.iter().any(|n| Arc::ptr_eq(n, b));
        let joined: Vec<Member> = backends.iter().filter(is_new).map(|b| b.member()).collect();
        let left: Vec<Member> = old
            .backends
            .iter()
            .filter(is_gone)
            .map(|b| b.member())
            .collect();
        let change = Change {
            added: joined.iter().map(|m| m.address).collect(),
            removed: left.iter().map(|m| m.address).collect(),
            total: set.len(),
        };
        if joined.is_empty() && left.is_empty() {
            return change;
        }
        let policy = self.policy.lock().map(|p| p.clone()).unwrap_or_default();
        let snapshot = Snapshot::new(
            backends,
            old.generation + 1,
            Some(Timestamp::now()),
            &policy,
        );
        if let Ok(mut changes) = self.changes.lock() {
            if changes.len() == CHANGES_KEPT {
                changes.pop_front();
            }
            changes.push_back(ChangeRecord {
                at: snapshot.changed_at.unwrap_or_else(Timestamp::now),
                generation: snapshot.generation,
                joined,
                left,
            });
        }
        self.current.store(Arc::new(snapshot));
        self.totals.set_changed();
        change
    }

    /// The backend the algorithm picks, skipping those cooling down and
    /// those in `tried`. `None` when no backend is left.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let snapshot = self.current.load();
        let now = now_ms();
        let usable = |b: &Backend| !b.cooling_down(now) && !tried.contains(&b.addr);
        let i = snapshot.selection.pick(&snapshot.backends, &usable)?;
        Some(snapshot.backends[i].clone())
    }

    /// Records a failed connection: the backend sits out a cool-down that
    /// doubles with each failure in a row. Returns the cool-down.
    pub fn failed(&self, backend: &Backend) -> Duration {
        let failures = backend.failures.fetch_add(1, Relaxed) + 1;
        let cooldown = Duration::from_millis(self.cooldown_ms.load(Relaxed))
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
    use std::collections::BTreeSet;

    fn addrs(list: &[&str]) -> BackendSet {
        list.iter()
            .map(|a| (a.parse().unwrap(), Pod::default()))
            .collect()
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
        assert_eq!(balancer.snapshot().generation, 2);
        let changes = balancer.recent_changes();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].joined[0].address.to_string(), "10.0.0.3:80");
        assert_eq!(changes[1].left[0].address.to_string(), "10.0.0.1:80");
    }

    #[test]
    fn the_same_address_as_another_pod_is_a_new_backend() {
        let balancer = Balancer::new(Duration::from_secs(1));
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let pod = |name: &str| Pod {
            name: Some(name.into()),
            ..Pod::default()
        };
        balancer.publish(&BackendSet::from([(addr, pod("backend-a"))]));
        let change = balancer.publish(&BackendSet::from([(addr, pod("backend-b"))]));
        assert_eq!((change.added.len(), change.removed.len()), (1, 1));
        assert_eq!(
            balancer.snapshot().backends[0].pod.name.as_deref(),
            Some("backend-b")
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

    fn set(list: &[(&str, &str)]) -> BackendSet {
        list.iter()
            .map(|(addr, pod)| {
                let pod = Pod {
                    name: Some(pod.to_string()),
                    ..Pod::default()
                };
                (addr.parse().unwrap(), pod)
            })
            .collect()
    }

    #[test]
    fn weighted_round_robin_follows_weights_by_address_or_pod_prefix() {
        let balancer = Balancer::new(Duration::from_secs(1));
        balancer.publish(&set(&[
            ("10.0.0.1:80", "big-7d9f-a"),
            ("10.0.0.2:80", "small-1"),
            ("10.0.0.3:80", "small-2"),
        ]));
        let weights = Weights::from([("big".to_owned(), 5), ("10.0.0.3:80".to_owned(), 2)]);
        balancer.set_algorithm(Algorithm::WeightedRoundRobin, &weights);
        let picked = picks(&balancer, 80);
        let count = |addr: &str| picked.iter().filter(|p| *p == addr).count();
        assert_eq!(
            (
                count("10.0.0.1:80"),
                count("10.0.0.2:80"),
                count("10.0.0.3:80")
            ),
            (50, 10, 20)
        );
        // Interleaved: the heavy one never takes more than two turns in a row.
        assert!(
            !picked
                .windows(3)
                .any(|w| w.iter().all(|p| p == "10.0.0.1:80")),
            "{picked:?}"
        );
    }

    #[test]
    fn least_connections_prefers_the_idle_backend_and_rotates_ties() {
        let balancer = Balancer::new(Duration::from_secs(1));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        balancer.set_algorithm(Algorithm::LeastConnections, &Weights::new());
        let tied = picks(&balancer, 3);
        assert_eq!(
            tied.iter().collect::<BTreeSet<_>>().len(),
            3,
            "ties rotate: {tied:?}"
        );
        let backends = balancer.snapshot().backends.clone();
        let _busy: Vec<_> = [0, 0, 2]
            .iter()
            .map(|&i| crate::metrics::InFlight::start(backends[i].clone()))
            .collect();
        assert_eq!(picks(&balancer, 5), vec!["10.0.0.2:80"; 5]);
    }

    #[test]
    fn power_of_two_never_picks_the_busier_of_its_two() {
        let balancer = Balancer::new(Duration::from_secs(1));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        balancer.set_algorithm(Algorithm::PowerOfTwo, &Weights::new());
        let backends = balancer.snapshot().backends.clone();
        let _busy = crate::metrics::InFlight::start(backends[0].clone());
        // With two backends, the two choices are always both of them.
        assert_eq!(picks(&balancer, 50), vec!["10.0.0.2:80"; 50]);
    }

    #[test]
    fn random_reaches_every_backend_and_skips_unusable_ones() {
        let balancer = Balancer::new(Duration::from_secs(60));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        balancer.set_algorithm(Algorithm::Random, &Weights::new());
        let picked = picks(&balancer, 300);
        assert_eq!(picked.iter().collect::<BTreeSet<_>>().len(), 3);
        balancer.failed(&balancer.snapshot().backends[1]);
        assert!(!picks(&balancer, 100).contains(&"10.0.0.2:80".to_owned()));
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
