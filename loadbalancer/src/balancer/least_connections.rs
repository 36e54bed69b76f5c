//! Least connections: the backend with the fewest requests in flight.
//!
//! A slow backend holds its requests longer, so it has more in flight and
//! gets fewer new ones: the load follows the capacity, which round robin
//! cannot see. Ties (all idle, say) go to each of the tied backends in turn,
//! so an idle set is still used evenly: not "the first one after a rotating
//! start", which hands the backend just after a run of ejected ones all of
//! their turns.
//! Each pick reads every backend's counter: fine for tens of backends (for
//! thousands, see power of two choices).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Backend;
use super::algorithm::Selection;

#[derive(Debug, Default)]
pub struct LeastConnections {
    next: AtomicUsize,
}

impl Selection for LeastConnections {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let ticket = self.next.fetch_add(1, Relaxed);
        let count = |i: &usize| backends[*i].stats.in_flight();
        let first = (0..n).filter(|&i| usable(&backends[i])).min_by_key(count)?;
        let fewest = count(&first);
        let tied = |i: &usize| usable(&backends[*i]) && count(i) == fewest;
        let ties = (0..n).filter(tied).count();
        // A count may change between the passes: then the first found.
        (0..n)
            .filter(tied)
            .nth(ticket % ties.max(1))
            .or(Some(first))
    }
}
