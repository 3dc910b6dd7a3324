//! The in-process store: the same entry protocol as the Redis scripts,
//! bounded in bytes.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;

use self::queue::MemQueue;
use super::{FillOutcome, FillRequest, FillValue, version_newer};
use crate::codec::peek_version;
use crate::key::EntryKeys;

mod caps;
mod entry;
mod queue;

/// Bookkeeping bytes charged per entry on top of its keys and values.
const ENTRY_OVERHEAD: usize = 96;
/// Entries sampled per eviction, as Redis samples for its LRU.
const EVICTION_SAMPLES: usize = 5;

#[derive(Debug, Clone)]
struct Timed<T> {
    v: T,
    until: Instant,
}

impl<T> Timed<T> {
    fn live(&self, now: Instant) -> bool {
        self.until > now
    }
}

/// The holder's token in a lease value. As in the scripts, a lease holds the
/// token, followed by `\n` and a floor when a committed change of that
/// version arrived while the load was in flight
/// ([`Store::invalidate_older`]): its fill must then store that version or
/// a newer one.
fn lease_token(lease: &str) -> &str {
    lease.split_once('\n').map_or(lease, |(token, _)| token)
}

/// The floor of a lease value, if a committed change set one.
fn lease_floor(lease: &str) -> Option<u64> {
    lease
        .split_once('\n')
        .and_then(|(_, floor)| floor.parse().ok())
}

/// One entry: the value key and its companions, kept together so that each
/// step is atomic under one shard lock.
#[derive(Debug, Default)]
struct Slot {
    value: Option<Timed<Bytes>>,
    lease: Option<Timed<Box<str>>>,
    stale: Option<Timed<Bytes>>,
    absent: Option<Instant>,
    /// A write-behind write not yet in the database: no TTL, never evicted.
    pending: Option<Bytes>,
    /// Coarse last-access time (seconds since the store started), for LRU.
    touched: u32,
}

impl Slot {
    fn expire(&mut self, now: Instant) {
        if self.value.as_ref().is_some_and(|t| !t.live(now)) {
            self.value = None;
        }
        if self.lease.as_ref().is_some_and(|t| !t.live(now)) {
            self.lease = None;
        }
        if self.stale.as_ref().is_some_and(|t| !t.live(now)) {
            self.stale = None;
        }
        if self.absent.is_some_and(|t| t <= now) {
            self.absent = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.lease.is_none()
            && self.stale.is_none()
            && self.absent.is_none()
            && self.pending.is_none()
    }

    /// Drops everything an invalidation drops: all but the pending copy.
    fn invalidate(&mut self) -> bool {
        let had = self.value.is_some();
        let pending = self.pending.take();
        *self = Slot {
            pending,
            touched: self.touched,
            ..Slot::default()
        };
        had
    }

    fn size(&self, key: &str) -> usize {
        ENTRY_OVERHEAD
            + key.len()
            + self.value.as_ref().map_or(0, |t| t.v.len())
            + self.stale.as_ref().map_or(0, |t| t.v.len())
            + self.lease.as_ref().map_or(0, |t| t.v.len())
            + self.pending.as_ref().map_or(0, Bytes::len)
    }
}

/// Keys outside the entry protocol: counters, locks, plain values.
#[derive(Debug)]
enum Plain {
    Value(Timed<Bytes>),
    Counter(i64),
}

mod slots {
    //! The entries of one shard and the bytes they are charged, in step by
    //! construction: the fields are private to this module, and every
    //! change to a slot goes through [`Slots::change`], which charges the
    //! difference it made.

    use std::time::Instant;

    use indexmap::IndexMap;

    use super::Slot;

    #[derive(Debug, Default)]
    pub(super) struct Slots {
        map: IndexMap<Box<str>, Slot>,
        /// Always the sum of [`Slot::size`] over `map`.
        bytes: usize,
    }

    impl Slots {
        /// The bytes charged: the sizes of the slots held.
        pub(super) fn bytes(&self) -> usize {
            self.bytes
        }

        pub(super) fn len(&self) -> usize {
            self.map.len()
        }

        pub(super) fn is_empty(&self) -> bool {
            self.map.is_empty()
        }

        pub(super) fn index_of(&self, key: &str) -> Option<usize> {
            self.map.get_index_of(key)
        }

        /// The key and slot at `i`, read-only.
        pub(super) fn get(&self, i: usize) -> (&str, &Slot) {
            let (k, s) = self.map.get_index(i).expect("slot index in range");
            (k, s)
        }

        pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Slot)> {
            self.map.iter().map(|(k, s)| (&**k, s))
        }

        /// The one way a slot changes: drops its expired parts, applies `f`,
        /// charges the difference and removes the slot if nothing is left.
        pub(super) fn change<R>(
            &mut self,
            i: usize,
            now: Instant,
            f: impl FnOnce(&mut Slot) -> R,
        ) -> R {
            let (k, slot) = self.map.get_index_mut(i).expect("slot index in range");
            let before = slot.size(k);
            slot.expire(now);
            let r = f(slot);
            let after = slot.size(k);
            let empty = slot.is_empty();
            // `before` is part of `bytes`, so this cannot underflow.
            self.bytes = self.bytes - before + after;
            if empty {
                self.remove(i);
            }
            r
        }

        /// [`Slots::change`] on the slot of `key`, created if missing.
        pub(super) fn upsert<R>(
            &mut self,
            key: &str,
            now: Instant,
            f: impl FnOnce(&mut Slot) -> R,
        ) -> R {
            let i = match self.map.get_index_of(key) {
                Some(i) => i,
                None => {
                    let slot = Slot::default();
                    self.bytes += slot.size(key);
                    self.map.insert_full(key.into(), slot).0
                }
            };
            self.change(i, now, f)
        }

        /// Removes the slot at `i`, uncharging exactly what it was charged.
        pub(super) fn remove(&mut self, i: usize) {
            if let Some((k, slot)) = self.map.swap_remove_index(i) {
                self.bytes -= slot.size(&k);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    slots: slots::Slots,
    plain: HashMap<Box<str>, Plain>,
    ops: u32,
}

impl Shard {
    /// Applies `f` to the live slot of `key` (created if missing), as an
    /// access.
    fn with_slot<R>(
        &mut self,
        key: &str,
        now: Instant,
        tick: u32,
        f: impl FnOnce(&mut Slot) -> R,
    ) -> R {
        self.slots.upsert(key, now, |slot| {
            slot.touched = tick;
            f(slot)
        })
    }

    /// Applies `f` to the live slot of `key` if there is one (`None`
    /// otherwise, or when its parts had all expired), as an access.
    fn peek<R>(
        &mut self,
        key: &str,
        now: Instant,
        tick: u32,
        f: impl FnOnce(&mut Slot) -> R,
    ) -> Option<R> {
        let i = self.slots.index_of(key)?;
        let mut live = false;
        let r = self.slots.change(i, now, |slot| {
            live = !slot.is_empty();
            slot.touched = tick;
            f(slot)
        });
        live.then_some(r)
    }

    /// Drops expired entries from a random sample (Redis's active expiry,
    /// amortised over operations instead of a background task).
    fn sweep(&mut self, now: Instant) {
        self.ops = self.ops.wrapping_add(1);
        if self.ops % 32 != 0 || self.slots.is_empty() {
            return;
        }
        let mut rng = rand::rng();
        for _ in 0..16 {
            if self.slots.is_empty() {
                break;
            }
            let i = rng.random_range(0..self.slots.len());
            self.slots.change(i, now, |_| ());
        }
        self.plain.retain(|_, p| match p {
            Plain::Value(t) => t.live(now),
            Plain::Counter(_) => true,
        });
    }

    /// Evicts approximately least recently used entries while `over` says
    /// the store is past its bound with this shard holding `bytes`.
    /// Entries holding a pending write-behind copy are never evicted, nor
    /// is `spare`, the entry the step just wrote (as in Redis, a write never
    /// evicts itself).
    fn evict(&mut self, spare: &str, over: impl Fn(usize) -> bool) {
        let mut rng = rand::rng();
        let mut attempts = 0;
        while over(self.slots.bytes()) && !self.slots.is_empty() && attempts < 64 {
            attempts += 1;
            let mut victim: Option<(usize, u32)> = None;
            for _ in 0..EVICTION_SAMPLES.min(self.slots.len()) {
                let i = rng.random_range(0..self.slots.len());
                let (k, slot) = self.slots.get(i);
                if slot.pending.is_some() || k == spare {
                    continue;
                }
                if victim.is_none_or(|(_, t)| slot.touched < t) {
                    victim = Some((i, slot.touched));
                }
            }
            if let Some((i, _)) = victim {
                self.slots.remove(i);
                attempts = 0;
            }
        }
    }
}

/// An in-process [`Store`](crate::Store) with the semantics of the Redis store.
///
/// Entries are spread over shards by key hash; each step locks one shard
/// (never across an `.await`). Memory is bounded: past
/// [`MemoryStore::with_max_bytes`] the least recently used entries are
/// evicted (sampled, as Redis does), and expired entries are dropped lazily
/// and by sampling. An entry is charged its keys, its values, its lease
/// token and 96 bytes of bookkeeping; the count is exact
/// (every change to an entry charges the difference it made, expiry
/// included), so a long-lived store keeps its whole bound for caching.
/// A write never evicts the entry it wrote, and an entry holding a
/// write-behind write not yet in the database is never evicted (as Redis's
/// `volatile-*` policies never evict a key without a TTL). Counters and
/// named locks are few and not charged.
///
/// The memory store is the embedded default for one process. Several
/// processes do not share it: use Redis for a fleet.
///
/// # Examples
///
/// ```
/// use kura::store::MemoryStore;
///
/// let store = MemoryStore::new().with_max_bytes(64 * 1024 * 1024);
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    /// The bound, over the whole store: a per-shard share would evict
    /// from whichever shard the hash made fuller than average long before
    /// the store as a whole is full.
    max_bytes: usize,
    /// The bytes of every shard, kept by [`ShardGuard`] as each holder of
    /// a shard lock lets go.
    total: AtomicUsize,
    started: Instant,
    queues: Mutex<HashMap<String, MemQueue>>,
    queued: tokio::sync::Notify,
    /// The stamps hashes ([`Store::bump_stamp`]), by key: tiny, outside the
    /// byte bound.
    stamps: Mutex<HashMap<String, HashMap<String, u64>>>,
    /// Raised by every stamp change ([`Store::stamps_version`]).
    stamps_version: std::sync::atomic::AtomicU64,
    /// How far the tests moved the entry clock forward (nanoseconds).
    #[cfg(test)]
    skew: std::sync::atomic::AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// The default bound: 256 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 256 * 1024 * 1024;

    /// A store bounded to [`Self::DEFAULT_MAX_BYTES`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_shards(64, Self::DEFAULT_MAX_BYTES)
    }

    /// The same store with another memory bound.
    #[must_use]
    pub fn with_max_bytes(self, max_bytes: usize) -> Self {
        Self::with_shards(self.inner.shards.len(), max_bytes)
    }

    fn with_shards(n: usize, max_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
                max_bytes,
                total: AtomicUsize::new(0),
                started: Instant::now(),
                queues: Mutex::new(HashMap::new()),
                queued: tokio::sync::Notify::new(),
                stamps: Mutex::new(HashMap::new()),
                stamps_version: std::sync::atomic::AtomicU64::new(0),
                #[cfg(test)]
                skew: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// A fill, or with `refresh` a refill ([`Store::refill`]).
    fn fill_as(&self, reqs: &[FillRequest<'_>], refresh: bool) -> Vec<FillOutcome> {
        reqs.iter()
            .map(|r| {
                self.step(r.keys, |slot, now| {
                    let Some(lease) = slot.lease.take() else {
                        return FillOutcome::LeaseLost;
                    };
                    if lease_token(&lease.v) != r.token {
                        slot.lease = Some(lease);
                        return FillOutcome::LeaseLost;
                    }
                    // A change committed while the load was in flight: a
                    // load of an older row (or of none) is void.
                    if let Some(floor) = lease_floor(&lease.v) {
                        match &r.value {
                            FillValue::Value { version, .. } if *version >= floor => {}
                            _ => return FillOutcome::LeaseLost,
                        }
                    }
                    match &r.value {
                        FillValue::Absent => {
                            if !r.lifetimes.ttl.is_zero() {
                                slot.absent = Some(now + r.lifetimes.ttl);
                            }
                            FillOutcome::Stored
                        }
                        FillValue::Value { bytes, version } => {
                            let cached = slot.value.as_ref().and_then(|t| peek_version(&t.v));
                            let refused = if refresh {
                                cached.is_some_and(|c| *version < c)
                            } else {
                                slot.value.is_some() && !version_newer(*version, cached)
                            };
                            if refused {
                                return FillOutcome::NotNewer;
                            }
                            slot.value = Some(timed(bytes.clone(), now, r.lifetimes.ttl));
                            // As `keep_stale` in the scripts: no stale copy
                            // survives a fill that asked for none (it would
                            // be older than the value now cached).
                            slot.stale = (!r.lifetimes.stale_ttl.is_zero())
                                .then(|| timed(bytes.clone(), now, r.lifetimes.stale_ttl));
                            slot.absent = None;
                            FillOutcome::Stored
                        }
                    }
                })
            })
            .collect()
    }

    /// Bytes held, as charged against the bound: exactly the sizes of the
    /// entries held (an expired part counts until it is dropped, on the
    /// entry's next access or by the sampling sweep).
    #[must_use]
    pub fn used_bytes(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(s).slots.bytes())
            .sum()
    }

    fn shard(&self, key: &str) -> ShardGuard<'_> {
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        self.shard_at((h as usize) % self.inner.shards.len())
    }

    fn shard_at(&self, i: usize) -> ShardGuard<'_> {
        let shard = lock(&self.inner.shards[i]);
        ShardGuard {
            before: shard.slots.bytes(),
            shard,
            total: &self.inner.total,
        }
    }

    /// Evicts from the locked shard while the whole store is past its
    /// bound, sparing the entry just written.
    fn evict(&self, shard: &mut ShardGuard<'_>, spare: &str) {
        // What the other shards hold, as of their last release.
        let others = self.inner.total.load(Ordering::Relaxed) as isize - shard.before as isize;
        let max = self.inner.max_bytes as isize;
        shard
            .shard
            .evict(spare, |bytes| others + bytes as isize > max);
    }

    /// The clock of the entry protocol: `Instant::now()`, which the unit
    /// tests can move forward to expire entries without sleeping.
    #[inline]
    fn now(&self) -> Instant {
        #[cfg(test)]
        {
            Instant::now()
                + Duration::from_nanos(self.inner.skew.load(std::sync::atomic::Ordering::Relaxed))
        }
        #[cfg(not(test))]
        {
            Instant::now()
        }
    }

    /// Moves the entry clock forward.
    #[cfg(test)]
    fn advance(&self, d: Duration) {
        self.inner
            .skew
            .fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn tick(&self, now: Instant) -> u32 {
        now.duration_since(self.inner.started).as_secs() as u32
    }

    /// Runs one entry step under its shard lock.
    fn step<R>(&self, keys: &EntryKeys, f: impl FnOnce(&mut Slot, Instant) -> R) -> R {
        let now = self.now();
        let tick = self.tick(now);
        let mut shard = self.shard(&keys.value);
        shard.sweep(now);
        let r = shard.with_slot(&keys.value, now, tick, |slot| f(slot, now));
        self.evict(&mut shard, &keys.value);
        r
    }
}

/// A locked shard. When it is let go, the store-wide total takes the
/// difference its holder made, so the total is the sum of the shards'
/// counts whenever no lock is held.
struct ShardGuard<'a> {
    shard: MutexGuard<'a, Shard>,
    /// The shard's bytes when the lock was taken.
    before: usize,
    total: &'a AtomicUsize,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = Shard;
    fn deref(&self) -> &Shard {
        &self.shard
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shard {
        &mut self.shard
    }
}

impl Drop for ShardGuard<'_> {
    fn drop(&mut self) {
        let after = self.shard.slots.bytes();
        if after >= self.before {
            self.total.fetch_add(after - self.before, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(self.before - after, Ordering::Relaxed);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a slot half-written (each
    // step assigns whole fields), so a poisoned shard is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn timed<T>(v: T, now: Instant, ttl: Duration) -> Timed<T> {
    Timed {
        v,
        until: now + ttl.max(Duration::from_millis(1)),
    }
}

/// What the byte count says against what the shards hold.
#[cfg(test)]
mod tests;
