//! Write epochs: what lets a single-flight load tell whether a write
//! returned since it started.
//!
//! Every write-through invalidation or update bumps the epoch of its key
//! before it returns (a pattern invalidation bumps every key's); a load in
//! flight records the epoch it started at, and a new caller joins it only
//! while that epoch is still current. So once a write has returned, no
//! caller that starts after it can be handed a load that may have read the
//! row before the write's commit.
//!
//! Epochs are kept per stripe of keys, not per key, so memory stays fixed
//! however many keys are written: a write to another key of the same stripe
//! only makes a caller start a load of its own instead of joining one.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::adaptive::key_hash;

const STRIPES: usize = 4096;

/// The epochs of all keys of one cache.
#[derive(Debug)]
pub(crate) struct Epochs {
    stripes: Box<[AtomicU64]>,
    /// Bumped by pattern invalidations, which cover keys not named.
    all: AtomicU64,
}

/// The epoch of one key at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Epoch {
    stripe: u64,
    all: u64,
}

impl Default for Epochs {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            all: AtomicU64::new(0),
        }
    }
}

impl Epochs {
    fn stripe(&self, key: &str) -> &AtomicU64 {
        &self.stripes[(key_hash(key) as usize) % STRIPES]
    }

    /// The current epoch of `key`.
    pub(crate) fn of(&self, key: &str) -> Epoch {
        // SeqCst pairs with the bumps: a caller that starts after a bump
        // returned sees it.
        Epoch {
            all: self.all.load(Ordering::SeqCst),
            stripe: self.stripe(key).load(Ordering::SeqCst),
        }
    }

    /// A write to `key` is done.
    pub(crate) fn bump(&self, key: &str) {
        self.stripe(key).fetch_add(1, Ordering::SeqCst);
    }

    /// A write that may cover any key is done.
    pub(crate) fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_changes_the_key_epoch_and_bump_all_every_epoch() {
        let e = Epochs::default();
        let (a, b) = (e.of("cache:profile:a"), e.of("cache:profile:b"));
        e.bump("cache:profile:a");
        assert_ne!(e.of("cache:profile:a"), a);
        let a2 = e.of("cache:profile:a");
        e.bump_all();
        assert_ne!(e.of("cache:profile:a"), a2);
        assert_ne!(e.of("cache:profile:b"), b);
    }
}
