//! The in-process store: the same entry protocol as the Redis scripts,
//! bounded in bytes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{
    AcceptOutcome, AcceptRequest, AcquireRequest, Acquired, DeadLetter, Durability, FillOutcome,
    FillRequest, FillValue, QueueEntry, QueueKeys, QueueStats, QueueStore, RateDecision, Retry,
    Settled, Store, StoreResult, UpdateOutcome, UpdateRequest, version_newer,
};
use crate::codec::peek_version;
use crate::error::StoreError;
use crate::key::{EntryKeys, KeyPattern};

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

/// An in-process [`Store`] with the semantics of the Redis store.
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

type EntryId = (u64, u64);

fn id_string((ms, seq): EntryId) -> String {
    format!("{ms}-{seq}")
}

fn parse_id(s: &str) -> Option<EntryId> {
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a queue entry holds (the fields of a Redis stream entry).
#[derive(Debug, Clone)]
struct Queued {
    id: String,
    version: u64,
    attempts: u32,
    not_before_ms: u64,
}

impl Queued {
    fn entry(&self, at: EntryId) -> QueueEntry {
        QueueEntry {
            entry_id: id_string(at),
            id: self.id.clone(),
            version: self.version,
            attempts: self.attempts,
            not_before_ms: self.not_before_ms,
        }
    }
}

/// A stream with one consumer group, as the write-behind queue uses it.
#[derive(Debug, Default)]
struct MemQueue {
    last: EntryId,
    entries: BTreeMap<EntryId, Queued>,
    /// The group's last delivered id.
    delivered: EntryId,
    /// Delivered, not acknowledged: consumer and delivery time.
    in_flight: BTreeMap<EntryId, (String, Instant)>,
    dead: std::collections::VecDeque<DeadLetter>,
}

impl MemQueue {
    /// The next entry id: milliseconds, then a sequence within one.
    fn next_id(&mut self) -> EntryId {
        let ms = epoch_ms();
        let next = if ms > self.last.0 {
            (ms, 0)
        } else {
            (self.last.0, self.last.1 + 1)
        };
        self.last = next;
        next
    }

    fn push(&mut self, q: Queued) -> String {
        let at = self.next_id();
        self.entries.insert(at, q);
        id_string(at)
    }

    fn oldest_age_ms(&self) -> u64 {
        self.entries
            .keys()
            .next()
            .map_or(0, |(ms, _)| epoch_ms().saturating_sub(*ms))
    }

    fn remove(&mut self, ids: &[String]) {
        for id in ids.iter().filter_map(|s| parse_id(s)) {
            self.entries.remove(&id);
            self.in_flight.remove(&id);
        }
    }
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

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str, refresh: Option<Duration>) -> StoreResult<Option<Bytes>> {
        let now = self.now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        let found = shard.peek(key, now, tick, |slot| {
            let v = slot.value.as_mut()?;
            if let Some(ttl) = refresh {
                let until = timed((), now, ttl).until;
                // The stale copy's end moves as much as the value's, as in
                // get_refresh.lua: it still outlives the value by max_stale.
                if let Some(st) = slot.stale.as_mut() {
                    st.until = until + st.until.saturating_duration_since(v.until);
                }
                v.until = until;
            }
            Some(v.v.clone())
        });
        if let Some(v) = found {
            return Ok(v);
        }
        Ok(match shard.plain.get(key) {
            Some(Plain::Value(t)) if t.live(now) => Some(t.v.clone()),
            Some(Plain::Counter(c)) => Some(Bytes::from(c.to_string())),
            _ => None,
        })
    }

    async fn get_many(&self, keys: &[&str]) -> StoreResult<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k, None).await?);
        }
        Ok(out)
    }

    async fn acquire(&self, reqs: &[AcquireRequest<'_>]) -> StoreResult<Vec<Acquired>> {
        Ok(reqs
            .iter()
            .map(|r| {
                self.step(r.keys, |slot, now| {
                    if let Some(v) = &slot.value {
                        return Acquired::Value(v.v.clone());
                    }
                    if let Some(p) = slot.pending.clone() {
                        slot.value = Some(timed(p.clone(), now, r.value_ttl));
                        return Acquired::Value(p);
                    }
                    if slot.absent.is_some() {
                        return Acquired::Absent;
                    }
                    let stale = slot.stale.as_ref().map(|t| t.v.clone());
                    match &mut slot.lease {
                        Some(l) if lease_token(&l.v) != r.token => Acquired::Busy { stale },
                        // Re-entrant: the lease keeps the floor a committed
                        // change may have set.
                        Some(l) => {
                            l.until = now + r.lease_ttl;
                            Acquired::Leased { stale }
                        }
                        None => {
                            slot.lease = Some(timed(r.token.into(), now, r.lease_ttl));
                            Acquired::Leased { stale }
                        }
                    }
                })
            })
            .collect())
    }

    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        Ok(self.fill_as(reqs, false))
    }

    async fn refill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        Ok(self.fill_as(reqs, true))
    }

    async fn refresh_lease(
        &self,
        keys: &EntryKeys,
        token: &str,
        ttl: Duration,
        seen_expires_ms: u64,
    ) -> StoreResult<bool> {
        Ok(self.step(keys, |slot, now| {
            let same = slot
                .value
                .as_ref()
                .is_some_and(|v| crate::codec::peek_meta(&v.v).expires_ms == seen_expires_ms);
            if !same || slot.lease.is_some() {
                return false;
            }
            slot.lease = Some(timed(token.into(), now, ttl));
            true
        }))
    }

    async fn stamps(&self, key: &str) -> StoreResult<Vec<(String, u64)>> {
        Ok(lock(&self.inner.stamps)
            .get(key)
            .map(|h| h.iter().map(|(f, v)| (f.clone(), *v)).collect())
            .unwrap_or_default())
    }

    async fn bump_stamp(&self, key: &str, field: &str, held: u64) -> StoreResult<u64> {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut all = lock(&self.inner.stamps);
        let h = all.entry(key.to_owned()).or_default();
        let cur = h.get(crate::tags::EPOCH_FIELD).copied().unwrap_or(0);
        let e = now_us.max(cur + 1).max(held + 1);
        h.insert(crate::tags::EPOCH_FIELD.to_owned(), e);
        h.insert(field.to_owned(), e);
        h.entry(crate::tags::ID_FIELD.to_owned()).or_insert(e);
        self.inner
            .stamps_version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(e)
    }

    fn stamps_version(&self) -> Option<u64> {
        Some(
            self.inner
                .stamps_version
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    async fn release(&self, entries: &[(&EntryKeys, &str)]) -> StoreResult<()> {
        for (keys, token) in entries {
            self.step(keys, |slot, _| {
                if slot
                    .lease
                    .as_ref()
                    .is_some_and(|l| lease_token(&l.v) == *token)
                {
                    slot.lease = None;
                }
            });
        }
        Ok(())
    }

    async fn update(&self, reqs: &[UpdateRequest<'_>]) -> StoreResult<Vec<UpdateOutcome>> {
        Ok(reqs
            .iter()
            .map(|r| {
                self.step(r.keys, |slot, now| {
                    slot.lease = None;
                    slot.absent = None;
                    let Some(cur) = &slot.value else {
                        slot.stale = None;
                        return UpdateOutcome::NotCached;
                    };
                    if !version_newer(r.version, peek_version(&cur.v)) {
                        return UpdateOutcome::NotNewer;
                    }
                    slot.value = Some(timed(r.bytes.clone(), now, r.lifetimes.ttl));
                    slot.stale = (!r.lifetimes.stale_ttl.is_zero())
                        .then(|| timed(r.bytes.clone(), now, r.lifetimes.stale_ttl));
                    UpdateOutcome::Stored
                })
            })
            .collect())
    }

    async fn invalidate(&self, entries: &[&EntryKeys]) -> StoreResult<u64> {
        let mut n = 0;
        for keys in entries {
            n += self.step(keys, |slot, _| u64::from(slot.invalidate()));
        }
        Ok(n)
    }

    async fn invalidate_older(&self, entries: &[(&EntryKeys, Option<u64>)]) -> StoreResult<u64> {
        let mut n = 0;
        for (keys, version) in entries {
            n += self.step(keys, |slot, _| {
                let cached = slot.value.as_ref().map(|t| peek_version(&t.v));
                match (version, cached) {
                    // As the script: a value without a version counts as older.
                    (Some(v), Some(c)) if !version_newer(*v, c) => 0,
                    (Some(v), _) => {
                        // As the script: a load in flight keeps its lease,
                        // with the change's version as the floor of its fill.
                        let lease = slot.lease.take().map(|mut l| {
                            if lease_floor(&l.v).is_none_or(|f| f < *v) {
                                l.v = format!("{}\n{v}", lease_token(&l.v)).into();
                            }
                            l
                        });
                        let had = slot.invalidate();
                        slot.lease = lease;
                        u64::from(had)
                    }
                    (None, _) => u64::from(slot.invalidate()),
                }
            });
        }
        Ok(n)
    }

    async fn advance(&self, key: &str, value: u64) -> StoreResult<u64> {
        // Kept as a counter, so `get` reads it as a decimal as on Redis.
        let new = i64::try_from(value)
            .map_err(|_| StoreError::Server("position past i64::MAX".into()))?;
        let mut shard = self.shard(key);
        let e = shard.plain.entry(key.into()).or_insert(Plain::Counter(new));
        let held = match e {
            Plain::Counter(c) if *c >= new => *c,
            other => {
                *other = Plain::Counter(new);
                new
            }
        };
        Ok(held as u64)
    }

    async fn invalidate_matching(&self, pattern: &KeyPattern) -> StoreResult<u64> {
        let now = self.now();
        let mut n = 0;
        for i in 0..self.inner.shards.len() {
            let mut shard = self.shard_at(i);
            // Backwards: a removal moves the last slot into the gap, and
            // that one has been seen already.
            for i in (0..shard.slots.len()).rev() {
                if pattern.matches_value_key(shard.slots.get(i).0) {
                    n += u64::from(shard.slots.change(i, now, Slot::invalidate));
                }
            }
        }
        Ok(n)
    }

    async fn sweep(&self, pattern: &KeyPattern, epoch: u64) -> StoreResult<u64> {
        let now = self.now();
        let mut n = 0;
        for i in 0..self.inner.shards.len() {
            let mut shard = self.shard_at(i);
            // Backwards, as in `invalidate_matching`.
            for i in (0..shard.slots.len()).rev() {
                if !pattern.matches_value_key(shard.slots.get(i).0) {
                    continue;
                }
                let removed = shard.slots.change(i, now, |slot| {
                    let old = slot.pending.is_none()
                        && slot
                            .value
                            .as_ref()
                            .is_some_and(|v| crate::codec::peek_meta(&v.v).epoch < epoch);
                    if old {
                        slot.value = None;
                        slot.stale = None;
                    }
                    old
                });
                n += u64::from(removed);
            }
        }
        Ok(n)
    }

    async fn rewind(&self, key: &str, from: u64, to: u64) -> StoreResult<bool> {
        let to =
            i64::try_from(to).map_err(|_| StoreError::Server("position past i64::MAX".into()))?;
        let mut shard = self.shard(key);
        match shard.plain.get_mut(key) {
            Some(Plain::Counter(c)) if u64::try_from(*c).ok() == Some(from) => {
                *c = to;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn count_matching(&self, pattern: &KeyPattern) -> StoreResult<Option<u64>> {
        let now = self.now();
        let mut n = 0;
        for i in 0..self.inner.shards.len() {
            let shard = self.shard_at(i);
            n += shard
                .slots
                .iter()
                .filter(|(k, slot)| {
                    pattern.matches_value_key(k) && slot.value.as_ref().is_some_and(|v| v.live(now))
                })
                .count() as u64;
        }
        Ok(Some(n))
    }

    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()> {
        let now = self.now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.with_slot(key, now, tick, |slot| {
            if slot.value.as_ref().is_some_and(|t| t.v == *seen) {
                slot.value = None;
            }
        });
        Ok(())
    }

    async fn rate(&self, key: &str, limit: u32, period: Duration) -> StoreResult<RateDecision> {
        // As the script, on this store's clock: the arrival time is kept as
        // a plain value (µs since the store started) that expires when the
        // limit is whole again, so the byte bound covers it too.
        let now = self.now();
        let now_us = now.duration_since(self.inner.started).as_micros() as u64;
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.sweep(now);
        let decision = shard.with_slot(key, now, tick, |slot| {
            let tat = slot
                .value
                .as_ref()
                .filter(|t| t.live(now))
                .and_then(|t| std::str::from_utf8(&t.v).ok()?.parse().ok());
            let (d, after) = super::gcra(tat, now_us, limit, period);
            if let Some(after) = after {
                slot.value = Some(timed(
                    Bytes::from(after.to_string()),
                    now,
                    Duration::from_micros(after - now_us) + Duration::from_millis(1),
                ));
            }
            d
        });
        self.evict(&mut shard, key);
        Ok(decision)
    }

    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()> {
        // A plain value lives in a slot like a cached one, so `get` and
        // `discard` see it the same way.
        let now = self.now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.sweep(now);
        shard.with_slot(key, now, tick, |slot| {
            slot.value = Some(timed(bytes, now, ttl));
        });
        self.evict(&mut shard, key);
        Ok(())
    }

    async fn incr(&self, counters: &[(&str, i64)]) -> StoreResult<()> {
        for (k, by) in counters {
            let mut shard = self.shard(k);
            let e = shard.plain.entry((*k).into()).or_insert(Plain::Counter(0));
            match e {
                Plain::Counter(c) => *c += by,
                other => *other = Plain::Counter(*by),
            }
        }
        Ok(())
    }

    async fn counters(&self, keys: &[&str]) -> StoreResult<Vec<i64>> {
        Ok(keys
            .iter()
            .map(|k| match self.shard(k).plain.get(*k) {
                Some(Plain::Counter(c)) => *c,
                _ => 0,
            })
            .collect())
    }

    async fn lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let now = self.now();
        let mut shard = self.shard(key);
        let held = matches!(shard.plain.get(key), Some(Plain::Value(t)) if t.live(now));
        if held {
            return Ok(false);
        }
        shard.plain.insert(
            key.into(),
            Plain::Value(timed(Bytes::copy_from_slice(token.as_bytes()), now, ttl)),
        );
        Ok(true)
    }

    async fn extend_lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let now = self.now();
        let mut shard = self.shard(key);
        match shard.plain.get_mut(key) {
            Some(Plain::Value(t)) if t.live(now) && t.v == token.as_bytes() => {
                t.until = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn unlock(&self, key: &str, token: &str) -> StoreResult<()> {
        let mut shard = self.shard(key);
        if matches!(shard.plain.get(key), Some(Plain::Value(t)) if t.v == token.as_bytes()) {
            shard.plain.remove(key);
        }
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    fn bounds_own_latency(&self) -> bool {
        true
    }

    fn describe(&self) -> &'static str {
        "memory"
    }
}

#[async_trait]
impl QueueStore for MemoryStore {
    async fn accept(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome> {
        let queues = &self.inner.queues;
        let out = self.step(req.keys, |slot, now| {
            // The version first, then the queue's limits (as accept.lua).
            let cur = slot.pending.as_ref().or(slot.value.as_ref().map(|t| &t.v));
            let Some(cur) = cur else {
                return AcceptOutcome::Uncached;
            };
            let cv = peek_version(cur).unwrap_or(0);
            if cv != req.expected_version {
                return AcceptOutcome::Conflict { current: cv };
            }
            let mut qs = lock(queues);
            let q = qs.entry(req.queue.stream.clone()).or_default();
            let depth = q.entries.len() as u64;
            let age = q.oldest_age_ms();
            if (req.max_depth > 0 && depth >= req.max_depth)
                || (!req.max_age.is_zero() && depth > 0 && age >= req.max_age.as_millis() as u64)
            {
                return AcceptOutcome::Full {
                    depth,
                    oldest_age: Duration::from_millis(age),
                };
            }
            slot.lease = None;
            slot.absent = None;
            slot.value = Some(timed(req.bytes.clone(), now, req.lifetimes.ttl));
            slot.stale = (!req.lifetimes.stale_ttl.is_zero())
                .then(|| timed(req.bytes.clone(), now, req.lifetimes.stale_ttl));
            slot.pending = Some(req.bytes.clone());
            AcceptOutcome::Accepted {
                entry_id: q.push(Queued {
                    id: req.id.to_owned(),
                    version: req.version,
                    attempts: 0,
                    not_before_ms: 0,
                }),
                // An in-process store has no replicas to confirm anything.
                replicated: (req.min_replicas > 0).then_some(0),
            }
        });
        if matches!(out, AcceptOutcome::Accepted { .. }) {
            self.inner.queued.notify_waiters();
        }
        Ok(out)
    }

    async fn pending_copies(&self, entries: &[&EntryKeys]) -> StoreResult<Vec<Option<Bytes>>> {
        let now = self.now();
        let tick = self.tick(now);
        Ok(entries
            .iter()
            .map(|e| {
                let mut shard = self.shard(&e.value);
                shard
                    .peek(&e.value, now, tick, |slot| slot.pending.clone())
                    .flatten()
            })
            .collect())
    }

    async fn queue_read(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> StoreResult<Vec<QueueEntry>> {
        let deadline = Instant::now() + block;
        loop {
            // Register interest before looking, so an accept between the
            // look and the wait is not missed.
            let notified = self.inner.queued.notified();
            {
                let mut qs = lock(&self.inner.queues);
                let q = qs.entry(queue.stream.clone()).or_default();
                let from = q.delivered;
                let got: Vec<(EntryId, Queued)> = q
                    .entries
                    .range((std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded))
                    .take(count)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                if let Some((last, _)) = got.last() {
                    q.delivered = *last;
                    let now = Instant::now();
                    for (k, _) in &got {
                        q.in_flight.insert(*k, (consumer.to_owned(), now));
                    }
                    return Ok(got.into_iter().map(|(k, e)| e.entry(k)).collect());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    async fn queue_claim(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<QueueEntry>> {
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        let now = Instant::now();
        let idle: Vec<EntryId> = q
            .in_flight
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= min_idle)
            .map(|(k, _)| *k)
            .take(count)
            .collect();
        let mut out = Vec::new();
        for k in idle {
            match q.entries.get(&k) {
                Some(e) => {
                    out.push(e.entry(k));
                    q.in_flight.insert(k, (consumer.to_owned(), now));
                }
                None => {
                    q.in_flight.remove(&k);
                }
            }
        }
        Ok(out)
    }

    async fn queue_ack(&self, queue: &QueueKeys, done: &[Settled<'_>]) -> StoreResult<()> {
        for d in done {
            self.step(d.keys, |slot, _| {
                if slot.pending.as_ref().and_then(|p| peek_version(p)) == Some(d.version) {
                    slot.pending = None;
                }
            });
        }
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        for d in done {
            q.remove(d.entry_ids);
        }
        Ok(())
    }

    async fn queue_dead_letter(
        &self,
        queue: &QueueKeys,
        letters: &[(Settled<'_>, &str, Bytes)],
        max_len: u64,
    ) -> StoreResult<u64> {
        for (d, ..) in letters {
            self.step(d.keys, |slot, _| {
                if slot.pending.as_ref().and_then(|p| peek_version(p)) == Some(d.version) {
                    slot.pending = None;
                    slot.value = None;
                    slot.stale = None;
                    slot.lease = None;
                }
            });
        }
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        let mut trimmed = 0;
        for (d, error, value) in letters {
            // Dead letters live apart from the queue itself; they take the
            // next id of its clock, as XADD on the dead-letter stream would.
            let entry_id = id_string(q.next_id());
            q.dead.push_back(DeadLetter {
                entry_id,
                id: d.id.to_owned(),
                version: d.version,
                error: (*error).to_owned(),
                value: String::from_utf8_lossy(value).into_owned(),
            });
            q.remove(d.entry_ids);
            while max_len > 0 && q.dead.len() as u64 > max_len {
                q.dead.pop_front();
                trimmed += 1;
            }
        }
        Ok(trimmed)
    }

    async fn queue_retry(
        &self,
        queue: &QueueKeys,
        retries: &[Retry<'_>],
    ) -> StoreResult<Vec<String>> {
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        let ids = retries
            .iter()
            .map(|r| {
                q.remove(r.entry_ids);
                q.push(Queued {
                    id: r.id.to_owned(),
                    version: r.version,
                    attempts: r.attempts,
                    not_before_ms: r.not_before_ms,
                })
            })
            .collect();
        drop(qs);
        self.inner.queued.notify_waiters();
        Ok(ids)
    }

    async fn queue_stats(&self, queue: &QueueKeys) -> StoreResult<QueueStats> {
        let qs = lock(&self.inner.queues);
        Ok(qs
            .get(&queue.stream)
            .map_or_else(QueueStats::default, |q| QueueStats {
                depth: q.entries.len() as u64,
                oldest_age_ms: q.oldest_age_ms(),
                in_flight: q.in_flight.len() as u64,
                dead_letters: q.dead.len() as u64,
            }))
    }

    async fn dead_letters(&self, queue: &QueueKeys, count: usize) -> StoreResult<Vec<DeadLetter>> {
        let qs = lock(&self.inner.queues);
        Ok(qs
            .get(&queue.stream)
            .map(|q| q.dead.iter().rev().take(count).cloned().collect())
            .unwrap_or_default())
    }

    async fn requeue_pending(&self, _pattern: &KeyPattern, _queue: &QueueKeys) -> StoreResult<u64> {
        // Accept stores the pending copy and the queue entry in one step, so
        // no pending copy is ever without its queue entry.
        Ok(0)
    }

    async fn durability(&self) -> StoreResult<Durability> {
        Ok(Durability::Volatile)
    }

    async fn evicts_keys_without_ttl(&self) -> StoreResult<Option<String>> {
        // Eviction never drops a pending copy or a queue.
        Ok(None)
    }
}

/// What the byte count says against what the shards hold.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Audit {
    /// The sum of the shards' byte counts.
    accounted: usize,
    /// The sizes of the slots held, expired parts included.
    held: usize,
    /// The sizes of the slots held, counting only their live parts.
    live: usize,
}

#[cfg(test)]
impl MemoryStore {
    fn audit(&self) -> Audit {
        let now = self.now();
        let mut a = Audit {
            accounted: 0,
            held: 0,
            live: 0,
        };
        for shard in self.inner.shards.iter() {
            let shard = lock(shard);
            a.accounted += shard.slots.bytes();
            for (k, slot) in shard.slots.iter() {
                a.held += slot.size(k);
                a.live += slot.live_size(k, now);
            }
        }
        a
    }
}

#[cfg(test)]
impl Slot {
    /// The size the slot would have once its expired parts are dropped (0
    /// when nothing is left).
    fn live_size(&self, key: &str, now: Instant) -> usize {
        let value = self
            .value
            .as_ref()
            .filter(|t| t.live(now))
            .map_or(0, |t| t.v.len());
        let stale = self
            .stale
            .as_ref()
            .filter(|t| t.live(now))
            .map_or(0, |t| t.v.len());
        let lease = self
            .lease
            .as_ref()
            .filter(|t| t.live(now))
            .map_or(0, |t| t.v.len());
        let pending = self.pending.as_ref().map_or(0, Bytes::len);
        let any = self.value.as_ref().is_some_and(|t| t.live(now))
            || self.stale.as_ref().is_some_and(|t| t.live(now))
            || self.lease.as_ref().is_some_and(|t| t.live(now))
            || self.absent.is_some_and(|t| t > now)
            || self.pending.is_some();
        if any {
            ENTRY_OVERHEAD + key.len() + value + stale + lease + pending
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyBuilder, Kind};
    use crate::store::Lifetimes;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const IDS: [&str; 4] = ["a1", "a2", "b1", "b2"];

    fn kb() -> KeyBuilder {
        KeyBuilder::new("t", false).unwrap()
    }

    fn entries() -> Vec<EntryKeys> {
        IDS.iter()
            .map(|id| kb().entry(&Kind::PROFILE, id).unwrap())
            .collect()
    }

    fn queue() -> QueueKeys {
        QueueKeys {
            stream: "t:~wb:profile".into(),
            dead: "t:~wb:profile:dead".into(),
            group: "kura".into(),
        }
    }

    fn envelope(version: u64, len: usize) -> Bytes {
        Bytes::from(format!(
            "{{\"_v\":{version},\"p\":\"{}\"}}",
            "x".repeat(len)
        ))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn life(ttl: u64, stale: u64) -> Lifetimes {
        Lifetimes {
            ttl: ms(ttl),
            stale_ttl: ms(stale),
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    async fn fill(s: &MemoryStore, e: &EntryKeys, version: u64, len: usize, l: Lifetimes) {
        assert_eq!(
            try_fill(s, e, version, len, l).await,
            Some(FillOutcome::Stored)
        );
    }

    /// Takes the lease and fills, as a reader that missed does; `None` when
    /// the lease was not granted (a value, a pending copy or another
    /// holder).
    async fn try_fill(
        s: &MemoryStore,
        e: &EntryKeys,
        version: u64,
        len: usize,
        l: Lifetimes,
    ) -> Option<FillOutcome> {
        let acq = AcquireRequest {
            keys: e,
            token: "T",
            lease_ttl: ms(5_000),
            value_ttl: ms(60_000),
        };
        let got = s.acquire(&[acq]).await.unwrap();
        if !matches!(got[0], Acquired::Leased { .. }) {
            return None;
        }
        let mut out = s
            .fill(&[FillRequest {
                keys: e,
                token: "T",
                value: FillValue::Value {
                    bytes: envelope(version, len),
                    version,
                },
                lifetimes: l,
            }])
            .await
            .unwrap();
        out.pop()
    }

    fn assert_exact(s: &MemoryStore) {
        let a = s.audit();
        assert_eq!(a.accounted, a.held, "the count drifted: {a:?}");
        assert_eq!(s.used_bytes(), a.accounted);
        assert_eq!(
            s.inner.total.load(Ordering::Relaxed),
            a.accounted,
            "the store-wide total drifted from the shards' counts"
        );
        assert!(a.live <= a.held, "{a:?}");
    }

    #[test]
    fn the_bound_holds_for_the_store_as_a_whole() {
        run(async {
            // 64 shards: a per-shard share of the bound would evict from
            // the shards the hash made fuller than average.
            let s = MemoryStore::with_shards(64, 256 * 1024);
            let es: Vec<EntryKeys> = (0..200)
                .map(|i| kb().entry(&Kind::PROFILE, &format!("w{i}")).unwrap())
                .collect();
            for e in &es {
                fill(&s, e, 1, 600, life(600_000, 0)).await;
            }
            assert_exact(&s);
            // About half the bound: every entry is still there.
            assert!(s.used_bytes() < 192 * 1024, "{}", s.used_bytes());
            let keys: Vec<&str> = es.iter().map(|e| e.value.as_str()).collect();
            let got = s.get_many(&keys).await.unwrap();
            assert_eq!(
                got.iter().flatten().count(),
                es.len(),
                "evicted under half the bound"
            );
            // Twice the bound written: the store stays near its bound.
            let more: Vec<EntryKeys> = (0..800)
                .map(|i| kb().entry(&Kind::PROFILE, &format!("m{i}")).unwrap())
                .collect();
            for e in &more {
                fill(&s, e, 1, 600, life(600_000, 0)).await;
            }
            assert_exact(&s);
            assert!(
                s.used_bytes() <= 256 * 1024 + 4 * 1024,
                "{}",
                s.used_bytes()
            );
        });
    }

    #[test]
    fn used_bytes_is_what_an_entry_holds() {
        run(async {
            let s = MemoryStore::new();
            assert_eq!(s.used_bytes(), 0);
            let e = &entries()[0];
            fill(&s, e, 1, 10, life(60_000, 120_000)).await;
            let v = envelope(1, 10).len();
            assert_eq!(s.used_bytes(), ENTRY_OVERHEAD + e.value.len() + 2 * v);
            s.invalidate(&[e]).await.unwrap();
            assert_eq!(s.used_bytes(), 0);
        });
    }

    #[test]
    fn a_read_that_finds_everything_expired_frees_the_entry() {
        run(async {
            let s = MemoryStore::new();
            let e = &entries()[0];
            fill(&s, e, 1, 10, life(1_000, 2_000)).await;
            s.advance(ms(3_000));
            assert_eq!(s.get(&e.value, None).await.unwrap(), None);
            assert_exact(&s);
            assert_eq!(s.used_bytes(), 0);
        });
    }

    #[test]
    fn a_read_that_finds_the_value_expired_frees_its_bytes() {
        run(async {
            let s = MemoryStore::new();
            let e = &entries()[0];
            fill(&s, e, 1, 100, life(1_000, 60_000)).await;
            s.advance(ms(2_000));
            assert_eq!(s.get(&e.value, None).await.unwrap(), None);
            assert_exact(&s);
            let stale = envelope(1, 100).len();
            assert_eq!(s.used_bytes(), ENTRY_OVERHEAD + e.value.len() + stale);
        });
    }

    #[test]
    fn pattern_invalidation_frees_whole_entries() {
        run(async {
            let s = MemoryStore::new();
            for e in &entries() {
                fill(&s, e, 1, 50, life(60_000, 0)).await;
            }
            let all = kb().pattern(&Kind::PROFILE, "*").unwrap();
            assert_eq!(s.invalidate_matching(&all).await.unwrap(), 4);
            assert_exact(&s);
            assert_eq!(s.used_bytes(), 0);
        });
    }

    #[test]
    fn eviction_frees_what_it_charged() {
        run(async {
            // One shard of 1 KiB: every fill past the bound evicts.
            let s = MemoryStore::with_shards(1, 1024);
            let es: Vec<EntryKeys> = (0..40)
                .map(|i| kb().entry(&Kind::PROFILE, &format!("e{i}")).unwrap())
                .collect();
            for (i, e) in es.iter().enumerate() {
                fill(&s, e, 1, 100, life(1_000 + i as u64 * 50, 0)).await;
                // Some values expire while others are still written.
                s.advance(ms(40));
                s.get(&es[i / 2].value, None).await.unwrap();
                assert_exact(&s);
                assert!(s.used_bytes() <= 1024 + 400, "{}", s.used_bytes());
            }
        });
    }

    /// One step of the property test.
    #[derive(Debug, Clone)]
    enum Op {
        Acquire {
            k: usize,
            token: u8,
        },
        Fill {
            k: usize,
            token: u8,
            version: u64,
            len: usize,
            ttl: u64,
            stale: u64,
        },
        FillAbsent {
            k: usize,
            token: u8,
            ttl: u64,
        },
        Release {
            k: usize,
            token: u8,
        },
        Update {
            k: usize,
            version: u64,
            len: usize,
            ttl: u64,
            stale: u64,
        },
        Invalidate {
            k: usize,
        },
        InvalidateMatching {
            all: bool,
        },
        Discard {
            k: usize,
        },
        Set {
            k: usize,
            len: usize,
            ttl: u64,
        },
        Get {
            k: usize,
            refresh: Option<u64>,
        },
        Accept {
            k: usize,
            len: usize,
            ttl: u64,
            stale: u64,
        },
        Ack {
            k: usize,
        },
        DeadLetter {
            k: usize,
        },
        Advance {
            ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let k = 0..IDS.len();
        let token = 0u8..3;
        let ttl = 1u64..3_000;
        let stale = prop_oneof![Just(0u64), 1u64..6_000];
        let len = 0usize..300;
        prop_oneof![
            (k.clone(), token.clone()).prop_map(|(k, token)| Op::Acquire { k, token }),
            (
                k.clone(),
                token.clone(),
                1u64..20,
                len.clone(),
                ttl.clone(),
                stale.clone()
            )
                .prop_map(|(k, token, version, len, ttl, stale)| Op::Fill {
                    k,
                    token,
                    version,
                    len,
                    ttl,
                    stale
                }),
            (k.clone(), token.clone(), ttl.clone()).prop_map(|(k, token, ttl)| Op::FillAbsent {
                k,
                token,
                ttl
            }),
            (k.clone(), token).prop_map(|(k, token)| Op::Release { k, token }),
            (k.clone(), 1u64..20, len.clone(), ttl.clone(), stale.clone()).prop_map(
                |(k, version, len, ttl, stale)| Op::Update {
                    k,
                    version,
                    len,
                    ttl,
                    stale
                }
            ),
            k.clone().prop_map(|k| Op::Invalidate { k }),
            any::<bool>().prop_map(|all| Op::InvalidateMatching { all }),
            k.clone().prop_map(|k| Op::Discard { k }),
            (k.clone(), len.clone(), ttl.clone()).prop_map(|(k, len, ttl)| Op::Set { k, len, ttl }),
            (k.clone(), prop::option::of(ttl.clone()))
                .prop_map(|(k, refresh)| Op::Get { k, refresh }),
            (k.clone(), len, ttl, stale).prop_map(|(k, len, ttl, stale)| Op::Accept {
                k,
                len,
                ttl,
                stale
            }),
            k.clone().prop_map(|k| Op::Ack { k }),
            k.prop_map(|k| Op::DeadLetter { k }),
            (0u64..4_000).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    /// The version of the entry's current write (pending copy, else value).
    async fn current(s: &MemoryStore, e: &EntryKeys) -> u64 {
        let pending = s.pending_copies(&[e]).await.unwrap().remove(0);
        let cur = match pending {
            Some(p) => Some(p),
            None => s.get(&e.value, None).await.unwrap(),
        };
        cur.and_then(|b| peek_version(&b)).unwrap_or(0)
    }

    async fn settle(s: &MemoryStore, e: &EntryKeys, dead: bool) {
        let Some(p) = s.pending_copies(&[e]).await.unwrap().remove(0) else {
            return;
        };
        let settled = Settled {
            id: "x",
            keys: e,
            version: peek_version(&p).unwrap_or(0),
            entry_ids: &[],
        };
        if dead {
            s.queue_dead_letter(&queue(), &[(settled, "refused", p)], 0)
                .await
                .unwrap();
        } else {
            s.queue_ack(&queue(), &[settled]).await.unwrap();
        }
    }

    async fn apply(s: &MemoryStore, es: &[EntryKeys], op: &Op) {
        let tok = |t: u8| ["A", "B", "C"][usize::from(t)];
        match *op {
            Op::Acquire { k, token } => {
                s.acquire(&[AcquireRequest {
                    keys: &es[k],
                    token: tok(token),
                    lease_ttl: ms(2_000),
                    value_ttl: ms(1_500),
                }])
                .await
                .unwrap();
            }
            Op::Fill {
                k,
                token,
                version,
                len,
                ttl,
                stale,
            } => {
                s.fill(&[FillRequest {
                    keys: &es[k],
                    token: tok(token),
                    value: FillValue::Value {
                        bytes: envelope(version, len),
                        version,
                    },
                    lifetimes: life(ttl, stale),
                }])
                .await
                .unwrap();
            }
            Op::FillAbsent { k, token, ttl } => {
                s.fill(&[FillRequest {
                    keys: &es[k],
                    token: tok(token),
                    value: FillValue::Absent,
                    lifetimes: life(ttl, 0),
                }])
                .await
                .unwrap();
            }
            Op::Release { k, token } => s.release(&[(&es[k], tok(token))]).await.unwrap(),
            Op::Update {
                k,
                version,
                len,
                ttl,
                stale,
            } => {
                s.update(&[UpdateRequest {
                    keys: &es[k],
                    bytes: envelope(version, len),
                    version,
                    lifetimes: life(ttl, stale),
                }])
                .await
                .unwrap();
            }
            Op::Invalidate { k } => {
                s.invalidate(&[&es[k]]).await.unwrap();
            }
            Op::InvalidateMatching { all } => {
                let glob = if all { "*" } else { "a*" };
                let p = kb().pattern(&Kind::PROFILE, glob).unwrap();
                s.invalidate_matching(&p).await.unwrap();
            }
            Op::Discard { k } => {
                if let Some(v) = s.get(&es[k].value, None).await.unwrap() {
                    s.discard(&es[k].value, &v).await.unwrap();
                }
            }
            Op::Set { k, len, ttl } => {
                s.set(&es[k].value, envelope(0, len), ms(ttl))
                    .await
                    .unwrap();
            }
            Op::Get { k, refresh } => {
                s.get(&es[k].value, refresh.map(ms)).await.unwrap();
            }
            Op::Accept { k, len, ttl, stale } => {
                let cur = current(s, &es[k]).await;
                s.accept(&AcceptRequest {
                    keys: &es[k],
                    queue: &queue(),
                    id: IDS[k],
                    expected_version: cur,
                    bytes: envelope(cur + 1, len),
                    version: cur + 1,
                    lifetimes: life(ttl, stale),
                    max_depth: 0,
                    max_age: Duration::ZERO,
                    min_replicas: 0,
                    replica_timeout: Duration::ZERO,
                })
                .await
                .unwrap();
            }
            Op::Ack { k } => settle(s, &es[k], false).await,
            Op::DeadLetter { k } => settle(s, &es[k], true).await,
            Op::Advance { ms: n } => s.advance(ms(n)),
        }
    }

    /// After everything expired and every pending copy is settled, reading
    /// each key once (lazy expiry, nothing test-only) empties the store.
    async fn drain(s: &MemoryStore, es: &[EntryKeys]) {
        s.advance(Duration::from_secs(3_600));
        for e in es {
            settle(s, e, false).await;
            s.get(&e.value, None).await.unwrap();
        }
        assert_exact(s);
        assert_eq!(s.used_bytes(), 0, "{:?}", s.audit());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any sequence of steps and clock moves keeps the byte count equal
        /// to the sizes of the slots held, and ends at zero once everything
        /// expired.
        #[test]
        fn byte_count_is_exact(
            ops in prop::collection::vec(op(), 1..120),
            small in any::<bool>(),
        ) {
            run(async {
                // Small: two shards of 600 bytes, so most steps evict.
                let s = if small {
                    MemoryStore::with_shards(2, 1_200)
                } else {
                    MemoryStore::with_shards(2, 1 << 20)
                };
                let es = entries();
                for op in &ops {
                    apply(&s, &es, op).await;
                    assert_exact(&s);
                }
                drain(&s, &es).await;
            });
        }
    }

    /// A long random run over many keys with short TTLs: the count never
    /// drifts, and it is back to zero once everything expired.
    #[test]
    fn soak_byte_count_stays_exact() {
        run(async {
            let mut rng = StdRng::seed_from_u64(11);
            let s = MemoryStore::with_shards(8, 64 * 1024);
            let es: Vec<EntryKeys> = (0..200)
                .map(|i| kb().entry(&Kind::PROFILE, &format!("s{i}")).unwrap())
                .collect();
            let all = kb().pattern(&Kind::PROFILE, "*").unwrap();
            for i in 0..30_000u32 {
                let e = &es[rng.random_range(0..es.len())];
                match rng.random_range(0..10) {
                    0..=3 => {
                        if s.get(&e.value, None).await.unwrap().is_none() {
                            let v = rng.random_range(1..1_000);
                            let l = life(rng.random_range(1..2_000), rng.random_range(0..4_000));
                            let len = rng.random_range(0..400);
                            try_fill(&s, e, v, len, l).await;
                        }
                    }
                    4 => {
                        let v = rng.random_range(1..1_000);
                        s.update(&[UpdateRequest {
                            keys: e,
                            bytes: envelope(v, 64),
                            version: v,
                            lifetimes: life(1_000, 3_000),
                        }])
                        .await
                        .unwrap();
                    }
                    5 => {
                        s.invalidate(&[e]).await.unwrap();
                    }
                    6 => {
                        let r = rng.random_range(1..3_000);
                        s.get(&e.value, Some(ms(r))).await.unwrap();
                    }
                    7 => {
                        let cur = current(&s, e).await;
                        let req = AcceptRequest {
                            keys: e,
                            queue: &queue(),
                            id: "x",
                            expected_version: cur,
                            bytes: envelope(cur + 1, 32),
                            version: cur + 1,
                            lifetimes: life(500, 0),
                            max_depth: 0,
                            max_age: Duration::ZERO,
                            min_replicas: 0,
                            replica_timeout: Duration::ZERO,
                        };
                        s.accept(&req).await.unwrap();
                    }
                    8 => settle(&s, e, rng.random_bool(0.2)).await,
                    _ => s.advance(ms(rng.random_range(0..200))),
                }
                if i % 5_000 == 4_999 {
                    s.invalidate_matching(&all).await.unwrap();
                }
                if i % 100 == 0 {
                    assert_exact(&s);
                }
            }
            assert_exact(&s);
            drain(&s, &es).await;
        });
    }
}
