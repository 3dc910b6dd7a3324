//! The adaptive rule ([`Adaptive`]): a key read more than `reads` times
//! within `window` gets a longer TTL, counted in-process
//! (`ReadCounter`) so that the hit path pays no extra round trip.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An adaptive rule: more than `reads` reads within `window` extend the TTL
/// to `ttl` (the seed's: 10 reads in an hour, 600 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Adaptive {
    /// Reads needed within the window (strictly more than this many).
    pub reads: u32,
    /// The counting window.
    pub window: Duration,
    /// The TTL a hot key gets.
    pub ttl: Duration,
}

impl Adaptive {
    /// A custom rule.
    #[must_use]
    pub const fn new(reads: u32, window: Duration, ttl: Duration) -> Self {
        Self { reads, window, ttl }
    }
}

/// Counts reads per key in-process to apply the adaptive rule without an
/// extra round trip (the seed paid an `INCR` and an `EXPIRE` on every read).
///
/// Each instance counts its own reads, so in a fleet of N instances a key is
/// "hot" once one instance sees more than the threshold; the rule's effect
/// (a longer TTL for popular keys) is the same. Memory is bounded: a shard
/// that fills up first drops its expired windows, then starts over.
#[derive(Debug)]
pub(crate) struct ReadCounter {
    /// Keyed by a 64-bit hash of the key: a collision merely shares a count,
    /// which a popularity heuristic tolerates, and the key is hashed once.
    shards: Box<[Mutex<Window>]>,
    cap_per_shard: usize,
}

/// Read counts by key hash: the count and when its window started.
type Window = HashMap<u64, (u32, Instant), BuildHasherDefault<Prehashed>>;

/// The hasher of maps whose keys are hashes already.
#[derive(Debug, Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in.
        for b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A multiply-rotate hash taking eight bytes at a step: fast on the short
/// keys it sees, and good enough to spread them over shards and buckets.
pub(crate) fn key_hash(key: &str) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = key.len() as u64;
    let mut chunks = key.as_bytes().chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("eight bytes"));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    h = (h.rotate_left(5) ^ u64::from_le_bytes(last)).wrapping_mul(K);
    // Fold the high bits down: the shard is picked from them.
    h ^ (h >> 29)
}

impl ReadCounter {
    pub(crate) fn new(capacity: usize) -> Self {
        const SHARDS: usize = 64;
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            cap_per_shard: (capacity / SHARDS).max(16),
        }
    }

    fn shard(&self, h: u64) -> std::sync::MutexGuard<'_, Window> {
        // The high bits pick the shard, so the map inside sees varied low
        // bits.
        self.shards[((h >> 40) as usize) % self.shards.len()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one read of `key` and returns the count in the current
    /// window, including it.
    pub(crate) fn record(&self, key: &str, window: Duration, now: Instant) -> u32 {
        let h = key_hash(key);
        let mut shard = self.shard(h);
        if let Some((n, start)) = shard.get_mut(&h) {
            if now.duration_since(*start) > window {
                *n = 0;
                *start = now;
            }
            *n += 1;
            return *n;
        }
        if shard.len() >= self.cap_per_shard {
            shard.retain(|_, (_, start)| now.duration_since(*start) <= window);
            if shard.len() >= self.cap_per_shard {
                shard.clear();
            }
        }
        shard.insert(h, (1, now));
        1
    }

    /// The count of `key` in the current window (0 when unseen).
    pub(crate) fn count(&self, key: &str, window: Duration) -> u32 {
        let h = key_hash(key);
        self.shard(h)
            .get(&h)
            .filter(|(_, start)| start.elapsed() <= window)
            .map_or(0, |(n, _)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_counter_counts_per_window_and_stays_bounded() {
        let hour = Duration::from_secs(3600);
        let c = ReadCounter::new(1024);
        assert_eq!(c.count("k", hour), 0);
        for i in 1..=11 {
            assert_eq!(c.record("k", hour, Instant::now()), i);
        }
        assert_eq!(c.count("k", hour), 11);
        // A window that has passed starts over.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.count("k", Duration::from_millis(1)), 0);
        assert_eq!(c.record("k", Duration::from_millis(1), Instant::now()), 1);
        // Many distinct keys never grow a shard past its share.
        for i in 0..100_000 {
            c.record(&format!("key{i}"), hour, Instant::now());
        }
        let held: usize = c.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= 1024 + 64, "{held}");
    }
}
