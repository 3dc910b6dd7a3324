//! Write-through: after the database commit, update or invalidate the cache.
//!
//! # Guarantee
//!
//! After [`WriteThrough::invalidate`] or [`WriteThrough::update`] returns,
//! no reader can get a version older than the committed one from the cache:
//!
//! - both delete the key's lease, so a load that read the row before the
//!   commit cannot fill afterwards;
//! - both bump the key's write epoch before returning, so a read in this
//!   process that starts afterwards never joins a single-flight load that
//!   began before (it may have read the row before the commit);
//! - `update` replaces a cached value only with a strictly newer version,
//!   so two writers finishing out of order leave the newer value (or
//!   nothing) cached, never the older;
//! - if the store cannot be reached, the invalidation is kept in-process
//!   and replayed in the background (bounded, retried every flush interval);
//!   until then this process reads the key from the source, not the cache,
//!   and the call still returns normally.
//!
//! `invalidate` is the seed's recommended default: the next read loads the
//! committed row. `update` keeps a hot key warm; it only replaces a value
//! that is cached (an absent one is loaded by the next read), which is what
//! makes an out-of-order writer harmless.

use crate::codec::CodecError;
use crate::core::Cache;
use crate::error::Error;
use crate::key::Kind;
use crate::metrics::KindMetrics;
use crate::source::Versioned;
use crate::store::{UpdateOutcome, UpdateRequest};

/// What a write did to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteOutcome {
    /// The entry was invalidated.
    Invalidated,
    /// The cached value was replaced by the new version.
    Updated,
    /// Nothing was cached; the next read loads the committed row.
    NotCached,
    /// A same-or-newer version was already cached.
    NotNewer,
    /// The store was unavailable: the invalidation is pending, and this
    /// process reads the key from the source until it is replayed.
    Deferred,
}

/// Writes after commit for one data type.
///
/// # Examples
///
/// ```
/// # use kura::{Cache, Kind, Versioned, WriteOutcome, store::MemoryStore};
/// # use serde::Serialize;
/// # #[derive(Serialize)] struct Row { name: String, version: u64 }
/// # impl Versioned for Row { fn version(&self) -> u64 { self.version } }
/// # #[tokio::main] async fn main() -> Result<(), kura::Error> {
/// let cache = Cache::builder(MemoryStore::new()).build()?;
/// let writes = cache.write_through(Kind::new("profile"));
/// // ... UPDATE profiles ... COMMIT, returning the row with its new version
/// let row = Row { name: "太郎".into(), version: 2 };
/// assert_eq!(writes.invalidate("u1").await?, WriteOutcome::Invalidated);
/// assert_eq!(writes.update("u1", &row).await?, WriteOutcome::NotCached);
/// # Ok(()) }
/// ```
///
/// # Concurrent calls
///
/// Any number of writers may call concurrently, in any order of commit and
/// cache step; the version rule decides what stays cached.
#[derive(Debug, Clone)]
pub struct WriteThrough {
    cache: Cache,
    kind: Kind,
    metrics: KindMetrics,
}

impl WriteThrough {
    pub(crate) fn new(cache: Cache, kind: Kind) -> Self {
        if let Err(e) = kind.validate() {
            panic!("invalid cache kind {kind:?}: {e}");
        }
        let metrics = cache.inner.kind_metrics(&kind);
        Self {
            cache,
            kind,
            metrics,
        }
    }

    /// The data type.
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Invalidates `id` after its row was committed.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for an id that cannot be a key. Store errors are not
    /// returned: the invalidation is deferred ([`WriteOutcome::Deferred`]).
    pub async fn invalidate(&self, id: &str) -> Result<WriteOutcome, Error> {
        let c = &self.cache.inner;
        let entry = c.keys.entry(&self.kind, id)?;
        self.metrics.invalidations.increment(1);
        let r = crate::spans::in_span!(
            c.call(Some(&self.metrics), c.store.invalidate(&[&entry])),
            "cache.write",
            cache.r#type = self.kind.name(),
            cache.op = "invalidate"
        )
        .await;
        // From here no new reader in this process joins a load that began
        // before this write.
        c.epochs.bump(&entry.value);
        c.near_evict(&entry.value);
        match r {
            Ok(_) => Ok(WriteOutcome::Invalidated),
            Err(e) => {
                tracing::warn!(key = entry.value, error = %e, "invalidation deferred");
                c.defer(self.kind, [entry]);
                Ok(WriteOutcome::Deferred)
            }
        }
    }

    /// Puts the committed `value` in the cache if an older version is
    /// cached; otherwise leaves the cache to the next read. Voids any load
    /// in flight either way.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for an id that cannot be a key. A value that cannot be
    /// cached (not a JSON object, over the size limit) is invalidated
    /// instead; store errors defer an invalidation.
    pub async fn update<T>(&self, id: &str, value: &T) -> Result<WriteOutcome, Error>
    where
        T: serde::Serialize + Versioned + ?Sized,
    {
        let c = &self.cache.inner;
        let entry = c.keys.entry(&self.kind, id)?;
        let policy = c.policy.get(self.kind.name());
        let version = value.version();
        let epoch = c.load_epoch().await;
        let (enc, lifetimes) = match c.envelope(value, &entry.value, &policy, epoch) {
            Ok((enc, lifetimes, _)) if policy.enabled() => (enc, lifetimes),
            Ok(_) => return self.invalidate(id).await,
            Err(
                e @ (CodecError::TooLarge { .. } | CodecError::Encode(_) | CodecError::Decode(_)),
            ) => {
                tracing::warn!(key = entry.value, error = %e, "value not cached: invalidating");
                return self.invalidate(id).await;
            }
        };
        let Some(lifetimes) = lifetimes else {
            // Past its end: nothing to cache, the old entry goes.
            return self.invalidate(id).await;
        };
        let req = UpdateRequest {
            keys: &entry,
            bytes: enc.envelope,
            version,
            lifetimes,
        };
        let r = crate::spans::in_span!(
            c.call(Some(&self.metrics), c.store.update(&[req])),
            "cache.write",
            cache.r#type = self.kind.name(),
            cache.op = "update"
        )
        .await;
        c.epochs.bump(&entry.value);
        c.near_evict(&entry.value);
        match r {
            Ok(v) => Ok(match v.first() {
                Some(UpdateOutcome::Stored) => WriteOutcome::Updated,
                Some(UpdateOutcome::NotNewer) => WriteOutcome::NotNewer,
                _ => WriteOutcome::NotCached,
            }),
            Err(e) => {
                tracing::warn!(key = entry.value, error = %e, "update failed: invalidation deferred");
                c.defer(self.kind, [entry]);
                Ok(WriteOutcome::Deferred)
            }
        }
    }
}

impl Cache {
    /// A write-through writer of `kind`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn write_through(&self, kind: Kind) -> WriteThrough {
        WriteThrough::new(self.clone(), kind)
    }
}
