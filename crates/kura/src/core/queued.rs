//! [`QueuedCache`]: a [`Cache`] whose store also has the write-behind queue
//! capability ([`QueueStore`]), and so can hand out [`WriteBehind`](crate::WriteBehind) writers.

use std::sync::Arc;

use crate::store::QueueStore;

use super::Cache;

/// A [`Cache`] over a store with a write-behind queue; made by
/// [`Cache::queued`]. It derefs to its [`Cache`] for every other strategy,
/// and is cheap to clone.
///
/// Write-behind needs the queue capability at compile time: only this type
/// makes [`WriteBehind`](crate::WriteBehind) writers, so a cache over a store without a queue
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
/// let reader = cache.aside(Kind::new("profile"), Db); // through Deref<Target = Cache>
/// let writes = cache.write_behind(&reader);
/// assert_eq!(writes.reader().kind(), Kind::new("profile"));
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
}

impl std::ops::Deref for QueuedCache {
    type Target = Cache;

    fn deref(&self) -> &Cache {
        &self.cache
    }
}
