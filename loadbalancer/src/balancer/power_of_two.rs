//! Power of two choices: two backends at random, the one with fewer in flight.
//!
//! Nearly as good as least connections at avoiding busy backends, but each
//! pick reads two counters instead of all of them, and many load balancers
//! picking at once do not all pile onto the same "least loaded" backend.
//! Ties go to the backend with the lower decaying average latency, as in
//! Finagle and Linkerd.

use std::sync::Arc;

use super::Backend;
use super::algorithm::{Selection, first_usable_from};

#[derive(Debug)]
pub struct PowerOfTwo;

impl Selection for PowerOfTwo {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let first = first_usable_from(fastrand::usize(..n), backends, usable)?;
        // A second, different start: offset 1..n from the first.
        let second_start = first + 1 + fastrand::usize(..n.max(2) - 1);
        let second = first_usable_from(second_start, backends, usable).unwrap_or(first);
        let load = |i: usize| {
            let stats = &backends[i].stats;
            (stats.in_flight(), stats.latency_micros())
        };
        Some(if load(second) < load(first) {
            second
        } else {
            first
        })
    }
}
