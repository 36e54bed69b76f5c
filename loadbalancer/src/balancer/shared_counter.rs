//! One round-robin counter for several load balancer replicas, in Redis.
//!
//! Each replica's round robin counts on its own, so with two replicas the
//! global order is not a strict rotation: both may send their next request
//! to the same pod. With `"sharedCounter": "redis://host:6379"`, round
//! robin takes its number from Redis `INCR` instead, and the replicas
//! together make one strict rotation.
//!
//! Redis is a convenience here, never a dependency: each `INCR` has a short
//! timeout, and when Redis is slow, down or not there yet, the replica uses
//! its local counter (for a second, so that requests do not each wait for
//! a dead Redis), logs the change once (and once when Redis is back), and
//! counts it in `loadbalancer_shared_counter_fallbacks_total`.
//! No request ever fails because of Redis. The cost: one round trip to
//! Redis per request, measured in the README.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::health::now_ms;

/// The longest a request waits for Redis before using the local counter.
const TIMEOUT: Duration = Duration::from_millis(50);

/// After a failure, how long the local counter is used before Redis is
/// asked again.
const PAUSE_MS: u64 = 1_000;

/// A round-robin counter kept in Redis.
pub struct SharedCounter {
    key: String,
    connection: ArcSwapOption<ConnectionManager>,
    /// Whether the last attempt fell back, to log only the changes.
    falling_back: AtomicBool,
    /// Redis is not asked again before this time (ms, the health clock).
    paused_until_ms: AtomicU64,
    fallbacks: AtomicU64,
}

impl std::fmt::Debug for SharedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCounter")
            .field("key", &self.key)
            .finish()
    }
}

/// Checks a `sharedCounter` URL.
pub fn check_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("{url:?} is not a Redis URL ({e}); write redis://host:6379"))
}

impl SharedCounter {
    /// Numbers taken locally because Redis failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Relaxed)
    }
}

impl SharedCounter {
    /// Connects to `url` in the background (retrying until Redis answers);
    /// until then, and whenever Redis fails, [`SharedCounter::next`] says
    /// to use the local counter. `key` names the counter in Redis.
    pub fn start(url: &str, key: String) -> Result<Arc<SharedCounter>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("{url:?}: {e}"))?;
        let counter = Arc::new(SharedCounter {
            key,
            connection: ArcSwapOption::empty(),
            falling_back: AtomicBool::new(false),
            paused_until_ms: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        });
        let connecting = counter.clone();
        let url = url.to_owned();
        tokio::spawn(async move {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(1);
            loop {
                match client
                    .get_connection_manager_with_config(config.clone())
                    .await
                {
                    Ok(connection) => {
                        tracing::info!(url, "shared round-robin counter connected");
                        connecting.connection.store(Some(Arc::new(connection)));
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(url, %error, "shared counter: Redis not reachable yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(counter)
    }

    /// The next number of the shared rotation, or `None` to use the local
    /// counter this time.
    pub async fn next(&self) -> Option<usize> {
        if now_ms() < self.paused_until_ms.load(Relaxed) {
            self.fallbacks.fetch_add(1, Relaxed);
            return None;
        }
        let Some(connection) = self.connection.load_full() else {
            return self.fell_back("not connected yet");
        };
        let mut connection = ConnectionManager::clone(&connection);
        match tokio::time::timeout(TIMEOUT, connection.incr::<_, _, u64>(&self.key, 1)).await {
            Ok(Ok(number)) => {
                if self.falling_back.swap(false, Relaxed) {
                    tracing::info!("shared round-robin counter back in use");
                }
                Some(number as usize)
            }
            Ok(Err(error)) => self.fell_back(&error.to_string()),
            Err(_) => self.fell_back("no answer within 50 ms"),
        }
    }

    fn fell_back(&self, why: &str) -> Option<usize> {
        self.fallbacks.fetch_add(1, Relaxed);
        self.paused_until_ms.store(now_ms() + PAUSE_MS, Relaxed);
        if !self.falling_back.swap(true, Relaxed) {
            tracing::warn!(
                why,
                "shared round-robin counter unavailable; using the local counter"
            );
        }
        None
    }
}
