//! The freshness flags: `--eager-refresh TYPE=BETA`, `--load-soft-timeout`
//! and `--load-hard-timeout TYPE=DURATION` (see [`kura::freshness`]).

use std::time::Duration;

use kura::freshness::EagerRefresh;

use super::parse_duration;
use crate::registry;

/// A type name these flags may name: one of the registry's.
fn cached_type(kind: &str) -> Result<String, String> {
    let kind = kind.trim();
    let names = registry::configurable_names();
    if names.contains(&kind) {
        Ok(kind.to_owned())
    } else {
        Err(format!(
            "{kind:?}: the cached types are {}",
            names.join(", ")
        ))
    }
}

/// One `--eager-refresh type=beta` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EagerRefreshSetting {
    /// The data type.
    pub kind: String,
    /// Its XFetch rule.
    pub rule: EagerRefresh,
}

impl std::str::FromStr for EagerRefreshSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, beta) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected TYPE=BETA, e.g. profile=1.0"))?;
        let beta: f64 = beta
            .trim()
            .parse()
            .map_err(|_| format!("{beta:?}: the factor is a number, e.g. 1.0"))?;
        Ok(Self {
            kind: cached_type(kind)?,
            rule: EagerRefresh::new(beta)?,
        })
    }
}

/// One `--load-soft-timeout` / `--load-hard-timeout` `type=duration`
/// setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadTimeoutSetting {
    /// The data type.
    pub kind: String,
    /// The timeout (above zero).
    pub timeout: Duration,
}

impl std::str::FromStr for LoadTimeoutSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, d) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected TYPE=DURATION, e.g. profile=100ms"))?;
        let timeout = parse_duration(d)?;
        if timeout.is_zero() {
            return Err(format!("{s:?}: a load timeout is above zero"));
        }
        Ok(Self {
            kind: cached_type(kind)?,
            timeout,
        })
    }
}

/// The freshness settings applied to the TTL table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreshnessConfig {
    /// Eager refresh per type (none: off).
    pub eager_refresh: Vec<EagerRefreshSetting>,
    /// Soft load timeouts per type.
    pub load_soft_timeout: Vec<LoadTimeoutSetting>,
    /// Hard load timeouts per type.
    pub load_hard_timeout: Vec<LoadTimeoutSetting>,
}

impl FreshnessConfig {
    /// Puts the settings into `policy`.
    pub fn apply(&self, policy: &mut kura::TtlPolicy) {
        for e in &self.eager_refresh {
            let mut p = policy.get(&e.kind);
            p.eager_refresh = Some(e.rule);
            policy.set(&e.kind, p);
        }
        for t in &self.load_soft_timeout {
            let mut p = policy.get(&t.kind);
            p.load_soft_timeout = Some(t.timeout);
            policy.set(&t.kind, p);
        }
        for t in &self.load_hard_timeout {
            let mut p = policy.get(&t.kind);
            p.load_hard_timeout = Some(t.timeout);
            policy.set(&t.kind, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_or_say_why() {
        let e: EagerRefreshSetting = "profile=1.0".parse().unwrap();
        assert_eq!(
            (e.kind.as_str(), e.rule),
            ("profile", EagerRefresh::DEFAULT)
        );
        let t: LoadTimeoutSetting = "settings=100ms".parse().unwrap();
        assert_eq!(t.timeout, Duration::from_millis(100));
        for (bad, says) in [
            ("profile", "TYPE=BETA"),
            ("profile=fast", "a number"),
            ("profile=0", "(0, 1000]"),
            ("avatar=1", "the cached types"),
        ] {
            let e = bad.parse::<EagerRefreshSetting>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        for (bad, says) in [
            ("profile", "TYPE=DURATION"),
            ("profile=soon", "not a duration"),
            ("profile=0ms", "above zero"),
            ("avatar=1s", "the cached types"),
        ] {
            let e = bad.parse::<LoadTimeoutSetting>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn apply_sets_the_policy() {
        let c = FreshnessConfig {
            eager_refresh: vec!["profile=2".parse().unwrap()],
            load_soft_timeout: vec!["profile=100ms".parse().unwrap()],
            load_hard_timeout: vec!["settings=1s".parse().unwrap()],
        };
        let mut p = registry::ttl_policy();
        c.apply(&mut p);
        let profile = p.get("profile");
        assert_eq!(profile.eager_refresh, Some(EagerRefresh::new(2.0).unwrap()));
        assert_eq!(profile.load_soft_timeout, Some(Duration::from_millis(100)));
        assert_eq!(
            p.get("settings").load_hard_timeout,
            Some(Duration::from_secs(1))
        );
        assert_eq!(p.get("settings").eager_refresh, None);
    }
}
