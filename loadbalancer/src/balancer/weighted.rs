//! Smooth weighted round robin, as nginx does it.
//!
//! Weights 5:1:1 should give `a a b a c a a`, not `a a a a a b c`: the
//! heavy backend's turns spread through the cycle. nginx's rule: each turn,
//! add every backend's weight to its running score, pick the highest score,
//! and subtract the total weight from the winner.
//!
//! nginx runs that under a lock. Here the cycle (as long as the weights add
//! up to) is worked out once per snapshot, and each pick is one `fetch_add`
//! into it: the same order, with no lock on the request path.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Backend;
use super::algorithm::Selection;

#[derive(Debug)]
pub struct Weighted {
    /// One cycle of picks, as indexes into the snapshot's backends.
    cycle: Vec<usize>,
    next: AtomicUsize,
}

impl Weighted {
    pub fn new(weights: &[u32]) -> Weighted {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let mut scores = vec![0i64; weights.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (score, weight) in scores.iter_mut().zip(weights) {
                *score += i64::from(*weight);
            }
            // The first of equal scores wins, as in nginx.
            let best = (0..scores.len())
                .max_by_key(|&i| (scores[i], std::cmp::Reverse(i)))
                .unwrap_or(0);
            scores[best] -= total;
            cycle.push(best);
        }
        Weighted {
            cycle,
            next: AtomicUsize::new(0),
        }
    }
}

impl Selection for Weighted {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        let n = self.cycle.len();
        if n == 0 || backends.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed);
        (0..n)
            .map(|offset| self.cycle[start.wrapping_add(offset) % n])
            .find(|&i| i < backends.len() && usable(&backends[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_five_one_one_interleave_as_in_nginx() {
        let weighted = Weighted::new(&[5, 1, 1]);
        assert_eq!(weighted.cycle, [0, 0, 1, 0, 2, 0, 0]);
    }
}
