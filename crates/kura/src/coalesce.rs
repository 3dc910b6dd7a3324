//! Coalesced writes behind: the latest value per key, kept in process and
//! handed out in batches.
//!
//! For data that changes on nearly every request and whose intermediate
//! values nobody needs (a session's `last_seen`): a busy key costs one
//! database write per flush, not one per request. [`Coalescer::record`]
//! merges a new value into the key's pending one; [`Coalescer::take`] hands
//! out everything pending and starts afresh. The caller writes the batch
//! (typically on a timer, and at once when [`Coalescer::record`] reports the
//! bound reached).
//!
//! # Guarantee
//!
//! Every recorded value reaches exactly one batch, merged with the values
//! recorded for its key between two takes; a key appears at most once per
//! batch. Pending keys never exceed the bound by more than the records made
//! between the report and the caller's take.
//!
//! # Not guaranteed
//!
//! What is pending lives in this process only: a crash loses up to one
//! flush interval of values. Use it where the last few seconds of such a
//! value may be lost (use [`crate::WriteBehind`] where they may not).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// The latest value per key, waiting for the next batch. See the module
/// docs.
///
/// # Examples
///
/// ```
/// use kura::coalesce::Coalescer;
///
/// let seen = Coalescer::new(1000);
/// seen.record("s1", 10, |old: &mut u64, new| *old = (*old).max(new));
/// seen.record("s1", 12, |old: &mut u64, new| *old = (*old).max(new));
/// seen.record("s2", 11, |old: &mut u64, new| *old = (*old).max(new));
/// let mut batch = seen.take();
/// batch.sort();
/// assert_eq!(batch, vec![("s1", 12), ("s2", 11)]);
/// assert!(seen.take().is_empty());
/// ```
#[derive(Debug)]
pub struct Coalescer<K, V> {
    pending: Mutex<HashMap<K, V>>,
    max_keys: usize,
}

impl<K: Eq + Hash, V> Coalescer<K, V> {
    /// A coalescer whose [`record`](Self::record) reports "flush now" once
    /// `max_keys` keys are pending (at least 1).
    #[must_use]
    pub fn new(max_keys: usize) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            max_keys: max_keys.max(1),
        }
    }

    /// Records `value` for `key`, merged into a pending one with `merge`
    /// (`merge(&mut pending, value)`). Returns `true` when the bound is
    /// reached: the caller should take and write a batch now.
    pub fn record(&self, key: K, value: V, merge: impl FnOnce(&mut V, V)) -> bool {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match p.get_mut(&key) {
            Some(old) => merge(old, value),
            None => {
                p.insert(key, value);
            }
        }
        p.len() >= self.max_keys
    }

    /// The pending value of `key`, if any (for reads that show it before
    /// it is written).
    #[must_use]
    pub fn peek(&self, key: &K) -> Option<V>
    where
        V: Clone,
    {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Drops the pending value of `key` (its row is gone).
    pub fn forget(&self, key: &K) {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Everything pending, in no particular order; the coalescer is empty
    /// after it.
    #[must_use]
    pub fn take(&self) -> Vec<(K, V)> {
        let taken = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        taken.into_iter().collect()
    }

    /// Puts a batch that could not be written back, each value merged with
    /// anything recorded for its key since (`merge(&mut newer, older)`).
    pub fn restore(&self, batch: Vec<(K, V)>, merge: impl Fn(&mut V, V)) {
        let mut p = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (k, v) in batch {
            match p.get_mut(&k) {
                Some(newer) => merge(newer, v),
                None => {
                    p.insert(k, v);
                }
            }
        }
    }

    /// How many keys are pending.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is pending.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn max(old: &mut u64, new: u64) {
        *old = (*old).max(new);
    }

    /// Runs `ops` (record key/value, take, or restore the last batch) and
    /// checks the invariant: per key, the maximum over everything recorded
    /// equals the maximum over what was taken (and not restored) plus what
    /// is pending; no batch names a key twice.
    fn check(ops: &[(u8, u8, u64)]) {
        let c = Coalescer::new(8);
        let mut recorded: HashMap<u8, u64> = HashMap::new();
        let mut written: HashMap<u8, u64> = HashMap::new();
        for &(op, key, value) in ops {
            match op {
                0..=5 => {
                    let full = c.record(key, value, max);
                    let e = recorded.entry(key).or_insert(0);
                    *e = (*e).max(value);
                    assert_eq!(full, c.len() >= 8);
                }
                6 => {
                    let batch = c.take();
                    let mut keys: Vec<u8> = batch.iter().map(|(k, _)| *k).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    assert_eq!(keys.len(), batch.len(), "a key twice in one batch");
                    for (k, v) in batch {
                        let e = written.entry(k).or_insert(0);
                        *e = (*e).max(v);
                    }
                    assert!(c.is_empty());
                }
                _ => {
                    // A failed write: the batch goes back.
                    let batch = c.take();
                    c.restore(batch, max);
                }
            }
        }
        for (k, v) in c.take() {
            let e = written.entry(k).or_insert(0);
            *e = (*e).max(v);
        }
        assert_eq!(recorded, written, "a recorded value was lost or changed");
    }

    proptest! {
        #[test]
        fn every_value_reaches_one_batch(
            ops in proptest::collection::vec((0u8..8, 0u8..20, 0u64..1000), 1..300)
        ) {
            check(&ops);
        }
    }

    /// A long run of random operations keeps the invariant (state kept
    /// over time).
    #[test]
    fn soak_coalescing_stays_exact() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let ops: Vec<(u8, u8, u64)> = (0..200_000)
            .map(|_| {
                let r = next();
                ((r % 8) as u8, ((r >> 8) % 64) as u8, (r >> 16) % 1_000_000)
            })
            .collect();
        check(&ops);
    }

    /// Concurrent records and takes: nothing lost across threads.
    #[test]
    fn concurrent_records_and_takes_lose_nothing() {
        let c = std::sync::Arc::new(Coalescer::new(usize::MAX));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        c.record((t, i % 100), i, max);
                    }
                })
            })
            .collect();
        let mut written: HashMap<(u64, u64), u64> = HashMap::new();
        while threads.iter().any(|t| !t.is_finished()) {
            for (k, v) in c.take() {
                let e = written.entry(k).or_insert(0);
                *e = (*e).max(v);
            }
        }
        for t in threads {
            t.join().unwrap();
        }
        for (k, v) in c.take() {
            let e = written.entry(k).or_insert(0);
            *e = (*e).max(v);
        }
        assert_eq!(written.len(), 400);
        for ((_, k), v) in written {
            assert_eq!(v, 9_900 + k, "the latest value of every key is written");
        }
    }
}
