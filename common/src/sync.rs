//! The one policy for a poisoned lock, in both binaries.
//!
//! A `Mutex` is poisoned when a thread panicked while holding it. What our
//! locks guard (idle connections, a body's state, the admin page's list of
//! changes, a policy) is still valid after such a panic, and a panic in
//! one request must not stop all traffic: so the lock is taken anyway.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, poisoned or not.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
