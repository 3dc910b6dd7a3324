//! TTL policy: the seed's table per data type, jitter, adaptive extension and
//! TTLs from an absolute expiry.
//!
//! | type | TTL |
//! |---|---|
//! | `profile` | 300 s (600 s once read more than 10 times in an hour) |
//! | `session` | 3600 s |
//! | `blacklist` | the token's remaining lifetime ([`TtlPolicy::ttl_until`]) |
//! | `rate_limit` | 3600 s |
//! | `document_meta` | 600 s |
//! | `settings`, `preferences` | 1800 s |
//! | anything else | 300 s |
//!
//! A TTL of zero disables caching for a type. Every TTL kura writes is
//! spread by ±10 % (configurable) so a warmed batch does not expire in one
//! instant and stampede the database together.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

use crate::freshness::EagerRefresh;

/// The seed's adaptive rule: more than `reads` reads within `window` extend
/// the TTL to `ttl`.
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
    /// The seed's rule: more than 10 reads in an hour → 600 s.
    pub const SEED: Adaptive = Adaptive {
        reads: 10,
        window: Duration::from_secs(3600),
        ttl: Duration::from_secs(600),
    };

    /// A custom rule.
    #[must_use]
    pub const fn new(reads: u32, window: Duration, ttl: Duration) -> Self {
        Self { reads, window, ttl }
    }
}

/// The caching policy of one data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TypePolicy {
    /// The TTL of a cached value; zero disables caching for the type.
    pub ttl: Duration,
    /// Optional adaptive extension for frequently read keys.
    pub adaptive: Option<Adaptive>,
    /// How long "not found" is remembered (zero: not at all).
    pub absent_ttl: Duration,
    /// How long after its TTL a copy is still kept to be served, flagged
    /// stale, when the source fails or while another caller reloads it.
    /// Zero keeps no stale copy (and halves the memory per entry).
    pub max_stale: Duration,
    /// Reload a hot value before it expires (XFetch, see
    /// [`crate::freshness`]); `None` (the default): at expiry.
    pub eager_refresh: Option<EagerRefresh>,
    /// A load slower than this, when a stale copy is on hand, answers with
    /// the stale copy and finishes in the background to fill the cache.
    pub load_soft_timeout: Option<Duration>,
    /// A load slower than this answers [`crate::Error::LoadTimeout`] (or the
    /// stale copy, if one is on hand) and finishes in the background.
    pub load_hard_timeout: Option<Duration>,
}

impl TypePolicy {
    /// A policy with `ttl`, no adaptive rule, 30 s "not found" memory and no
    /// stale copy.
    #[must_use]
    pub const fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            adaptive: None,
            absent_ttl: Duration::from_secs(30),
            max_stale: Duration::ZERO,
            eager_refresh: None,
            load_soft_timeout: None,
            load_hard_timeout: None,
        }
    }

    /// Turns eager refresh on with `rule`.
    #[must_use]
    pub const fn eager_refresh(mut self, rule: EagerRefresh) -> Self {
        self.eager_refresh = Some(rule);
        self
    }

    /// Sets the soft load timeout (see [`TypePolicy::load_soft_timeout`]).
    #[must_use]
    pub const fn load_soft_timeout(mut self, d: Duration) -> Self {
        self.load_soft_timeout = Some(d);
        self
    }

    /// Sets the hard load timeout (see [`TypePolicy::load_hard_timeout`]).
    #[must_use]
    pub const fn load_hard_timeout(mut self, d: Duration) -> Self {
        self.load_hard_timeout = Some(d);
        self
    }

    /// Sets the adaptive rule.
    #[must_use]
    pub const fn adaptive(mut self, rule: Adaptive) -> Self {
        self.adaptive = Some(rule);
        self
    }

    /// Sets how long "not found" is cached.
    #[must_use]
    pub const fn absent_ttl(mut self, ttl: Duration) -> Self {
        self.absent_ttl = ttl;
        self
    }

    /// Sets how long a stale copy is kept past the TTL.
    #[must_use]
    pub const fn max_stale(mut self, d: Duration) -> Self {
        self.max_stale = d;
        self
    }

    /// Whether caching is enabled.
    #[must_use]
    pub const fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }
}

/// TTLs per data type.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use kura::{TtlPolicy, TypePolicy};
///
/// let policy = TtlPolicy::seed()
///     .with_type("avatar", TypePolicy::new(Duration::from_secs(120)))
///     .with_jitter(0.0);
/// assert_eq!(policy.get("avatar").ttl, Duration::from_secs(120));
/// assert_eq!(policy.get("settings").ttl, Duration::from_secs(1800));
/// assert_eq!(policy.get("unknown").ttl, Duration::from_secs(300));
/// ```
#[derive(Debug, Clone)]
pub struct TtlPolicy {
    default: TypePolicy,
    types: HashMap<String, TypePolicy>,
    jitter: f64,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self::seed()
    }
}

impl TtlPolicy {
    /// The seed's table, with ±10 % jitter.
    #[must_use]
    pub fn seed() -> Self {
        let secs = |s| TypePolicy::new(Duration::from_secs(s));
        let mut types = HashMap::new();
        types.insert("profile".to_owned(), secs(300).adaptive(Adaptive::SEED));
        types.insert("session".to_owned(), secs(3600));
        types.insert("rate_limit".to_owned(), secs(3600));
        types.insert("document_meta".to_owned(), secs(600));
        types.insert("settings".to_owned(), secs(1800));
        types.insert("preferences".to_owned(), secs(1800));
        // The blacklist's TTL comes from each token's expiry; this is only
        // the bound used if a caller gives none.
        types.insert("blacklist".to_owned(), secs(3600));
        Self {
            default: secs(300),
            types,
            jitter: 0.1,
        }
    }

    /// Sets the policy of one type.
    #[must_use]
    pub fn with_type(mut self, name: &str, policy: TypePolicy) -> Self {
        self.types.insert(name.to_owned(), policy);
        self
    }

    /// Sets the policy of types not listed.
    #[must_use]
    pub fn with_default(mut self, policy: TypePolicy) -> Self {
        self.default = policy;
        self
    }

    /// Sets the jitter fraction (0.1 = ±10 %), clamped to `0.0..=0.5`.
    #[must_use]
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 0.5);
        self
    }

    /// Changes one type's policy in place (for configuration loaders).
    pub fn set(&mut self, name: &str, policy: TypePolicy) {
        self.types.insert(name.to_owned(), policy);
    }

    /// The policy of `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> TypePolicy {
        self.types.get(name).copied().unwrap_or(self.default)
    }

    /// The jitter fraction.
    #[must_use]
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// `ttl` spread by the jitter fraction, in whole milliseconds (the
    /// stores' resolution) and never below one: a positive TTL stays
    /// positive, and a sub-second one stays sub-second, with or without
    /// jitter. Zero stays zero (caching off).
    ///
    /// ```
    /// use std::time::Duration;
    /// use kura::TtlPolicy;
    ///
    /// let plain = TtlPolicy::seed().with_jitter(0.0);
    /// assert_eq!(plain.jittered(Duration::from_millis(500)), Duration::from_millis(500));
    /// assert_eq!(plain.jittered(Duration::from_micros(300)), Duration::from_millis(1));
    /// let spread = TtlPolicy::seed().jittered(Duration::from_millis(500));
    /// assert!(spread >= Duration::from_millis(450) && spread <= Duration::from_millis(550));
    /// ```
    #[must_use]
    pub fn jittered(&self, ttl: Duration) -> Duration {
        if ttl.is_zero() {
            return ttl;
        }
        let f = if self.jitter == 0.0 {
            0.0
        } else {
            rand::rng().random_range(-self.jitter..=self.jitter)
        };
        let ms = (ttl.as_secs_f64() * 1000.0 * (1.0 + f)).round() as u64;
        Duration::from_millis(ms.max(1))
    }

    /// The TTL that ends at `expires_at` (a token's `exp`), or `None` when
    /// that moment has passed. Not jittered: an expiry is exact.
    #[must_use]
    pub fn ttl_until(expires_at: SystemTime) -> Option<Duration> {
        expires_at
            .duration_since(SystemTime::now())
            .ok()
            .filter(|d| *d >= Duration::from_millis(1))
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
    fn seed_table() {
        let p = TtlPolicy::seed();
        for (t, s) in [
            ("profile", 300),
            ("session", 3600),
            ("rate_limit", 3600),
            ("document_meta", 600),
            ("settings", 1800),
            ("other", 300),
        ] {
            assert_eq!(p.get(t).ttl, Duration::from_secs(s), "{t}");
        }
        assert_eq!(p.get("profile").adaptive, Some(Adaptive::SEED));
        assert!(p.get("session").adaptive.is_none());
    }

    #[test]
    fn jitter_stays_in_band_and_spreads() {
        let p = TtlPolicy::seed();
        let base = Duration::from_secs(300);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let t = p.jittered(base);
            assert!(t >= Duration::from_secs(270) && t <= Duration::from_secs(330));
            seen.insert(t.as_secs());
        }
        assert!(seen.len() > 20, "jitter should spread: {}", seen.len());
        assert_eq!(p.clone().with_jitter(0.0).jittered(base), base);
    }

    #[test]
    fn sub_second_ttls_stay_sub_second_with_and_without_jitter() {
        let plain = TtlPolicy::seed().with_jitter(0.0);
        let spread = TtlPolicy::seed();
        let half = Duration::from_millis(500);
        assert_eq!(plain.jittered(half), half);
        for _ in 0..1000 {
            let t = spread.jittered(half);
            assert!(
                t >= Duration::from_millis(450) && t <= Duration::from_millis(550),
                "{t:?}"
            );
        }
        // Whole milliseconds, at least one, the same way with or without
        // jitter: a positive TTL stays positive.
        for (given, kept) in [
            (Duration::from_micros(300), Duration::from_millis(1)),
            (Duration::from_nanos(1), Duration::from_millis(1)),
            (Duration::from_micros(2_400), Duration::from_millis(2)),
        ] {
            assert_eq!(plain.jittered(given), kept, "{given:?}");
        }
        for _ in 0..100 {
            assert_eq!(
                spread.jittered(Duration::from_micros(300)),
                Duration::from_millis(1)
            );
        }
        assert_eq!(plain.jittered(Duration::ZERO), Duration::ZERO);
        assert_eq!(spread.jittered(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn ttl_until_expiry() {
        let later = SystemTime::now() + Duration::from_secs(100);
        let t = TtlPolicy::ttl_until(later).unwrap();
        assert!(t <= Duration::from_secs(100) && t > Duration::from_secs(98));
        assert!(TtlPolicy::ttl_until(SystemTime::now() - Duration::from_secs(1)).is_none());
    }

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
