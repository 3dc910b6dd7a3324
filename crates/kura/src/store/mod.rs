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
//! 4. Every key written has a TTL, except the write-behind pending copy and
//!    the feed position ([`Store::advance`]).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::StoreError;
use crate::key::{EntryKeys, KeyPattern};

mod memory;
mod redis;
mod redis_conn;

pub use self::memory::MemoryStore;
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
    /// Lifetime of the stale copy (zero: none is written).
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

/// A write the database refused, to be retried later from the end of the
/// queue (see [`Store::queue_retry`]).
#[derive(Debug, Clone)]
pub struct Retry<'a> {
    /// The entity id.
    pub id: &'a str,
    /// The version refused.
    pub version: u64,
    /// Refusals so far.
    pub attempts: u32,
    /// Not to be retried before this time (milliseconds since the Unix
    /// epoch).
    pub not_before_ms: u64,
    /// The queue entries it replaces.
    pub entry_ids: &'a [String],
}

/// Queue entries of one entity that a flusher is done with.
#[derive(Debug, Clone)]
pub struct Settled<'a> {
    /// The entity id.
    pub id: &'a str,
    /// The entry.
    pub keys: &'a EntryKeys,
    /// The version the database now has (or that was given up).
    pub version: u64,
    /// The queue entries to acknowledge.
    pub entry_ids: &'a [String],
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

/// The keys of one write-behind queue (one per data type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// The stream of accepted writes not yet acknowledged.
    pub stream: String,
    /// The dead-letter stream.
    pub dead: String,
    /// The consumer group the flushers share.
    pub group: String,
}

/// A request to accept a write-behind write.
#[derive(Debug, Clone)]
pub struct AcceptRequest<'a> {
    /// The entry.
    pub keys: &'a EntryKeys,
    /// The queue.
    pub queue: &'a QueueKeys,
    /// The entity id (recorded in the queue entry).
    pub id: &'a str,
    /// The version the write was based on (compare-and-set).
    pub expected_version: u64,
    /// The new envelope.
    pub bytes: Bytes,
    /// Its version.
    pub version: u64,
    /// Lifetimes of the cached value and stale copy.
    pub lifetimes: Lifetimes,
    /// Refuse when the queue holds this many entries (0: no limit).
    pub max_depth: u64,
    /// Refuse when the oldest entry is this old (zero: no limit).
    pub max_age: Duration,
    /// After storing, wait until this many replicas have the write (Redis
    /// `WAIT`; 0: do not wait).
    pub min_replicas: u32,
    /// How long to wait for the replicas.
    pub replica_timeout: Duration,
}

/// What [`Store::accept`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcceptOutcome {
    /// Stored and queued.
    Accepted {
        /// The queue entry id.
        entry_id: String,
        /// How many replicas confirmed the write, when the request asked
        /// for replicas.
        replicated: Option<u32>,
    },
    /// The current version is not the expected one: read again and retry.
    Conflict {
        /// The version found.
        current: u64,
    },
    /// The queue is past its depth or age limit: nothing was written.
    /// Reported only for a write whose version matched: a conflict is
    /// reported first, being a fact about the caller's data.
    Full {
        /// Entries in the queue.
        depth: u64,
        /// Age of the oldest entry.
        oldest_age: Duration,
    },
    /// Neither a pending copy nor a value is cached, so the expected
    /// version cannot be compared with anything: nothing was written. The
    /// caller reads the row again (which caches it) and retries; accepting
    /// on a guess could acknowledge a patch of a version the database has
    /// already replaced.
    Uncached,
}

/// One queued write-behind notification. The value itself is the entry's
/// pending copy, which always holds the newest accepted write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// The stream entry id (`<ms>-<seq>`).
    pub entry_id: String,
    /// The entity id.
    pub id: String,
    /// The version accepted.
    pub version: u64,
    /// How many times the database refused this version already (0 for a
    /// new write; set by [`Store::queue_retry`]).
    pub attempts: u32,
    /// Not to be applied before this time (milliseconds since the Unix
    /// epoch; 0: at once): the back-off of a retried write.
    pub not_before_ms: u64,
}

impl QueueEntry {
    /// When the entry was added (milliseconds since the Unix epoch), from its
    /// id.
    #[must_use]
    pub fn added_ms(&self) -> u64 {
        self.entry_id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0)
    }
}

/// A write that will never reach the database, with why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// The dead-letter stream entry id.
    pub entry_id: String,
    /// The entity id.
    pub id: String,
    /// The version that failed.
    pub version: u64,
    /// The last error.
    pub error: String,
    /// The value that was not applied.
    pub value: String,
}

/// The state of a write-behind queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct QueueStats {
    /// Entries not yet acknowledged (waiting or being applied).
    pub depth: u64,
    /// Age of the oldest entry (the flush lag).
    pub oldest_age_ms: u64,
    /// Entries delivered to a flusher and not yet acknowledged.
    pub in_flight: u64,
    /// Entries in the dead-letter stream.
    pub dead_letters: u64,
}

/// How durable the store's data is across a restart of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Every write is logged (Redis AOF with `appendfsync always` or
    /// `everysec`: up to one second lost on a power failure).
    Logged {
        /// The `appendfsync` policy.
        fsync: String,
    },
    /// Data lives in memory only (Redis without AOF, or the memory store):
    /// a restart loses queued write-behind writes.
    Volatile,
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
    /// Reads a value key; with `refresh`, also resets its TTL (`GETEX`).
    async fn get(&self, key: &str, refresh: Option<Duration>) -> StoreResult<Option<Bytes>>;

    /// Reads many value keys (`MGET`).
    async fn get_many(&self, keys: &[&str]) -> StoreResult<Vec<Option<Bytes>>>;

    /// For each entry: the value, or "not found", or the lease (granted to
    /// this caller or held by another), with the stale copy if one is kept.
    async fn acquire(&self, reqs: &[AcquireRequest<'_>]) -> StoreResult<Vec<Acquired>>;

    /// For each entry: stores the loaded value if the caller's lease is still
    /// held, then releases the lease.
    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>>;

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
    /// newer version than the change's is cached, deletes the value, lease
    /// (voiding loads in flight), stale copy and "not found" marker. A
    /// delete (`None`) always invalidates. Pending write-behind copies are
    /// kept, as [`Store::invalidate`] keeps them. Applying a change twice, or
    /// after a newer one, is harmless. Returns how many values were dropped.
    async fn invalidate_older(&self, entries: &[(&EntryKeys, Option<u64>)]) -> StoreResult<u64>;

    /// Moves a position (a key outside the entry protocol, such as the
    /// feed's `<ns>:~feed:position`) forward to `value` if that is greater
    /// than the one held, in one atomic step; returns the position now held
    /// (never less than before). The key has no TTL: losing it is safe (the
    /// relay starts again from the oldest row it can read), and it is one
    /// small key per namespace. Read it with [`Store::get`] (a decimal).
    async fn advance(&self, key: &str, value: u64) -> StoreResult<u64>;

    /// Invalidates every entry matching `pattern` by `SCAN` (`COUNT 100`)
    /// and batched deletes; returns how many values were cached.
    async fn invalidate_matching(&self, pattern: &KeyPattern) -> StoreResult<u64>;

    /// Removes a value that failed to decode, unless it has been replaced.
    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()>;

    /// Stores a value with a TTL unconditionally (data the cache owns, such
    /// as a token blacklist entry; never data loaded from a source).
    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()>;

    /// Adds to counters (`INCRBY`), pipelined.
    async fn incr(&self, counters: &[(&str, i64)]) -> StoreResult<()>;

    /// Reads counters (missing as 0).
    async fn counters(&self, keys: &[&str]) -> StoreResult<Vec<i64>>;

    /// Takes a named lock for `ttl` if free; `true` when taken.
    async fn lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool>;

    /// Extends a lock still held by `token`; `false` when it was lost.
    async fn extend_lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool>;

    /// Releases a lock held by `token`.
    async fn unlock(&self, key: &str, token: &str) -> StoreResult<()>;

    /// Checks the server answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Write-behind: if the entry's current version (pending copy, else
    /// value) is the expected one and the queue has room, stores the new
    /// value as value, stale copy and pending copy (no TTL), voids any
    /// lease, and appends a queue entry, in one atomic step. The version is
    /// checked first ([`AcceptOutcome::Conflict`] before
    /// [`AcceptOutcome::Full`]); with nothing cached to compare it with,
    /// nothing is written ([`AcceptOutcome::Uncached`]).
    async fn accept(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome> {
        let _ = req;
        Err(StoreError::Unsupported("write-behind"))
    }

    /// Whether [`Store::accept`] stores the value and the queue entry in one
    /// atomic step. When not (Redis Cluster, where they live in different
    /// slots), flushers call [`Store::requeue_pending`] now and then.
    fn accepts_atomically(&self) -> bool {
        true
    }

    /// Appends a queue entry for every pending copy matching `pattern`, so
    /// a pending copy whose queue entry was never written (a crash between
    /// the two halves of a non-atomic accept) is still flushed. Duplicates
    /// are harmless: the flush is version-guarded. Returns how many.
    async fn requeue_pending(&self, pattern: &KeyPattern, queue: &QueueKeys) -> StoreResult<u64> {
        let _ = (pattern, queue);
        Ok(0)
    }

    /// Reads the pending copies (write-behind writes not yet in the
    /// database) of some entries.
    async fn pending_copies(&self, entries: &[&EntryKeys]) -> StoreResult<Vec<Option<Bytes>>> {
        let _ = entries;
        Err(StoreError::Unsupported("write-behind"))
    }

    /// Delivers up to `count` new queue entries to `consumer`, waiting up
    /// to `block` for some. Creates the consumer group if needed.
    async fn queue_read(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> StoreResult<Vec<QueueEntry>> {
        let _ = (queue, consumer, count, block);
        Err(StoreError::Unsupported("write-behind"))
    }

    /// Moves up to `count` entries delivered to other consumers and not
    /// acknowledged for `min_idle` to `consumer` (a flusher that died).
    async fn queue_claim(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<QueueEntry>> {
        let _ = (queue, consumer, min_idle, count);
        Err(StoreError::Unsupported("write-behind"))
    }

    /// After the database committed: for each entry, drops the pending copy
    /// if it still holds the applied version and acknowledges and deletes
    /// the queue entries. Per entry, the two happen together (one step on
    /// one server; on Cluster the entries are acknowledged only after their
    /// pending copy is settled), so no pending copy is left without a queue
    /// entry.
    async fn queue_ack(&self, queue: &QueueKeys, done: &[Settled<'_>]) -> StoreResult<()> {
        let _ = (queue, done);
        Err(StoreError::Unsupported("write-behind"))
    }

    /// Moves writes that will never be applied to the dead-letter stream
    /// with their error; their pending copies and cached values are dropped
    /// so reads return to the database's version. The dead-letter stream
    /// is trimmed to its newest `max_len` entries (0: no bound); returns how
    /// many older letters that trimmed.
    async fn queue_dead_letter(
        &self,
        queue: &QueueKeys,
        letters: &[(Settled<'_>, &str, Bytes)],
        max_len: u64,
    ) -> StoreResult<u64> {
        let _ = (queue, letters, max_len);
        Err(StoreError::Unsupported("write-behind"))
    }

    /// Puts writes the database refused back at the end of the queue with
    /// their attempt count and back-off, acknowledging the entries they
    /// replace, one atomic step per write; returns the new entry ids. A
    /// refused write thus never stays at the head, where it would hold
    /// back the queue's age limit for every other write.
    async fn queue_retry(
        &self,
        queue: &QueueKeys,
        retries: &[Retry<'_>],
    ) -> StoreResult<Vec<String>> {
        let _ = (queue, retries);
        Err(StoreError::Unsupported("write-behind"))
    }

    /// Depth, lag, in-flight and dead-letter counts of a queue.
    async fn queue_stats(&self, queue: &QueueKeys) -> StoreResult<QueueStats> {
        let _ = queue;
        Err(StoreError::Unsupported("write-behind"))
    }

    /// The newest dead letters, up to `count`.
    async fn dead_letters(&self, queue: &QueueKeys, count: usize) -> StoreResult<Vec<DeadLetter>> {
        let _ = (queue, count);
        Err(StoreError::Unsupported("write-behind"))
    }

    /// How durable queued writes are across a restart of the store.
    async fn durability(&self) -> StoreResult<Durability> {
        Ok(Durability::Volatile)
    }

    /// The store's eviction policy when it may evict keys without a TTL
    /// (Redis `maxmemory-policy allkeys-*`), which would drop pending
    /// copies and the queue itself; `None` when it never does.
    async fn evicts_keys_without_ttl(&self) -> StoreResult<Option<String>> {
        Ok(None)
    }

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
