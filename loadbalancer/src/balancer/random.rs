//! Random: any usable backend, uniformly. The baseline the others are
//! measured against: even on average, uneven in any short window.

use std::sync::Arc;

use super::Backend;
use super::algorithm::{Selection, first_usable_from};

#[derive(Debug)]
pub struct Random;

impl Selection for Random {
    fn pick(&self, backends: &[Arc<Backend>], usable: &dyn Fn(&Backend) -> bool) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        first_usable_from(fastrand::usize(..backends.len()), backends, usable)
    }
}
