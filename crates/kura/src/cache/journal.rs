//! The pending-invalidation journal: invalidations that could not reach the
//! store, kept in-process and replayed when it answers again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::error::StoreError;
use crate::key::{EntryKeys, KeyPattern, Kind};
use crate::store::StoreResult;

use super::{CacheInner, lock};

/// Invalidations that could not reach the store, kept until they do.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// By value key: the entry and a generation, so a replay only forgets
    /// what it actually applied.
    entries: HashMap<String, (Kind, EntryKeys, u64)>,
    patterns: Vec<KeyPattern>,
    generation: u64,
}

impl Pending {
    pub(super) fn len(&self) -> usize {
        self.entries.len() + self.patterns.len()
    }
}

impl CacheInner {
    /// Remembers invalidations that failed, to apply before the cache is
    /// used again.
    pub(crate) fn defer(&self, kind: Kind, entries: impl IntoIterator<Item = EntryKeys>) {
        let mut p = lock(&self.pending);
        for e in entries {
            p.generation += 1;
            let g = p.generation;
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
                    p.patterns.push(pat);
                }
            }
        }
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        self.has_pending.store(true, Ordering::Release);
    }

    /// Remembers a pattern invalidation that failed.
    pub(crate) fn defer_pattern(&self, pattern: KeyPattern) {
        let mut p = lock(&self.pending);
        p.patterns.push(pattern);
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        self.has_pending.store(true, Ordering::Release);
    }

    /// Applies pending invalidations. Callers that find a replay running
    /// skip the store meanwhile rather than queue behind it.
    pub(super) async fn replay(&self) -> StoreResult<()> {
        let Ok(_guard) = self.replaying.try_lock() else {
            return Err(StoreError::Unavailable);
        };
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
            (entries, p.patterns.clone())
        };
        let fail = |e: StoreError| {
            if e.is_outage() {
                self.breaker.failure();
            }
            e
        };
        for chunk in entries.chunks(512) {
            let refs: Vec<&EntryKeys> = chunk.iter().map(|(_, e, _)| e).collect();
            tokio::time::timeout(self.op_timeout * 4, self.store.invalidate(&refs))
                .await
                .unwrap_or(Err(StoreError::Timeout))
                .map_err(fail)?;
        }
        for pat in &patterns {
            tokio::time::timeout(Duration::from_secs(60), self.store.invalidate_matching(pat))
                .await
                .unwrap_or(Err(StoreError::Timeout))
                .map_err(fail)?;
        }
        let mut p = lock(&self.pending);
        for (k, _, g) in &entries {
            if p.entries.get(k).is_some_and(|(_, _, cur)| cur == g) {
                p.entries.remove(k);
            }
        }
        let done = patterns.len();
        let done_now = done.min(p.patterns.len());
        p.patterns.drain(..done_now);
        if p.len() == 0 {
            self.has_pending.store(false, Ordering::Release);
        }
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        tracing::info!(
            entries = entries.len(),
            patterns = done,
            "pending invalidations applied"
        );
        Ok(())
    }
}
