//! The seam to the cache server.
//!
//! A [`Store`] offers the atomic steps the strategies are made of, not raw
//! commands. Two implementations pass one conformance suite
//! (`tests/store_conformance.rs`):
//!
//! - [`RedisStore`]: Redis 7 (standalone, Sentinel or Cluster) over one
//!   multiplexed, auto-reconnecting connection; each step is one Lua script
//!   run by `EVALSHA`, and batches are pipelined.
//! - [`MemoryStore`]: the same semantics in-process, bounded in bytes; the
//!   embedded default when no Redis is configured.
//!
//! # Capabilities
//!
//! What a store can do is split into traits, so a store implements what it
//! supports and a strategy asks at compile time for what it needs:
//!
//! - [`Store`]: the cache entry protocol (below), owned values and ping.
//! - `caps.rs`: one trait per other capability: [`StampStore`] (clear and
//!   tag stamps), [`PositionStore`] (the feed's position), [`RateStore`]
//!   (GCRA), [`CounterStore`] (the fleet's hit and miss counters),
//!   [`LockStore`] (named locks, the fleet lease) and [`TrackingStore`]
//!   (the invalidation stream of near caches). [`CacheStore`] is all of
//!   them with [`Store`]: what a [`crate::Cache`] is built over.
//! - [`QueueStore`]: the write-behind queue (accept, the per-type stream
//!   of accepted writes, settling, dead letters, durability). Needed by
//!   [`crate::Cache::queued`] and so by [`crate::strategy::WriteBehind`]
//!   and [`crate::strategy::Flusher`].
//!
//! Both stores implement every trait, each in files of its own
//! (`redis/{entry,caps,queue}.rs`, `memory/{entry,caps,queue}.rs`). No
//! method has a default that refuses: where a store has no such thing
//! (the memory store has no stream shared with other processes; Redis does
//! not count a namespace's keys without walking them), its implementation
//! says so explicitly.
//!
//! # The entry protocol
//!
//! An entry is a value key plus companions (see [`crate::key`]): a lease, a
//! stale copy and a "not found" marker. The steps keep four invariants:
//!
//! 1. Only the holder of the lease can fill an absent value
//!    ([`Store::fill`] compares the owner token).
//! 2. Every invalidation and update deletes the lease, so a load that began
//!    before a write can never put its older row back.
//! 3. A present value is replaced only by a strictly newer version
//!    ([`Store::update`], and fills check too).
//! 4. Every key written has a TTL, with one exception: the fleet's hit and
//!    miss counters (`metrics:<namespace>:hits` / `:misses`, the seed's
//!    `metrics:cache:*`, written by [`CounterStore::incr`]) live until deleted.
//!    They are long-lived totals other tools read, as in the seed, two
//!    keys per namespace whatever the traffic, so they cannot grow the
//!    keyspace. The write-behind queue's keys and pending copies are
//!    outside the entry protocol and are kept until flushed, and the feed
//!    position
//!    ([`PositionStore::advance`]) lives as long as the fleet relays.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::StoreError;
use crate::key::{EntryKeys, KeyPattern};

mod caps;
mod memory;
mod queue;
mod redis;

pub use self::caps::{
    CacheStore, CounterStore, LockStore, PositionStore, RateDecision, RateStore, StampStore,
    Tracking, TrackingSink, TrackingStore,
};
pub(crate) use self::caps::{gcra, rate_steps};
pub use self::memory::MemoryStore;
pub use self::queue::{
    AcceptOutcome, AcceptRequest, DeadLetter, Durability, QueueEntry, QueueKeys, QueueStats,
    QueueStore, Retry, Settled,
};
pub use self::redis::{RedisStore, RedisStoreBuilder};

/// The result of a store step.
pub type StoreResult<T> = Result<T, StoreError>;

/// What [`Store::acquire`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Acquired {
    /// The value is cached.
    Value(Bytes),
    /// "Not found" is cached.
    Absent,
    /// The caller now holds the lease and should load; the stale copy, if
    /// any, is returned to fall back on.
    Leased {
        /// The stale copy.
        stale: Option<Bytes>,
    },
    /// Another caller holds the lease.
    Busy {
        /// The stale copy.
        stale: Option<Bytes>,
    },
}

/// A request to take the load lease of an entry.
#[derive(Debug, Clone, Copy)]
pub struct AcquireRequest<'a> {
    /// The entry.
    pub keys: &'a EntryKeys,
    /// The caller's owner token.
    pub token: &'a str,
    /// How long the lease lives if its holder never fills.
    pub lease_ttl: Duration,
    /// TTL to give the value key when a pending write-behind value is put
    /// back in place.
    pub value_ttl: Duration,
}

/// What a lease holder puts in the cache.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FillValue {
    /// The loaded value (an envelope from [`crate::codec::encode`]).
    Value {
        /// The envelope bytes.
        bytes: Bytes,
        /// The row version.
        version: u64,
    },
    /// The source has no such row.
    Absent,
}

/// Lifetimes of what a fill or update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// TTL of the value (or of the "not found" marker for an absent fill).
    pub ttl: Duration,
    /// Lifetime of the stale copy (zero: none is written, and one left by
    /// an earlier write is dropped).
    pub stale_ttl: Duration,
}

/// A request to fill an entry under a lease.
#[derive(Debug, Clone)]
pub struct FillRequest<'a> {
    /// The entry.
    pub keys: &'a EntryKeys,
    /// The owner token the lease was taken with.
    pub token: &'a str,
    /// What to store.
    pub value: FillValue,
    /// Its lifetimes.
    pub lifetimes: Lifetimes,
}

/// What a fill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FillOutcome {
    /// Stored.
    Stored,
    /// The lease was no longer the caller's (an invalidation or update
    /// overtook the load): nothing was written.
    LeaseLost,
    /// A value of the same or a newer version was already cached.
    NotNewer,
}

/// A request to update a cached value after a commit.
#[derive(Debug, Clone)]
pub struct UpdateRequest<'a> {
    /// The entry.
    pub keys: &'a EntryKeys,
    /// The new envelope.
    pub bytes: Bytes,
    /// Its version.
    pub version: u64,
    /// Its lifetimes.
    pub lifetimes: Lifetimes,
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpdateOutcome {
    /// The cached value was older and has been replaced.
    Stored,
    /// Nothing was cached; the next read loads the committed row.
    NotCached,
    /// The cached value was already this version or newer.
    NotNewer,
}

/// The cache server, as the strategies use it.
///
/// Every method is one round trip whatever the number of entries it is given
/// (a pipeline on Redis), and each entry's step is atomic.
///
/// # Concurrent calls
///
/// Implementations are shared (`Arc<dyn Store>`) and called from many tasks
/// and processes at once; atomicity is per entry, not across entries.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Reads a value key; with `refresh`, also resets its TTL (`GETEX`)
    /// and moves the end of the entry's stale copy, if any, by as much, so
    /// that it still outlives the value by the type's `max_stale`. One
    /// round trip either way.
    async fn get(&self, key: &str, refresh: Option<Duration>) -> StoreResult<Option<Bytes>>;

    /// Reads many value keys (`MGET`).
    async fn get_many(&self, keys: &[&str]) -> StoreResult<Vec<Option<Bytes>>>;

    /// For each entry: the value, or "not found", or the lease (granted to
    /// this caller or held by another), with the stale copy if one is kept.
    async fn acquire(&self, reqs: &[AcquireRequest<'_>]) -> StoreResult<Vec<Acquired>>;

    /// For each entry: stores the loaded value if the caller's lease is still
    /// held (and the value is at least the version a committed change fenced
    /// the lease with, see [`Store::invalidate_older`]), then releases the
    /// lease.
    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>>;

    /// Takes the lease of a cached value for an early reload (eager
    /// refresh, see [`crate::policy::freshness`]): granted only while the value is
    /// cached, is still the one the caller read (its envelope's expiry is
    /// `seen_expires_ms`, see [`crate::codec::Meta`]) and no lease is held.
    /// `true` when granted.
    async fn refresh_lease(
        &self,
        keys: &EntryKeys,
        token: &str,
        ttl: Duration,
        seen_expires_ms: u64,
    ) -> StoreResult<bool>;

    /// As [`Store::fill`], under a refresh lease: the value is stored when
    /// it is the cached version or newer (a reload of the same row resets
    /// its lifetime).
    async fn refill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>>;

    /// How many values matching `pattern` are cached, when the store can
    /// tell without walking a shared keyspace: the memory store counts its
    /// own entries; Redis answers `None`. Reported by a clear
    /// ([`crate::tags::Cleared::covered`]).
    async fn count_matching(&self, pattern: &KeyPattern) -> StoreResult<Option<u64>>;

    /// Gives back leases whose loads failed, if still held by `token`.
    async fn release(&self, entries: &[(&EntryKeys, &str)]) -> StoreResult<()>;

    /// For each entry: voids any lease; replaces the cached value only if it
    /// is present and older; drops the stale copy of an absent value.
    async fn update(&self, reqs: &[UpdateRequest<'_>]) -> StoreResult<Vec<UpdateOutcome>>;

    /// Deletes the value and companions of each entry (voiding leases);
    /// returns how many values were cached.
    async fn invalidate(&self, entries: &[&EntryKeys]) -> StoreResult<u64>;

    /// Applies committed changes from the database's invalidation log (see
    /// [`crate::feed`]): for each entry, unless a value of the same or a
    /// newer version than the change's is cached, deletes the value, stale
    /// copy and "not found" marker, and fences a lease in flight with the
    /// change's version: its fill then stores only that version or a newer
    /// one (a load that read the row before the commit is refused as if its
    /// lease had been voided, one that read it after still fills). A delete
    /// (`None`) always invalidates, lease included. Pending write-behind
    /// copies are kept, as [`Store::invalidate`] keeps them. Applying a
    /// change twice, or after a newer one, is harmless. Returns how many
    /// values were dropped.
    async fn invalidate_older(&self, entries: &[(&EntryKeys, Option<u64>)]) -> StoreResult<u64>;

    /// Removes the values under `pattern` that were loaded before a clear at
    /// `epoch` (their envelope's epoch is lower; see [`crate::tags`]),
    /// with their stale copies; values filled since, entries with a pending
    /// write-behind write, leases and "not found" markers are kept. Returns
    /// how many values it removed. Walks the keyspace (Redis: `SCAN` with
    /// `COUNT 100` on every primary): not a request-path step.
    async fn sweep(&self, pattern: &KeyPattern, epoch: u64) -> StoreResult<u64>;

    /// Invalidates every entry matching `pattern` by `SCAN` (`COUNT 100`)
    /// and batched deletes; returns how many values were cached.
    async fn invalidate_matching(&self, pattern: &KeyPattern) -> StoreResult<u64>;

    /// Removes a value that failed to decode, unless it has been replaced.
    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()>;

    /// Stores a value with a TTL unconditionally (data the cache owns, such
    /// as a token blacklist entry; never data loaded from a source).
    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()>;

    /// Checks the server answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Whether every operation of this store is already bounded in time by
    /// the store itself (socket timeouts on a single connection, or no I/O
    /// at all). The cache then skips its own per-operation timer, which is
    /// a measurable part of a hit's cost.
    fn bounds_own_latency(&self) -> bool {
        false
    }

    /// Whether keys must carry Redis Cluster hash tags.
    fn needs_hash_tags(&self) -> bool {
        false
    }

    /// A short name for logs and health output (`redis`, `redis-cluster`,
    /// `memory`, …).
    fn describe(&self) -> &'static str;
}

/// Compares two non-negative decimal numbers written without leading zeros,
/// as the Lua scripts do (no float rounding past 2^53).
pub(crate) fn version_newer(new: u64, cached: Option<u64>) -> bool {
    cached.is_none_or(|c| new > c)
}
