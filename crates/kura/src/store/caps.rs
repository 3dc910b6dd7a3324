//! The store's capabilities besides the entry protocol ([`super::Store`]),
//! one trait each, so that every part of the library asks for what it
//! needs: the clear and tag stamps ([`StampStore`], [`crate::tags`]), the
//! feed's position ([`PositionStore`], [`crate::feed`]), rate limits
//! ([`RateStore`], [`crate::ratelimit`]), the fleet's hit and miss counters
//! ([`CounterStore`]), named locks ([`LockStore`], the fleet lease) and the
//! invalidation stream ([`TrackingStore`], [`crate::near`]). Both stores
//! implement every one; no method answers "unsupported" by default: where a
//! store truly has no such thing (the memory store has no stream shared
//! with other processes), its implementation says so explicitly.
//! [`CacheStore`] is all of them together, what a [`crate::Cache`] is
//! built over.

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;

use super::{Store, StoreResult};

/// What one request against a rate limit got ([`RateStore::rate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Admitted.
    pub allowed: bool,
    /// Requests still admitted now, after this one.
    pub remaining: u32,
    /// Until the limit is whole again.
    pub reset: Duration,
    /// When refused: until the next request can be admitted.
    pub retry_after: Duration,
}

/// The emission interval and period of a limit, in microseconds.
pub(crate) fn rate_steps(limit: u32, period: Duration) -> (u64, u64) {
    let period = (period.as_micros() as u64).max(1);
    let step = (period / u64::from(limit.max(1))).max(1);
    (step, step * u64::from(limit.max(1)))
}

/// GCRA on a theoretical arrival time `tat` (µs), at `now` (µs): the
/// decision and the new arrival time (`None` when refused). The scripts do
/// the same in Lua.
pub(crate) fn gcra(
    tat: Option<u64>,
    now: u64,
    limit: u32,
    period: Duration,
) -> (RateDecision, Option<u64>) {
    let (step, period) = rate_steps(limit, period);
    let tat = tat.unwrap_or(now).max(now);
    let after = tat + step;
    if after - now > period {
        return (
            RateDecision {
                allowed: false,
                remaining: 0,
                reset: Duration::from_micros(tat - now),
                retry_after: Duration::from_micros(after - period - now),
            },
            None,
        );
    }
    (
        RateDecision {
            allowed: true,
            remaining: ((period - (after - now)) / step) as u32,
            reset: Duration::from_micros(after - now),
            retry_after: Duration::ZERO,
        },
        Some(after),
    )
}

/// The namespace's clear and tag stamps ([`crate::tags`]): one small hash,
/// bumped atomically.
#[async_trait]
pub trait StampStore: Send + Sync + 'static {
    /// Reads the stamps hash at `key` (see [`crate::tags`]): every field
    /// with its number (none when the key is missing).
    async fn stamps(&self, key: &str) -> StoreResult<Vec<(String, u64)>>;

    /// In one atomic step: raises the stamps hash's `epoch` field and sets
    /// `field` to it; returns the new epoch. The new epoch is the store's
    /// clock in microseconds since the Unix epoch, or one past the higher
    /// of the hash's epoch and `held` (the epoch the caller knows),
    /// whichever is highest: a hash that was lost and is made again starts
    /// above every epoch a value can carry. The hash's `id` field is set to
    /// its first epoch when the hash is made (its incarnation). The key has
    /// no TTL: it is one small hash per namespace.
    async fn bump_stamp(&self, key: &str, field: &str, held: u64) -> StoreResult<u64>;

    /// For a store inside this process: a counter that changes with every
    /// [`StampStore::bump_stamp`], so a copy of the stamps can be trusted
    /// without a read. `None`: the store is shared with other processes,
    /// and changes are learnt from its invalidation stream.
    fn stamps_version(&self) -> Option<u64>;
}

/// Positions that move forward only (the feed's fleet position,
/// [`crate::feed`]), and the one way back after a database regression.
#[async_trait]
pub trait PositionStore: Send + Sync + 'static {
    /// Moves a position (a key outside the entry protocol, such as the
    /// feed's `<ns>:~feed:position`) forward to `value` if that is greater
    /// than the one held, in one atomic step; returns the position now held
    /// (never less than before). The key has no TTL: losing it is safe (the
    /// relay starts again from the oldest row it can read), and it is one
    /// small key per namespace. Read it with [`super::Store::get`] (a decimal).
    async fn advance(&self, key: &str, value: u64) -> StoreResult<u64>;

    /// Sets a position ([`PositionStore::advance`]) back to `to`, only if it still
    /// holds `from`, in one atomic step; returns whether it did. The one
    /// way a position goes back: after the database's watermark was found
    /// below it (a failover to a standby that lacks transactions), once the
    /// kinds it feeds were cleared.
    async fn rewind(&self, key: &str, from: u64, to: u64) -> StoreResult<bool>;
}

/// Rate limits (GCRA, [`crate::ratelimit`]) in one atomic step on the
/// store's clock.
#[async_trait]
pub trait RateStore: Send + Sync + 'static {
    /// One request against a rate limit of `limit` per `period` at `key`
    /// (GCRA, see [`crate::ratelimit`]), in one atomic step on the store's
    /// clock: admitted or not, with what is left. The key expires when the
    /// limit is whole again.
    async fn rate(&self, key: &str, limit: u32, period: Duration) -> StoreResult<RateDecision>;
}

/// Long-lived counters (the fleet's hit and miss totals, the seed's
/// `metrics:cache:*`).
#[async_trait]
pub trait CounterStore: Send + Sync + 'static {
    /// Adds to counters (`INCRBY`), pipelined.
    async fn incr(&self, counters: &[(&str, i64)]) -> StoreResult<()>;

    /// Reads counters (missing as 0).
    async fn counters(&self, keys: &[&str]) -> StoreResult<Vec<i64>>;
}

/// Named locks with an owner token and a lifetime (the fleet lease,
/// [`crate::lease`]).
#[async_trait]
pub trait LockStore: Send + Sync + 'static {
    /// Takes a named lock for `ttl` if free; `true` when taken.
    async fn lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool>;

    /// Extends a lock still held by `token`; `false` when it was lost.
    async fn extend_lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool>;

    /// Releases a lock held by `token`.
    async fn unlock(&self, key: &str, token: &str) -> StoreResult<()>;
}

/// The store's invalidation stream (Redis client tracking), which keeps
/// copies above the store (near caches, the stamps copy) honest.
pub trait TrackingStore: Send + Sync + 'static {
    /// Starts the stream of invalidations of keys starting with any of
    /// `prefixes` (changes, deletions, expiries, evictions, by any client),
    /// delivered to `sink` until it is dropped or the returned handle is.
    /// Redis: `CLIENT TRACKING ON BCAST` on connections of its own (see
    /// [`crate::near`]). `None`: the store has no such stream (the memory
    /// store, which no other process shares).
    fn track(&self, prefixes: Vec<String>, sink: Weak<dyn TrackingSink>) -> Option<Tracking>;
}

/// Where a store's invalidation stream goes ([`TrackingStore::track`]). The calls
/// come from the stream's own task, one at a time, in the order the server
/// sent them.
pub trait TrackingSink: Send + Sync + 'static {
    /// These keys changed on the server; `None`: all of them (a flush).
    fn invalidated(&self, keys: Option<&[&[u8]]>);

    /// Every invalidation of a change the server applied before `sent_at`
    /// has been delivered.
    fn confirmed(&self, sent_at: std::time::Instant);

    /// Invalidations may have been missed (the connection broke, a check
    /// failed, the topology moved, or a new stream began): nothing held
    /// from before can be trusted. `reason` is a short tag for metrics.
    fn lost(&self, reason: &'static str);
}

/// A running invalidation stream; stopped when dropped.
#[derive(Debug)]
pub struct Tracking {
    task: tokio::task::AbortHandle,
}

impl Tracking {
    /// The handle of a stream running as the task behind `task`.
    pub(crate) fn new(task: tokio::task::AbortHandle) -> Self {
        Self { task }
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything a [`crate::Cache`] uses of a store: the entry protocol and
/// every capability. Implemented for every type that has them all.
pub trait CacheStore:
    Store + StampStore + PositionStore + RateStore + CounterStore + LockStore + TrackingStore
{
}

impl<T> CacheStore for T where
    T: Store
        + StampStore
        + PositionStore
        + RateStore
        + CounterStore
        + LockStore
        + TrackingStore
        + ?Sized
{
}
