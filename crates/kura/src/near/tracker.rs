//! The process-wide side of the near cache: what the invalidation stream
//! says, and which fills may still land.
//!
//! One [`Tracker`] per [`crate::Cache`] with a near cache. It receives the
//! store's invalidation stream ([`TrackingSink`]) and keeps:
//!
//! - a **generation**, bumped by every flush (stream lost, reconnected,
//!   topology moved); an L1 entry or a fill of an older generation is void;
//! - the **liveness** of the stream: until when L1 entries may be served
//!   (the last confirmation plus the allowed silence);
//! - one **ticket per fill in flight**, by value key: a fill lands only if
//!   its own ticket is still the key's ticket when the reply arrives. An
//!   invalidation of the key removes the ticket, so a reply that raced an
//!   invalidation is dropped; a second fill of the same key replaces the
//!   ticket, so an older fill cannot land over a newer one. There is never
//!   one placeholder shared by several fills.
//!
//! An L1 insert happens under the lock of the key's ticket shard, and an
//! invalidation evicts under the same lock, so an insert can never slip in
//! after the invalidation that should have removed it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::key::{KeyPattern, Kind};
use crate::store::{Tracking, TrackingSink};

const SHARDS: usize = 16;

/// How many recent writes of this process are remembered to time their
/// invalidation's round trip (`cache_l1_invalidation_delay_seconds`).
const OWN_WRITES: usize = 4096;

/// What a [`Tracker`] asks of an L1 it feeds (one per reader handle).
pub(crate) trait NearLayer: Send + Sync {
    /// Drops the entry of `id`; `true` if there was one.
    fn evict(&self, id: &str) -> bool;
    /// Drops every entry.
    fn clear(&self);
}

struct Registered {
    kind: Kind,
    pattern: KeyPattern,
    layer: Weak<dyn NearLayer>,
}

/// A fill in flight; removes its ticket when dropped unused.
pub(crate) struct Ticket {
    tracker: Arc<Tracker>,
    key: Box<str>,
    token: u64,
    generation: u64,
}

impl Ticket {
    /// The generation the fill began in.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut shard = self.tracker.shard(&self.key);
        if shard.get(&*self.key) == Some(&self.token) {
            shard.remove(&*self.key);
        }
    }
}

/// A key whose news goes elsewhere, and where.
type Forward = (Box<str>, Weak<dyn TrackingSink>);

/// See the module docs.
pub(crate) struct Tracker {
    epoch: Instant,
    generation: AtomicU64,
    /// Milliseconds since `epoch` until which L1 may be served (0: not
    /// live).
    live_until_ms: AtomicU64,
    max_silence: Duration,
    pending: [Mutex<HashMap<Box<str>, u64>>; SHARDS],
    next_token: AtomicU64,
    layers: RwLock<Vec<Registered>>,
    own_writes: Mutex<HashMap<Box<str>, Instant>>,
    handle: Mutex<Option<Tracking>>,
    /// Where the stream's news of another key goes (the cache's stamps,
    /// see [`crate::tags`]: one stream carries both).
    forward: RwLock<Option<Forward>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tracker {
    pub(crate) fn new(max_silence: Duration) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            generation: AtomicU64::new(1),
            live_until_ms: AtomicU64::new(0),
            max_silence,
            pending: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_token: AtomicU64::new(1),
            layers: RwLock::new(Vec::new()),
            own_writes: Mutex::new(HashMap::new()),
            handle: Mutex::new(None),
            forward: RwLock::new(None),
        })
    }

    /// Hands the stream's news of `key` (and its liveness) to `sink`.
    pub(crate) fn forward(&self, key: &str, sink: Weak<dyn TrackingSink>) {
        *self
            .forward
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((key.into(), sink));
    }

    fn forwarded(&self) -> Option<(Box<str>, Arc<dyn TrackingSink>)> {
        let f = self
            .forward
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (key, sink) = f.as_ref()?;
        Some((key.clone(), sink.upgrade()?))
    }

    /// Keeps the store's tracking task for as long as the tracker lives.
    pub(crate) fn hold(&self, tracking: Tracking) {
        *lock(&self.handle) = Some(tracking);
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<Box<str>, u64>> {
        // FNV-1a: cheap, and good enough to spread keys over 16 locks.
        let mut h: u32 = 0x811c_9dc5;
        for b in key.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        lock(&self.pending[h as usize % SHARDS])
    }

    /// The current generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the stream was confirmed recently enough to serve L1.
    pub(crate) fn live(&self) -> bool {
        self.ms(Instant::now()) < self.live_until_ms.load(Ordering::Acquire)
    }

    /// Registers an L1 fed by invalidations of `kind`'s value keys.
    pub(crate) fn register(&self, kind: Kind, pattern: KeyPattern, layer: Weak<dyn NearLayer>) {
        let mut layers = self
            .layers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        layers.retain(|r| r.layer.strong_count() > 0);
        layers.push(Registered {
            kind,
            pattern,
            layer,
        });
    }

    /// Takes a ticket for a fill of `key`, before its read is sent.
    pub(crate) fn begin(self: &Arc<Self>, key: &str) -> Ticket {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation();
        self.shard(key).insert(key.into(), token);
        Ticket {
            tracker: self.clone(),
            key: key.into(),
            token,
            generation,
        }
    }

    /// Runs `insert` if `ticket` is still its key's ticket, of the current
    /// generation, with the stream live; under the key's shard lock.
    /// Returns whether it ran.
    pub(crate) fn finish(&self, ticket: &Ticket, insert: impl FnOnce()) -> bool {
        let mut shard = self.shard(&ticket.key);
        let mine = shard.get(&*ticket.key) == Some(&ticket.token);
        if mine {
            shard.remove(&*ticket.key);
        }
        let ok = mine && ticket.generation == self.generation() && self.live();
        if ok {
            insert();
        }
        ok
    }

    /// A write of this process to the value key `key`, after the store
    /// applied it: evicts the key from every L1 at once (read-your-writes
    /// here, without waiting for the push) and voids fills in flight.
    pub(crate) fn evict_own(&self, key: &str) {
        {
            let _shard = self.shard_and_remove(key);
            self.evict_layers(key);
        }
        let mut own = lock(&self.own_writes);
        if own.len() >= OWN_WRITES {
            own.clear();
        }
        own.insert(key.into(), Instant::now());
    }

    /// Drops every L1 entry of `kind` (a pattern invalidation or clear by
    /// this process).
    pub(crate) fn clear_kind(&self, kind: &Kind) {
        let registered: Vec<_> = self
            .registered()
            .into_iter()
            .filter(|(k, _, _)| k.name() == kind.name())
            .collect();
        let mut all = self.lock_all();
        // Fills in flight of the kind are void too.
        for shard in &mut all {
            shard.retain(|key, _| !registered.iter().any(|(_, p, _)| p.id_of(key).is_some()));
        }
        for (_, _, layer) in &registered {
            if let Some(l) = layer.upgrade() {
                l.clear();
            }
        }
    }

    fn shard_and_remove(&self, key: &str) -> MutexGuard<'_, HashMap<Box<str>, u64>> {
        let mut shard = self.shard(key);
        shard.remove(key);
        shard
    }

    fn registered(&self) -> Vec<(Kind, KeyPattern, Weak<dyn NearLayer>)> {
        self.layers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|r| (r.kind, r.pattern.clone(), r.layer.clone()))
            .collect()
    }

    fn evict_layers(&self, key: &str) -> bool {
        let layers = self
            .layers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut evicted = false;
        for r in layers.iter() {
            if let (Some(id), Some(layer)) = (r.pattern.id_of(key), r.layer.upgrade()) {
                evicted |= layer.evict(&id);
            }
        }
        evicted
    }

    fn lock_all(&self) -> Vec<MutexGuard<'_, HashMap<Box<str>, u64>>> {
        self.pending.iter().map(lock).collect()
    }

    /// Voids every L1 entry and fill in flight (the stamps moved: a type
    /// or tag was cleared).
    pub(crate) fn flush_all(&self, reason: &'static str) {
        self.flush(reason);
    }

    /// Voids every L1 entry and fill in flight.
    fn flush(&self, reason: &'static str) {
        let mut all = self.lock_all();
        self.generation.fetch_add(1, Ordering::AcqRel);
        for shard in &mut all {
            shard.clear();
        }
        for (_, _, layer) in self.registered() {
            if let Some(l) = layer.upgrade() {
                l.clear();
            }
        }
        drop(all);
        metrics::counter!("cache_l1_flushes_total", "reason" => reason).increment(1);
    }
}

impl TrackingSink for Tracker {
    fn invalidated(&self, keys: Option<&[&[u8]]>) {
        let forward = self.forwarded();
        let Some(keys) = keys else {
            if let Some((_, f)) = &forward {
                f.invalidated(None);
            }
            self.flush("server_flush");
            return;
        };
        for raw in keys {
            let Ok(key) = std::str::from_utf8(raw) else {
                continue;
            };
            if let Some((k, f)) = &forward {
                if **k == *key {
                    f.invalidated(Some(&[*raw]));
                    continue;
                }
            }
            // A "not found" marker's change concerns its entry's value key
            // (a negative L1 entry, a negative fill in flight).
            let value_key = crate::key::value_key_of_absent(key);
            let key = value_key.as_deref().unwrap_or(key);
            let evicted = {
                let _shard = self.shard_and_remove(key);
                self.evict_layers(key)
            };
            metrics::counter!("cache_l1_invalidations_total").increment(1);
            if evicted {
                metrics::counter!("cache_l1_evictions_total", "reason" => "invalidated")
                    .increment(1);
            }
            let own = lock(&self.own_writes).remove(key);
            if let Some(at) = own {
                metrics::histogram!("cache_l1_invalidation_delay_seconds")
                    .record(at.elapsed().as_secs_f64());
            }
        }
    }

    fn confirmed(&self, sent_at: Instant) {
        let until = self.ms(sent_at) + self.max_silence.as_millis() as u64;
        self.live_until_ms.fetch_max(until, Ordering::AcqRel);
        if let Some((_, f)) = self.forwarded() {
            f.confirmed(sent_at);
        }
    }

    fn lost(&self, reason: &'static str) {
        if let Some((_, f)) = self.forwarded() {
            f.lost(reason);
        }
        self.live_until_ms.store(0, Ordering::Release);
        self.flush(reason);
        tracing::debug!(reason, "near cache flushed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;

    struct Recorder(Mutex<HashMap<String, u32>>);

    impl NearLayer for Recorder {
        fn evict(&self, id: &str) -> bool {
            lock(&self.0).remove(id).is_some()
        }
        fn clear(&self) {
            lock(&self.0).clear();
        }
    }

    fn setup() -> (Arc<Tracker>, Arc<Recorder>, String) {
        let t = Tracker::new(Duration::from_secs(60));
        let keys = KeyBuilder::new("ns", false).unwrap();
        let layer = Arc::new(Recorder(Mutex::new(HashMap::new())));
        let weak: Weak<dyn NearLayer> = Arc::downgrade(&(layer.clone() as Arc<dyn NearLayer>));
        t.register(
            Kind::new("profile"),
            keys.pattern(&Kind::new("profile"), "*").unwrap(),
            weak,
        );
        t.confirmed(Instant::now());
        let key = keys.value_key(&Kind::new("profile"), "u1").unwrap();
        (t, layer, key)
    }

    fn fill(t: &Tracker, layer: &Recorder, ticket: &Ticket, v: u32) -> bool {
        t.finish(ticket, || {
            lock(&layer.0).insert("u1".into(), v);
        })
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_dropped() {
        let (t, layer, key) = setup();
        let a = t.begin(&key);
        t.invalidated(Some(&[key.as_bytes()]));
        assert!(!fill(&t, &layer, &a, 1));
        assert!(lock(&layer.0).is_empty());
        let b = t.begin(&key);
        assert!(fill(&t, &layer, &b, 2));
        assert_eq!(lock(&layer.0).get("u1"), Some(&2));
    }

    #[test]
    fn an_older_fill_cannot_land_over_a_newer_ticket() {
        let (t, layer, key) = setup();
        let old = t.begin(&key);
        t.invalidated(Some(&[key.as_bytes()]));
        let new = t.begin(&key);
        // The old reply arrives while the new fill is in flight: with one
        // shared placeholder it would land here.
        assert!(!fill(&t, &layer, &old, 1));
        assert!(fill(&t, &layer, &new, 2));
        assert_eq!(lock(&layer.0).get("u1"), Some(&2));
    }

    #[test]
    fn a_lost_stream_flushes_and_stops_serving() {
        let (t, layer, key) = setup();
        let a = t.begin(&key);
        assert!(fill(&t, &layer, &a, 1));
        let b = t.begin(&key);
        t.lost("test");
        assert!(lock(&layer.0).is_empty(), "flushed");
        assert!(!t.live());
        assert!(!fill(&t, &layer, &b, 2), "a fill from before the loss");
        t.confirmed(Instant::now());
        assert!(!fill(&t, &layer, &b, 2), "still: its generation is gone");
        let c = t.begin(&key);
        assert!(fill(&t, &layer, &c, 3));
    }

    #[test]
    fn liveness_runs_out_without_confirmations() {
        let t = Tracker::new(Duration::from_millis(30));
        assert!(!t.live(), "not live before the first confirmation");
        t.confirmed(Instant::now());
        assert!(t.live());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.live());
    }

    /// One step of a randomized interleaving between one key's writes (each
    /// sends a push, delivered later, in order), reads (a ticket, then the
    /// server answers with the version current then, delivered later) and
    /// stream losses.
    #[derive(Debug, Clone)]
    enum Step {
        /// A write on the server: the version goes up, its push is queued.
        Write,
        /// The oldest queued push arrives.
        Push,
        /// A read is sent (ticket taken) and the server answers at once
        /// with the current version; the answer is queued.
        Send,
        /// The answer of the `n`-th read in flight arrives (and fills).
        Reply(usize),
        /// The stream is lost and comes back (flush, then confirmed).
        Reconnect,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => Just(Step::Write),
            3 => Just(Step::Push),
            4 => Just(Step::Send),
            4 => (0usize..4).prop_map(Step::Reply),
            1 => Just(Step::Reconnect),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// Once every push and answer has arrived, L1 holds nothing or the
        /// current version, whatever the interleaving; and it never holds a
        /// version older than one whose push already arrived.
        #[test]
        fn fills_never_leave_an_older_version(steps in proptest::collection::vec(step(), 1..60)) {
            let (t, layer, key) = setup();
            let mut version = 1u32;
            let mut pushes: std::collections::VecDeque<u32> = Default::default();
            let mut replies: Vec<(Ticket, u32)> = Vec::new();
            let mut pushed_up_to = 0u32;
            for s in steps {
                match s {
                    Step::Write => {
                        version += 1;
                        pushes.push_back(version);
                    }
                    Step::Push => {
                        if let Some(v) = pushes.pop_front() {
                            pushed_up_to = v;
                            t.invalidated(Some(&[key.as_bytes()]));
                        }
                    }
                    Step::Send => replies.push((t.begin(&key), version)),
                    Step::Reply(i) => {
                        if !replies.is_empty() {
                            let (ticket, v) = replies.remove(i % replies.len());
                            fill(&t, &layer, &ticket, v);
                        }
                    }
                    Step::Reconnect => {
                        t.lost("test");
                        t.confirmed(Instant::now());
                    }
                }
                if let Some(&held) = lock(&layer.0).get("u1") {
                    proptest::prop_assert!(
                        held >= pushed_up_to,
                        "L1 holds v{held} after the push of v{pushed_up_to} arrived"
                    );
                }
            }
            while let Some(v) = pushes.pop_front() {
                pushed_up_to = v;
                t.invalidated(Some(&[key.as_bytes()]));
            }
            for (ticket, v) in replies.drain(..) {
                fill(&t, &layer, &ticket, v);
            }
            let held = lock(&layer.0).get("u1").copied();
            proptest::prop_assert!(
                held.is_none_or(|h| h == version),
                "at rest L1 holds {held:?}, current v{version} (pushed up to v{pushed_up_to})"
            );
        }
    }

    #[test]
    fn abandoned_tickets_leave_nothing_behind() {
        let (t, _layer, key) = setup();
        drop(t.begin(&key));
        assert!(t.pending.iter().all(|s| lock(s).is_empty()));
    }
}
