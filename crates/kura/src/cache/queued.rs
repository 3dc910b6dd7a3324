//! [`QueuedCache`]: a [`Cache`] whose store also has the write-behind queue
//! capability ([`QueueStore`]), and so can hand out [`WriteBehind`] writers.

use std::sync::Arc;

use crate::key::Kind;
use crate::source::Source;
use crate::store::QueueStore;
use crate::strategy::{CacheAside, WriteBehind};

use super::Cache;

/// A [`Cache`] over a store with a write-behind queue; made by
/// [`Cache::queued`]. It derefs to its [`Cache`] for every other strategy,
/// and is cheap to clone.
///
/// Write-behind needs the queue capability at compile time: only this type
/// makes [`WriteBehind`] writers, so a cache over a store without a queue
/// cannot be asked for one.
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
/// # #[tokio::main] async fn main() -> Result<(), kura::Error> {
/// let cache = Cache::queued(MemoryStore::new()).build()?;
/// let reader = cache.aside(Kind::PROFILE, Db); // through Deref<Target = Cache>
/// let writes = cache.write_behind(&reader);
/// assert_eq!(writes.reader().kind(), Kind::PROFILE);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct QueuedCache {
    cache: Cache,
    /// The cache's store, as a queue (the same `Arc`).
    queue: Arc<dyn QueueStore>,
}

impl std::fmt::Debug for QueuedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedCache")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl QueuedCache {
    pub(crate) fn new(cache: Cache, queue: Arc<dyn QueueStore>) -> Self {
        Self { cache, queue }
    }

    /// The cache (also reachable through `Deref`).
    #[must_use]
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The store as a write-behind queue (the same store as
    /// [`Cache::store`]).
    #[must_use]
    pub fn queue_store(&self) -> &Arc<dyn QueueStore> {
        &self.queue
    }

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
            Arc::ptr_eq(&reader.cache().inner, &self.cache.inner),
            "write_behind: the reader was made from another cache"
        );
        WriteBehind::new(reader.clone(), self.queue.clone())
    }

    /// A cache-aside reader of `kind` through `source` and write-behind
    /// writes based on it: `self.write_behind(&self.aside(kind, source))`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn behind<S: Source>(&self, kind: Kind, source: S) -> WriteBehind<S> {
        self.write_behind(&self.cache.aside(kind, source))
    }
}

impl std::ops::Deref for QueuedCache {
    type Target = Cache;

    fn deref(&self) -> &Cache {
        &self.cache
    }
}
