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

    /// Accepts a write: reads `id` through the cache, applies `patch` to
    /// make the next version, and stores it with its queue entry in one
    /// atomic step. `patch` must return a value with a higher version (the
    /// usual `version + 1`); it may be called again with a newer current
    /// value if another write to the key got in first.
    ///
    /// # Errors
    ///
    /// [`BehindError::NotFound`] for an unknown id, [`BehindError::Full`]
    /// under back-pressure, [`BehindError::Unavailable`] when the cache
    /// server cannot be reached (write through instead),
    /// [`BehindError::Evicting`] on a server that may evict queued writes,
    /// and the others as documented on [`BehindError`].
    pub async fn accept(
        &self,
        id: &str,
        mut patch: impl FnMut(&S::Value) -> S::Value,
    ) -> Result<Accepted<S::Value>, BehindError> {
        let c = self.cache();
        let kind = self.aside.kind();
        let entry = c.keys.entry(&kind, id)?;
        self.check_eviction().await?;
        let policy = c.policy.get(kind.name());
        for _ in 0..self.limits.cas_attempts.max(1) {
            let current = self.aside.get(id).await.map_err(BehindError::Read)?;
            match current.status() {
                // Without the cache there is nowhere durable to put the write.
                Status::Bypass => return Err(BehindError::Unavailable(StoreError::unavailable())),
                Status::Stale => {
                    return Err(BehindError::Read(Error::source_error(
                        "the source is unavailable (only a stale copy is cached)",
                    )));
                }
                _ => {}
            }
            let Some(current) = current.into_value() else {
                return Err(BehindError::NotFound);
            };
            let next = patch(&current);
            if next.version() <= current.version() {
                return Err(BehindError::Invalid(format!(
                    "the patch must raise the version (was {}, got {})",
                    current.version(),
                    next.version()
                )));
            }
            let lifetimes = c.lifetimes(&entry.value, &policy);
            let epoch = c.load_epoch().await;
            let enc = codec::envelope::seal(
                &next,
                Some(lifetimes.ttl),
                policy.eager_refresh.is_some(),
                epoch,
                c.max_value_bytes,
            )
            .map_err(|e: CodecError| BehindError::Invalid(e.to_string()))?
            .encoded;
            let req = AcceptRequest {
                keys: &entry,
                queue: &self.queue,
                id,
                expected_version: current.version(),
                bytes: enc.envelope,
                version: next.version(),
                lifetimes,
                max_depth: self.limits.max_depth,
                max_age: self.limits.max_age,
                min_replicas: self.limits.min_replicas,
                replica_timeout: self.limits.replica_timeout,
            };
            let r = c.call(None, self.store.accept(&req)).await;
            // Accepted or not, this process's near cache copy is gone: the
            // value key was written, or a conflict showed the copy old.
            c.near_evict(&entry.value);
            match r {
                Ok(AcceptOutcome::Accepted {
                    replicated: Some(n),
                    ..
                }) if n < self.limits.min_replicas => {
                    metrics::counter!("cache_wb_unreplicated_total", "cache_type" => self.label())
                        .increment(1);
                    return Err(BehindError::NotReplicated { replicas: n });
                }
                Ok(AcceptOutcome::Accepted { entry_id, .. }) => {
                    metrics::counter!("cache_wb_accepted_total", "cache_type" => self.label())
                        .increment(1);
                    return Ok(Accepted {
                        value: next,
                        json: enc.json,
                        entry_id,
                    });
                }
                Ok(AcceptOutcome::Conflict { .. }) => {
                    metrics::counter!("cache_wb_conflicts_total", "cache_type" => self.label())
                        .increment(1);
                }
                // Nothing cached to compare the version with: the next round
                // reads the row again from the database (caching it), so
                // the patch is re-based on what the database has.
                Ok(AcceptOutcome::Uncached) => {
                    metrics::counter!("cache_wb_uncached_total", "cache_type" => self.label())
                        .increment(1);
                }
                Ok(AcceptOutcome::Full { depth, oldest_age }) => {
                    metrics::counter!("cache_wb_refused_total", "cache_type" => self.label())
                        .increment(1);
                    return Err(BehindError::Full { depth, oldest_age });
                }
                Err(e) => return Err(BehindError::Unavailable(e)),
            }
        }
        Err(BehindError::Contended)
    }

    /// Refuses writes on a server that may evict keys without a TTL, unless
    /// allowed. The answer is kept for [`EVICTION_RECHECK`]; a server that
    /// will not tell (`CONFIG` disabled) is taken not to evict.
    async fn check_eviction(&self) -> Result<(), BehindError> {
        if self.limits.allow_eviction {
            return Ok(());
        }
        let known = self
            .eviction
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < EVICTION_RECHECK)
            .map(|(_, p)| p.clone());
        let policy = match known {
            Some(p) => p,
            None => {
                let c = self.cache();
                let p = match c.call(None, self.store.evicts_keys_without_ttl()).await {
                    Ok(p) => p,
                    Err(e) if e.is_outage() => return Err(BehindError::Unavailable(e)),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the cache server's eviction policy");
                        None
                    }
                };
                *self
                    .eviction
                    .last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((Instant::now(), p.clone()));
                p
            }
        };
        match policy {
            Some(policy) => {
                metrics::counter!("cache_wb_refused_evicting_total", "cache_type" => self.label())
                    .increment(1);
                Err(BehindError::Evicting { policy })
            }
            None => Ok(()),
        }
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

/// The longest back-off of a refused row.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch (retry times travel with the queue
/// entry, so every flusher honours them).
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a flusher did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Queue entries read (new and reclaimed).
    pub entries: u64,
    /// Rows written to the database.
    pub flushed: u64,
    /// Rows the database already had (replays).
    pub superseded: u64,
    /// Entries folded into a newer write of the same key.
    pub coalesced: u64,
    /// Batch retries after the database was unavailable.
    pub retried: u64,
    /// Rows the database refused, put back at the end of the queue for a
    /// later attempt.
    pub requeued: u64,
    /// Rows moved to the dead-letter stream.
    pub dead_lettered: u64,
}

/// Sums reports, e.g. of several flushers or of repeated
/// [`Flusher::flush_once`] calls.
impl std::ops::AddAssign for FlushReport {
    fn add_assign(&mut self, o: FlushReport) {
        self.entries += o.entries;
        self.flushed += o.flushed;
        self.superseded += o.superseded;
        self.coalesced += o.coalesced;
        self.retried += o.retried;
        self.requeued += o.requeued;
        self.dead_lettered += o.dead_lettered;
    }
}

/// Applies a write-behind queue to the database; made by
/// [`WriteBehind::flusher`]. Run several (in one process or many) to share
/// the load.
#[must_use]
pub struct Flusher<S: Source, K: Sink<Value = S::Value>> {
    wb: WriteBehind<S>,
    sink: Arc<K>,
    consumer: String,
    batch_size: usize,
    linger: Duration,
    block: Duration,
    claim_idle: Duration,
    max_attempts: u32,
    retry_backoff: Duration,
    /// Entries delivered to this flusher that wait for their retry time
    /// (still pending for it in the queue).
    held: Vec<QueueEntry>,
    /// How often pending copies are re-queued on stores whose accept is
    /// not atomic.
    sweep_every: Duration,
    last_sweep: Option<Instant>,
}

impl<S: Source, K: Sink<Value = S::Value>> std::fmt::Debug for Flusher<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("consumer", &self.consumer)
            .field("batch_size", &self.batch_size)
            .field("claim_idle", &self.claim_idle)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl<S: Source, K: Sink<Value = S::Value>> Flusher<S, K> {
    /// The consumer name (unique per flusher by default).
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// Most entries per database transaction (default 256).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How long to wait for more entries once one arrived (default 20 ms).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// How long a read waits for entries when the queue is empty (default
    /// 1 s; also the longest a shutdown waits for an idle flusher).
    pub fn block(mut self, d: Duration) -> Self {
        self.block = d;
        self
    }

    /// After how long an unacknowledged entry of another flusher is taken
    /// over (default 30 s). Longer than the slowest batch.
    pub fn claim_idle(mut self, d: Duration) -> Self {
        self.claim_idle = d;
        self
    }

    /// How often, on a store whose accept is not one atomic step (Redis
    /// Cluster), pending copies are re-queued in case a crash separated a
    /// copy from its queue entry (default 60 s).
    pub fn sweep_every(mut self, d: Duration) -> Self {
        self.sweep_every = d;
        self
    }

    /// Rejections of one write before it is dead-lettered (default 5).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The wait before the first retry of a row the database refused
    /// (default 1 s), doubled at each further refusal. It is kept below
    /// half the claim idle time and half the queue's age limit (and 30 s),
    /// so a waiting row is neither taken over by another flusher nor, being
    /// back at the end of the queue, ever the reason the queue is refused.
    pub fn retry_backoff(mut self, d: Duration) -> Self {
        self.retry_backoff = d;
        self
    }

    /// The back-off after the `attempt`-th refusal.
    fn backoff(&self, attempt: u32) -> Duration {
        let mut cap = MAX_RETRY_BACKOFF.min(self.claim_idle / 2);
        let max_age = self.wb.limits.max_age;
        if !max_age.is_zero() {
            cap = cap.min(max_age / 2);
        }
        self.retry_backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(cap)
    }

    /// Splits entries read from the queue into those due now (`into`) and
    /// those to hold until their retry time.
    fn sort_in(&mut self, got: Vec<QueueEntry>, into: &mut Vec<QueueEntry>) {
        let now = epoch_ms();
        let cap = self.backoff(u32::MAX).as_millis() as u64;
        for mut e in got {
            if self.held.iter().any(|h| h.entry_id == e.entry_id)
                || into.iter().any(|h| h.entry_id == e.entry_id)
            {
                continue;
            }
            if e.not_before_ms > now {
                // A clock far ahead on the flusher that set it must not
                // park the row for longer than a back-off.
                e.not_before_ms = e.not_before_ms.min(now + cap);
                self.held.push(e);
            } else {
                into.push(e);
            }
        }
    }

    /// Held entries whose retry time has come.
    fn take_due(&mut self) -> Vec<QueueEntry> {
        let now = epoch_ms();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|e| e.not_before_ms <= now);
        self.held = wait;
        due
    }

    /// How long until the first held entry is due.
    fn next_due(&self) -> Option<Duration> {
        let now = epoch_ms();
        self.held
            .iter()
            .map(|e| Duration::from_millis(e.not_before_ms.saturating_sub(now)))
            .min()
    }

    /// Runs until `shutdown` completes, then finishes the batch in hand
    /// (never half-applies one) and returns. Entries not yet applied stay
    /// queued for the next flusher.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> FlushReport {
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.store(true, Ordering::Release);
            }
        };
        let work = async {
            let mut total = FlushReport::default();
            let mut last_claim: Option<Instant> = None;
            let mut backoff = Duration::from_millis(100);
            while !stop.load(Ordering::Acquire) {
                let claim = last_claim.is_none_or(|t| t.elapsed() >= self.claim_idle / 2);
                if claim {
                    last_claim = Some(Instant::now());
                }
                match self.step(claim, &stop).await {
                    Ok(r) => {
                        total += r;
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "write-behind flush step failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            total
        };
        tokio::pin!(watcher);
        tokio::pin!(work);
        let mut watching = true;
        loop {
            tokio::select! {
                r = &mut work => return r,
                () = &mut watcher, if watching => watching = false,
            }
        }
    }

    /// Reads one batch (reclaiming idle entries first when `claim`), applies
    /// it and acknowledges it. Useful for tests and one-shot drains.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the cache server cannot be reached.
    pub async fn flush_once(&mut self, claim: bool) -> Result<FlushReport, Error> {
        self.step(claim, &AtomicBool::new(false)).await
    }

    async fn step(&mut self, claim: bool, stop: &AtomicBool) -> Result<FlushReport, Error> {
        let kind = self.wb.aside.kind().name();
        let _ = kind;
        crate::spans::in_span!(
            self.step_inner(claim, stop),
            "cache.flush",
            cache.r#type = kind
        )
        .await
    }

    async fn step_inner(&mut self, claim: bool, stop: &AtomicBool) -> Result<FlushReport, Error> {
        let wb = self.wb.clone();
        let c = wb.cache();
        let store = &wb.store;
        let q = &wb.queue;
        if !store.accepts_atomically()
            && self
                .last_sweep
                .is_none_or(|t| t.elapsed() >= self.sweep_every)
        {
            self.last_sweep = Some(Instant::now());
            let pattern = c.keys.pattern(&wb.aside.kind(), "*")?;
            match c
                .call_within(
                    Duration::from_secs(120),
                    None,
                    store.requeue_pending(&pattern, q),
                )
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(n, "pending write-behind copies re-queued"),
                Err(e) => tracing::warn!(error = %e, "could not re-queue pending copies"),
            }
        }
        let mut entries = self.take_due();
        if claim {
            let claimed = c
                .call(
                    None,
                    store.queue_claim(q, &self.consumer, self.claim_idle, self.batch_size),
                )
                .await
                .map_err(Error::Unavailable)?;
            if !claimed.is_empty() {
                tracing::info!(
                    n = claimed.len(),
                    "reclaimed write-behind entries of a stalled flusher"
                );
            }
            self.sort_in(claimed, &mut entries);
        }
        if entries.len() < self.batch_size {
            let block = if entries.is_empty() {
                // Wake up for the first held retry.
                self.next_due().map_or(self.block, |d| d.min(self.block))
            } else {
                Duration::ZERO
            };
            // A blocking read is bounded by the block time, not the
            // operation timeout.
            let more = c
                .call_within(
                    block + c.op_timeout * 4,
                    None,
                    store.queue_read(q, &self.consumer, self.batch_size - entries.len(), block),
                )
                .await
                .map_err(Error::Unavailable)?;
            self.sort_in(more, &mut entries);
        }
        // Batch by time as well as size: let a trickle fill the batch.
        let until = Instant::now() + self.linger;
        while !entries.is_empty() && entries.len() < self.batch_size && Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            let more = c
                .call_within(
                    left + c.op_timeout * 4,
                    None,
                    store.queue_read(q, &self.consumer, self.batch_size - entries.len(), left),
                )
                .await
                .map_err(Error::Unavailable)?;
            if more.is_empty() {
                break;
            }
            self.sort_in(more, &mut entries);
        }
        if entries.is_empty() {
            if let Ok(s) = c.call(None, store.queue_stats(q)).await {
                wb.publish(&s);
            }
            return Ok(FlushReport::default());
        }
        let r = self.apply(entries, stop).await?;
        if let Ok(s) = c.call(None, store.queue_stats(q)).await {
            wb.publish(&s);
        }
        Ok(r)
    }

    async fn apply(
        &mut self,
        entries: Vec<QueueEntry>,
        stop: &AtomicBool,
    ) -> Result<FlushReport, Error> {
        let c = self.wb.cache();
        let kind = self.wb.aside.kind();
        let label = kind.name();
        let mut report = FlushReport {
            entries: entries.len() as u64,
            ..FlushReport::default()
        };
        // Coalesce: one row per entity, whatever number of entries.
        let mut by_id: Vec<(String, EntryKeys, Vec<String>)> = Vec::new();
        // Refusals so far of each (entity, version) in the batch.
        let mut attempts: HashMap<(String, u64), u32> = HashMap::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for e in entries {
            let n = attempts.entry((e.id.clone(), e.version)).or_insert(0);
            *n = (*n).max(e.attempts);
            match index.get(&e.id) {
                Some(&i) => {
                    by_id[i].2.push(e.entry_id);
                    report.coalesced += 1;
                }
                None => {
                    // Ids in the queue were validated when accepted.
                    let keys = c.keys.entry_unchecked(&kind, &e.id);
                    index.insert(e.id.clone(), by_id.len());
                    by_id.push((e.id, keys, vec![e.entry_id]));
                }
            }
        }
        let entry_refs: Vec<&EntryKeys> = by_id.iter().map(|(_, k, _)| k).collect();
        let copies = c
            .call(None, self.wb.store.pending_copies(&entry_refs))
            .await
            .map_err(Error::Unavailable)?;
        // Rows to write, and entries whose pending copy is already gone (a
        // replay after the database got them): acknowledge only.
        let mut rows: Vec<(String, S::Value)> = Vec::new();
        let mut row_meta: Vec<(usize, u64, Bytes)> = Vec::new();
        let mut settled: Vec<(usize, u64)> = Vec::new();
        let mut dead: Vec<(usize, u64, String, Bytes)> = Vec::new();
        let mut retries: Vec<(usize, u64, u32)> = Vec::new();
        for (i, copy) in copies.into_iter().enumerate() {
            match copy {
                None => settled.push((i, 0)),
                Some(bytes) => match codec::decode::<S::Value>(&bytes) {
                    Ok(d) => {
                        rows.push((by_id[i].0.clone(), d.value));
                        row_meta.push((i, d.version, bytes));
                    }
                    Err(e) => dead.push((
                        i,
                        codec::peek_version(&bytes).unwrap_or(0),
                        format!("pending copy does not decode: {e}"),
                        bytes,
                    )),
                },
            }
        }
        if !rows.is_empty() {
            let mut backoff = Duration::from_millis(100);
            let results = loop {
                match self.sink.apply(&rows).await {
                    Ok(r) if r.len() == rows.len() => break r,
                    Ok(r) => {
                        return Err(Error::source_error(format!(
                            "sink returned {} results for {} rows",
                            r.len(),
                            rows.len()
                        )));
                    }
                    Err(e) => {
                        report.retried += 1;
                        metrics::counter!("cache_wb_retried_total", "cache_type" => label)
                            .increment(1);
                        tracing::warn!(error = %e, rows = rows.len(), "database unavailable for write-behind batch; retrying");
                        if stop.load(Ordering::Acquire) {
                            // Leave the batch queued for the next flusher.
                            return Ok(report);
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            for ((i, version, bytes), result) in row_meta.into_iter().zip(results) {
                match result {
                    Applied::Written => {
                        report.flushed += 1;
                        settled.push((i, version));
                    }
                    Applied::Superseded => {
                        report.superseded += 1;
                        settled.push((i, version));
                    }
                    Applied::Rejected(why) => {
                        let n = attempts
                            .get(&(by_id[i].0.clone(), version))
                            .copied()
                            .unwrap_or(0)
                            + 1;
                        if n >= self.max_attempts {
                            dead.push((i, version, why, bytes));
                        } else {
                            tracing::warn!(
                                id = by_id[i].0,
                                attempt = n,
                                error = why,
                                "write-behind row rejected; will retry"
                            );
                            retries.push((i, version, n));
                        }
                    }
                }
            }
        }
        let acks: Vec<Settled<'_>> = settled
            .iter()
            .map(|&(i, version)| Settled {
                id: &by_id[i].0,
                keys: &by_id[i].1,
                version,
                entry_ids: &by_id[i].2,
            })
            .collect();
        c.call(None, self.wb.store.queue_ack(&self.wb.queue, &acks))
            .await
            .map_err(Error::Unavailable)?;
        if !retries.is_empty() {
            let now = epoch_ms();
            let again: Vec<Retry<'_>> = retries
                .iter()
                .map(|&(i, version, n)| Retry {
                    id: &by_id[i].0,
                    version,
                    attempts: n,
                    not_before_ms: now + self.backoff(n).as_millis() as u64,
                    entry_ids: &by_id[i].2,
                })
                .collect();
            c.call(None, self.wb.store.queue_retry(&self.wb.queue, &again))
                .await
                .map_err(Error::Unavailable)?;
            report.requeued += retries.len() as u64;
        }
        if !dead.is_empty() {
            let letters: Vec<(Settled<'_>, &str, Bytes)> = dead
                .iter()
                .map(|(i, version, why, bytes)| {
                    tracing::error!(
                        id = by_id[*i].0,
                        version,
                        error = why.as_str(),
                        "write-behind write dead-lettered"
                    );
                    (
                        Settled {
                            id: &by_id[*i].0,
                            keys: &by_id[*i].1,
                            version: *version,
                            entry_ids: &by_id[*i].2,
                        },
                        why.as_str(),
                        bytes.clone(),
                    )
                })
                .collect();
            let trimmed = c
                .call(
                    None,
                    self.wb.store.queue_dead_letter(
                        &self.wb.queue,
                        &letters,
                        self.wb.limits.dead_letter_max,
                    ),
                )
                .await
                .map_err(Error::Unavailable)?;
            report.dead_lettered += dead.len() as u64;
            if trimmed > 0 {
                tracing::warn!(
                    trimmed,
                    max = self.wb.limits.dead_letter_max,
                    "oldest write-behind dead letters trimmed"
                );
                metrics::counter!("cache_wb_dead_letters_trimmed_total", "cache_type" => label)
                    .increment(trimmed);
            }
        }
        metrics::counter!("cache_wb_flushed_total", "cache_type" => label)
            .increment(report.flushed);
        metrics::counter!("cache_wb_coalesced_total", "cache_type" => label)
            .increment(report.coalesced);
        metrics::counter!("cache_wb_dead_lettered_total", "cache_type" => label)
            .increment(report.dead_lettered);
        metrics::counter!("cache_wb_requeued_total", "cache_type" => label)
            .increment(report.requeued);
        Ok(report)
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
