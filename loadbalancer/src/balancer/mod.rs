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
//! Each backend also carries its health ([`health`]): ejected after failed
//! connections or 5xx answers in a row, let back in through one probe
//! request. When every backend is ejected the balancer *fails open*: it
//! routes to all of them rather than answer 503 to everyone on the strength
//! of its own view alone (Envoy's panic threshold), and says so.
//!
//! Each backend also carries the pod it is (when discovery knows it) and its
//! [`BackendStats`] ([`stats`]), the numbers the request path counts, which
//! two of the algorithms read and the metrics and the admin page show. The
//! balancer knows nothing of HTTP or TCP: it hands out backends, and each
//! data plane keeps its own connections to them.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use common::sync::lock;
use jiff::Timestamp;
use serde::Serialize;

pub mod algorithm;
pub mod checker;
pub mod health;
mod least_connections;
mod power_of_two;
mod random;
mod round_robin;
pub mod shared_counter;
pub mod stats;
mod weighted;

use algorithm::Selection;
pub use algorithm::{Algorithm, Weights};
use health::{Health, now_ms};
pub use health::{Outcome, Reason, State};
use stats::{BackendStats, Totals};

/// How many recent changes of the set are kept for the admin page.
const CHANGES_KEPT: usize = 50;

/// Where a backend came from, as far as discovery knows: the pod it is
/// (EndpointSlices name the pod, its node and zone), or the `Server`
/// resource (its name, weight and health URL); a static list knows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Origin {
    pub name: Option<String>,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// Its own weight for `weighted_round_robin`, over the config's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// What active checks probe instead of the health path on its address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
}

/// A whole set of backends, as discovery publishes it.
pub type BackendSet = BTreeMap<SocketAddr, Origin>;

/// One backend, and what the request path has learned about its health.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub origin: Origin,
    /// `addr` as text, built once: the HTTP path's `x-served-by`, metric labels.
    label: Box<str>,
    pub stats: BackendStats,
    pub health: Health,
    /// Set when it leaves the set: its health checks stop.
    pub left: AtomicBool,
    /// Woken when it leaves the set: TCP connections to it start draining,
    /// the HTTP path forgets its connections.
    departure: tokio::sync::Notify,
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
struct AlgorithmConfig {
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

impl Change {
    /// Nothing joined and nothing left.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
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

/// The current snapshot with its algorithm, the health policy, and the
/// numbers and changes the admin port shows.
#[derive(Debug)]
pub struct Balancer {
    current: ArcSwap<Snapshot>,
    /// Read and written by discovery and config changes only.
    algorithm: Mutex<AlgorithmConfig>,
    /// Outlier detection's settings; the config can change them while running.
    outlier: ArcSwap<health::Policy>,
    /// The numbers that belong to no one backend.
    pub totals: Totals,
    /// The latest changes, newest last; written by discovery only.
    changes: Mutex<VecDeque<ChangeRecord>>,
    /// Active health checks, when configured.
    pub checker: Arc<checker::Checker>,
    /// Round robin's counter in Redis, when configured (`sharedCounter`).
    pub shared_counter: ArcSwapOption<shared_counter::SharedCounter>,
}

// === impl Backend ===

impl Backend {
    pub fn new(addr: SocketAddr, origin: Origin) -> Backend {
        Backend {
            addr,
            label: addr.to_string().into(),
            stats: BackendStats::default(),
            // Only its checks vouch for a backend with a health URL.
            health: if origin.health_url.is_some() {
                Health::unverified()
            } else {
                Health::default()
            },
            left: AtomicBool::new(false),
            departure: tokio::sync::Notify::new(),
            origin,
        }
    }

    /// Completes once the backend has left the set (at once if it has).
    pub async fn departed(&self) {
        loop {
            let notified = self.departure.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the flag is read, so a departure in
            // between is not missed.
            notified.as_mut().enable();
            if self.left.load(Relaxed) {
                return;
            }
            notified.await;
        }
    }

    /// `addr` as text, for metric labels and headers.
    pub fn label_str(&self) -> &str {
        &self.label
    }

    pub fn state(&self) -> State {
        self.health.state(now_ms())
    }

    fn member(&self) -> Member {
        Member {
            address: self.addr,
            pod: self.origin.name.clone(),
        }
    }

    /// Whether the backend is out of the rotation now (ejected, or
    /// probing for its way back).
    pub fn is_cooling_down(&self) -> bool {
        self.state() != State::Healthy
    }
}

// === impl Snapshot ===

impl Snapshot {
    fn new(
        backends: Box<[Arc<Backend>]>,
        generation: u64,
        changed_at: Option<Timestamp>,
        policy: &AlgorithmConfig,
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

// === impl Balancer ===

impl Balancer {
    /// A balancer with no backends yet; `cooldown` is how long a first
    /// ejection lasts (the rest of the health policy: its defaults).
    pub fn new(cooldown: Duration) -> Balancer {
        let policy = AlgorithmConfig::default();
        Balancer {
            current: ArcSwap::from_pointee(Snapshot::new(Box::default(), 0, None, &policy)),
            algorithm: Mutex::new(policy),
            outlier: ArcSwap::from_pointee(health::Policy {
                base_ejection: cooldown,
                ..health::Policy::default()
            }),
            totals: Totals::default(),
            changes: Mutex::new(VecDeque::new()),
            checker: Arc::default(),
            shared_counter: ArcSwapOption::empty(),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Uses `algorithm` (with `weights`) from the next request on.
    pub fn set_algorithm(&self, algorithm: Algorithm, weights: &Weights) {
        let policy = AlgorithmConfig {
            algorithm,
            weights: weights.clone(),
        };
        let mut current = lock(&self.algorithm);
        if current.algorithm == algorithm && current.weights == *weights {
            return;
        }
        let old = self.current.load();
        let snapshot = Snapshot::new(
            old.backends.clone(),
            old.generation + 1,
            old.changed_at,
            &policy,
        );
        *current = policy;
        self.current.store(Arc::new(snapshot));
    }

    /// A backend's weight under the configured weights (1 when unweighted).
    pub fn weight_of(&self, backend: &Backend) -> u32 {
        algorithm::weight_of(backend, &lock(&self.algorithm).weights)
    }

    /// Changes outlier detection's settings from now on.
    pub fn set_outlier_policy(&self, policy: health::Policy) {
        self.outlier.store(Arc::new(policy));
    }

    /// The latest changes of the set, newest last.
    pub fn recent_changes(&self) -> Vec<ChangeRecord> {
        lock(&self.changes).iter().cloned().collect()
    }

    /// Replaces the backend set with `set`. Backends that stay (same address,
    /// same pod) keep their health record and numbers; the others are
    /// dropped once no request holds them. Publishing the same set again
    /// changes nothing.
    pub fn publish(&self, set: &BackendSet) -> Change {
        let old = self.current.load();
        let kept = |addr: &SocketAddr, origin: &Origin| {
            old.backends
                .iter()
                .find(|b| b.addr == *addr && b.origin == *origin)
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
        if change.is_empty() {
            return change;
        }
        for gone in old.backends.iter().filter(is_gone) {
            gone.left.store(true, Relaxed);
            gone.departure.notify_waiters();
        }
        let policy = lock(&self.algorithm).clone();
        let snapshot = Snapshot::new(
            backends,
            old.generation + 1,
            Some(Timestamp::now()),
            &policy,
        );
        let mut changes = lock(&self.changes);
        if changes.len() == CHANGES_KEPT {
            changes.pop_front();
        }
        changes.push_back(ChangeRecord {
            at: snapshot.changed_at.unwrap_or_else(Timestamp::now),
            generation: snapshot.generation,
            joined,
            left,
        });
        drop(changes);
        for joined in snapshot.backends.iter().filter(is_new) {
            self.checker.watch(joined);
        }
        self.current.store(Arc::new(snapshot));
        self.totals.set_changed();
        change
    }

    /// The backend the algorithm picks, among those not ejected and not in
    /// `tried`. When every backend is ejected, it fails open and picks among
    /// all of them (still not the `tried`). `None` when no backend is left.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        self.pick_from(tried, None)
    }

    /// The first pick of a request: with a shared counter configured, round
    /// robin takes its number from it (retries use the local counter).
    pub async fn pick_first(&self) -> Option<Arc<Backend>> {
        let shared = match self.shared_counter.load_full() {
            Some(counter) if self.current.load().algorithm == Algorithm::RoundRobin => {
                counter.next().await
            }
            _ => None,
        };
        self.pick_from(&[], shared)
    }

    fn pick_from(&self, tried: &[SocketAddr], shared: Option<usize>) -> Option<Arc<Backend>> {
        let snapshot = self.current.load();
        let ticket;
        let selection: &dyn Selection = match shared {
            Some(number) => {
                ticket = algorithm::Ticket(number);
                &ticket
            }
            None => &*snapshot.selection,
        };
        pick_admitted(&snapshot.backends, selection, tried)
            .or_else(|| self.fail_open(&snapshot, tried))
    }

    /// With every backend ejected: any of them, at random, but never a tried
    /// one; `None` while some backend is not ejected (then none was left).
    fn fail_open(&self, snapshot: &Snapshot, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        if !self.failing_open() {
            return None;
        }
        let backends = &snapshot.backends;
        static THROTTLE: common::telemetry::Throttle =
            common::telemetry::Throttle::new(Duration::from_secs(1));
        if let Some(held_back) = THROTTLE.allow() {
            tracing::warn!(
                backends = backends.len(),
                held_back,
                "every backend is ejected: failing open, routing to all of them"
            );
        }
        self.totals.failed_open();
        // At random: the algorithm's own state already moved on for the
        // pick that found nothing.
        let start = fastrand::usize(..backends.len());
        let i = algorithm::usable_for_ticket(start, backends, &|b| !tried.contains(&b.addr))?;
        Some(backends[i].clone())
    }

    /// Whether every backend is ejected now, so that the balancer fails open.
    pub fn failing_open(&self) -> bool {
        let snapshot = self.current.load();
        let now = now_ms();
        !snapshot.backends.is_empty() && snapshot.backends.iter().all(|b| !b.health.may_admit(now))
    }

    /// Records what an attempt on `backend` came to, ejecting it when its
    /// health says so (within `maxEjectionPercent` of the set).
    pub fn record(&self, backend: &Backend, outcome: Outcome) {
        if outcome == Outcome::Success && backend.health.is_clear() {
            return;
        }
        let policy = self.outlier.load();
        let may_eject = outcome != Outcome::Success && {
            let snapshot = self.current.load();
            let now = now_ms();
            let ejected = snapshot
                .backends
                .iter()
                .filter(|b| matches!(b.health.state(now), State::Ejected(_)))
                .count();
            let allowed = snapshot.backends.len() * policy.max_ejection_percent as usize / 100;
            ejected < allowed.max(1)
        };
        if let Some((reason, time)) = backend.health.record(outcome, &policy, may_eject) {
            backend.stats.ejected(reason);
            tracing::warn!(backend = %backend.addr, reason = reason.as_str(), ejection = ?time, "backend ejected from the rotation");
        }
    }
}

/// The backend `selection` picks among those that health admits and that
/// were not `tried`. A probing backend takes one request; when another
/// request won it, the pick is made again without it.
fn pick_admitted(
    backends: &[Arc<Backend>],
    selection: &dyn Selection,
    tried: &[SocketAddr],
) -> Option<Arc<Backend>> {
    let now = now_ms();
    let mut lost_probe_race = Vec::new();
    loop {
        let usable = |b: &Backend| {
            b.health.may_admit(now)
                && !tried.contains(&b.addr)
                && !lost_probe_race.contains(&b.addr)
        };
        let i = selection.pick(backends, &usable)?;
        if backends[i].health.admit(now) {
            return Some(backends[i].clone());
        }
        lost_probe_race.push(backends[i].addr);
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
            .map(|a| (a.parse().unwrap(), Origin::default()))
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
        balancer.record(&kept, Outcome::ConnectFailure);

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
        let pod = |name: &str| Origin {
            name: Some(name.into()),
            ..Origin::default()
        };
        balancer.publish(&BackendSet::from([(addr, pod("backend-a"))]));
        let change = balancer.publish(&BackendSet::from([(addr, pod("backend-b"))]));
        assert_eq!((change.added.len(), change.removed.len()), (1, 1));
        assert_eq!(
            balancer.snapshot().backends[0].origin.name.as_deref(),
            Some("backend-b")
        );
    }

    #[test]
    fn an_ejected_backend_is_skipped_until_a_success() {
        let balancer = Balancer::new(Duration::from_secs(60));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        let bad = balancer.snapshot().backends[1].clone();
        balancer.record(&bad, Outcome::ConnectFailure);
        assert_eq!(bad.state(), State::Ejected(Reason::Connect));
        let picked = picks(&balancer, 100);
        assert!(!picked.contains(&"10.0.0.2:80".to_string()));

        balancer.record(&bad, Outcome::Success);
        assert_eq!(bad.state(), State::Healthy);
        assert!(picks(&balancer, 3).contains(&"10.0.0.2:80".to_string()));
    }

    #[test]
    fn the_turns_of_ejected_backends_are_spread_over_the_others() {
        // Round robin, and least connections' ties (every backend idle):
        // "the next usable one" would hand the second of the two left all
        // the turns of the 28 ejected after it.
        for algorithm in [Algorithm::RoundRobin, Algorithm::LeastConnections] {
            let balancer = Balancer::new(Duration::from_secs(60));
            balancer.set_algorithm(algorithm, &Weights::new());
            balancer.set_outlier_policy(health::Policy {
                max_ejection_percent: 100,
                ..health::Policy::default()
            });
            let list: Vec<String> = (1..=30).map(|i| format!("10.0.0.{i}:80")).collect();
            balancer.publish(&addrs(&list.iter().map(String::as_str).collect::<Vec<_>>()));
            let backends = balancer.snapshot().backends.clone();
            for backend in &backends[2..] {
                balancer.record(backend, Outcome::ConnectFailure);
            }
            let picked = picks(&balancer, 3000);
            let share =
                |b: &Arc<Backend>| picked.iter().filter(|a| **a == b.addr.to_string()).count();
            assert_eq!(
                (share(&backends[0]), share(&backends[1])),
                (1500, 1500),
                "{algorithm:?}"
            );
        }
    }

    #[test]
    fn five_5xx_in_a_row_eject_and_at_most_half_the_set_is_ejected() {
        let balancer = Balancer::new(Duration::from_secs(60));
        balancer.publish(&addrs(&[
            "10.0.0.1:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "10.0.0.4:80",
        ]));
        let backends = balancer.snapshot().backends.clone();
        for backend in backends.iter() {
            for _ in 0..5 {
                balancer.record(backend, Outcome::ServerError);
            }
        }
        let ejected = backends
            .iter()
            .filter(|b| b.state() != State::Healthy)
            .count();
        assert_eq!(ejected, 2, "maxEjectionPercent 50 of 4");
    }

    #[test]
    fn with_every_backend_ejected_it_fails_open() {
        let balancer = Balancer::new(Duration::from_secs(60));
        balancer.set_outlier_policy(health::Policy {
            max_ejection_percent: 100,
            ..health::Policy::default()
        });
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        for backend in balancer.snapshot().backends.iter() {
            balancer.record(backend, Outcome::ConnectFailure);
        }
        assert!(balancer.failing_open());
        let picked = picks(&balancer, 64);
        assert_eq!(
            picked.iter().collect::<BTreeSet<_>>().len(),
            2,
            "{picked:?}"
        );
        let first = balancer.pick(&[]).unwrap();
        let second = balancer.pick(&[first.addr]).unwrap();
        assert!(
            balancer.pick(&[first.addr, second.addr]).is_none(),
            "never a tried one"
        );
    }

    fn set(list: &[(&str, &str)]) -> BackendSet {
        list.iter()
            .map(|(addr, pod)| {
                let pod = Origin {
                    name: Some(pod.to_string()),
                    ..Origin::default()
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
            .map(|&i| stats::InFlight::start(backends[i].clone()))
            .collect();
        assert_eq!(picks(&balancer, 5), vec!["10.0.0.2:80"; 5]);
    }

    #[test]
    fn power_of_two_never_picks_the_busier_of_its_two() {
        let balancer = Balancer::new(Duration::from_secs(1));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        balancer.set_algorithm(Algorithm::PowerOfTwo, &Weights::new());
        let backends = balancer.snapshot().backends.clone();
        let _busy = stats::InFlight::start(backends[0].clone());
        // With two backends, the two choices are always both of them.
        assert_eq!(picks(&balancer, 50), vec!["10.0.0.2:80"; 50]);
    }

    #[test]
    fn power_of_two_weighs_requests_in_flight_by_latency() {
        let balancer = Balancer::new(Duration::from_secs(1));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80"]));
        balancer.set_algorithm(Algorithm::PowerOfTwo, &Weights::new());
        let backends = balancer.snapshot().backends.clone();
        backends[0].stats.answered(200, Duration::from_micros(500));
        backends[1].stats.answered(200, Duration::from_millis(50));
        // The fast one with 20 in flight still costs less than the idle slow one.
        let _busy: Vec<_> = (0..20)
            .map(|_| stats::InFlight::start(backends[0].clone()))
            .collect();
        assert_eq!(picks(&balancer, 20), vec!["10.0.0.1:80"; 20]);
    }

    #[test]
    fn random_reaches_every_backend_and_skips_unusable_ones() {
        let balancer = Balancer::new(Duration::from_secs(60));
        balancer.publish(&addrs(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]));
        balancer.set_algorithm(Algorithm::Random, &Weights::new());
        let picked = picks(&balancer, 300);
        assert_eq!(picked.iter().collect::<BTreeSet<_>>().len(), 3);
        balancer.record(&balancer.snapshot().backends[1], Outcome::ConnectFailure);
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
}
