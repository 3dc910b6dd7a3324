//! Caching policy per data type: the TTL table ([`TtlPolicy`]), each type's
//! [`TypePolicy`] (TTL, "not found" memory, stale window, eager refresh and
//! load timeouts), jitter, the adaptive rule (`adaptive.rs`) and TTLs from
//! an absolute expiry.
//!
//! The library knows no application type: a [`TtlPolicy`] starts with one
//! default for every type (300 s, no adaptive rule, 30 s of "not found",
//! no stale copy) and the application sets its types' policies
//! ([`TtlPolicy::with_type`]). A TTL of zero disables caching for a type.
//! Every TTL kura writes is spread by ±10 % (configurable) so a warmed
//! batch does not expire in one instant and stampede the database
//! together.
//!
//! - `adaptive.rs`: [`Adaptive`], a longer TTL for keys read often,
//!   counted in-process.
//! - `freshness.rs`: eager refresh (XFetch) and the soft and hard load
//!   timeouts.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rand::Rng;

pub mod adaptive;
pub mod freshness;

pub use self::adaptive::Adaptive;
use self::freshness::EagerRefresh;

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
    /// [`crate::policy::freshness`]); `None` (the default): at expiry.
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
/// let policy = TtlPolicy::default()
///     .with_type("avatar", TypePolicy::new(Duration::from_secs(120)))
///     .with_jitter(0.0);
/// assert_eq!(policy.get("avatar").ttl, Duration::from_secs(120));
/// assert_eq!(policy.get("unknown").ttl, Duration::from_secs(300));
/// ```
#[derive(Debug, Clone)]
pub struct TtlPolicy {
    default: TypePolicy,
    types: HashMap<String, TypePolicy>,
    jitter: f64,
}

/// The TTL every type gets unless its policy says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

impl Default for TtlPolicy {
    /// Every type at [`DEFAULT_TTL`], ±10 % jitter.
    fn default() -> Self {
        Self {
            default: TypePolicy::new(DEFAULT_TTL),
            types: HashMap::new(),
            jitter: 0.1,
        }
    }
}

impl TtlPolicy {
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
    /// let plain = TtlPolicy::default().with_jitter(0.0);
    /// assert_eq!(plain.jittered(Duration::from_millis(500)), Duration::from_millis(500));
    /// assert_eq!(plain.jittered(Duration::from_micros(300)), Duration::from_millis(1));
    /// let spread = TtlPolicy::default().jittered(Duration::from_millis(500));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_the_default() {
        let hot = Adaptive::new(10, Duration::from_secs(3600), Duration::from_secs(600));
        let p = TtlPolicy::default()
            .with_type(
                "profile",
                TypePolicy::new(Duration::from_secs(300)).adaptive(hot),
            )
            .with_type("session", TypePolicy::new(Duration::from_secs(3600)));
        assert_eq!(p.get("session").ttl, Duration::from_secs(3600));
        assert_eq!(p.get("other").ttl, DEFAULT_TTL);
        assert_eq!(p.get("profile").adaptive, Some(hot));
        assert!(p.get("session").adaptive.is_none());
        assert!(p.get("other").adaptive.is_none());
    }

    #[test]
    fn jitter_stays_in_band_and_spreads() {
        let p = TtlPolicy::default();
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
        let plain = TtlPolicy::default().with_jitter(0.0);
        let spread = TtlPolicy::default();
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
}
