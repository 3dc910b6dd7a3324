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
    /// The bytes they hold: JSON, id and a fixed overhead per entry (the
    /// decoded value, when a typed read made it, comes on top).
    pub bytes: u64,
    /// Their weight against the byte bound: JSON, id and a fixed overhead,
    /// but at least the bound's share of one entry each.
    pub weighed_bytes: u64,
}

/// One L1 entry: the value's JSON and, once a typed read needed it, the
/// decoded value.
pub(crate) struct NearEntry<T> {
    pub(crate) json: Bytes,
    pub(crate) value: OnceLock<Arc<T>>,
    /// When the store's entry expires, Unix milliseconds (0: not known), for
    /// eager refresh ([`crate::policy::freshness`]).
    pub(crate) expires_ms: u64,
    /// The value's `cached_at`, Unix milliseconds (0: not known).
    pub(crate) cached_at_ms: i64,
    generation: u64,
}

impl<T> NearEntry<T> {
    /// A negative entry: the store holds "not found" for the id (an empty
    /// JSON, which no cached value has: values are JSON objects).
    pub(crate) fn is_absent(&self) -> bool {
        self.json.is_empty()
    }
}

fn entry_bytes<T>(id: &str, e: &NearEntry<T>) -> u64 {
    e.json.len() as u64 + id.len() as u64 + ENTRY_OVERHEAD
}

/// The L1 of one reader handle.
pub(crate) struct Near<T> {
    l1: moka::sync::Cache<String, Arc<NearEntry<T>>>,
    /// What the entries hold ([`NearStats::bytes`]): added on insert,
    /// taken off by the removal listener, whatever the cause.
    bytes: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) tracker: Arc<Tracker>,
    hits: metrics::Counter,
    misses: metrics::Counter,
    /// Bumped by every invalidation that reaches this L1 (an entry evicted
    /// or not, a clear): what a [`Stamp`] compares.
    changes: std::sync::atomic::AtomicU64,
    max_lifetime: Duration,
}

/// The state of one type's near cache at a moment (see
/// [`crate::CacheAside::near_stamp`]): two equal stamps mean that no
/// invalidation of the type reached the near cache between them, and that
/// its stream was live at both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    generation: u64,
    changes: u64,
}

impl Stamp {
    /// The stamp packed in one number (to keep it in an atomic); `0` is
    /// never a stamp.
    #[must_use]
    pub fn to_u64(self) -> u64 {
        (self.generation << 40) ^ self.changes ^ (1 << 63)
    }
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
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let held = bytes.clone();
        let evictions = metrics::counter!("cache_l1_evictions_total", "cache_type" => kind.name(), "reason" => "size");
        let l1 = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(move |id: &String, e: &Arc<NearEntry<T>>| {
                u32::try_from(entry_bytes(id, e).max(floor)).unwrap_or(u32::MAX)
            })
            .time_to_live(config.max_lifetime)
            .eviction_listener(move |id, e, cause| {
                held.fetch_sub(entry_bytes(&id, &e), std::sync::atomic::Ordering::Relaxed);
                if cause == moka::notification::RemovalCause::Size {
                    evictions.increment(1);
                }
            })
            .build();
        let near = Arc::new(Self {
            l1,
            bytes,
            tracker: tracker.clone(),
            hits: metrics::counter!("cache_l1_hits_total", "cache_type" => kind.name()),
            misses: metrics::counter!("cache_l1_misses_total", "cache_type" => kind.name()),
            changes: std::sync::atomic::AtomicU64::new(0),
            max_lifetime: config.max_lifetime,
        });
        let pattern = keys
            .pattern(&kind, "*")
            .expect("the match-all pattern is valid");
        let weak: Weak<dyn NearLayer> = Arc::downgrade(&(near.clone() as Arc<dyn NearLayer>));
        tracker.register(kind, pattern, weak);
        near
    }

    /// The stamp now, while the stream is live.
    pub(crate) fn stamp(&self) -> Option<Stamp> {
        // Changes first: a flush bumps the generation after clearing, so a
        // stamp read across a flush differs in one of the two.
        let changes = self.changes.load(std::sync::atomic::Ordering::Acquire);
        let generation = self.tracker.generation();
        self.tracker.live().then_some(Stamp {
            generation,
            changes,
        })
    }

    /// The longest an entry lives.
    pub(crate) fn max_lifetime(&self) -> Duration {
        self.max_lifetime
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
    pub(crate) fn fill(
        &self,
        ticket: &Ticket,
        id: &str,
        json: Bytes,
        value: Option<Arc<T>>,
        expires_ms: u64,
        cached_at_ms: i64,
    ) {
        // `finish` runs the insert only while the ticket's generation is
        // the current one.
        let generation = ticket.generation();
        self.tracker.finish(ticket, || {
            let cell = OnceLock::new();
            if let Some(v) = value {
                let _ = cell.set(v);
            }
            let id = id.to_owned();
            let entry = Arc::new(NearEntry {
                json,
                value: cell,
                expires_ms,
                cached_at_ms,
                generation,
            });
            self.bytes.fetch_add(
                entry_bytes(&id, &entry),
                std::sync::atomic::Ordering::Relaxed,
            );
            self.l1.insert(id, entry);
        });
    }

    /// What the L1 holds now (moka counts lazily: its pending work is run
    /// first).
    pub(crate) fn stats(&self) -> NearStats {
        self.l1.run_pending_tasks();
        NearStats {
            entries: self.l1.entry_count(),
            bytes: self.bytes.load(std::sync::atomic::Ordering::Relaxed),
            weighed_bytes: self.l1.weighted_size(),
        }
    }
}

impl<T: Send + Sync + 'static> NearLayer for Near<T> {
    fn evict(&self, id: &str) -> bool {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.l1.remove(id).is_some()
    }

    fn clear(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.l1.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::store::TrackingSink;

    fn near(entries: u64, max_bytes: u64) -> (Arc<Near<u32>>, KeyBuilder) {
        let tracker = Tracker::new(Duration::from_secs(3600));
        tracker.confirmed(Instant::now());
        let keys = KeyBuilder::new("ns", false).unwrap();
        let n = Near::new(
            Kind::new("profile"),
            &keys,
            NearConfig::entries(entries).max_bytes(max_bytes),
            tracker,
        );
        (n, keys)
    }

    /// The byte count equals what the entries held hold, after any mix of
    /// fills, replacements, size evictions, invalidations and clears.
    fn check_bytes(ops: &[(u8, u16, u16)]) {
        let (n, keys) = near(50, 20_000);
        for &(op, id, len) in ops {
            let id = format!("u{}", id % 80);
            let key = keys.value_key(&Kind::new("profile"), &id).unwrap();
            match op % 4 {
                0 | 1 => {
                    let t = n.tracker.begin(&key);
                    let json = Bytes::from(vec![b'x'; usize::from(len % 700)]);
                    n.fill(&t, &id, json, Some(Arc::new(1)), 0, 0);
                }
                2 => n.tracker.invalidated(Some(&[key.as_bytes()])),
                _ => {
                    if id.ends_with('7') {
                        n.clear();
                    } else {
                        n.evict(&id);
                    }
                }
            }
        }
        let s = n.stats();
        let held: u64 = n.l1.iter().map(|(id, e)| entry_bytes(&id, &e)).sum();
        assert_eq!(s.bytes, held, "counted vs held");
        assert!(s.entries <= 50);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn byte_count_is_exact(ops in proptest::collection::vec((0u8..4, 0u16..200, 0u16..2000), 1..200)) {
            check_bytes(&ops);
        }
    }

    #[test]
    fn soak_byte_count_stays_exact() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let ops: Vec<(u8, u16, u16)> = (0..30_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x as u8, (x >> 8) as u16, (x >> 24) as u16)
            })
            .collect();
        check_bytes(&ops);
    }

    #[test]
    fn both_bounds_hold() {
        // Small entries: the entry bound binds.
        let (n, keys) = near(10, 1 << 20);
        for i in 0..100 {
            let id = format!("u{i}");
            let t = n
                .tracker
                .begin(&keys.value_key(&Kind::new("profile"), &id).unwrap());
            n.fill(&t, &id, Bytes::from_static(b"{}"), None, 0, 0);
        }
        assert!(n.stats().entries <= 10, "{:?}", n.stats());
        // Large entries: the byte bound binds.
        let (n, keys) = near(1000, 10_000);
        for i in 0..100 {
            let id = format!("u{i}");
            let t = n
                .tracker
                .begin(&keys.value_key(&Kind::new("profile"), &id).unwrap());
            n.fill(&t, &id, Bytes::from(vec![b'x'; 1000]), None, 0, 0);
        }
        let s = n.stats();
        assert!(s.bytes <= 10_000, "{s:?}");
        assert!(s.entries >= 5, "{s:?}");
    }
}
