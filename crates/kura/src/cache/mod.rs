//! The shared core every strategy handle works through: the store behind a
//! timeout and a circuit breaker, the key builder, the TTL policy, pending
//! invalidations and the metric counters.
//!
//! - `builder`: [`CacheBuilder`], the options.
//! - `queued`: [`QueuedCache`], a cache whose store also has the
//!   write-behind queue ([`crate::store::QueueStore`]).
//! - `journal`: invalidations that could not reach the store, and their replay.
//! - `epochs`: write epochs, so no read joins a load older than a write.
//! - `counters`: hit/miss counts and the fleet's shared counters.
//! - `maintenance`: the background task (counter flushes, replays).
//! - `owned`: values the cache owns ([`Cache::put`], [`Cache::peek`]).
//! - `stamps`: this process's copy of the clear and tag stamps
//!   ([`crate::tags`]), and [`Cache::clear`] / [`Cache::invalidate_tag`].
//! - here: [`Cache`], and [`CacheInner::call`], the one way to a store step
//!   (breaker, operation timeout).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::breaker::{Breaker, BreakerState};
use crate::error::StoreError;
use crate::key::{KeyBuilder, Kind};
use crate::metrics::{KindMetrics, LocalCounters};
use crate::source::Source;
use crate::store::{CacheStore, Lifetimes, StoreResult};
use crate::strategy::{CacheAside, WriteThrough};
use crate::ttl::{ReadCounter, TtlPolicy, TypePolicy};

mod builder;
mod counters;
mod epochs;
mod journal;
mod maintenance;
mod owned;
mod queued;
mod stamps;

pub use self::builder::CacheBuilder;
pub(crate) use self::epochs::{Epoch, Epochs};
use self::journal::Pending;
pub use self::queued::QueuedCache;
pub(crate) use self::stamps::Stamps;

/// A cache over one store and namespace; cheap to clone, shared by all the
/// strategy handles made from it.
///
/// # Concurrent calls
///
/// `Cache` and the handles made from it are `Send + Sync` and meant to be
/// shared by every task of a process. Store calls run concurrently over one
/// connection; no lock is held across an `.await`.
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<CacheInner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store.describe())
            .field("namespace", &self.inner.keys.namespace())
            .field("breaker", &self.inner.breaker.state())
            .finish_non_exhaustive()
    }
}

pub(crate) struct CacheInner {
    pub(crate) store: Arc<dyn CacheStore>,
    /// The store bounds its own operations (see
    /// [`Store::bounds_own_latency`]) within the operation timeout.
    self_bounded: bool,
    pub(crate) keys: KeyBuilder,
    counter_keys: [String; 2],
    pub(crate) policy: TtlPolicy,
    pub(crate) op_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_wait: Duration,
    breaker: Breaker,
    pub(crate) max_value_bytes: usize,
    pub(crate) stale_while_loading: bool,
    pub(crate) counters: LocalCounters,
    reads: ReadCounter,
    pending: Mutex<Pending>,
    pub(crate) has_pending: AtomicBool,
    pending_limit: usize,
    /// A replay task is running.
    replay_running: AtomicBool,
    /// After a failed replay, store calls do not start another before this.
    replay_not_before: Mutex<Option<tokio::time::Instant>>,
    /// The bound of one replay as a whole.
    replay_timeout: Duration,
    flush_interval: Duration,
    /// This cache, for the replay task to hold.
    me: Weak<CacheInner>,
    kind_metrics: Mutex<HashMap<&'static str, KindMetrics>>,
    /// Bumped by every write before it returns; see [`Epochs`].
    pub(crate) epochs: Epochs,
    /// The near caches, when some type has one and the store a stream.
    pub(crate) near: Option<NearCaches>,
    /// The clear and tag stamps (see [`crate::tags`]).
    pub(crate) stamps: Arc<Stamps>,
}

/// The near caches of a [`Cache`]: the tracker every L1 is registered
/// with, and each type's options.
pub(crate) struct NearCaches {
    pub(crate) tracker: Arc<crate::near::Tracker>,
    pub(crate) configs: HashMap<&'static str, crate::near::NearConfig>,
}

impl CacheInner {
    /// A write of this process to the value key `key`, after the store
    /// call: evicted from this process's L1 before the write returns.
    pub(crate) fn near_evict(&self, key: &str) {
        if let Some(n) = &self.near {
            n.tracker.evict_own(key);
        }
    }

    /// A pattern invalidation or clear of `kind` by this process.
    pub(crate) fn near_clear(&self, kind: &Kind) {
        if let Some(n) = &self.near {
            n.tracker.clear_kind(kind);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Cache {
    /// A cache-aside reader of `kind` through `source`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn aside<S: Source>(&self, kind: Kind, source: S) -> CacheAside<S> {
        CacheAside::new(self.clone(), kind, source)
    }

    /// A write-through writer of `kind`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn write_through(&self, kind: Kind) -> WriteThrough {
        WriteThrough::new(self.clone(), kind)
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.inner.store
    }

    /// The key builder.
    #[must_use]
    pub fn keys(&self) -> &KeyBuilder {
        &self.inner.keys
    }

    /// The TTL policy.
    #[must_use]
    pub fn ttl_policy(&self) -> &TtlPolicy {
        &self.inner.policy
    }

    /// The circuit breaker's state.
    #[must_use]
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Sets the cache's state gauges (`cache_breaker_state`,
    /// `cache_pending_invalidations`) from its current state. They also move
    /// on every change; a scrape calls this so they exist before the first.
    pub fn publish_gauges(&self) {
        metrics::gauge!("cache_breaker_state").set(self.breaker_state().as_gauge());
        metrics::gauge!("cache_pending_invalidations").set(self.pending_invalidations() as f64);
    }

    /// Invalidations waiting for the store to come back (entries plus
    /// distrusted patterns).
    #[must_use]
    pub fn pending_invalidations(&self) -> usize {
        lock(&self.inner.pending).len()
    }

    /// Checks the store answers within the operation timeout. A success also
    /// closes an open breaker and, with invalidations pending, starts their
    /// replay and waits for it at most one more operation timeout (the
    /// replay goes on in the background if it takes longer).
    ///
    /// # Errors
    ///
    /// The store's error or [`StoreErrorKind::Timeout`](crate::error::StoreErrorKind::Timeout), from the ping alone: a
    /// replay that fails or is still running does not fail it.
    pub async fn ping(&self) -> StoreResult<()> {
        let r = tokio::time::timeout(self.inner.op_timeout, self.inner.store.ping())
            .await
            .unwrap_or(Err(StoreError::timeout()));
        match &r {
            Ok(()) => {
                self.inner.breaker.success();
                if self.inner.has_pending.load(Ordering::Acquire) {
                    if let Some(replay) = self.inner.start_replay() {
                        let _ = tokio::time::timeout(self.inner.op_timeout, replay).await;
                    }
                }
            }
            Err(_) => self.inner.breaker.failure(),
        }
        r
    }
}

impl CacheInner {
    /// Runs one store operation behind the breaker and the operation
    /// timeout. With invalidations pending, it also starts their replay in
    /// the background (it does not wait for it: the keys they cover are
    /// kept from the cache by [`CacheInner::distrusts`] meanwhile).
    pub(crate) async fn call<T>(
        &self,
        metrics: Option<&KindMetrics>,
        op: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        self.call_within(self.op_timeout, metrics, op).await
    }

    /// [`CacheInner::call`] with another timeout, for operations that walk
    /// the keyspace.
    pub(crate) async fn call_within<T>(
        &self,
        timeout: Duration,
        metrics: Option<&KindMetrics>,
        op: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if !self.breaker.allow() {
            return Err(StoreError::unavailable());
        }
        if self.has_pending.load(Ordering::Acquire) {
            self.kick_replay();
        }
        let r = if self.self_bounded && timeout == self.op_timeout {
            op.await
        } else {
            match tokio::time::timeout(timeout, op).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::timeout()),
            }
        };
        match &r {
            Ok(_) => self.breaker.success(),
            Err(e) if e.is_outage() => {
                self.breaker.failure();
                if let Some(m) = metrics {
                    m.redis_errors.increment(1);
                }
                tracing::debug!(error = %e, "cache store error");
            }
            Err(_) => {}
        }
        r
    }

    /// Handles for `kind`, registered once.
    pub(crate) fn kind_metrics(&self, kind: &Kind) -> KindMetrics {
        lock(&self.kind_metrics)
            .entry(kind.name())
            .or_insert_with(|| KindMetrics::new(kind.name()))
            .clone()
    }

    /// Counts a read of `key` for the adaptive rule; returns the TTL to
    /// reset on this read (once, when the key becomes hot).
    pub(crate) fn adaptive_refresh(
        &self,
        key: &str,
        policy: &TypePolicy,
        now: Instant,
    ) -> Option<Duration> {
        let rule = policy.adaptive?;
        (self.reads.record(key, rule.window, now) == rule.reads + 1)
            .then(|| self.policy.jittered(rule.ttl))
    }

    /// Lifetimes for a value written now.
    pub(crate) fn lifetimes(&self, key: &str, policy: &TypePolicy) -> Lifetimes {
        let base = match policy.adaptive {
            Some(rule) if self.reads.count(key, rule.window) > rule.reads => rule.ttl,
            _ => policy.ttl,
        };
        let ttl = self.policy.jittered(base);
        Lifetimes {
            ttl,
            stale_ttl: if policy.max_stale.is_zero() {
                Duration::ZERO
            } else {
                ttl + policy.max_stale
            },
        }
    }

    /// `lifetimes` cut to end at `expires_at` ([`crate::Versioned::expires_at`]);
    /// `None` when that moment has passed (the value is not cached).
    pub(crate) fn capped(
        lifetimes: Lifetimes,
        expires_at: Option<std::time::SystemTime>,
    ) -> Option<Lifetimes> {
        let Some(at) = expires_at else {
            return Some(lifetimes);
        };
        let left = crate::ttl::TtlPolicy::ttl_until(at)?;
        Some(Lifetimes {
            ttl: lifetimes.ttl.min(left),
            stale_ttl: if lifetimes.stale_ttl.is_zero() {
                Duration::ZERO
            } else {
                lifetimes.stale_ttl.min(left)
            },
        })
    }

    /// A fresh owner token for a lease or lock.
    pub(crate) fn token() -> String {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        format!(
            "{:016x}{:08x}",
            rand::random::<u64>(),
            SEQ.fetch_add(1, Ordering::Relaxed) as u32
        )
    }

    /// Removes a value that failed to decode (best effort).
    pub(crate) async fn discard(&self, key: &str, seen: &Bytes) {
        if let Err(e) = self.call(None, self.store.discard(key, seen)).await {
            tracing::debug!(error = %e, key, "could not remove an undecodable value");
        }
    }
}
