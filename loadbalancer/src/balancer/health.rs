//! A backend's health: one state machine, fed by real traffic and by active
//! checks.
//!
//! ```text
//!            failures in a row ≥ threshold            ejection time over
//!  healthy ─────────────────────────────────▶ ejected ──────────────────▶ probing
//!     ▲                                          ▲                          │
//!     └────────── the probe request succeeds ────┼──────────────────────────┤
//!                                                └── the probe fails ───────┘
//! ```
//!
//! This is Envoy's outlier detection, a circuit breaker per backend:
//! - **Passive** (real traffic). A refused or timed-out connection ejects at
//!   once: nothing was sent, the backend is certainly not there. A 5xx
//!   answer may be one bad request, so only `consecutive5xx` of them in a
//!   row eject. Each ejection lasts `baseEjectionMs` times the number of
//!   ejections so far (capped at 5 minutes), so a backend that keeps failing
//!   is tried less and less often.
//! - **Half-open.** When the time is over, exactly one request is let
//!   through as the probe; its success closes the breaker (healthy, history
//!   cleared), its failure ejects again for longer.
//! - **Active checks** (optional) probe each backend's health path on a
//!   timer; `unhealthyThreshold` failures eject it until
//!   `healthyThreshold` passes bring it back, whatever the traffic says.
//!
//! Everything is atomics on the backend, so the request path reads a few
//! of them per pick and writes only when something changes. At most
//! `maxEjectionPercent` of the set may be ejected by traffic at once; and
//! when every backend is out, the balancer fails open (see
//! [`super::Balancer::pick`]).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The longest one ejection lasts.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Times are stored as ms since this instant, so they fit in an atomic.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

pub fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// Why a backend is out of the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Connections were refused or timed out.
    Connect,
    /// Too many 5xx answers in a row.
    FiveXx,
    /// Its health path failed the active checks.
    ActiveCheck,
}

/// What happened on one attempt, as far as health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500.
    Success,
    /// A 5xx answer, or a failure after the request was sent.
    ServerError,
    /// No connection could be made.
    ConnectFailure,
    /// Nothing to judge the backend by (the client's fault, or ours); a
    /// probe that ends so is given back for the next request.
    Neutral,
}

/// The state the rotation sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    Ejected(Reason),
    /// The ejection time is over; the next request is the probe.
    Probing,
}

/// A backend's health record.
#[derive(Debug, Default)]
pub struct Health {
    /// 5xx answers (or failures after sending) in a row.
    failures_in_a_row: AtomicU32,
    /// How often it was ejected since it was last healthy.
    ejections: AtomicU32,
    /// Ejected until this many ms after [`EPOCH`]; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    reason: AtomicU8,
    /// Set while the one probe request is in flight.
    probe_in_flight: AtomicBool,
    /// The active checks' verdict: out until they pass again.
    check_failed: AtomicBool,
    checks_in_a_row: AtomicU32,
}

/// The outlier-detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub consecutive_5xx: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Health {
    /// A backend that must pass its checks before it gets traffic: one that
    /// only they can vouch for (a `Server` resource, which no kubelet
    /// probes), as a pod is not ready until its first probe passes.
    pub fn unverified() -> Health {
        let health = Health::default();
        health.check_failed.store(true, Relaxed);
        health
    }

    /// The state at `now`.
    pub fn state(&self, now: u64) -> State {
        if self.check_failed.load(Relaxed) {
            return State::Ejected(Reason::ActiveCheck);
        }
        let until = self.ejected_until_ms.load(Relaxed);
        if until == 0 {
            State::Healthy
        } else if now < until {
            State::Ejected(self.reason())
        } else {
            State::Probing
        }
    }

    /// Whether [`Health::admit`] would let a request through at `now`,
    /// without claiming anything.
    pub fn may_admit(&self, now: u64) -> bool {
        match self.state(now) {
            State::Healthy => true,
            State::Ejected(_) => false,
            State::Probing => !self.probe_in_flight.load(Relaxed),
        }
    }

    /// Nothing to clear: the common case, read without writing.
    pub fn is_clear(&self) -> bool {
        self.failures_in_a_row.load(Relaxed) == 0
            && self.ejected_until_ms.load(Relaxed) == 0
            && !self.probe_in_flight.load(Relaxed)
    }

    /// Whether a request may go to this backend at `now`. A probing backend
    /// takes one request at a time, claimed here.
    pub fn admit(&self, now: u64) -> bool {
        match self.state(now) {
            State::Healthy => true,
            State::Ejected(_) => false,
            State::Probing => self
                .probe_in_flight
                .compare_exchange(false, true, Relaxed, Relaxed)
                .is_ok(),
        }
    }

    /// Records an attempt's outcome. Returns the ejection it caused, if any,
    /// as (reason, how long). `may_eject` is false when too many backends
    /// are ejected already.
    pub fn record(
        &self,
        outcome: Outcome,
        policy: &Policy,
        may_eject: bool,
    ) -> Option<(Reason, Duration)> {
        let was_probe = self.probe_in_flight.swap(false, Relaxed);
        let reason = match outcome {
            Outcome::Neutral => return None,
            Outcome::Success => {
                // Read first: writing on every request would make the
                // cache line bounce between cores for nothing.
                if self.failures_in_a_row.load(Relaxed) != 0 {
                    self.failures_in_a_row.store(0, Relaxed);
                }
                if was_probe || self.ejected_until_ms.load(Relaxed) != 0 {
                    self.ejected_until_ms.store(0, Relaxed);
                    self.ejections.store(0, Relaxed);
                }
                return None;
            }
            Outcome::ConnectFailure => Reason::Connect,
            Outcome::ServerError => {
                let in_a_row = self.failures_in_a_row.fetch_add(1, Relaxed) + 1;
                if in_a_row < policy.consecutive_5xx && !was_probe {
                    return None;
                }
                Reason::FiveXx
            }
        };
        if !may_eject && !was_probe {
            return None;
        }
        let ejections = self.ejections.fetch_add(1, Relaxed) + 1;
        let time = policy
            .base_ejection
            .saturating_mul(ejections)
            .min(MAX_EJECTION);
        self.failures_in_a_row.store(0, Relaxed);
        self.reason.store(reason as u8, Relaxed);
        self.ejected_until_ms
            .store(now_ms() + time.as_millis() as u64, Relaxed);
        Some((reason, time))
    }

    /// Records an active check's result. Returns `Some(true)` when the
    /// backend just turned unhealthy, `Some(false)` when it just recovered.
    pub fn checked(&self, passed: bool, unhealthy: u32, healthy: u32) -> Option<bool> {
        let failed = self.check_failed.load(Relaxed);
        // Counts the results that disagree with the current verdict.
        if passed != failed {
            self.checks_in_a_row.store(0, Relaxed);
            return None;
        }
        let in_a_row = self.checks_in_a_row.fetch_add(1, Relaxed) + 1;
        let threshold = if failed { healthy } else { unhealthy };
        if in_a_row < threshold {
            return None;
        }
        self.checks_in_a_row.store(0, Relaxed);
        self.check_failed.store(!failed, Relaxed);
        Some(!failed)
    }

    /// The active checks' verdict: whether they hold the backend out.
    pub fn check_failed(&self) -> bool {
        self.check_failed.load(Relaxed)
    }

    fn reason(&self) -> Reason {
        match self.reason.load(Relaxed) {
            x if x == Reason::FiveXx as u8 => Reason::FiveXx,
            x if x == Reason::ActiveCheck as u8 => Reason::ActiveCheck,
            _ => Reason::Connect,
        }
    }
}

impl State {
    /// The word for it in metrics and `/backends`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Ejected(_) => "ejected",
            State::Probing => "probing",
        }
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::FiveXx => "5xx",
            Reason::ActiveCheck => "active_check",
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            consecutive_5xx: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection_percent: 50,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        consecutive_5xx: 3,
        base_ejection: Duration::from_secs(60),
        max_ejection_percent: 100,
    };

    #[test]
    fn a_refused_connection_ejects_at_once_and_5xx_only_in_a_row() {
        let health = Health::default();
        let now = now_ms();
        health.record(Outcome::ServerError, &POLICY, true);
        health.record(Outcome::ServerError, &POLICY, true);
        health.record(Outcome::Success, &POLICY, true);
        health.record(Outcome::ServerError, &POLICY, true);
        health.record(Outcome::ServerError, &POLICY, true);
        assert_eq!(
            health.state(now),
            State::Healthy,
            "a success breaks the run"
        );
        let ejected = health.record(Outcome::ServerError, &POLICY, true);
        assert_eq!(ejected, Some((Reason::FiveXx, Duration::from_secs(60))));
        assert_eq!(health.state(now_ms()), State::Ejected(Reason::FiveXx));

        let other = Health::default();
        let ejected = other.record(Outcome::ConnectFailure, &POLICY, true);
        assert_eq!(ejected.map(|e| e.0), Some(Reason::Connect));
    }

    #[test]
    fn after_the_ejection_one_probe_decides() {
        let health = Health::default();
        health.record(Outcome::ConnectFailure, &POLICY, true);
        let later = now_ms() + 61_000;
        assert_eq!(health.state(later), State::Probing);
        assert!(health.admit(later), "the probe");
        assert!(!health.admit(later), "one probe at a time");

        // The probe fails: ejected again, for twice as long.
        let again = health.record(Outcome::ServerError, &POLICY, true);
        assert_eq!(again, Some((Reason::FiveXx, Duration::from_secs(120))));

        let much_later = now_ms() + 121_000;
        assert!(health.admit(much_later));
        health.record(Outcome::Success, &POLICY, true);
        assert_eq!(health.state(much_later), State::Healthy);
        assert_eq!(health.ejections.load(Relaxed), 0, "history cleared");
    }

    #[test]
    fn no_ejection_beyond_the_limit_except_a_failed_probe() {
        let health = Health::default();
        assert_eq!(health.record(Outcome::ConnectFailure, &POLICY, false), None);
        assert_eq!(health.state(now_ms()), State::Healthy);
    }

    #[test]
    fn active_checks_eject_after_the_unhealthy_threshold_and_restore_after_the_healthy_one() {
        let health = Health::default();
        assert_eq!(health.checked(false, 2, 3), None);
        assert_eq!(health.checked(false, 2, 3), Some(true));
        assert_eq!(health.state(now_ms()), State::Ejected(Reason::ActiveCheck));
        assert_eq!(health.checked(true, 2, 3), None);
        assert_eq!(
            health.checked(false, 2, 3),
            None,
            "a failure restarts the count"
        );
        assert_eq!(health.checked(true, 2, 3), None);
        assert_eq!(health.checked(true, 2, 3), None);
        assert_eq!(health.checked(true, 2, 3), Some(false));
        assert_eq!(health.state(now_ms()), State::Healthy);
    }
}
