//! The replay of pending invalidations: the journal
//! ([`crate::consistency::journal`]) applied to the store once it answers
//! again, in a task of its own, bounded as a whole.

use std::sync::atomic::Ordering;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::StoreError;
use crate::key::{EntryKeys, KeyPattern, Kind};
use crate::store::StoreResult;

use super::{CacheInner, lock};
use crate::consistency::journal::Pending;

/// Clears the running flag however a replay task ends.
struct Running<'a>(&'a CacheInner);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.replay_running.store(false, Ordering::Release);
    }
}

impl CacheInner {
    /// Remembers invalidations that failed, to apply before the keys are
    /// read from the cache again.
    pub(crate) fn defer(&self, kind: Kind, entries: impl IntoIterator<Item = EntryKeys>) {
        let mut p = lock(&self.pending);
        for e in entries {
            let g = p.next_generation();
            p.entries.insert(e.value.clone(), (kind, e, g));
        }
        if p.entries.len() > self.pending_limit {
            // Too many to track one by one: distrust the affected types
            // wholesale; the replay clears them by pattern.
            let kinds: std::collections::HashSet<Kind> =
                p.entries.values().map(|(k, _, _)| *k).collect();
            tracing::warn!(
                entries = p.entries.len(),
                "too many pending invalidations: the affected types will be cleared"
            );
            p.entries.clear();
            for k in kinds {
                if let Ok(pat) = self.keys.pattern(&k, "*") {
                    p.add_pattern(pat);
                }
            }
        }
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        self.has_pending.store(true, Ordering::Release);
    }

    /// Remembers a pattern invalidation that failed.
    pub(crate) fn defer_pattern(&self, pattern: KeyPattern) {
        let mut p = lock(&self.pending);
        p.add_pattern(pattern);
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        self.has_pending.store(true, Ordering::Release);
    }

    /// Whether `key` (of `kind`) has an invalidation pending, itself or by a
    /// pattern over its type: its cached value must not be used until the
    /// replay applied it.
    pub(crate) fn distrusts(&self, kind: &Kind, key: &str) -> bool {
        if !self.has_pending.load(Ordering::Acquire) {
            return false;
        }
        let p = lock(&self.pending);
        p.entries.contains_key(key) || p.patterns.keys().any(|(k, _)| *k == kind.name())
    }

    /// Applies the pending invalidation of `key` now, before the caller
    /// writes the key unconditionally ([`Cache::put`](super::Cache::put)):
    /// a replay afterwards would delete what it wrote.
    ///
    /// # Errors
    ///
    /// The store's error; [`StoreErrorKind::Unavailable`](crate::error::StoreErrorKind::Unavailable) while a pattern over
    /// the key's type is pending (the replay would delete the write too).
    pub(crate) async fn apply_pending_of(&self, kind: &Kind, key: &str) -> StoreResult<()> {
        if !self.has_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let entry = {
            let p = lock(&self.pending);
            if p.patterns.keys().any(|(k, _)| *k == kind.name()) {
                return Err(StoreError::unavailable());
            }
            match p.entries.get(key) {
                Some((_, e, g)) => (e.clone(), *g),
                None => return Ok(()),
            }
        };
        self.call(None, self.store.invalidate(&[&entry.0])).await?;
        let mut p = lock(&self.pending);
        if p.entries.get(key).is_some_and(|(_, _, g)| *g == entry.1) {
            p.entries.remove(key);
        }
        self.settle_pending(&p);
        Ok(())
    }

    /// Starts a replay unless one is running or a failed one ended less
    /// than a flush interval ago (a store call found something pending).
    pub(super) fn kick_replay(&self) {
        if self.replay_running.load(Ordering::Acquire) {
            return;
        }
        let not_before = *lock(&self.replay_not_before);
        if not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        drop(self.start_replay());
    }

    /// Starts a replay as a task of its own, unless one is running; its
    /// handle answers how it ended. `None` when one was running already (or
    /// no Tokio runtime is there to run it).
    pub(super) fn start_replay(&self) -> Option<JoinHandle<StoreResult<()>>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let me = self.me.upgrade()?;
        if self
            .replay_running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return None;
        }
        Some(rt.spawn(async move {
            let _running = Running(&me);
            let r = match tokio::time::timeout(me.replay_timeout, me.replay()).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        timeout = ?me.replay_timeout,
                        "replay of pending invalidations cut at its bound: the rest waits for the next"
                    );
                    Err(StoreError::timeout())
                }
            };
            match &r {
                Ok(()) => *lock(&me.replay_not_before) = None,
                Err(e) => {
                    if e.is_outage() {
                        me.breaker.failure();
                    }
                    tracing::debug!(error = %e, "pending invalidations kept");
                    *lock(&me.replay_not_before) = Some(Instant::now() + me.flush_interval);
                }
            }
            r
        }))
    }

    /// Applies pending invalidations, forgetting each batch or pattern as
    /// soon as the store applied it, so a replay cut short keeps what it
    /// did.
    async fn replay(&self) -> StoreResult<()> {
        if !self.has_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let (entries, patterns) = {
            let p = lock(&self.pending);
            let entries: Vec<(String, EntryKeys, u64)> = p
                .entries
                .iter()
                .map(|(k, (_, e, g))| (k.clone(), e.clone(), *g))
                .collect();
            let mut patterns: Vec<((&'static str, String), KeyPattern, u64)> = p
                .patterns
                .iter()
                .map(|(id, (pat, g))| (id.clone(), pat.clone(), *g))
                .collect();
            // In the order they failed: a replay cut short has applied the
            // oldest.
            patterns.sort_unstable_by_key(|(_, _, g)| *g);
            (entries, patterns)
        };
        for chunk in entries.chunks(512) {
            let refs: Vec<&EntryKeys> = chunk.iter().map(|(_, e, _)| e).collect();
            tokio::time::timeout(self.op_timeout * 4, self.store.invalidate(&refs))
                .await
                .unwrap_or(Err(StoreError::timeout()))?;
            self.breaker.success();
            let mut p = lock(&self.pending);
            for (k, _, g) in chunk {
                if p.entries.get(k).is_some_and(|(_, _, cur)| cur == g) {
                    p.entries.remove(k);
                }
            }
            self.settle_pending(&p);
        }
        for (id, pat, g) in &patterns {
            // Bounded by the replay's own bound.
            self.store.invalidate_matching(pat).await?;
            self.breaker.success();
            let mut p = lock(&self.pending);
            if p.patterns.get(id).is_some_and(|(_, cur)| cur == g) {
                p.patterns.remove(id);
            }
            self.settle_pending(&p);
        }
        tracing::info!(
            entries = entries.len(),
            patterns = patterns.len(),
            "pending invalidations applied"
        );
        Ok(())
    }

    /// Publishes the journal's size after a change that may have emptied it.
    fn settle_pending(&self, p: &Pending) {
        if p.len() == 0 {
            self.has_pending.store(false, Ordering::Release);
        }
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;

    use crate::Cache;
    use crate::key::Kind;
    use crate::store::MemoryStore;

    #[derive(Debug, Clone)]
    enum Op {
        DeferEntry(usize),
        DeferPattern(usize),
        Replay,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize).prop_map(Op::DeferEntry),
            (0..3usize).prop_map(Op::DeferPattern),
            Just(Op::Replay),
        ]
    }

    const IDS: [&str; 4] = ["a1", "a2", "b1", "b2"];
    const PATTERNS: [(Kind, &str); 3] = [
        (Kind::new("profile"), "a*"),
        (Kind::new("profile"), "*"),
        (Kind::new("settings"), "*"),
    ];

    proptest! {
        /// Any sequence of failed invalidations and replays: the journal
        /// holds each entry and pattern once, distrusts exactly the keys
        /// with a pending entry and the types with a pending pattern, and a
        /// replay that succeeds empties it.
        #[test]
        fn the_journal_matches_a_set_of_what_is_pending(ops in prop::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let cache = Cache::builder(MemoryStore::new()).namespace("j").build().unwrap();
                let c = &cache.inner;
                let mut entries: HashSet<&str> = HashSet::new();
                let mut patterns: HashMap<usize, Kind> = HashMap::new();
                for op in &ops {
                    match *op {
                        Op::DeferEntry(i) => {
                            c.defer(Kind::new("profile"), [c.keys.entry(&Kind::new("profile"), IDS[i]).unwrap()]);
                            entries.insert(IDS[i]);
                        }
                        Op::DeferPattern(j) => {
                            let (kind, glob) = PATTERNS[j];
                            c.defer_pattern(c.keys.pattern(&kind, glob).unwrap());
                            patterns.insert(j, kind);
                        }
                        Op::Replay => {
                            c.replay().await.unwrap();
                            entries.clear();
                            patterns.clear();
                        }
                    }
                    prop_assert_eq!(cache.pending_invalidations(), entries.len() + patterns.len());
                    for kind in [Kind::new("profile"), Kind::new("settings")] {
                        for id in IDS {
                            let key = c.keys.value_key(&kind, id).unwrap();
                            let expected = (kind == Kind::new("profile") && entries.contains(id))
                                || patterns.values().any(|k| *k == kind);
                            prop_assert_eq!(c.distrusts(&kind, &key), expected, "{:?} {}", kind, id);
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}
