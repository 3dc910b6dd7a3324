//! The pending-invalidation journal: invalidations that could not reach the
//! store, kept in-process and replayed when it answers again.
//!
//! Until an entry's invalidation is replayed, that key is *distrusted*: reads
//! of it go to the source and skip the cache (`CacheInner::distrusts`);
//! while a pattern is pending, the same holds for every key of its type.
//! Other keys use the cache as usual, also while a replay runs.
//!
//! A replay runs as a task of its own, one at a time, and is bounded as a
//! whole by the cache's `replay_timeout` (default 60 s): what it applied
//! before the bound is forgotten, the rest waits for the next replay. It is
//! started by the maintenance task every flush interval, by a store call
//! that finds something pending (at most once per flush interval after a
//! failed replay), and by [`Cache::ping`](crate::Cache::ping), which waits
//! for it at most the operation timeout.
//!
//! Each entry and pattern is kept once, with a generation that a new failure
//! bumps: a replay forgets only what did not fail again while it ran. This
//! file is the journal itself; the replay is `core/replay.rs`.

use std::collections::HashMap;

use crate::key::{EntryKeys, KeyPattern, Kind};

/// Invalidations that could not reach the store, kept until they do.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// By value key: the entry and a generation, so a replay only forgets
    /// what it actually applied.
    pub(crate) entries: HashMap<String, (Kind, EntryKeys, u64)>,
    /// By `(type, SCAN MATCH argument)`: a pattern that failed twice is kept
    /// once.
    pub(crate) patterns: HashMap<(&'static str, String), (KeyPattern, u64)>,
    generation: u64,
}

impl Pending {
    pub(crate) fn len(&self) -> usize {
        self.entries.len() + self.patterns.len()
    }

    pub(crate) fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    pub(crate) fn add_pattern(&mut self, pattern: KeyPattern) {
        let g = self.next_generation();
        let id = (pattern.kind().name(), pattern.scan_match());
        self.patterns.insert(id, (pattern, g));
    }
}
