//! Rate limits per class and subject, fleet-wide in the store, per process
//! when the store cannot answer.
//!
//! # Algorithm: GCRA
//!
//! Each `(class, subject)` keeps one number in the store, its theoretical
//! arrival time (TAT). A limit of `N` per `P` admits a request if, once the
//! emission interval `P / N` is added, the TAT is at most `P` ahead of now;
//! one Lua script ([`RateStore::rate`]) reads, decides and writes it on Redis's
//! clock (`TIME`), so concurrent requests on any number of instances are
//! counted exactly. It was chosen over the seed's fixed hourly window,
//! which lets `2N` through within moments around a window edge (`N` at the
//! end of one hour, `N` at the start of the next). With GCRA any span of
//! length `d` admits at most `N + d·N/P`: a burst of `N` at most at once,
//! and only to a subject idle for `P`, then one request per `P/N`. (Over a
//! whole period after a full burst that is up to `2N − 1`: a rate limit,
//! not a count per sliding window; a sliding log would bound that too, at
//! `N` stored timestamps per subject.) It costs one key of a few bytes per
//! active subject, expiring when the limit is whole.
//!
//! # Guarantees
//!
//! | what | guarantee |
//! |---|---|
//! | `N` concurrent requests of one subject, anywhere in the fleet | exactly the limit admitted (one atomic step each) |
//! | a window edge | no `2N` burst: right after a burst of `N`, one request per `P/N` |
//! | the store unreachable or its circuit open | the process's own in-memory limiter decides ([`Scope::Instance`]): the limit then holds per instance, not for the fleet |
//!
//! Not guaranteed: the limit across the fleet while the store is out (each
//! instance admits up to the limit), and continuity when it comes back (the
//! store's count did not see what the instances admitted meanwhile).
//!
//! # Examples
//!
//! ```
//! use kura::ratelimit::{Quota, RateLimiter};
//! use kura::{Cache, store::MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), kura::Error> {
//! let cache = Cache::builder(MemoryStore::new()).build()?;
//! let limits = RateLimiter::new(&cache);
//! let quota: Quota = "2/1h".parse().unwrap();
//! assert!(limits.check("write", "alice", quota).await?.allowed);
//! assert!(limits.check("write", "alice", quota).await?.allowed);
//! let third = limits.check("write", "alice", quota).await?;
//! assert!(!third.allowed && third.retry_after.as_secs() > 1700);
//! # Ok(()) }
//! ```

use std::time::Duration;

use crate::core::Cache;
use crate::error::Error;
use crate::key::{Kind, validate_id};
use crate::store::{MemoryStore, RateStore};

/// The kind of the limits' keys (`<ns>:rate_limit:<class>.<subject>`).
pub const RATE_LIMIT: Kind = Kind::new("rate_limit");

/// A limit: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    limit: u32,
    period: Duration,
}

impl Quota {
    /// `limit` (at least 1) requests per `period` (at least 1 ms).
    #[must_use]
    pub fn new(limit: u32, period: Duration) -> Self {
        Self {
            limit: limit.max(1),
            period: period.max(Duration::from_millis(1)),
        }
    }

    /// Requests per period.
    #[must_use]
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The period.
    #[must_use]
    pub fn period(&self) -> Duration {
        self.period
    }
}

/// Why a quota's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?}: expected N/PERIOD, e.g. 1000/1h (PERIOD: 1s, 1m, 1h, 1d, 250ms, or a bare number of seconds)"
)]
pub struct QuotaError(pub String);

impl std::str::FromStr for Quota {
    type Err = QuotaError;

    fn from_str(s: &str) -> Result<Self, QuotaError> {
        let bad = || QuotaError(s.to_owned());
        let (n, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let limit: u32 = n.trim().parse().map_err(|_| bad())?;
        let p = p.trim();
        let (num, unit) = p
            .find(|c: char| c.is_ascii_alphabetic())
            .map_or((p, ""), |i| p.split_at(i));
        let num: f64 = if num.is_empty() {
            1.0
        } else {
            num.parse().map_err(|_| bad())?
        };
        let secs = match unit {
            "" | "s" => num,
            "ms" => num / 1000.0,
            "m" => num * 60.0,
            "h" => num * 3600.0,
            "d" => num * 86_400.0,
            _ => return Err(bad()),
        };
        if limit == 0 || !secs.is_finite() || secs <= 0.0 || secs > 365.0 * 86_400.0 {
            return Err(bad());
        }
        Ok(Quota::new(limit, Duration::from_secs_f64(secs)))
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.period.as_secs_f64();
        match s {
            s if s >= 86_400.0 && s % 86_400.0 == 0.0 => {
                write!(f, "{}/{}d", self.limit, s / 86_400.0)
            }
            s if s >= 3600.0 && s % 3600.0 == 0.0 => write!(f, "{}/{}h", self.limit, s / 3600.0),
            s if s >= 60.0 && s % 60.0 == 0.0 => write!(f, "{}/{}m", self.limit, s / 60.0),
            s => write!(f, "{}/{}s", self.limit, s),
        }
    }
}

/// Who counted a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// The store: the limit holds for the fleet.
    Fleet,
    /// This process, the store being unreachable: the limit holds per
    /// instance.
    Instance,
}

/// The answer to one request ([`RateLimiter::check`]), with what the
/// `RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Admitted.
    pub allowed: bool,
    /// The quota's limit.
    pub limit: u32,
    /// Requests still admitted now.
    pub remaining: u32,
    /// Until the limit is whole again.
    pub reset: Duration,
    /// When refused: until a request can be admitted.
    pub retry_after: Duration,
    /// Who counted.
    pub scope: Scope,
}

/// Rate limits over a cache's store (see the module docs).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    cache: Cache,
    local: MemoryStore,
}

impl RateLimiter {
    /// Limits kept in `cache`'s store, under its namespace.
    #[must_use]
    pub fn new(cache: &Cache) -> Self {
        Self {
            cache: cache.clone(),
            local: MemoryStore::new().with_max_bytes(64 << 20),
        }
    }

    /// Counts one request of `subject` in `class` against `quota`.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] when `class` is not `[a-z0-9_]+`. Store failures are
    /// not errors: this process's own limiter answers instead.
    pub async fn check(&self, class: &str, subject: &str, quota: Quota) -> Result<Limited, Error> {
        if class.is_empty()
            || !class
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(Error::Key(crate::key::KeyError::BadPattern(format!(
                "rate limit class {class:?} must be [a-z0-9_]+"
            ))));
        }
        let c = &self.cache.inner;
        let key = c
            .keys
            .value_key(&RATE_LIMIT, &format!("{class}.{}", subject_id(subject)))?;
        let (d, scope) = match c
            .call(None, c.store.rate(&key, quota.limit, quota.period))
            .await
        {
            Ok(d) => (d, Scope::Fleet),
            Err(e) => {
                tracing::debug!(error = %e, "rate limit: store unavailable, counting in process");
                metrics::counter!("cache_rate_limit_local_total", "class" => class.to_owned())
                    .increment(1);
                let d = self
                    .local
                    .rate(&key, quota.limit, quota.period)
                    .await
                    .map_err(Error::Unavailable)?;
                (d, Scope::Instance)
            }
        };
        metrics::counter!(
            "cache_rate_limit_checks_total",
            "class" => class.to_owned(),
            "outcome" => if d.allowed { "allowed" } else { "limited" },
        )
        .increment(1);
        Ok(Limited {
            allowed: d.allowed,
            limit: quota.limit,
            remaining: d.remaining,
            reset: d.reset,
            retry_after: d.retry_after,
            scope,
        })
    }
}

/// A subject as a key id: itself when it is one, else a 128-bit hash of it
/// (`h-<32 hex>`), so any `sub` claim is usable.
fn subject_id(subject: &str) -> std::borrow::Cow<'_, str> {
    if subject.len() <= 200 && !subject.starts_with("h-") && validate_id(subject).is_ok() {
        return std::borrow::Cow::Borrowed(subject);
    }
    let fnv = |seed: u64| {
        subject.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    std::borrow::Cow::Owned(format!(
        "h-{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse() {
        let q: Quota = "1000/1h".parse().unwrap();
        assert_eq!((q.limit(), q.period()), (1000, Duration::from_secs(3600)));
        assert_eq!(
            "5/30s".parse::<Quota>().unwrap().period(),
            Duration::from_secs(30)
        );
        assert_eq!(
            "5/m".parse::<Quota>().unwrap().period(),
            Duration::from_secs(60)
        );
        assert_eq!(
            "5/250ms".parse::<Quota>().unwrap().period(),
            Duration::from_millis(250)
        );
        assert_eq!("100/1h".parse::<Quota>().unwrap().to_string(), "100/1h");
        for bad in ["", "100", "0/1h", "x/1h", "10/1y", "10/-1s", "10/0s"] {
            assert!(bad.parse::<Quota>().is_err(), "{bad}");
        }
    }

    #[test]
    fn subjects_become_key_ids() {
        assert_eq!(subject_id("alice"), "alice");
        let odd = subject_id("user:1 {x}");
        assert!(odd.starts_with("h-") && validate_id(&odd).is_ok());
        assert_ne!(subject_id("user:1"), subject_id("user:2"));
        assert_ne!(subject_id("h-abc"), std::borrow::Cow::Borrowed("h-abc"));
    }
}
