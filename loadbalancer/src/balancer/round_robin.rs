//! Round robin: one shared counter, `fetch_add(1) % len`.
//!
//! With N healthy backends, N sequential requests reach each exactly once.
//! A backend that may not be used is skipped by moving on to the next one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Backend;
use super::algorithm::{Selection, first_usable_from};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Selection for RoundRobin {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        first_usable_from(self.next.fetch_add(1, Relaxed), backends, usable)
    }
}
