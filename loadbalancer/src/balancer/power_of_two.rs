//! Power of two choices: two backends at random, the one that costs less.
//!
//! Each pick reads two backends instead of all of them, and many load
//! balancers picking at once do not all pile onto the same "least loaded"
//! backend. The cost is Linkerd's: the backend's peak-EWMA latency times
//! (its requests in flight + 1). Counting only requests in flight (least
//! connections) treats a pod that answers in 50 ms like one that answers in
//! 0.5 ms whenever both have the same number open; weighing by latency
//! sends the slow one a request only when the fast one is a hundred
//! requests deep. A backend with no latency yet costs almost nothing, so a
//! new backend gets traffic at once, and the average decays while a
//! backend is left alone, so a slow one that recovered is tried again.

use std::sync::Arc;

use super::Backend;
use super::algorithm::{Selection, usable_for_ticket};

#[derive(Debug)]
pub struct PowerOfTwo;

impl Selection for PowerOfTwo {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let first = usable_for_ticket(fastrand::usize(..n), backends, usable)?;
        // A second, different start: offset 1..n from the first.
        let second_start = first + 1 + fastrand::usize(..n.max(2) - 1);
        let other = |b: &Backend| usable(b) && !std::ptr::eq(b, &*backends[first]);
        let second = usable_for_ticket(second_start, backends, &other).unwrap_or(first);
        let cost = |i: usize| {
            let stats = &backends[i].stats;
            (stats.in_flight().max(0) + 1) as f64 * stats.latency_micros().max(1.0)
        };
        Some(if cost(second) < cost(first) {
            second
        } else {
            first
        })
    }
}
