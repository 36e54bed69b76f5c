//! Round robin: one shared counter, `fetch_add(1) % len`.
//!
//! With N healthy backends, N sequential requests reach each exactly once.
//! The turn of a backend that may not be used now goes to one of the usable
//! ones, spread evenly (see [`usable_for_ticket`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Backend;
use super::algorithm::{Selection, usable_for_ticket};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Selection for RoundRobin {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        usable_for_ticket(self.next.fetch_add(1, Relaxed), backends, usable)
    }
}
