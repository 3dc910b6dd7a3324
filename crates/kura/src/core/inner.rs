//! [`CacheInner`], what a [`Cache`](super::Cache) shares: the store behind
//! the circuit breaker and the operation timeout ([`CacheInner::call`], the
//! one way to a store step), the key builder, the TTL policy and its
//! adaptive read counts, the journal of pending invalidations, the write
//! epochs, the stamps copy and the near caches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::lock;
use crate::breaker::Breaker;
use crate::consistency::epochs::Epochs;
use crate::consistency::journal::Pending;
use crate::consistency::stamps::Stamps;
use crate::error::StoreError;
use crate::key::{KeyBuilder, Kind};
use crate::metrics::{KindMetrics, LocalCounters};
use crate::policy::adaptive::ReadCounter;
use crate::policy::{TtlPolicy, TypePolicy};
use crate::store::{CacheStore, Lifetimes, StoreResult};

pub(crate) struct CacheInner {
    pub(crate) store: Arc<dyn CacheStore>,
    /// The store bounds its own operations (see
    /// [`Store::bounds_own_latency`]) within the operation timeout.
    pub(super) self_bounded: bool,
    pub(crate) keys: KeyBuilder,
    pub(super) counter_keys: [String; 2],
    pub(crate) policy: TtlPolicy,
    pub(crate) op_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_wait: Duration,
    pub(super) breaker: Breaker,
    pub(crate) max_value_bytes: usize,
    pub(crate) stale_while_loading: bool,
    pub(crate) counters: LocalCounters,
    pub(super) reads: ReadCounter,
    pub(super) pending: Mutex<Pending>,
    pub(crate) has_pending: AtomicBool,
    pub(super) pending_limit: usize,
    /// A replay task is running.
    pub(super) replay_running: AtomicBool,
    /// After a failed replay, store calls do not start another before this.
    pub(super) replay_not_before: Mutex<Option<tokio::time::Instant>>,
    /// The bound of one replay as a whole.
    pub(super) replay_timeout: Duration,
    pub(super) flush_interval: Duration,
    /// This cache, for the replay task to hold.
    pub(super) me: Weak<CacheInner>,
    pub(super) kind_metrics: Mutex<HashMap<&'static str, KindMetrics>>,
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
        let left = crate::policy::TtlPolicy::ttl_until(at)?;
        Some(Lifetimes {
            ttl: lifetimes.ttl.min(left),
            stale_ttl: if lifetimes.stale_ttl.is_zero() {
                Duration::ZERO
            } else {
                lifetimes.stale_ttl.min(left)
            },
        })
    }

    /// A loaded or committed `value` of a type with `policy`, at `key`,
    /// sealed in its envelope ([`crate::codec::envelope`]) with the
    /// lifetimes it gets now (`None`: past the value's end, not to be
    /// cached): the envelope step every write path takes.
    pub(crate) fn envelope<T: serde::Serialize + crate::Versioned + ?Sized>(
        &self,
        value: &T,
        key: &str,
        policy: &TypePolicy,
        epoch: u64,
    ) -> Result<(crate::codec::Encoded, Option<Lifetimes>, Vec<String>), crate::codec::CodecError>
    {
        let lifetimes = Self::capped(self.lifetimes(key, policy), value.expires_at());
        let sealed = crate::codec::envelope::seal(
            value,
            lifetimes.map(|l| l.ttl),
            policy.eager_refresh.is_some(),
            epoch,
            self.max_value_bytes,
        )?;
        Ok((sealed.encoded, lifetimes, sealed.tags))
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
