//! The write-behind queue capability: [`QueueStore`].
//!
//! A store that can take write-behind writes keeps, per data type, a queue
//! (a Redis stream with a consumer group) of accepted writes that flushers
//! apply to the database, and per entry a pending copy (no TTL) of the
//! newest accepted value. [`crate::store::MemoryStore`] and
//! [`crate::store::RedisStore`] implement it; a cache made with
//! [`crate::Cache::queued`] requires it, and only such a cache
//! ([`crate::QueuedCache`]) hands out write-behind writers.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{CacheStore, Lifetimes, StoreResult};
use crate::key::{EntryKeys, KeyPattern};

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

/// What [`QueueStore::accept`] did.
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
    /// new write; set by [`QueueStore::queue_retry`]).
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

/// A write the database refused, to be retried later from the end of the
/// queue (see [`QueueStore::queue_retry`]).
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

/// The write-behind queue, on top of the entry protocol of [`Store`](crate::Store).
///
/// Every method is one round trip (a pipeline on Redis), and each entry's
/// step is atomic, as for [`Store`](crate::Store).
#[async_trait]
pub trait QueueStore: CacheStore {
    /// Write-behind: if the entry's current version (pending copy, else
    /// value) is the expected one and the queue has room, stores the new
    /// value as value, stale copy and pending copy (no TTL), voids any
    /// lease, and appends a queue entry, in one atomic step. The version is
    /// checked first ([`AcceptOutcome::Conflict`] before
    /// [`AcceptOutcome::Full`]); with nothing cached to compare it with,
    /// nothing is written ([`AcceptOutcome::Uncached`]).
    async fn accept(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome>;

    /// Whether [`QueueStore::accept`] stores the value and the queue entry in one
    /// atomic step. When not (Redis Cluster, where they live in different
    /// slots), flushers call [`QueueStore::requeue_pending`] now and then.
    fn accepts_atomically(&self) -> bool {
        true
    }

    /// Appends a queue entry for every pending copy matching `pattern`, so
    /// a pending copy whose queue entry was never written (a crash between
    /// the two halves of a non-atomic accept) is still flushed. Duplicates
    /// are harmless: the flush is version-guarded. Returns how many.
    async fn requeue_pending(&self, pattern: &KeyPattern, queue: &QueueKeys) -> StoreResult<u64>;

    /// Reads the pending copies (write-behind writes not yet in the
    /// database) of some entries.
    async fn pending_copies(&self, entries: &[&EntryKeys]) -> StoreResult<Vec<Option<Bytes>>>;

    /// Delivers up to `count` new queue entries to `consumer`, waiting up
    /// to `block` for some. Creates the consumer group if needed.
    async fn queue_read(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> StoreResult<Vec<QueueEntry>>;

    /// Moves up to `count` entries delivered to other consumers and not
    /// acknowledged for `min_idle` to `consumer` (a flusher that died).
    async fn queue_claim(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<QueueEntry>>;

    /// After the database committed: for each entry, drops the pending copy
    /// if it still holds the applied version and acknowledges and deletes
    /// the queue entries. Per entry, the two happen together (one step on
    /// one server; on Cluster the entries are acknowledged only after their
    /// pending copy is settled), so no pending copy is left without a queue
    /// entry.
    async fn queue_ack(&self, queue: &QueueKeys, done: &[Settled<'_>]) -> StoreResult<()>;

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
    ) -> StoreResult<u64>;

    /// Puts writes the database refused back at the end of the queue with
    /// their attempt count and back-off, acknowledging the entries they
    /// replace, one atomic step per write; returns the new entry ids. A
    /// refused write thus never stays at the head, where it would hold
    /// back the queue's age limit for every other write.
    async fn queue_retry(
        &self,
        queue: &QueueKeys,
        retries: &[Retry<'_>],
    ) -> StoreResult<Vec<String>>;

    /// Depth, lag, in-flight and dead-letter counts of a queue.
    async fn queue_stats(&self, queue: &QueueKeys) -> StoreResult<QueueStats>;

    /// The newest dead letters, up to `count`.
    async fn dead_letters(&self, queue: &QueueKeys, count: usize) -> StoreResult<Vec<DeadLetter>>;

    /// How durable queued writes are across a restart of the store.
    async fn durability(&self) -> StoreResult<Durability>;

    /// The store's eviction policy when it may evict keys without a TTL
    /// (Redis `maxmemory-policy allkeys-*`), which would drop pending
    /// copies and the queue itself; `None` when it never does.
    async fn evicts_keys_without_ttl(&self) -> StoreResult<Option<String>>;
}
