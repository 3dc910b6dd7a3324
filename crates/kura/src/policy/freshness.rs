//! Freshness without spikes: eager refresh and load timeouts, per type
//! ([`crate::TypePolicy`]).
//!
//! # Eager refresh
//!
//! Without it, a hot key that expires costs every reader a miss at once:
//! one loads, the others wait on the lease. With
//! [`TypePolicy::eager_refresh`](crate::TypePolicy::eager_refresh), a hit
//! may start a reload before the value expires, with the probability of
//! XFetch (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache
//! Stampede Prevention", VLDB 2015): a read at time `t` of a value expiring
//! at `expiry` reloads when
//!
//! ```text
//! t − δ · β · ln(U) ≥ expiry        U uniform in (0, 1]
//! ```
//!
//! where `δ` is what a refresh of the type takes, lease to refill (a moving
//! average of this process's refreshes, and of its loads before the first
//! refresh) and `β` the rule's factor (1.0 is the paper's optimum;
//! larger reloads earlier). The reload runs in the background under a
//! refresh lease (one per key across the fleet, taken only while the value
//! is cached and no lease is held), and at most one per key per process;
//! readers keep getting the cached value meanwhile. Its fill replaces the
//! value when the row is the same version or newer, and is refused, as any
//! fill, when an invalidation or update voided the lease. A value's expiry
//! is written in its envelope ([`crate::codec`]) when the type has the rule,
//! so the check costs no round trip.
//!
//! With `λ` reads per second of a key, the first roll that comes up falls
//! about `δβ·ln(λδβ)` before expiry: the busier the key, the earlier (and
//! the more often) it is reloaded, never more than once per key at a time.
//!
//! Not guaranteed: a refresh before expiry when the key is read too rarely
//! (a key read less than about once per `δ·β` near its end expires as
//! before); with the adaptive TTL rule, the expiry a value was written
//! with, not a later extension, is what the rule counts down to.
//!
//! # Load timeouts
//!
//! - **Soft** ([`TypePolicy::load_soft_timeout`](crate::TypePolicy::load_soft_timeout)):
//!   a load slower than it, when the entry has a stale copy (the type keeps
//!   one: `max_stale`), answers with the stale copy
//!   ([`crate::Status::Stale`]); the load goes on in the background and
//!   fills the cache. Readers waiting on another process's lease get the
//!   stale copy after the same time.
//! - **Hard** ([`TypePolicy::load_hard_timeout`](crate::TypePolicy::load_hard_timeout)):
//!   bounds the wait when no stale copy is on hand: the caller gets
//!   [`crate::Error::LoadTimeout`]; the load still goes on in the background
//!   and fills the cache for the next reader. With a stale copy and no soft
//!   timeout, the hard one serves the stale copy. A load outside the cache
//!   (Redis unreachable) is cut at the hard timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The XFetch rule of a type: reload early with factor `β`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EagerRefresh {
    beta_milli: u32,
}

impl EagerRefresh {
    /// The paper's optimum, `β = 1`.
    pub const DEFAULT: EagerRefresh = EagerRefresh { beta_milli: 1000 };

    /// A rule with factor `beta` (kept to a thousandth).
    ///
    /// # Errors
    ///
    /// A message when `beta` is not a finite number in `(0, 1000]`.
    pub fn new(beta: f64) -> Result<Self, String> {
        if !beta.is_finite() || beta <= 0.0 || beta > 1000.0 {
            return Err(format!(
                "{beta}: the eager refresh factor is a number in (0, 1000]"
            ));
        }
        Ok(Self {
            beta_milli: ((beta * 1000.0).round() as u32).max(1),
        })
    }

    /// The factor `β`.
    #[must_use]
    pub fn beta(&self) -> f64 {
        f64::from(self.beta_milli) / 1000.0
    }

    /// Whether a read with `remaining` time before expiry, for a type whose
    /// loads take `delta`, reloads now; `u` is uniform in `(0, 1]`.
    #[must_use]
    pub fn due(&self, remaining: Duration, delta: Duration, u: f64) -> bool {
        let u = u.clamp(f64::MIN_POSITIVE, 1.0);
        delta.as_secs_f64() * self.beta() * -u.ln() >= remaining.as_secs_f64()
    }

    /// [`due`](Self::due) with a fresh random `u`.
    #[must_use]
    pub fn roll(&self, remaining: Duration, delta: Duration) -> bool {
        // 1 − [0, 1) is (0, 1].
        self.due(remaining, delta, 1.0 - rand::random::<f64>())
    }
}

/// A type's measured load time: an exponential moving average (weight 1/8)
/// of this process's loads, starting from a guess until the first one.
#[derive(Debug)]
pub(crate) struct LoadTime {
    micros: AtomicU64,
}

impl LoadTime {
    /// The guess before any load was measured.
    pub(crate) const INITIAL: Duration = Duration::from_millis(10);

    pub(crate) fn new() -> Self {
        Self {
            micros: AtomicU64::new(0),
        }
    }

    /// Records one load.
    pub(crate) fn record(&self, took: Duration) {
        let t = (took.as_micros() as u64).max(1);
        // Racing updates may lose one sample; the average stays an average.
        let old = self.micros.load(Ordering::Relaxed);
        let new = if old == 0 { t } else { old - old / 8 + t / 8 };
        self.micros.store(new.max(1), Ordering::Relaxed);
    }

    /// The average, `None` before the first sample.
    pub(crate) fn measured(&self) -> Option<Duration> {
        match self.micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The current estimate: the average, or the guess before any load.
    pub(crate) fn estimate(&self) -> Duration {
        self.measured().unwrap_or(Self::INITIAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_bounds() {
        assert_eq!(EagerRefresh::new(1.0).unwrap(), EagerRefresh::DEFAULT);
        assert!((EagerRefresh::new(2.5).unwrap().beta() - 2.5).abs() < 1e-9);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1001.0] {
            assert!(EagerRefresh::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn due_grows_as_expiry_nears() {
        let r = EagerRefresh::DEFAULT;
        let delta = Duration::from_millis(100);
        // −ln(u) ≥ remaining/δ: with u = e^-1, due exactly at remaining = δ.
        let u = (-1.0f64).exp();
        assert!(r.due(Duration::from_millis(99), delta, u));
        assert!(!r.due(Duration::from_millis(101), delta, u));
        // Far from expiry almost never; at expiry always.
        assert!(!r.due(Duration::from_secs(60), delta, 0.5));
        assert!(r.due(Duration::ZERO, delta, 1.0));
        // The frequency over many rolls follows P = e^(−remaining/(δβ)).
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| r.roll(Duration::from_millis(100), delta))
            .count();
        let p = hits as f64 / f64::from(n);
        assert!((p - (-1.0f64).exp()).abs() < 0.02, "{p}");
        // A larger β reloads earlier.
        let eager = EagerRefresh::new(4.0).unwrap();
        assert!(eager.due(Duration::from_millis(300), delta, u));
    }

    #[test]
    fn load_time_average() {
        let t = LoadTime::new();
        assert_eq!(t.estimate(), LoadTime::INITIAL);
        t.record(Duration::from_millis(80));
        assert_eq!(t.estimate(), Duration::from_millis(80));
        for _ in 0..100 {
            t.record(Duration::from_millis(8));
        }
        let e = t.estimate();
        assert!(
            e >= Duration::from_millis(8) && e < Duration::from_millis(9),
            "{e:?}"
        );
    }
}
