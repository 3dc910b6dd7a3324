//! The values of the repeatable flags: `--ttl TYPE=DURATION`,
//! `--near-cache TYPE=ENTRIES`, `--rate-limit CLASS=N/PERIOD`.

use std::time::Duration;

use super::parse_duration;

/// One `--ttl type=seconds` override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlOverride {
    /// The data type (`profile`, `settings`, …).
    pub kind: String,
    /// Its TTL; zero disables caching for the type.
    pub ttl: Duration,
}

impl std::str::FromStr for TtlOverride {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, ttl) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected TYPE=DURATION, e.g. profile=300"))?;
        let kind = kind.trim();
        if kind.is_empty()
            || !kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!("{kind:?}: a type name is [a-z0-9_]+"));
        }
        Ok(TtlOverride {
            kind: kind.to_owned(),
            ttl: parse_duration(ttl)?,
        })
    }
}

/// One `--near-cache type=entries` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NearCacheSetting {
    /// The data type (`profile`, …).
    pub kind: String,
    /// Its near cache's entry bound.
    pub entries: u64,
}

impl std::str::FromStr for NearCacheSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, entries) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected TYPE=ENTRIES, e.g. profile=10000"))?;
        let kind = kind.trim();
        let names = crate::registry::configurable_names();
        if !names.contains(&kind) {
            return Err(format!(
                "{kind:?}: a near cache is available for {}",
                names.join(", ")
            ));
        }
        let entries: u64 = entries
            .trim()
            .parse()
            .map_err(|_| format!("{entries:?}: the entry bound is a whole number"))?;
        if entries == 0 {
            return Err(format!("{s:?}: at least one entry"));
        }
        Ok(NearCacheSetting {
            kind: kind.to_owned(),
            entries,
        })
    }
}

/// One `--rate-limit class=N/PERIOD` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSetting {
    /// `read`, `write`, `batch` or `admin`.
    pub class: String,
    /// Its limit per token subject.
    pub quota: kura::ratelimit::Quota,
}

/// The request classes a rate limit can name.
pub const RATE_LIMIT_CLASSES: &[&str] = &["read", "write", "batch", "admin"];

impl std::str::FromStr for RateLimitSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (class, quota) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected CLASS=N/PERIOD, e.g. read=1000/1h"))?;
        let class = class.trim();
        if !RATE_LIMIT_CLASSES.contains(&class) {
            return Err(format!(
                "{class:?}: a rate limit class is one of {}",
                RATE_LIMIT_CLASSES.join(", ")
            ));
        }
        Ok(RateLimitSetting {
            class: class.to_owned(),
            quota: quota
                .parse()
                .map_err(|e: kura::ratelimit::QuotaError| e.to_string())?,
        })
    }
}
