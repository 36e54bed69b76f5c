//! The one small interface every balancing algorithm implements.
//!
//! As in pingora-load-balancing's `BackendSelection`: whatever an algorithm
//! needs is built once per snapshot ([`build`], when the set or the config
//! changes), and [`Selection::pick`] is cheap, called once per attempt on
//! the request path: atomics and arithmetic, no lock, no allocation.
//!
//! `usable` says which backends may be picked now (not ejected, not
//! already tried by this request); an algorithm never returns another.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Backend;
use super::{least_connections, power_of_two, random, round_robin, weighted};

/// Which algorithm picks the backend (`"algorithm"` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// The next backend in turn, from one shared counter.
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight.
    LeastConnections,
    /// Of two backends at random, the one with fewer in flight.
    PowerOfTwo,
    /// Round robin in proportion to `weights`, interleaved.
    WeightedRoundRobin,
    /// Any backend, at random.
    Random,
}

/// Weights for `weighted_round_robin`: keyed by `IP:port` or by a prefix of
/// the pod name; a backend that matches no key weighs 1.
pub type Weights = BTreeMap<String, u32>;

/// An algorithm's state for one snapshot.
pub trait Selection: fmt::Debug + Send + Sync {
    /// The index in `backends` of the backend to use, among the `usable`.
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize>;
}

/// The state of `algorithm` for `backends`.
pub fn build(
    algorithm: Algorithm,
    weights: &Weights,
    backends: &[Arc<Backend>],
) -> Box<dyn Selection> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(round_robin::RoundRobin::default()),
        Algorithm::LeastConnections => Box::new(least_connections::LeastConnections::default()),
        Algorithm::PowerOfTwo => Box::new(power_of_two::PowerOfTwo),
        Algorithm::WeightedRoundRobin => {
            let weights: Vec<u32> = backends.iter().map(|b| weight_of(b, weights)).collect();
            Box::new(weighted::Weighted::new(&weights))
        }
        Algorithm::Random => Box::new(random::Random),
    }
}

/// A backend's weight: its own (a `Server`'s `spec.weight`), else its
/// `IP:port` key, else the longest pod-name prefix that is a key, else 1.
pub fn weight_of(backend: &Backend, weights: &Weights) -> u32 {
    if let Some(weight) = backend.origin.weight {
        return weight;
    }
    if let Some(weight) = weights.get(backend.label_str()) {
        return *weight;
    }
    let pod = backend.origin.name.as_deref().unwrap_or("");
    weights
        .iter()
        .filter(|(key, _)| !pod.is_empty() && pod.starts_with(key.as_str()))
        .max_by_key(|(key, _)| key.len())
        .map_or(1, |(_, weight)| *weight)
}

/// A number handed out from outside (the shared counter in Redis), as a
/// selection: round robin's turn, taken from someone else's counter.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(pub usize);

impl Selection for Ticket {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        usable_for_ticket(self.0, backends, usable)
    }
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::PowerOfTwo => "power_of_two",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::Random => "random",
        }
    }
}

/// The backend for `ticket` (a counter value or a random number) among the
/// usable ones: `backends[ticket % n]` when it is usable, else the
/// `ticket % k`-th of the `k` usable backends.
///
/// Why not "the next usable one after it": then the backend just after a run
/// of unusable ones inherits all their turns (with 28 of 30 ejected, one of
/// the two left would get 29 requests in 30). Spreading the missed tickets
/// over the usable backends keeps them even.
pub(super) fn usable_for_ticket(
    ticket: usize,
    backends: &[Arc<Backend>],
    usable: &dyn Fn(&Backend) -> bool,
) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let i = ticket % n;
    if usable(&backends[i]) {
        return Some(i);
    }
    let k = backends.iter().filter(|b| usable(b)).count();
    if k == 0 {
        return None;
    }
    (0..n).filter(|&j| usable(&backends[j])).nth(ticket % k)
}
