//! Cache-aside reads: one round trip on a hit, one load per key per fleet on
//! a miss.
//!
//! # Guarantee
//!
//! A fill lands only while its lease is held, and every invalidation or
//! update after a commit deletes the lease. So a value read from the source
//! before a write can never be cached after that write's invalidation: the
//! seed's stale-set race is closed. Within one process, concurrent callers
//! for one key share one load (single-flight); across processes, the lease
//! makes the others wait for the fill (or take the stale copy). A caller
//! that starts after a write-through invalidation or update of the key
//! returned never joins a load that began before it: each load records the
//! key's write epoch, and only loads of the current epoch are joined.
//!
//! # Failure modes
//!
//! - Store down, slow or circuit open: the source answers (`Status::Bypass`),
//!   still one load per key per process.
//! - Source fails with a stale copy on hand: the stale copy is served,
//!   flagged `Status::Stale`; without one, [`Error::Source`].
//! - Bad bytes at the key: counted as a miss, removed, reloaded.
//! - A load past the type's soft timeout with a stale copy on hand: the
//!   stale copy; past the hard timeout without one: [`Error::LoadTimeout`].
//!   Either way the load finishes in the background and fills (see
//!   [`crate::policy::freshness`]).
//! - A value cleared by type or tag since its load began ([`crate::tags`]):
//!   a miss; it is removed and reloaded.
//!
//! # Layout
//!
//! Here the single reads and the in-process single flight; `batch.rs` the
//! batch path (`get_many` and warming); `refresh.rs` eager refresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::Cache;
use crate::error::Error;
use crate::key::Kind;
use crate::metrics::KindMetrics;
use crate::near::Near;
use crate::policy::TypePolicy;
use crate::source::Source;

pub use self::fetched::{Batch, Fetched, FetchedJson, Status};
use self::flight::Flights;

mod batch;
mod fetched;
mod flight;
mod read;
mod refresh;
mod resolve;

pub(crate) use self::batch::BatchMode;

/// A cache-aside reader of one data type through a [`Source`].
///
/// # Examples
///
/// ```
/// # use kura::{Cache, Kind, Source, Versioned, store::MemoryStore};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Clone, Serialize, Deserialize)]
/// # struct Row { id: String, version: u64 }
/// # impl Versioned for Row { fn version(&self) -> u64 { self.version } }
/// # struct Db;
/// # impl Source for Db {
/// #     type Value = Row;
/// #     type Error = std::io::Error;
/// #     async fn load(&self, id: &str) -> Result<Option<Row>, std::io::Error> {
/// #         Ok(Some(Row { id: id.into(), version: 1 }))
/// #     }
/// # }
/// # #[tokio::main] async fn main() -> Result<(), kura::Error> {
/// let cache = Cache::builder(MemoryStore::new()).build()?;
/// let profiles = cache.aside(Kind::new("profile"), Db);
/// let first = profiles.get("u1").await?;
/// assert_eq!(first.status(), kura::Status::Miss);
/// let again = profiles.get("u1").await?;
/// assert_eq!(again.status(), kura::Status::Hit);
/// # Ok(()) }
/// ```
///
/// # Concurrent calls
///
/// Concurrent [`get`](Self::get)s of one cold key in one process share one
/// load; across processes sharing a Redis, one process loads while the
/// others wait for its fill (up to the cache's `lease_wait`). The load runs
/// as a task of its own, so a caller that is cancelled cancels neither the
/// load nor the fill. A `get` that starts after an invalidation or update of
/// its key returned does not join a load that began before that write.
///
/// A cancelled [`get_many`](Self::get_many) releases the leases it took and
/// had not filled yet, so other readers do not wait for them to expire.
pub struct CacheAside<S: Source> {
    inner: Arc<ReaderState<S>>,
}

impl<S: Source> Clone for CacheAside<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Source> std::fmt::Debug for CacheAside<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheAside")
            .field("kind", &self.inner.kind)
            .finish_non_exhaustive()
    }
}

pub(crate) struct ReaderState<S: Source> {
    pub(crate) cache: Cache,
    pub(crate) kind: Kind,
    pub(crate) source: S,
    pub(crate) metrics: KindMetrics,
    /// The type's policy, looked up once: the policy table does not change
    /// after the cache is built.
    policy: TypePolicy,
    flights: Flights<S::Value>,
    /// The type's near cache, if it has one.
    near: Option<Arc<Near<S::Value>>>,
    /// The type's measured load time.
    load_time: crate::policy::freshness::LoadTime,
    /// The type's measured refresh time, lease to refill (eager refresh's
    /// `δ`, with the load time until a refresh was measured).
    refresh_time: crate::policy::freshness::LoadTime,
    /// Ids with an eager refresh of this process in flight.
    refreshing: Mutex<std::collections::HashSet<String>>,
}

impl<S: Source> CacheAside<S> {
    pub(crate) fn new(cache: Cache, kind: Kind, source: S) -> Self {
        if let Err(e) = kind.validate() {
            panic!("invalid cache kind {kind:?}: {e}");
        }
        let metrics = cache.inner.kind_metrics(&kind);
        let policy = cache.inner.policy.get(kind.name());
        let near = cache.inner.near.as_ref().and_then(|n| {
            let config = n.configs.get(kind.name())?;
            Some(Near::<S::Value>::new(
                kind,
                &cache.inner.keys,
                *config,
                n.tracker.clone(),
            ))
        });
        Self {
            inner: Arc::new(ReaderState {
                cache,
                kind,
                source,
                metrics,
                policy,
                flights: Mutex::new(HashMap::new()),
                near,
                load_time: crate::policy::freshness::LoadTime::new(),
                refresh_time: crate::policy::freshness::LoadTime::new(),
                refreshing: Mutex::new(std::collections::HashSet::new()),
            }),
        }
    }

    /// The data type.
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.inner.kind
    }

    /// The cache this reader uses.
    #[must_use]
    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// What this reader's near cache holds, if the type has one.
    #[must_use]
    pub fn near_stats(&self) -> Option<crate::near::NearStats> {
        self.inner.near.as_ref().map(|n| n.stats())
    }

    /// The type's near cache stamp now, `None` without a near cache or
    /// while its invalidation stream is not live.
    ///
    /// For callers that keep an answer above the cache (a request memo): an
    /// answer read as a [`Status::Hit`] after taking stamp `s` may be kept
    /// while [`near_stamp`](Self::near_stamp) still returns `s`, and for at
    /// most [`near_max_lifetime`](Self::near_max_lifetime) — the same rule
    /// an L1 entry lives by, since any change of any key of the type that
    /// reaches this process changes the stamp. Answers loaded from the
    /// source ([`Status::Miss`], [`Status::Bypass`]) must not be kept this
    /// way: nothing in the store tracks them.
    #[must_use]
    pub fn near_stamp(&self) -> Option<crate::near::Stamp> {
        self.inner.near.as_ref().and_then(|n| n.stamp())
    }

    /// The longest an entry of the type's near cache lives (`None` without
    /// one).
    #[must_use]
    pub fn near_max_lifetime(&self) -> Option<Duration> {
        self.inner.near.as_ref().map(|n| n.max_lifetime())
    }

    /// The source.
    #[must_use]
    pub fn source(&self) -> &S {
        &self.inner.source
    }

    pub(crate) fn parts(&self) -> &Arc<ReaderState<S>> {
        &self.inner
    }

    /// Reads many ids: one `MGET` for all, then for the misses one pipelined
    /// lease request, one [`Source::load_many`] and one pipelined fill.
    ///
    /// Duplicate ids are answered once. Ids whose lease another caller holds
    /// are loaded without caching rather than waited for.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for the first id that cannot be a key;
    /// [`Error::Source`] when the source fails and some missing id has no
    /// stale copy.
    pub async fn get_many<I: AsRef<str>>(&self, ids: &[I]) -> Result<Batch<S::Value>, Error> {
        let started = Instant::now();
        let r = self.inner.get_many(ids).await;
        self.inner.metrics.get_seconds.record(started.elapsed());
        if let Ok(b) = &r {
            for (_, f) in &b.entries {
                self.inner.count(f.status);
            }
        }
        r
    }
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
}
