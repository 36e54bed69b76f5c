//! A value made once by the first caller that needs it, and shared.
//!
//! When a backend's HTTP/2 connection is missing, a hundred requests may
//! notice at once. Each making its own would open a hundred connections to
//! keep one; so the first caller starts making it, and every caller that
//! arrives meanwhile waits for that same attempt and shares its outcome,
//! success or failure (Go's `singleflight`, Envoy's connection pool). The
//! attempt is a shared future: if the caller that started it goes away, the
//! others still drive it to the end.

use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use common::sync::lock;

/// The attempt in progress, as every waiter polls it.
type Flight<T, E> = Shared<BoxFuture<'static, Result<T, Arc<E>>>>;

/// One value, made by one caller at a time and shared by all.
pub struct SingleFlight<T: Clone, E> {
    slot: Mutex<Slot<T, E>>,
}

enum Slot<T: Clone, E> {
    Empty,
    Making(Flight<T, E>),
    Made(T),
}

impl<T: Clone + Send + Sync + 'static, E: Send + Sync + 'static> SingleFlight<T, E> {
    /// The value if it is made and still `usable`; else the outcome of the
    /// attempt in progress, or of a new one that `make` starts.
    pub async fn get_or_make<F>(
        &self,
        usable: impl Fn(&T) -> bool,
        make: impl FnOnce() -> F,
    ) -> Result<T, Arc<E>>
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        let flight = {
            let mut slot = lock(&self.slot);
            match &*slot {
                Slot::Made(value) if usable(value) => return Ok(value.clone()),
                Slot::Making(flight) => flight.clone(),
                Slot::Made(_) | Slot::Empty => {
                    let flight = make().map(|made| made.map_err(Arc::new)).boxed().shared();
                    *slot = Slot::Making(flight.clone());
                    flight
                }
            }
        };
        let outcome = flight.clone().await;
        // The first waiter back puts the outcome in place of the attempt.
        let mut slot = lock(&self.slot);
        if matches!(&*slot, Slot::Making(current) if current.ptr_eq(&flight)) {
            *slot = match &outcome {
                Ok(value) => Slot::Made(value.clone()),
                Err(_) => Slot::Empty,
            };
        }
        outcome
    }

    /// Forgets the made value: the next caller makes a new one.
    pub fn forget(&self) {
        let mut slot = lock(&self.slot);
        if matches!(&*slot, Slot::Made(_)) {
            *slot = Slot::Empty;
        }
    }
}

impl<T: Clone, E> Default for SingleFlight<T, E> {
    fn default() -> Self {
        SingleFlight {
            slot: Mutex::new(Slot::Empty),
        }
    }
}

impl<T: Clone, E> std::fmt::Debug for SingleFlight<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &*lock(&self.slot) {
            Slot::Empty => "empty",
            Slot::Making(_) => "making",
            Slot::Made(_) => "made",
        };
        f.debug_struct("SingleFlight")
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    #[tokio::test]
    async fn callers_that_arrive_while_it_is_made_share_one_attempt_and_its_failure() {
        let flight: Arc<SingleFlight<u32, String>> = Arc::default();
        let attempts = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = released.shared();
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let (flight, attempts, released) =
                    (flight.clone(), attempts.clone(), released.clone());
                tokio::spawn(async move {
                    let make = || async move {
                        attempts.fetch_add(1, Relaxed);
                        let _ = released.await;
                        Err::<u32, _>("refused".to_owned())
                    };
                    flight.get_or_make(|_| true, make).await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        let _ = release.send(());
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap_err().as_str(), "refused");
        }
        assert_eq!(attempts.load(Relaxed), 1);
        // The failure is not kept: the next caller tries again.
        let made = flight.get_or_make(|_| true, || async { Ok(7) }).await;
        assert_eq!(made.unwrap(), 7);
        let kept = flight.get_or_make(|_| true, || async { Ok(8) }).await;
        assert_eq!(kept.unwrap(), 7, "a usable value is kept");
        let unusable = flight.get_or_make(|v| *v != 7, || async { Ok(9) }).await;
        assert_eq!(unusable.unwrap(), 9, "an unusable one is made again");
    }
}
