//! The in-process store: the same entry protocol as the Redis scripts,
//! bounded in bytes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use indexmap::IndexMap;
use rand::Rng;

use super::{
    AcceptOutcome, AcceptRequest, AcquireRequest, Acquired, DeadLetter, FillOutcome, FillRequest,
    FillValue, QueueEntry, QueueKeys, QueueStats, Retry, Settled, Store, StoreResult,
    UpdateOutcome, UpdateRequest, version_newer,
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

#[derive(Debug, Default)]
struct Shard {
    slots: IndexMap<Box<str>, Slot>,
    plain: HashMap<Box<str>, Plain>,
    bytes: usize,
    ops: u32,
}

impl Shard {
    /// Applies `f` to the live slot of `key` (created if missing), keeping
    /// the byte count and dropping the slot if it ends up empty.
    fn with_slot<R>(
        &mut self,
        key: &str,
        now: Instant,
        tick: u32,
        f: impl FnOnce(&mut Slot) -> R,
    ) -> R {
        let idx = match self.slots.get_index_of(key) {
            Some(i) => i,
            None => {
                let slot = Slot {
                    touched: tick,
                    ..Slot::default()
                };
                self.bytes += slot.size(key);
                self.slots.insert_full(key.into(), slot).0
            }
        };
        let (k, slot) = self.slots.get_index_mut(idx).expect("index just found");
        let before = slot.size(k);
        slot.expire(now);
        slot.touched = tick;
        let r = f(slot);
        let after = slot.size(k);
        let empty = slot.is_empty();
        self.bytes = self.bytes + after - before;
        if empty {
            self.slots.swap_remove_index(idx);
            self.bytes -= after;
        }
        r
    }

    /// Reads a slot without creating one.
    fn peek(&mut self, key: &str, now: Instant, tick: u32) -> Option<&mut Slot> {
        let slot = self.slots.get_mut(key)?;
        slot.expire(now);
        slot.touched = tick;
        Some(slot)
    }

    /// Drops expired entries from a random sample (Redis's active expiry,
    /// amortised over operations instead of a background task).
    fn sweep(&mut self, now: Instant) {
        self.ops = self.ops.wrapping_add(1);
        if self.ops % 32 != 0 || self.slots.is_empty() {
            return;
        }
        let mut rng = rand::rng();
        for _ in 0..16.min(self.slots.len()) {
            let i = rng.random_range(0..self.slots.len());
            let (key, slot) = self.slots.get_index_mut(i).expect("index in range");
            let before = slot.size(key);
            slot.expire(now);
            if slot.is_empty() {
                self.bytes = self.bytes.saturating_sub(before);
                self.slots.swap_remove_index(i);
                if self.slots.is_empty() {
                    break;
                }
            }
        }
        self.plain.retain(|_, p| match p {
            Plain::Value(t) => t.live(now),
            Plain::Counter(_) => true,
        });
    }

    /// Evicts approximately least recently used entries until under `cap`.
    /// Entries holding a pending write-behind copy are never evicted.
    fn evict(&mut self, cap: usize) {
        let mut rng = rand::rng();
        let mut attempts = 0;
        while self.bytes > cap && !self.slots.is_empty() && attempts < 64 {
            attempts += 1;
            let mut victim: Option<usize> = None;
            for _ in 0..EVICTION_SAMPLES.min(self.slots.len()) {
                let i = rng.random_range(0..self.slots.len());
                if self.slots[i].pending.is_some() {
                    continue;
                }
                if victim.is_none_or(|v| self.slots[i].touched < self.slots[v].touched) {
                    victim = Some(i);
                }
            }
            if let Some((k, slot)) = victim.and_then(|v| self.slots.swap_remove_index(v)) {
                self.bytes = self.bytes.saturating_sub(slot.size(&k));
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
/// and by sampling.
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
    cap_per_shard: usize,
    started: Instant,
    queues: Mutex<HashMap<String, MemQueue>>,
    queued: tokio::sync::Notify,
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
                cap_per_shard: (max_bytes / n).max(1),
                started: Instant::now(),
                queues: Mutex::new(HashMap::new()),
                queued: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Bytes held, as charged against the bound.
    #[must_use]
    pub fn used_bytes(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).bytes).sum()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        lock(&self.inner.shards[(h as usize) % self.inner.shards.len()])
    }

    fn tick(&self, now: Instant) -> u32 {
        now.duration_since(self.inner.started).as_secs() as u32
    }

    /// Runs one entry step under its shard lock.
    fn step<R>(&self, keys: &EntryKeys, f: impl FnOnce(&mut Slot, Instant) -> R) -> R {
        let now = Instant::now();
        let tick = self.tick(now);
        let mut shard = self.shard(&keys.value);
        shard.sweep(now);
        let r = shard.with_slot(&keys.value, now, tick, |slot| f(slot, now));
        let cap = self.inner.cap_per_shard;
        shard.evict(cap);
        r
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
        let now = Instant::now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        if let Some(slot) = shard.peek(key, now, tick) {
            if let Some(v) = slot.value.as_mut() {
                if let Some(ttl) = refresh {
                    v.until = now + ttl;
                }
                return Ok(Some(v.v.clone()));
            }
            return Ok(None);
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
                    match &slot.lease {
                        Some(l) if &*l.v != r.token => Acquired::Busy { stale },
                        _ => {
                            slot.lease = Some(timed(r.token.into(), now, r.lease_ttl));
                            Acquired::Leased { stale }
                        }
                    }
                })
            })
            .collect())
    }

    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        Ok(reqs
            .iter()
            .map(|r| {
                self.step(r.keys, |slot, now| {
                    if slot.lease.as_ref().is_none_or(|l| &*l.v != r.token) {
                        return FillOutcome::LeaseLost;
                    }
                    slot.lease = None;
                    match &r.value {
                        FillValue::Absent => {
                            if !r.lifetimes.ttl.is_zero() {
                                slot.absent = Some(now + r.lifetimes.ttl);
                            }
                            FillOutcome::Stored
                        }
                        FillValue::Value { bytes, version } => {
                            let cached = slot.value.as_ref().and_then(|t| peek_version(&t.v));
                            if slot.value.is_some() && !version_newer(*version, cached) {
                                return FillOutcome::NotNewer;
                            }
                            slot.value = Some(timed(bytes.clone(), now, r.lifetimes.ttl));
                            if !r.lifetimes.stale_ttl.is_zero() {
                                slot.stale = Some(timed(bytes.clone(), now, r.lifetimes.stale_ttl));
                            }
                            slot.absent = None;
                            FillOutcome::Stored
                        }
                    }
                })
            })
            .collect())
    }

    async fn release(&self, entries: &[(&EntryKeys, &str)]) -> StoreResult<()> {
        for (keys, token) in entries {
            self.step(keys, |slot, _| {
                if slot.lease.as_ref().is_some_and(|l| &*l.v == *token) {
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
                    _ => u64::from(slot.invalidate()),
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
        let now = Instant::now();
        let mut n = 0;
        for shard in self.inner.shards.iter() {
            let mut shard = lock(shard);
            let mut freed = 0;
            shard.slots.retain(|k, slot| {
                if !pattern.matches_value_key(k) {
                    return true;
                }
                let before = slot.size(k);
                slot.expire(now);
                n += u64::from(slot.invalidate());
                freed += before - slot.size(k);
                !slot.is_empty()
            });
            shard.bytes = shard.bytes.saturating_sub(freed);
        }
        Ok(n)
    }

    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()> {
        let now = Instant::now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.with_slot(key, now, tick, |slot| {
            if slot.value.as_ref().is_some_and(|t| t.v == *seen) {
                slot.value = None;
            }
        });
        Ok(())
    }

    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()> {
        // A plain value lives in a slot like a cached one, so `get` and
        // `discard` see it the same way.
        let now = Instant::now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.sweep(now);
        shard.with_slot(key, now, tick, |slot| {
            slot.value = Some(timed(bytes, now, ttl));
        });
        let cap = self.inner.cap_per_shard;
        shard.evict(cap);
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
        let now = Instant::now();
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
        let now = Instant::now();
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
        let now = Instant::now();
        let tick = self.tick(now);
        Ok(entries
            .iter()
            .map(|e| {
                let mut shard = self.shard(&e.value);
                shard
                    .peek(&e.value, now, tick)
                    .and_then(|slot| slot.pending.clone())
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

    fn bounds_own_latency(&self) -> bool {
        true
    }

    fn describe(&self) -> &'static str {
        "memory"
    }
}
