//! Random: any usable backend, uniformly. The baseline the others are
//! measured against: even on average, uneven in any short window.

use std::sync::Arc;

use super::Backend;
use super::algorithm::{Selection, usable_for_ticket};

#[derive(Debug)]
pub struct Random;

impl Selection for Random {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        usable_for_ticket(fastrand::usize(..backends.len()), backends, usable)
    }
}
