//! The near cache: an in-process L1 above the store, per data type, kept
//! consistent by the store's invalidation stream (Redis server-assisted
//! client-side caching, `CLIENT TRACKING ... BCAST`).
//!
//! - here: [`NearConfig`] (the options of one type), [`Layer`] (where a
//!   hit came from) and the typed L1 of a [`crate::CacheAside`];
//! - `tracker`: the process-wide part: the fill tickets, the generation
//!   that a flush bumps, the stream's liveness.
//!
//! Turn it on per type with [`crate::CacheBuilder::near_cache`]. An L1 hit
//! costs no round trip and no JSON decode (entries hold the decoded value
//! and its JSON).
//!
//! # Tracking mode: BCAST on each near-cached type's prefix
//!
//! The store opens a connection of its own (per primary on Cluster) with
//! `CLIENT TRACKING ON BCAST PREFIX <ns>:<type>:` for each near-cached
//! type, and answers a `PING` on it every 100 ms. BCAST was chosen over the
//! default (and OPTIN) mode because those track the keys *read on the
//! tracking connection*, while kura reads on its shared multiplexed
//! connection (and in scripts): following them would need every read moved
//! to the tracking connection, or `REDIRECT` re-armed on every reconnect of
//! the shared connection. BCAST costs Redis one push per write of a tracked
//! prefix per instance, whether that instance holds the key or not; only
//! value keys carry the prefix (leases, stale copies and markers live under
//! `<ns>:~`), so the pushes are the writes of values: fills, updates,
//! invalidations, expiries. Measured in `docs/bench/NEAR.md`.
//!
//! # Guarantees
//!
//! | what | guarantee |
//! |---|---|
//! | a change to a tracked key, by anyone (kura, the feed's relay, `redis-cli`) | evicts it from every instance's L1 when the push arrives |
//! | a fill racing an invalidation | dropped: each fill holds its own ticket, which the invalidation removes (never one placeholder shared by fills) |
//! | a write through this process | evicted from this process's L1 before the write returns |
//! | write-behind | the accepted value is written to the value key, so its push evicts the L1 copy; the next read fills from the pending copy |
//! | the tracking connection lost, reconnected, a Sentinel switch, a Cluster slot move | L1 flushed, and not filled again until the new stream is confirmed |
//! | Redis unreachable | L1 is served only until `max_silence` (1 s by default) after the last confirmed `PING`, then reads fall through to the store's usual failure path |
//! | a bounded L1 | at most `max_entries` entries and `max_bytes` bytes (JSON plus key), each at most `max_lifetime` (30 s by default) old |
//!
//! Not guaranteed:
//!
//! - that another instance stops serving an old value at the instant of the
//!   write: it does when the push reaches it (sub-millisecond on a LAN, see
//!   the benchmark), or after `max_silence` if the pushes stop;
//! - read-your-writes across instances faster than that push;
//! - a near cache over a store without an invalidation stream (the memory
//!   store): the builder logs it and reads go to the store as before.

mod tracker;

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::key::{KeyBuilder, Kind};
pub(crate) use tracker::{NearLayer, Ticket, Tracker};

/// The default [`NearConfig::max_lifetime`].
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(30);

/// The default [`NearConfig::max_bytes`].
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The default silence of the invalidation stream after which L1 stops
/// serving ([`crate::CacheBuilder::near_cache_max_silence`]).
pub const DEFAULT_MAX_SILENCE: Duration = Duration::from_secs(1);

/// Bytes charged per entry on top of its JSON and id.
const ENTRY_OVERHEAD: u64 = 96;

/// The near cache of one data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct NearConfig {
    max_entries: u64,
    max_bytes: u64,
    max_lifetime: Duration,
}

impl NearConfig {
    /// At most `max_entries` entries (at least 1), [`DEFAULT_MAX_BYTES`],
    /// each at most [`DEFAULT_MAX_LIFETIME`] old.
    pub fn entries(max_entries: u64) -> Self {
        Self {
            max_entries: max_entries.max(1),
            max_bytes: DEFAULT_MAX_BYTES,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }

    /// The bound on the bytes held (JSON, id and a fixed overhead per
    /// entry).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes.max(1);
        self
    }

    /// The longest an entry is kept, a backstop behind the invalidations.
    pub fn max_lifetime(mut self, d: Duration) -> Self {
        self.max_lifetime = d.max(Duration::from_millis(1));
        self
    }

    /// The entry bound.
    #[must_use]
    pub fn max_entries_bound(&self) -> u64 {
        self.max_entries
    }

    /// The byte bound.
    #[must_use]
    pub fn max_bytes_bound(&self) -> u64 {
        self.max_bytes
    }

    /// The lifetime bound.
    #[must_use]
    pub fn max_lifetime_bound(&self) -> Duration {
        self.max_lifetime
    }
}

/// Where a hit came from (the service's `X-Cache-Layer` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Layer {
    /// The in-process near cache.
    L1,
    /// The store (Redis).
    L2,
}

impl Layer {
    /// `l1` or `l2`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::L1 => "l1",
            Layer::L2 => "l2",
        }
    }
}

/// What a near cache holds ([`crate::CacheAside::near_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NearStats {
    /// Entries.
    pub entries: u64,
    /// Their weight against the byte bound: JSON, id and a fixed overhead,
    /// but at least the bound's share of one entry each.
    pub weighed_bytes: u64,
}

/// One L1 entry: the value's JSON and, once a typed read needed it, the
/// decoded value.
pub(crate) struct NearEntry<T> {
    pub(crate) json: Bytes,
    pub(crate) value: OnceLock<Arc<T>>,
    generation: u64,
}

/// The L1 of one reader handle.
pub(crate) struct Near<T> {
    l1: moka::sync::Cache<String, Arc<NearEntry<T>>>,
    pub(crate) tracker: Arc<Tracker>,
    hits: metrics::Counter,
    misses: metrics::Counter,
}

impl<T: Send + Sync + 'static> Near<T> {
    /// An L1 for `kind`, registered with `tracker` for its invalidations.
    pub(crate) fn new(
        kind: Kind,
        keys: &KeyBuilder,
        config: NearConfig,
        tracker: Arc<Tracker>,
    ) -> Arc<Self> {
        // One weight for both bounds: an entry weighs its bytes, but never
        // less than the byte bound's share of one entry, so the byte bound
        // also caps the count.
        let floor = (config.max_bytes / config.max_entries).max(1);
        let evictions = metrics::counter!("cache_l1_evictions_total", "cache_type" => kind.name(), "reason" => "size");
        let l1 = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(move |id: &String, e: &Arc<NearEntry<T>>| {
                let bytes = e.json.len() as u64 + id.len() as u64 + ENTRY_OVERHEAD;
                u32::try_from(bytes.max(floor)).unwrap_or(u32::MAX)
            })
            .time_to_live(config.max_lifetime)
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.increment(1);
                }
            })
            .build();
        let near = Arc::new(Self {
            l1,
            tracker: tracker.clone(),
            hits: metrics::counter!("cache_l1_hits_total", "cache_type" => kind.name()),
            misses: metrics::counter!("cache_l1_misses_total", "cache_type" => kind.name()),
        });
        let pattern = keys
            .pattern(&kind, "*")
            .expect("the match-all pattern is valid");
        let weak: Weak<dyn NearLayer> = Arc::downgrade(&(near.clone() as Arc<dyn NearLayer>));
        tracker.register(kind, pattern, weak);
        near
    }

    /// The entry of `id`, if it may be served.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<NearEntry<T>>> {
        let hit = if self.tracker.live() {
            self.l1
                .get(id)
                .filter(|e| e.generation == self.tracker.generation())
        } else {
            None
        };
        match &hit {
            Some(_) => self.hits.increment(1),
            None => self.misses.increment(1),
        }
        hit
    }

    /// Stores what a read of `key` returned, if `ticket` still allows.
    pub(crate) fn fill(&self, ticket: &Ticket, id: &str, json: Bytes, value: Option<Arc<T>>) {
        let generation = self.tracker.generation();
        self.tracker.finish(ticket, || {
            let cell = OnceLock::new();
            if let Some(v) = value {
                let _ = cell.set(v);
            }
            self.l1.insert(
                id.to_owned(),
                Arc::new(NearEntry {
                    json,
                    value: cell,
                    generation,
                }),
            );
        });
    }

    /// What the L1 holds now (moka counts lazily: its pending work is run
    /// first).
    pub(crate) fn stats(&self) -> NearStats {
        self.l1.run_pending_tasks();
        NearStats {
            entries: self.l1.entry_count(),
            weighed_bytes: self.l1.weighted_size(),
        }
    }
}

impl<T: Send + Sync + 'static> NearLayer for Near<T> {
    fn evict(&self, id: &str) -> bool {
        self.l1.remove(id).is_some()
    }

    fn clear(&self) {
        self.l1.invalidate_all();
    }
}
