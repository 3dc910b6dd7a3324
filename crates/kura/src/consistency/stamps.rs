//! This process's copy of the namespace's clear and tag stamps (see
//! [`crate::tags`]), and when it can be trusted without asking the store.
//!
//! The copy is trusted when nothing announced a change since it was read
//! and either the store is in this process (its change counter,
//! [`Store::stamps_version`], is the one the copy was read at) or the
//! store's invalidation stream for the stamps key was confirmed within the
//! allowed silence. Otherwise the next check reads the hash again (one
//! read at a time; the others wait for it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::codec::Meta;
use crate::store::{StampStore, StoreResult, Tracking, TrackingSink, TrackingStore};
use crate::tags::{EPOCH_FIELD, ID_FIELD, kind_field};

/// The stamps as last read.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// The epoch counter.
    pub(crate) epoch: u64,
    /// The hash's incarnation (0: no hash).
    id: u64,
    kinds: HashMap<String, u64>,
    tags: HashMap<String, u64>,
    /// The highest stamp of any type or tag (0: nothing was ever cleared).
    max: u64,
}

impl Table {
    fn from_fields(fields: Vec<(String, u64)>) -> Self {
        let mut t = Table::default();
        for (f, v) in fields {
            if f == EPOCH_FIELD {
                t.epoch = v;
            } else if f == ID_FIELD {
                t.id = v;
            } else if let Some(k) = f.strip_prefix("kind:") {
                t.kinds.insert(k.to_owned(), v);
                t.max = t.max.max(v);
            } else if let Some(g) = f.strip_prefix("tag:") {
                t.tags.insert(g.to_owned(), v);
                t.max = t.max.max(v);
            }
        }
        t
    }

    /// Whether a value of `kind` with `tags` whose load began at `epoch` is
    /// still good: no clear of `kind`, invalidation of its implicit tag
    /// `kind:<kind>` or of one of `tags` came after `epoch`.
    fn admits_loaded<'a>(
        &self,
        kind: &str,
        epoch: u64,
        tags: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        if self.max <= epoch {
            return true;
        }
        let after = |s: Option<&u64>| s.is_some_and(|&s| s > epoch);
        !after(self.kinds.get(kind))
            && !after(self.tags.get(&kind_field(kind)))
            && !tags.into_iter().any(|t| after(self.tags.get(t)))
    }

    /// Whether a value of `kind` with envelope `meta` may be served.
    pub(crate) fn admits(&self, kind: &str, meta: &Meta<'_>) -> bool {
        self.admits_loaded(kind, meta.epoch, meta.tags())
    }

    /// Whether values of `kind` with `tags` whose loads began at `epoch`
    /// may be written.
    pub(crate) fn admits_tags(&self, kind: &str, epoch: u64, tags: &[String]) -> bool {
        self.admits_loaded(kind, epoch, tags.iter().map(String::as_str))
    }
}

/// See the module docs.
pub(crate) struct Stamps {
    key: String,
    table: RwLock<Arc<Table>>,
    /// A change was announced (or the copy was never read).
    dirty: AtomicBool,
    /// The local store's change counter the copy was read at.
    read_at_version: AtomicU64,
    started: Instant,
    /// Milliseconds since `started` until which the stream counts as live
    /// (0: not live).
    live_until_ms: AtomicU64,
    max_silence: Duration,
    reading: tokio::sync::Mutex<()>,
    /// The copy's highest stamp, read without the lock (0: nothing was
    /// ever cleared, every value is admitted).
    max: AtomicU64,
    tracking: Mutex<Option<Tracking>>,
    /// Emptied when the stamps change (the near caches).
    on_change: Option<Arc<crate::near::Tracker>>,
}

impl Stamps {
    pub(crate) fn new(
        key: String,
        max_silence: Duration,
        on_change: Option<Arc<crate::near::Tracker>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            key,
            table: RwLock::new(Arc::new(Table::default())),
            dirty: AtomicBool::new(true),
            read_at_version: AtomicU64::new(u64::MAX),
            started: Instant::now(),
            live_until_ms: AtomicU64::new(0),
            max_silence,
            reading: tokio::sync::Mutex::new(()),
            max: AtomicU64::new(0),
            tracking: Mutex::new(None),
            on_change,
        })
    }

    /// Starts the store's stream for the stamps key, if it has one.
    pub(crate) fn start(self: &Arc<Self>, store: &dyn TrackingStore) {
        let sink: Arc<dyn TrackingSink> = self.clone();
        let weak: Weak<dyn TrackingSink> = Arc::downgrade(&sink);
        drop(sink);
        if let Some(t) = store.track(vec![self.key.clone()], weak) {
            *self
                .tracking
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(t);
        }
    }

    /// The key of the stamps hash.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    fn trusted(&self, store: &dyn StampStore) -> bool {
        if self.dirty.load(Ordering::Acquire) {
            return false;
        }
        match store.stamps_version() {
            Some(v) => v == self.read_at_version.load(Ordering::Acquire),
            None => self.ms(Instant::now()) < self.live_until_ms.load(Ordering::Acquire),
        }
    }

    /// The copy, without asking the store: `None` when it cannot be
    /// trusted now.
    pub(crate) fn cached(&self, store: &dyn StampStore) -> Option<Arc<Table>> {
        if !self.trusted(store) {
            return None;
        }
        Some(
            self.table
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }

    /// Whether a value of `kind` in `bytes` may be served, from the copy
    /// alone; `None` when the copy cannot be trusted now.
    pub(crate) fn admits_now(
        &self,
        store: &dyn StampStore,
        kind: &str,
        bytes: &[u8],
    ) -> Option<bool> {
        if !self.trusted(store) {
            return None;
        }
        let max = self.max.load(Ordering::Acquire);
        if max == 0 {
            return Some(true);
        }
        let meta = crate::codec::peek_meta(bytes);
        if meta.epoch >= max {
            return Some(true);
        }
        Some(
            self.table
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .admits(kind, &meta),
        )
    }

    /// The last copy read, trusted or not (what a fill records).
    pub(crate) fn last(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A trusted copy, reading the hash when needed.
    pub(crate) async fn current(
        &self,
        store: &dyn StampStore,
        read: impl std::future::Future<Output = StoreResult<Vec<(String, u64)>>>,
    ) -> StoreResult<Arc<Table>> {
        if let Some(t) = self.cached(store) {
            return Ok(t);
        }
        let _one = self.reading.lock().await;
        if let Some(t) = self.cached(store) {
            return Ok(t);
        }
        // Cleared before the read: a change announced during it marks the
        // copy dirty again.
        self.dirty.store(false, Ordering::Release);
        let version = store.stamps_version();
        let fields = match read.await {
            Ok(f) => f,
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        };
        Ok(self.install(Table::from_fields(fields), version))
    }

    /// Takes a freshly read table; empties the near caches if it moved.
    fn install(&self, table: Table, version: Option<u64>) -> Arc<Table> {
        let table = Arc::new(table);
        let moved = {
            let mut t = self
                .table
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let moved = t.epoch != table.epoch || t.id != table.id;
            // The epoch only grows within one incarnation of the hash: a
            // read that raced a newer one loses. A hash that is gone or was
            // made again replaces the copy (see `crate::tags`, "Losing the
            // hash"): its clears are above every epoch the old one gave.
            if table.epoch >= t.epoch || table.id != t.id {
                *t = table.clone();
                self.max.store(table.max, Ordering::Release);
            }
            moved
        };
        if let Some(v) = version {
            self.read_at_version.store(v, Ordering::Release);
        }
        if moved {
            if let Some(n) = &self.on_change {
                n.flush_all("cleared");
            }
        }
        table
    }

    /// After this process's own clear: the copy must be read again before
    /// anything is served, and the near caches are emptied now.
    pub(crate) fn changed_here(&self) {
        self.dirty.store(true, Ordering::Release);
        if let Some(n) = &self.on_change {
            n.flush_all("cleared");
        }
    }
}

impl TrackingSink for Stamps {
    fn invalidated(&self, _keys: Option<&[&[u8]]>) {
        // The only key tracked is the hash (or a flush of everything).
        self.dirty.store(true, Ordering::Release);
        if let Some(n) = &self.on_change {
            n.flush_all("cleared");
        }
    }

    fn confirmed(&self, sent_at: Instant) {
        let until = self.ms(sent_at) + self.max_silence.as_millis() as u64;
        self.live_until_ms.fetch_max(until, Ordering::AcqRel);
    }

    fn lost(&self, _reason: &'static str) {
        self.live_until_ms.store(0, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: a value loaded at `epoch` of `kind` with `tags` is
    /// served unless some bump after `epoch` named its kind, its kind's
    /// tag or one of its tags.
    fn model(bumps: &[(String, u64)], kind: &str, tags: &[String], epoch: u64) -> bool {
        bumps.iter().all(|(field, at)| {
            let covers = *field == format!("kind:{kind}")
                || *field == format!("tag:kind:{kind}")
                || tags.iter().any(|t| *field == format!("tag:{t}"));
            !covers || *at <= epoch
        })
    }

    /// Plays `ops` against a hash like the store's (each bump raises the
    /// epoch and sets its field) and checks every value against the model,
    /// through the envelope as a reader sees it and as a fill is checked.
    fn check(ops: &[(bool, u8, u8, Vec<u8>)]) {
        let kinds = ["profile", "settings"];
        let mut hash: HashMap<String, u64> = HashMap::new();
        let mut bumps: Vec<(String, u64)> = Vec::new();
        let mut epoch = 0;
        for (bump, k, t, value_tags) in ops {
            let kind = kinds[usize::from(*k) % 2];
            if *bump {
                epoch += 1;
                let field = match t % 3 {
                    0 => format!("kind:{kind}"),
                    1 => format!("tag:kind:{kind}"),
                    _ => format!("tag:t{}", t % 5),
                };
                hash.insert("epoch".to_owned(), epoch);
                hash.insert(field.clone(), epoch);
                bumps.push((field, epoch));
                continue;
            }
            let table = Table::from_fields(hash.clone().into_iter().collect());
            let tags: Vec<String> = value_tags.iter().map(|x| format!("t{}", x % 5)).collect();
            let loaded_at = u64::from(*t) % (epoch + 1);
            let enc = crate::codec::encode_with(
                &serde_json::json!({"a": 1}),
                1,
                1 << 16,
                &crate::codec::Header {
                    expires_ms: 0,
                    epoch: loaded_at,
                    tags: &tags,
                },
            )
            .unwrap();
            let want = model(&bumps, kind, &tags, loaded_at);
            let meta = crate::codec::peek_meta(&enc.envelope);
            assert_eq!(
                table.admits(kind, &meta),
                want,
                "{kind} {tags:?} at {loaded_at}"
            );
            assert_eq!(table.admits_tags(kind, loaded_at, &tags), want);
        }
    }

    proptest! {
        #[test]
        fn admits_exactly_what_no_later_bump_covers(
            ops in proptest::collection::vec(
                (any::<bool>(), any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..3)),
                1..200,
            )
        ) {
            check(&ops);
        }
    }

    /// A long run of reads of the hash arriving out of order: the copy only
    /// ever moves forward, and its quick bound is always its own highest
    /// stamp.
    #[test]
    fn soak_the_copy_never_moves_back() {
        let stamps = Stamps::new("ns:~stamps".into(), Duration::from_secs(1), None);
        let mut seen_max = 0;
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 1..=100_000u64 {
            // xorshift: a read of an epoch up to 50 behind the newest.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let epoch = i.saturating_sub(state % 50);
            let fields = vec![
                ("epoch".to_owned(), epoch),
                (format!("tag:t{}", epoch % 7), epoch),
            ];
            stamps.install(Table::from_fields(fields), None);
            seen_max = seen_max.max(epoch);
            let last = stamps.last();
            assert_eq!(last.epoch, seen_max, "at {i}");
            assert_eq!(stamps.max.load(Ordering::Acquire), last.max);
        }
    }

    /// A hash that is gone, or made again, replaces the copy even with a
    /// lower epoch; within one incarnation the copy never moves back.
    #[test]
    fn a_new_incarnation_replaces_the_copy() {
        let stamps = Stamps::new("ns:~stamps".into(), Duration::from_secs(1), None);
        let install = |fields: &[(&str, u64)]| {
            stamps.install(table(fields), None);
            let t = stamps.last();
            (t.epoch, t.id)
        };
        assert_eq!(
            install(&[("epoch", 500), ("id", 100), ("kind:profile", 500)]),
            (500, 100)
        );
        assert_eq!(
            install(&[("epoch", 400), ("id", 100)]),
            (500, 100),
            "an older read loses"
        );
        // The hash is gone: nothing is cleared any more.
        assert_eq!(install(&[]), (0, 0));
        assert!(stamps.last().admits_tags("profile", 0, &[]));
        assert_eq!(stamps.max.load(Ordering::Acquire), 0);
        // Made again by a clear.
        assert_eq!(
            install(&[("epoch", 900), ("id", 900), ("kind:profile", 900)]),
            (900, 900)
        );
        assert!(!stamps.last().admits_tags("profile", 500, &[]));
    }

    fn table(fields: &[(&str, u64)]) -> Table {
        Table::from_fields(fields.iter().map(|(f, v)| ((*f).to_owned(), *v)).collect())
    }

    #[test]
    fn admits_by_kind_and_tag() {
        let t = table(&[("epoch", 5), ("kind:profile", 3), ("tag:tenant:a", 5)]);
        let bytes = |epoch: u64, tags: &[&str]| {
            let tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
            crate::codec::encode_with(
                &serde_json::json!({"a": 1}),
                1,
                1000,
                &crate::codec::Header {
                    expires_ms: 0,
                    epoch,
                    tags: &tags,
                },
            )
            .unwrap()
            .envelope
        };
        let check = |b: &bytes::Bytes, kind: &str| t.admits(kind, &crate::codec::peek_meta(b));
        // Loaded before the profile clear at 3: refused; after: served.
        assert!(!check(&bytes(2, &[]), "profile"));
        assert!(check(&bytes(3, &[]), "profile"));
        // Every value carries its kind's tag.
        let t2 = table(&[("epoch", 2), ("tag:kind:settings", 2)]);
        assert!(!t2.admits("settings", &crate::codec::peek_meta(&bytes(1, &[]))));
        assert!(t2.admits("profile", &crate::codec::peek_meta(&bytes(1, &[]))));
        // Another type is untouched by the profile clear.
        assert!(check(&bytes(0, &[]), "settings"));
        // The tag invalidated at 5 refuses what began before it.
        assert!(!check(&bytes(4, &["tenant:a"]), "settings"));
        assert!(check(&bytes(4, &["tenant:b"]), "settings"));
        assert!(check(&bytes(5, &["tenant:a"]), "profile"));
        assert!(!t.admits_tags("profile", 2, &[]));
        assert!(!t.admits_tags("x", 4, &["tenant:a".to_owned()]));
        assert!(t.admits_tags("x", 4, &["tenant:b".to_owned()]));
        // Nothing cleared: everything admitted.
        let empty = Table::default();
        assert!(empty.admits("profile", &crate::codec::peek_meta(&bytes(0, &["t"]))));
    }
}
