//! The fleet lease: one named lease in the store that lets one process of a
//! fleet do a piece of work at a time (relay the invalidation feed, warm the
//! cache), taken over by another within about its lifetime when the holder
//! dies or is cut off from the store.
//!
//! The lease is a key under the namespace's internal prefix
//! (`<ns>:~<name>`) holding the holder's token, with a lifetime
//! ([`LockStore::lock`](crate::store::LockStore::lock), [`LockStore::extend_lock`](crate::store::LockStore::extend_lock), [`LockStore::unlock`](crate::store::LockStore::unlock)). Every store
//! call goes through the cache's operation timeout and circuit breaker.
//!
//! A holder keeps its lease with [`FleetLease::hold`]: a heartbeat task
//! extends it every quarter of its lifetime, however long the work between
//! two of the holder's own checks takes, and [`Held::is_held`] turns false
//! as soon as the lease was found taken by another, or when no extension
//! succeeded for a whole lifetime (the holder may be cut off from the store
//! while another takes the lease). A fleet lease is an efficiency, never
//! the safety of the work it guards: for a moment after a takeover two
//! processes may both believe they hold it.
//!
//! # Examples
//!
//! ```
//! # use std::time::Duration;
//! # use kura::{Cache, store::MemoryStore, lease::FleetLease};
//! # #[tokio::main] async fn main() {
//! let cache = Cache::builder(MemoryStore::new()).build().unwrap();
//! let a = FleetLease::new(&cache, "warming", "a", Duration::from_secs(2));
//! let b = FleetLease::new(&cache, "warming", "b", Duration::from_secs(2));
//! let held = a.hold().await.expect("reachable").expect("free");
//! assert_eq!(b.try_acquire().await, Some(false));
//! held.release().await;
//! assert_eq!(b.try_acquire().await, Some(true));
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::core::Cache;

#[cfg(doc)]
use crate::Store;

/// A named lease of the fleet, as one process sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FleetLease {
    cache: Cache,
    key: Arc<str>,
    token: Arc<str>,
    ttl: Duration,
}

impl FleetLease {
    /// The lease `name` of `cache`'s namespace, for this process (shown as
    /// `<instance>#<random>` to whoever reads the key), living `ttl` after
    /// each extension.
    #[must_use]
    pub fn new(cache: &Cache, name: &str, instance: &str, ttl: Duration) -> Self {
        Self {
            key: cache.keys().internal(name).into(),
            token: format!("{instance}#{:08x}", rand::random::<u32>()).into(),
            cache: cache.clone(),
            ttl: ttl.max(Duration::from_millis(100)),
        }
    }

    /// This process's token (what the lease key holds while it is held
    /// here).
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The lease key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's lifetime after each extension.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes the lease if it is free (or already this process's): `Some(true)`
    /// when held now, `Some(false)` when another holds it, `None` when the
    /// store did not answer.
    pub async fn try_acquire(&self) -> Option<bool> {
        let c = &self.cache.inner;
        match c
            .call(None, c.store.extend_lock(&self.key, &self.token, self.ttl))
            .await
        {
            Ok(true) => return Some(true),
            Ok(false) => {}
            Err(_) => return None,
        }
        c.call(None, c.store.lock(&self.key, &self.token, self.ttl))
            .await
            .ok()
    }

    /// Takes the lease and keeps it with a heartbeat until the [`Held`] is
    /// released or dropped; `Some(None)` when another holds it, `None` when
    /// the store did not answer.
    pub async fn hold(&self) -> Option<Option<Held>> {
        match self.try_acquire().await? {
            false => Some(None),
            true => Some(Some(Held::start(self.clone()))),
        }
    }

    /// Gives the lease back if this process holds it.
    pub async fn release(&self) {
        let c = &self.cache.inner;
        let _ = c.call(None, c.store.unlock(&self.key, &self.token)).await;
    }
}

/// A lease this process holds, kept by a heartbeat task. Dropping it stops
/// the heartbeat and gives the lease back in the background.
#[derive(Debug)]
pub struct Held {
    lease: FleetLease,
    state: Arc<HeldState>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct HeldState {
    /// Found taken by another (or released).
    lost: AtomicBool,
    /// Milliseconds since `since` of the last successful take or extension.
    renewed_ms: AtomicU64,
    since: Instant,
}

impl HeldState {
    fn ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }
}

impl Held {
    fn start(lease: FleetLease) -> Self {
        let state = Arc::new(HeldState {
            lost: AtomicBool::new(false),
            renewed_ms: AtomicU64::new(0),
            since: Instant::now(),
        });
        let beat = {
            let (lease, state) = (lease.clone(), state.clone());
            async move {
                let every = lease.ttl / 4;
                loop {
                    tokio::time::sleep(every).await;
                    let c = &lease.cache.inner;
                    match c
                        .call(
                            None,
                            c.store.extend_lock(&lease.key, &lease.token, lease.ttl),
                        )
                        .await
                    {
                        Ok(true) => state.renewed_ms.store(state.ms(), Ordering::Release),
                        Ok(false) => {
                            state.lost.store(true, Ordering::Release);
                            break;
                        }
                        // Unreachable: tried again at the next beat; past a
                        // whole lifetime without one, `is_held` says no.
                        Err(_) => {}
                    }
                }
            }
        };
        Self {
            heartbeat: Some(tokio::spawn(beat)),
            lease,
            state,
        }
    }

    /// Whether the lease is still this process's: not found taken by
    /// another, and extended within its lifetime.
    #[must_use]
    pub fn is_held(&self) -> bool {
        let s = &self.state;
        !s.lost.load(Ordering::Acquire)
            && s.ms().saturating_sub(s.renewed_ms.load(Ordering::Acquire))
                < self.lease.ttl.as_millis() as u64
    }

    /// The lease.
    #[must_use]
    pub fn lease(&self) -> &FleetLease {
        &self.lease
    }

    /// Stops the heartbeat and gives the lease back.
    pub async fn release(mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        self.state.lost.store(true, Ordering::Release);
        self.lease.release().await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
            let lease = self.lease.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { lease.release().await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn cache() -> Cache {
        Cache::builder(MemoryStore::new()).build().unwrap()
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_takeover_after_the_lifetime() {
        let cache = cache();
        let ttl = Duration::from_millis(200);
        let a = FleetLease::new(&cache, "job", "a", ttl);
        let b = FleetLease::new(&cache, "job", "b", ttl);
        assert_eq!(a.try_acquire().await, Some(true));
        assert_eq!(a.try_acquire().await, Some(true), "re-entrant");
        assert_eq!(b.try_acquire().await, Some(false));
        // `a` never extends: `b` takes it once the lifetime passed.
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert_eq!(b.try_acquire().await, Some(true));
        assert_eq!(a.try_acquire().await, Some(false));
    }

    #[tokio::test]
    async fn a_held_lease_outlives_its_lifetime_and_is_given_back() {
        let cache = cache();
        let ttl = Duration::from_millis(200);
        let a = FleetLease::new(&cache, "job", "a", ttl);
        let b = FleetLease::new(&cache, "job", "b", ttl);
        let held = a.hold().await.unwrap().unwrap();
        tokio::time::sleep(ttl * 4).await;
        assert!(held.is_held());
        assert_eq!(b.try_acquire().await, Some(false), "the heartbeat kept it");
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.try_acquire().await, Some(true), "given back on drop");
    }

    #[tokio::test]
    async fn a_lease_taken_by_another_is_seen_lost() {
        let cache = cache();
        let ttl = Duration::from_millis(200);
        let a = FleetLease::new(&cache, "job", "a", ttl);
        let held = a.hold().await.unwrap().unwrap();
        // Another holder forced in (as after an expiry a slow heartbeat missed).
        let c = &cache.inner;
        c.store.unlock(a.key(), a.token()).await.unwrap();
        assert!(c.store.lock(a.key(), "intruder", ttl).await.unwrap());
        tokio::time::sleep(ttl).await;
        assert!(!held.is_held());
    }
}
