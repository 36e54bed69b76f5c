//! Least connections: the backend with the fewest requests in flight.
//!
//! A slow backend holds its requests longer, so it has more in flight and
//! gets fewer new ones: the load follows the capacity, which round robin
//! cannot see. Ties (all idle, say) are broken by a rotating start, so an
//! idle set is still used in turn instead of always the first backend.
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
        let start = self.next.fetch_add(1, Relaxed);
        (0..n)
            .map(|offset| start.wrapping_add(offset) % n)
            .filter(|&i| usable(&backends[i]))
            // min_by_key keeps the first of equals: the rotation breaks ties.
            .min_by_key(|&i| backends[i].stats.in_flight())
    }
}
