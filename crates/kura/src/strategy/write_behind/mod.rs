//! Write-behind: acknowledge a write once the cache holds it durably, apply
//! it to the database in batches afterwards.
//!
//! It needs a store with the write-behind queue ([`QueueStore`]): writers
//! come from a [`crate::QueuedCache`] (built by [`crate::Cache::queued`]),
//! never from a plain [`crate::Cache`].
//!
//! # Guarantee
//!
//! Every acknowledged write reaches the database or the dead-letter stream;
//! none is dropped silently, and until the database has it every read sees
//! it (or something newer).
//!
//! - **Accept** ([`WriteBehind::accept`]): the current value is read through
//!   the cache (an unknown id is refused), the caller's patch makes the next
//!   version, and one atomic step stores it as the cached value, as a
//!   *pending copy* without TTL, and as a queue entry (a Redis Stream with a
//!   consumer group). The step compares the version first, so two
//!   concurrent patches of one key both survive: the second is re-based on
//!   the first and retried. An accept that finds nothing cached to compare
//!   with (the value expired or was evicted, and no write is pending) is
//!   not acknowledged on a guess: the row is read again from the database
//!   (which caches it) and the patch is re-based on it.
//! - **Read-your-writes**: the pending copy outlives the value's TTL and any
//!   invalidation; a read that misses the value finds it and puts it back.
//! - **Flush** ([`Flusher`]): batches entries by size and time, coalesces
//!   several writes of one key into the newest (the pending copy), applies
//!   the batch through a [`Sink`] with a version guard
//!   (`... WHERE version < $new`, so a replay is a no-op), and acknowledges
//!   only after the commit (settling the pending copy and acknowledging its
//!   entries in one step). Entries a dead flusher had claimed are
//!   reclaimed after an idle time. A row the database refuses is put back
//!   at the end of the queue and retried with a growing back-off
//!   ([`Flusher::retry_backoff`]), so it never holds back the rows behind
//!   it nor the queue's age limit; refused `max_attempts` times it goes to a
//!   dead-letter stream with its error. That stream keeps the newest
//!   [`BehindLimits::dead_letter_max`] letters.
//! - **Back-pressure**: past a depth or age limit the accept is refused
//!   ([`BehindError::Full`]); the caller writes through instead or answers
//!   503.
//!
//! # Durability
//!
//! The queue is as durable as the Redis holding it: with `appendonly yes`
//! and `appendfsync always` nothing acknowledged is lost on a Redis crash;
//! with `everysec`, up to one second; without AOF, everything queued is lost
//! when Redis restarts. [`WriteBehind::durability`] tells which. The memory
//! store keeps the queue for the life of the process only.
//!
//! A Redis whose `maxmemory-policy` is `allkeys-*` may evict keys without
//! a TTL, that is pending copies and the queue itself, losing acknowledged
//! writes: accepts are refused there ([`BehindError::Evicting`]) unless
//! [`BehindLimits::allow_eviction`] says otherwise.
//!
//! Replication is asynchronous: with [`BehindLimits::min_replicas`] at 0, a
//! failover to a replica loses the writes the old primary acknowledged and
//! had not yet sent to it (usually well under a second's worth).
//!
//! # Mixing strategies
//!
//! A write-through write to a key with a pending write-behind write can
//! commit the same version number with other content; the flush then finds
//! the row at its version with different data and dead-letters the
//! write-behind write as a conflict (visible, not lost silently). Route all
//! writes of a key through one strategy while its queue drains.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{self, CodecError};
use crate::core::CacheInner;
use crate::error::{BoxError, Error, StoreError};
use crate::key::{EntryKeys, KeyError};
use crate::source::{CacheValue, Source, Versioned};
use crate::store::{
    AcceptOutcome, AcceptRequest, DeadLetter, Durability, QueueEntry, QueueKeys, QueueStats,
    QueueStore, Retry, Settled,
};
use crate::strategy::{CacheAside, Status};

mod accept;
mod flusher;
pub mod ordering;

pub use self::flusher::{FlushReport, Flusher};
pub use self::ordering::{TurnError, WriteTurn};

/// The database side of write-behind: applies batches of values.
///
/// # Examples
///
/// ```
/// use kura::strategy::write_behind::{Applied, Sink};
/// # use kura::Versioned;
/// # #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// # struct Row { version: u64 }
/// # impl Versioned for Row { fn version(&self) -> u64 { self.version } }
///
/// struct Db;
/// impl Sink for Db {
///     type Value = Row;
///     async fn apply(&self, batch: &[(String, Row)]) -> Result<Vec<Applied>, kura::BoxError> {
///         // BEGIN; UPDATE ... WHERE id = $1 AND version < $2 for each; COMMIT
///         Ok(batch.iter().map(|_| Applied::Written).collect())
///     }
/// }
/// ```
pub trait Sink: Send + Sync + 'static {
    /// The value type (the same as the reader's source).
    type Value: CacheValue;

    /// Applies `batch` in one transaction, each row only if the database
    /// holds an older version. Returns one result per row, in order. An
    /// `Err` means the database is unavailable: nothing was applied and the
    /// whole batch is retried.
    fn apply(
        &self,
        batch: &[(String, Self::Value)],
    ) -> impl Future<Output = Result<Vec<Applied>, BoxError>> + Send;
}

/// What the database did with one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// Written.
    Written,
    /// The database already had this version or a newer one (a replay).
    Superseded,
    /// The database refused the row (the row is gone, a constraint failed,
    /// another write took the same version); retried up to
    /// `max_attempts`, then dead-lettered with this reason.
    Rejected(String),
}

/// Why a write-behind write was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BehindError {
    /// The id cannot be a key.
    #[error("invalid key: {0}")]
    Key(#[from] KeyError),
    /// No such row: nothing was accepted.
    #[error("not found")]
    NotFound,
    /// The queue is past its depth or age limit: nothing was accepted.
    #[error("write-behind queue full ({depth} entries, oldest {oldest_age:?})")]
    Full {
        /// Entries queued.
        depth: u64,
        /// Age of the oldest.
        oldest_age: Duration,
    },
    /// The cache server cannot be reached: write-behind is impossible, the
    /// caller should write through.
    #[error("cache unavailable: {0}")]
    Unavailable(StoreError),
    /// Reading the current value failed.
    #[error("{0}")]
    Read(Error),
    /// The version kept changing under concurrent writers.
    #[error("too many concurrent writes to one key")]
    Contended,
    /// The write is stored and queued on the primary, but fewer replicas
    /// than required confirmed it in time: it is not acknowledged. It may
    /// still be applied (it is in the queue); a retry is safe, since it is
    /// re-based on the newest value.
    #[error("only {replicas} replica(s) confirmed the write in time")]
    NotReplicated {
        /// Replicas that confirmed it.
        replicas: u32,
    },
    /// The patched value cannot be cached (not a JSON object, too large) or
    /// its version did not increase.
    #[error("invalid patch: {0}")]
    Invalid(String),
    /// The cache server may evict keys without a TTL (Redis
    /// `maxmemory-policy allkeys-*`), which would lose acknowledged writes:
    /// nothing was accepted; the caller should write through (or set
    /// [`BehindLimits::allow_eviction`]).
    #[error("the cache server may evict queued writes (maxmemory-policy {policy})")]
    Evicting {
        /// The eviction policy.
        policy: String,
    },
}

/// An accepted write.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Accepted<T> {
    /// The value as it now stands.
    pub value: T,
    /// Its JSON, ready to send.
    pub json: Bytes,
    /// The queue entry id.
    pub entry_id: String,
}

/// Limits of the write-behind queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BehindLimits {
    /// Refuse writes when this many are queued (0: no limit).
    pub max_depth: u64,
    /// Refuse writes when the oldest queued one is this old (zero: no limit).
    pub max_age: Duration,
    /// Compare-and-set attempts before giving up on a contended key.
    pub cas_attempts: u32,
    /// Replicas that must confirm a write before it is acknowledged (Redis
    /// `WAIT`; 0 by default). With 1, a write acknowledged on a primary
    /// that then dies survives on the replica promoted in its place (given
    /// that replica has it: `WAIT` confirms it does).
    pub min_replicas: u32,
    /// How long to wait for those replicas before refusing the
    /// acknowledgement ([`BehindError::NotReplicated`]).
    pub replica_timeout: Duration,
    /// Dead letters kept (the oldest are trimmed past it; 0: no bound).
    pub dead_letter_max: u64,
    /// Accept writes even on a cache server that may evict keys without a
    /// TTL (off by default: such a server can drop queued writes).
    pub allow_eviction: bool,
}

impl Default for BehindLimits {
    fn default() -> Self {
        Self::new(100_000, Duration::from_secs(60))
    }
}

impl BehindLimits {
    /// Custom limits.
    #[must_use]
    pub const fn new(max_depth: u64, max_age: Duration) -> Self {
        Self {
            max_depth,
            max_age,
            cas_attempts: 16,
            min_replicas: 0,
            replica_timeout: Duration::from_millis(500),
            dead_letter_max: Self::DEFAULT_DEAD_LETTER_MAX,
            allow_eviction: false,
        }
    }

    /// Dead letters kept by default.
    pub const DEFAULT_DEAD_LETTER_MAX: u64 = 10_000;

    /// Keeps the newest `n` dead letters (0: no bound).
    #[must_use]
    pub const fn dead_letter_max(mut self, n: u64) -> Self {
        self.dead_letter_max = n;
        self
    }

    /// Accepts writes even on a cache server that may evict keys without a
    /// TTL (Redis `maxmemory-policy allkeys-*`), at the risk of losing them.
    #[must_use]
    pub const fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Requires `n` replicas to confirm each write, waiting up to `timeout`.
    #[must_use]
    pub const fn replicas(mut self, n: u32, timeout: Duration) -> Self {
        self.min_replicas = n;
        self.replica_timeout = timeout;
        self
    }
}

/// Write-behind writes for one data type, read through a [`CacheAside`];
/// made by [`crate::QueuedCache::write_behind`] or
/// [`crate::QueuedCache::behind`].
///
/// # Examples
///
/// ```
/// # use kura::{Cache, Kind, Source, Versioned, store::MemoryStore};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Clone, Serialize, Deserialize)]
/// # struct Row { id: String, name: String, version: u64 }
/// # impl Versioned for Row { fn version(&self) -> u64 { self.version } }
/// # struct Db;
/// # impl Source for Db {
/// #     type Value = Row;
/// #     type Error = std::io::Error;
/// #     async fn load(&self, id: &str) -> Result<Option<Row>, std::io::Error> {
/// #         Ok(Some(Row { id: id.into(), name: "a".into(), version: 1 }))
/// #     }
/// # }
/// # #[tokio::main] async fn main() {
/// let cache = Cache::queued(MemoryStore::new()).build().unwrap();
/// let writes = cache.behind(Kind::new("profile"), Db);
/// let accepted = writes
///     .accept("u1", |cur| Row { name: "b".into(), version: cur.version + 1, ..cur.clone() })
///     .await
///     .unwrap();
/// assert_eq!(accepted.value.version, 2);
/// # }
/// ```
///
/// # Concurrent calls
///
/// Any number of tasks and processes may accept writes to one key at once;
/// each accept is re-based on the newest accepted value, so no patch is
/// lost. Any number of [`Flusher`]s may share the queue.
///
/// A type written both behind and directly orders the two with
/// [`WriteBehind::turn`] and [`WriteBehind::direct_turn`] ([`ordering`]).
pub struct WriteBehind<S: Source> {
    aside: CacheAside<S>,
    /// The queue capability of the cache's store (the same store).
    store: Arc<dyn QueueStore>,
    queue: Arc<QueueKeys>,
    limits: BehindLimits,
    eviction: Arc<EvictionCheck>,
}

impl<S: Source> Clone for WriteBehind<S> {
    fn clone(&self) -> Self {
        Self {
            aside: self.aside.clone(),
            store: self.store.clone(),
            queue: self.queue.clone(),
            limits: self.limits,
            eviction: self.eviction.clone(),
        }
    }
}

/// How often accepts look at the server's eviction policy again (it can be
/// changed at run time).
const EVICTION_RECHECK: Duration = Duration::from_secs(10);

/// The last answer about the server's eviction policy.
#[derive(Debug, Default)]
struct EvictionCheck {
    last: Mutex<Option<(Instant, Option<String>)>>,
}

impl<S: Source> std::fmt::Debug for WriteBehind<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("kind", &self.aside.kind())
            .field("queue", &self.queue.stream)
            .field("limits", &self.limits)
            .finish()
    }
}

impl<S: Source> WriteBehind<S> {
    /// Write-behind writes of `aside`'s type through `store` (the queue
    /// capability of the store `aside`'s cache works on), with default
    /// limits.
    pub(crate) fn new(aside: CacheAside<S>, store: Arc<dyn QueueStore>) -> Self {
        let stream = aside
            .cache()
            .inner
            .keys
            .internal(&format!("wb:{}", aside.kind().name()));
        WriteBehind {
            aside,
            store,
            queue: Arc::new(QueueKeys {
                dead: format!("{stream}:dead"),
                stream,
                group: "kura".to_owned(),
            }),
            limits: BehindLimits::default(),
            eviction: Arc::default(),
        }
    }
}

impl<S: Source> WriteBehind<S> {
    /// Sets the queue limits.
    #[must_use]
    pub fn limits(mut self, limits: BehindLimits) -> Self {
        self.limits = limits;
        self.publish_limits();
        self
    }

    /// Sets the limit gauges (again at every [`WriteBehind::status`], so a
    /// scrape shows this writer's limits).
    fn publish_limits(&self) {
        let l = self.aside.kind().name();
        metrics::gauge!("cache_wb_limit_depth", "cache_type" => l)
            .set(self.limits.max_depth as f64);
        metrics::gauge!("cache_wb_limit_age_seconds", "cache_type" => l)
            .set(self.limits.max_age.as_secs_f64());
    }

    /// The limits in force.
    #[must_use]
    pub fn configured_limits(&self) -> BehindLimits {
        self.limits
    }

    /// The queue's keys.
    #[must_use]
    pub fn queue(&self) -> &QueueKeys {
        &self.queue
    }

    /// The reader writes are based on.
    #[must_use]
    pub fn reader(&self) -> &CacheAside<S> {
        &self.aside
    }

    fn cache(&self) -> &CacheInner {
        &self.aside.cache().inner
    }

    fn label(&self) -> &'static str {
        self.aside.kind().name()
    }

    /// The cache server's eviction policy when it may evict queued writes
    /// (keys without a TTL), as [`WriteBehind::accept`] checks it.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the store cannot be asked.
    pub async fn eviction_policy(&self) -> Result<Option<String>, Error> {
        let c = self.cache();
        c.call(None, self.store.evicts_keys_without_ttl())
            .await
            .map_err(Error::Unavailable)
    }

    /// Whether `id` has a write not yet in the database.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad id, [`Error::Unavailable`] when the store
    /// cannot be asked.
    pub async fn is_pending(&self, id: &str) -> Result<bool, Error> {
        let c = self.cache();
        let entry = c.keys.entry(&self.aside.kind(), id)?;
        c.call(None, self.store.pending_copies(&[&entry]))
            .await
            .map(|v| v.first().is_some_and(Option::is_some))
            .map_err(Error::Unavailable)
    }

    /// Depth, lag, in-flight and dead-letter counts; also updates the
    /// `cache_wb_queue_depth` and `cache_wb_oldest_age_seconds` gauges.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the store cannot be asked.
    pub async fn status(&self) -> Result<QueueStats, Error> {
        let c = self.cache();
        let s = c
            .call(None, self.store.queue_stats(&self.queue))
            .await
            .map_err(Error::Unavailable)?;
        self.publish(&s);
        Ok(s)
    }

    fn publish(&self, s: &QueueStats) {
        let l = self.label();
        self.publish_limits();
        metrics::gauge!("cache_wb_queue_depth", "cache_type" => l).set(s.depth as f64);
        metrics::gauge!("cache_wb_oldest_age_seconds", "cache_type" => l)
            .set(s.oldest_age_ms as f64 / 1000.0);
        metrics::gauge!("cache_wb_dead_letters", "cache_type" => l).set(s.dead_letters as f64);
    }

    /// The newest dead letters.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the store cannot be asked.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>, Error> {
        let c = self.cache();
        c.call(None, self.store.dead_letters(&self.queue, count))
            .await
            .map_err(Error::Unavailable)
    }

    /// How durable the queue is across a restart of the cache server.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the store cannot be asked (or refuses
    /// `CONFIG GET`, as some managed services do).
    pub async fn durability(&self) -> Result<Durability, Error> {
        let c = self.cache();
        c.call(None, self.store.durability())
            .await
            .map_err(Error::Unavailable)
    }

    /// A flusher applying this queue through `sink`.
    pub fn flusher<K: Sink<Value = S::Value>>(&self, sink: K) -> Flusher<S, K> {
        Flusher {
            wb: self.clone(),
            sink: Arc::new(sink),
            consumer: format!(
                "{}-{}-{:08x}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "kura".into()),
                std::process::id(),
                rand::random::<u32>()
            ),
            batch_size: 256,
            linger: Duration::from_millis(20),
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            max_attempts: 5,
            retry_backoff: Duration::from_secs(1),
            held: Vec::new(),
            sweep_every: Duration::from_secs(60),
            last_sweep: None,
        }
    }
}

impl crate::core::QueuedCache {
    /// Write-behind writes of `reader`'s type, based on `reader`, with
    /// default limits.
    ///
    /// # Panics
    ///
    /// If `reader` was made from another cache (a programming error: its
    /// writes would be queued in one store and read from another).
    #[must_use]
    pub fn write_behind<S: Source>(&self, reader: &CacheAside<S>) -> WriteBehind<S> {
        assert!(
            Arc::ptr_eq(&reader.cache().inner, &self.cache().inner),
            "write_behind: the reader was made from another cache"
        );
        WriteBehind::new(reader.clone(), self.queue_store().clone())
    }

    /// A cache-aside reader of `kind` through `source` and write-behind
    /// writes based on it: `self.write_behind(&self.aside(kind, source))`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn behind<S: Source>(&self, kind: crate::key::Kind, source: S) -> WriteBehind<S> {
        self.write_behind(&self.cache().aside(kind, source))
    }
}
