//! Cache warming: fill the cache with the rows most likely to be read, in the
//! background, once per fleet.
//!
//! # Guarantee
//!
//! Warming never overwrites a cached value and never caches a row older than
//! a concurrent write: it takes each key's lease like a cache-aside miss,
//! loads the rows of the leased keys with one [`Source::load_many`] per
//! batch, and fills under the lease. The stream given to
//! [`Warmer::run`] only says *which* ids to warm (for example the users
//! active in the last 7 days); a row read before its lease could predate an
//! invalidation, so values are always read after.
//!
//! A fleet-wide lock (`<namespace>:~lock:warm:<type>`) lets one instance warm
//! a type at a time; the others return at once with
//! [`WarmReport::locked_out`].

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};

use crate::core::lease::FleetLease;
use crate::error::Error;
use crate::source::Source;
use crate::strategy::CacheAside;
use crate::strategy::cache_aside::BatchMode;

/// Something that names an id to warm: an id string, or a row type that
/// implements it.
pub trait WarmItem {
    /// The id.
    fn warm_id(&self) -> Cow<'_, str>;
}

impl WarmItem for String {
    fn warm_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl WarmItem for &str {
    fn warm_id(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

/// Progress so far, passed to the callback after each batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmProgress {
    /// Ids taken from the stream.
    pub seen: u64,
    /// Values put in the cache.
    pub cached: u64,
    /// Ids skipped: already cached, being loaded by someone else, invalid,
    /// gone from the source, or with an invalidation pending in this
    /// process.
    pub skipped: u64,
    /// Ids whose batch failed (source or store error).
    pub failed: u64,
}

/// The outcome of a warming run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmReport {
    /// The final counts.
    pub progress: WarmProgress,
    /// Another instance held the warming lock: nothing was done.
    pub locked_out: bool,
}

type ProgressFn = Arc<dyn Fn(WarmProgress) + Send + Sync>;

/// Warms one data type; made by [`CacheAside::warmer`].
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
/// let ids = futures::stream::iter(vec!["a".to_string(), "b".to_string()]);
/// let report = profiles
///     .warmer()
///     .batch_size(500)
///     .on_progress(|p| println!("{} cached", p.cached))
///     .run(ids)
///     .await?;
/// assert_eq!(report.progress.cached, 2);
/// # Ok(()) }
/// ```
#[must_use]
pub struct Warmer<S: Source> {
    aside: CacheAside<S>,
    batch_size: usize,
    concurrency: usize,
    lock_ttl: Duration,
    progress: Option<ProgressFn>,
}

impl<S: Source> std::fmt::Debug for Warmer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer")
            .field("kind", &self.aside.kind())
            .field("batch_size", &self.batch_size)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<S: Source> CacheAside<S> {
    /// A warmer for this reader's type and source.
    pub fn warmer(&self) -> Warmer<S> {
        Warmer {
            aside: self.clone(),
            batch_size: 200,
            concurrency: 4,
            lock_ttl: Duration::from_secs(30),
            progress: None,
        }
    }
}

impl<S: Source> Warmer<S> {
    /// Ids per pipelined batch (default 200).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Batches in flight at once (default 4).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Lifetime of the fleet lease (default 30 s), kept by its heartbeat
    /// while warming runs: how long a warmer that died holds up another.
    pub fn lock_ttl(mut self, d: Duration) -> Self {
        self.lock_ttl = d;
        self
    }

    /// Called after each batch with the counts so far.
    pub fn on_progress(mut self, f: impl Fn(WarmProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Warms the ids of `items`.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the store cannot be reached to take the
    /// lock. Failures of single batches are counted in
    /// [`WarmProgress::failed`], not returned.
    pub async fn run<I, St>(self, items: St) -> Result<WarmReport, Error>
    where
        I: WarmItem,
        St: Stream<Item = I>,
    {
        let a = self.aside.parts().clone();
        let lease = FleetLease::new(
            &a.cache,
            &format!("lock:warm:{}", a.kind.name()),
            "warming",
            self.lock_ttl,
        );
        let held = match lease.hold().await {
            Some(Some(held)) => held,
            Some(None) => {
                tracing::info!(kind = a.kind.name(), "another instance is warming: skipped");
                return Ok(WarmReport {
                    progress: WarmProgress::default(),
                    locked_out: true,
                });
            }
            None => {
                return Err(Error::Unavailable(crate::error::StoreError::unavailable()));
            }
        };
        let counts = Counts::default();
        let this = &self;
        // Another instance may take over once the lease is lost; stop
        // rather than warm twice.
        let held_ref = &held;
        items
            .chunks(self.batch_size)
            .take_while(|_| std::future::ready(held_ref.is_held()))
            .for_each_concurrent(self.concurrency, |batch| {
                let ids: Vec<String> = batch.iter().map(|i| i.warm_id().into_owned()).collect();
                let counts = &counts;
                async move {
                    this.warm_batch(ids, counts).await;
                    if let Some(f) = &this.progress {
                        f(counts.snapshot());
                    }
                }
            })
            .await;
        held.release().await;
        let progress = counts.snapshot();
        tracing::info!(kind = a.kind.name(), ?progress, "cache warming done");
        Ok(WarmReport {
            progress,
            locked_out: false,
        })
    }

    async fn warm_batch(&self, ids: Vec<String>, counts: &Counts) {
        let n = ids.len() as u64;
        counts.seen.fetch_add(n, Ordering::Relaxed);
        match self.try_batch(ids).await {
            Ok((cached, skipped)) => {
                counts.cached.fetch_add(cached, Ordering::Relaxed);
                counts.skipped.fetch_add(skipped, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, n, "warming batch failed");
                counts.failed.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Returns (cached, skipped).
    async fn try_batch(&self, ids: Vec<String>) -> Result<(u64, u64), Error> {
        let a = self.aside.parts();
        let c = &a.cache.inner;
        let policy = c.policy.get(a.kind.name());
        if !policy.enabled() {
            return Ok((0, ids.len() as u64));
        }
        let mut skipped = 0;
        let entries: Vec<String> = ids
            .into_iter()
            .filter(|id| {
                // Invalid ids, and keys with an invalidation pending (not to
                // be cached before the replay applied it), are skipped.
                let warm = c
                    .keys
                    .entry(&a.kind, id)
                    .is_ok_and(|e| !c.distrusts(&a.kind, &e.value));
                if !warm {
                    skipped += 1;
                }
                warm
            })
            .collect();
        let ids: Vec<&str> = entries.iter().map(String::as_str).collect();
        let slots = a
            .lease_load_fill(&ids, &vec![true; ids.len()], BatchMode::Warm)
            .await?;
        let stored = slots.iter().filter(|s| s.stored).count() as u64;
        Ok((stored, skipped + (slots.len() as u64 - stored)))
    }
}

#[derive(Debug, Default)]
struct Counts {
    seen: AtomicU64,
    cached: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn snapshot(&self) -> WarmProgress {
        WarmProgress {
            seen: self.seen.load(Ordering::Relaxed),
            cached: self.cached.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}
