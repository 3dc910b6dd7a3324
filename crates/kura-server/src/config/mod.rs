//! Configuration: the flag groups shared by the commands (each flag also an
//! environment variable) and the [`Config`] the service is started with.
//!
//! Tests build a [`Config`] directly; the binary builds it from
//! [`ServeArgs`].

mod args;
mod freshness;
mod settings;

pub use self::args::{AuthArgs, CacheArgs, DbArgs, FeedArgs, ServeArgs, WriteBehindArgs};
pub use self::freshness::{EagerRefreshSetting, FreshnessConfig, LoadTimeoutSetting};
pub use self::settings::{NearCacheSetting, RATE_LIMIT_CLASSES, RateLimitSetting, TtlOverride};

use std::net::SocketAddr;
use std::time::Duration;

use clap::ValueEnum;

use crate::db::PoolOptions;

/// Which write strategy `PUT` uses when the request names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum WriteStrategy {
    /// Commit, then invalidate the cached profile (the default).
    #[default]
    Invalidate,
    /// Commit, then put the new version in the cache if an older one is
    /// cached.
    Through,
    /// Accept the write into the cache and its write-behind queue, flush it
    /// to the database later.
    Behind,
}

impl WriteStrategy {
    /// `invalidate`, `through` or `behind`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WriteStrategy::Invalidate => "invalidate",
            WriteStrategy::Through => "through",
            WriteStrategy::Behind => "behind",
        }
    }

    /// Parses a query-string value.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "invalidate" => Some(WriteStrategy::Invalidate),
            "through" => Some(WriteStrategy::Through),
            "behind" => Some(WriteStrategy::Behind),
            _ => None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses `250ms`, `2s`, `5m`, `1h`; a bare number is seconds.
///
/// # Errors
///
/// A message for anything else.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 250ms, 2s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What a `behind` write does when the write-behind queue is past its
/// depth or age limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
#[non_exhaustive]
pub enum OnFull {
    /// Write through to the database instead (the default); a profile that
    /// still has queued writes answers 503 instead, so that the direct
    /// write cannot overtake them.
    #[default]
    Through,
    /// Answer 503 with `Retry-After`.
    Reject,
}

/// Write-behind settings (see [`WriteBehindArgs`] for each).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WbConfig {
    /// Flushers run by the process.
    pub flushers: usize,
    /// Batch size.
    pub batch: usize,
    /// Batch linger time.
    pub linger: Duration,
    /// Queue depth limit (0: none).
    pub max_depth: u64,
    /// Oldest-entry age limit (zero: none).
    pub max_age: Duration,
    /// Behaviour past a limit.
    pub on_full: OnFull,
    /// Idle time before entries of a stopped flusher are reclaimed.
    pub claim_idle: Duration,
    /// Rejections before dead-lettering.
    pub max_attempts: u32,
    /// Replicas that must confirm a write before it is acknowledged.
    pub min_replicas: u32,
    /// How long to wait for them.
    pub replica_timeout: Duration,
    /// Dead letters kept (0: no bound).
    pub dead_letter_max: u64,
    /// Take `behind` writes on a Redis that may evict keys without a TTL.
    pub allow_eviction: bool,
}

impl WbConfig {
    /// The queue limits of these settings.
    #[must_use]
    pub fn limits(&self) -> kura::BehindLimits {
        kura::BehindLimits::new(self.max_depth, self.max_age)
            .replicas(self.min_replicas, self.replica_timeout)
            .dead_letter_max(self.dead_letter_max)
            .allow_eviction(self.allow_eviction)
    }
}

impl Default for WbConfig {
    fn default() -> Self {
        Self {
            flushers: 1,
            batch: 256,
            linger: Duration::from_millis(20),
            max_depth: 100_000,
            max_age: Duration::from_secs(60),
            on_full: OnFull::Through,
            claim_idle: Duration::from_secs(30),
            max_attempts: 5,
            min_replicas: 0,
            replica_timeout: Duration::from_secs(1),
            dead_letter_max: kura::BehindLimits::DEFAULT_DEAD_LETTER_MAX,
            allow_eviction: false,
        }
    }
}

/// `--invalidation-feed`: where this process reads the database's changes
/// from to invalidate the cache, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
#[non_exhaustive]
pub enum FeedMode {
    /// `wal` on a PostgreSQL server with `wal_level = logical`, `log`
    /// otherwise (with a warning that says what to change).
    #[default]
    Auto,
    /// PostgreSQL's WAL through a replication slot and a publication: no
    /// trigger in the fed tables (refuses to start when the server has no
    /// logical decoding).
    Wal,
    /// The trigger log (`on` is the same: the name earlier versions used).
    #[value(alias = "on")]
    Log,
    /// Do not relay (another instance or a dedicated process does; or no
    /// invalidations from the database at all).
    Off,
}

/// A feature turned `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Switch {
    /// On.
    #[default]
    On,
    /// Off.
    Off,
}

/// Invalidation feed settings (see [`FeedArgs`] for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedConfig {
    /// Whether the relay runs.
    pub mode: FeedMode,
    /// Poll interval; `None`: the backend's default
    /// ([`FeedConfig::poll_for`]).
    pub poll: Option<Duration>,
    /// Retention of applied entries.
    pub retention: Duration,
    /// Backlog bound while the cache is unreachable.
    pub max_backlog: u64,
    /// PostgreSQL: wake on `NOTIFY` (`false`: poll only).
    pub listen: bool,
    /// WAL feed: rows of one type changed by one transaction past which the
    /// type is cleared instead of invalidated row by row.
    pub bulk_clear: usize,
}

impl FeedConfig {
    /// Default `--feed-max-backlog`.
    pub const DEFAULT_MAX_BACKLOG: u64 = 100_000;
    /// Default `--feed-bulk-clear`.
    pub const DEFAULT_BULK_CLEAR: usize = 10_000;
    /// Default poll interval on PostgreSQL, where `NOTIFY` wakes the relay
    /// first and polling only catches a missed wake-up.
    pub const POSTGRES_POLL: Duration = Duration::from_secs(1);
    /// Default poll interval on SQLite, which has no notifications.
    pub const SQLITE_POLL: Duration = Duration::from_millis(100);

    /// The poll interval on `backend` (`postgres` or `sqlite`, as
    /// [`crate::db::Db::backend`] names it).
    #[must_use]
    pub fn poll_for(&self, backend: &str) -> Duration {
        self.poll.unwrap_or(if backend == "postgres" {
            Self::POSTGRES_POLL
        } else {
            Self::SQLITE_POLL
        })
    }
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            mode: FeedMode::Auto,
            poll: None,
            retention: Duration::from_secs(3600),
            max_backlog: Self::DEFAULT_MAX_BACKLOG,
            listen: true,
            bulk_clear: Self::DEFAULT_BULK_CLEAR,
        }
    }
}

/// How bearer tokens are verified.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AuthConfig {
    /// HS256 secret.
    pub jwt_secret: Option<String>,
    /// JWKS URL for RS256.
    pub jwks_url: Option<String>,
    /// Required issuer.
    pub issuer: Option<String>,
    /// Required audience.
    pub audience: Option<String>,
    /// Least time between two JWKS fetches (unknown key ids, a short
    /// `max-age`, a failed fetch).
    pub jwks_min_refresh: Duration,
    /// Longest a fetched JWKS is used: it is fetched again after this, or
    /// after its `Cache-Control: max-age` if shorter (never sooner than
    /// [`AuthConfig::jwks_min_refresh`]).
    pub jwks_refresh: Duration,
}

impl AuthConfig {
    /// HS256 with `secret`.
    #[must_use]
    pub fn hs256(secret: impl Into<String>) -> Self {
        Self {
            jwt_secret: Some(secret.into()),
            jwks_min_refresh: Duration::from_secs(30),
            jwks_refresh: Duration::from_secs(60),
            ..Self::default()
        }
    }
}

/// Everything the service is started with.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// Where `/metrics` is served apart from the API (port 0: any free
    /// port); `None`: on the API port.
    pub metrics_listen: Option<SocketAddr>,
    /// Database URL; `None`: SQLite at `./kura.db`.
    pub database_url: Option<String>,
    /// Database pool settings.
    pub pool: PoolOptions,
    /// Redis URL; `None`: the embedded memory store.
    pub redis_url: Option<String>,
    /// Redis operation timeout.
    pub redis_timeout: Duration,
    /// Memory store budget in bytes.
    pub memory_max_bytes: usize,
    /// Key namespace.
    pub namespace: String,
    /// Per-type TTL overrides.
    pub ttl: Vec<TtlOverride>,
    /// Stale-copy lifetime of profiles past their TTL.
    pub max_stale: Duration,
    /// Near caches: `(type, entry bound)`.
    pub near_cache: Vec<NearCacheSetting>,
    /// Rate limits per request class and token subject (none: off).
    pub rate_limits: Vec<RateLimitSetting>,
    /// Byte bound of each near cache.
    pub near_cache_max_bytes: u64,
    /// Longest life of a near cache entry.
    pub near_cache_ttl: Duration,
    /// Eager refresh and load timeouts per type.
    pub freshness: FreshnessConfig,
    /// Default write strategy.
    pub write_strategy: WriteStrategy,
    /// Warm the cache in the background after start-up.
    pub warm_on_start: bool,
    /// Start-up warming size.
    pub warm_limit: u64,
    /// Start-up warming window in days.
    pub warm_since_days: u32,
    /// Request timeout (504 past it).
    pub request_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Largest accepted request body in bytes (413 past it).
    pub body_limit: usize,
    /// Token verification.
    pub auth: AuthConfig,
    /// Write-behind queue limits and flushers.
    pub wb: WbConfig,
    /// The invalidation feed relay.
    pub feed: FeedConfig,
    /// Whether requests' tokens are checked against the revocations.
    pub revocation: bool,
    /// Sessions kept per user.
    pub max_sessions: u32,
    /// Whether per-route request metrics are recorded.
    pub http_metrics: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: None,
            database_url: None,
            pool: PoolOptions::default(),
            redis_url: None,
            redis_timeout: Duration::from_millis(250),
            memory_max_bytes: 256 << 20,
            namespace: "cache".to_owned(),
            ttl: Vec::new(),
            max_stale: Duration::ZERO,
            near_cache: Vec::new(),
            rate_limits: Vec::new(),
            near_cache_max_bytes: 64 << 20,
            near_cache_ttl: Duration::from_secs(30),
            freshness: FreshnessConfig::default(),
            write_strategy: WriteStrategy::Invalidate,
            warm_on_start: false,
            warm_limit: 1000,
            warm_since_days: 7,
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            body_limit: 64 * 1024,
            auth: AuthConfig {
                jwks_min_refresh: Duration::from_secs(30),
                jwks_refresh: Duration::from_secs(60),
                ..AuthConfig::default()
            },
            wb: WbConfig::default(),
            feed: FeedConfig::default(),
            revocation: true,
            max_sessions: 10,
            http_metrics: true,
        }
    }
}

impl Config {
    /// A configuration from flags and environment.
    #[must_use]
    pub fn from_args(a: &ServeArgs) -> Self {
        let mut c = Config {
            listen: a.listen,
            metrics_listen: a.metrics_listen,
            write_strategy: a.write_strategy,
            warm_on_start: a.warm_on_start,
            warm_limit: a.warm_limit,
            warm_since_days: a.warm_since_days,
            request_timeout: a.request_timeout,
            rate_limits: a.rate_limit.clone(),
            shutdown_grace: a.shutdown_grace,
            wb: a.wb.config(),
            feed: a.feed.config(),
            revocation: a.revocation == Switch::On,
            max_sessions: a.max_sessions,
            http_metrics: a.http_metrics == Switch::On,
            ..Config::default()
        };
        c.apply_db(&a.db);
        c.apply_cache(&a.cache);
        c.auth.jwt_secret = a.auth.jwt_secret.clone().filter(|s| !s.is_empty());
        c.auth.jwks_url = a.auth.jwks_url.clone().filter(|s| !s.is_empty());
        c.auth.issuer = a.auth.jwt_issuer.clone().filter(|s| !s.is_empty());
        c.auth.audience = a.auth.jwt_audience.clone().filter(|s| !s.is_empty());
        c.auth.jwks_refresh = a.auth.jwks_refresh;
        c
    }

    /// Takes the database flags.
    pub fn apply_db(&mut self, a: &DbArgs) {
        self.database_url = a.database_url.clone().filter(|s| !s.is_empty());
        self.pool = a.pool();
    }

    /// Takes the cache flags.
    pub fn apply_cache(&mut self, a: &CacheArgs) {
        self.redis_url = a.redis_url.clone().filter(|s| !s.is_empty());
        self.namespace = a.namespace.clone();
        self.redis_timeout = a.redis_timeout;
        self.ttl = a.ttl.clone();
        self.max_stale = a.max_stale;
        self.memory_max_bytes = a.memory_max_mb << 20;
        self.near_cache = a.near_cache.clone();
        self.near_cache_max_bytes = a.near_cache_max_mb.max(1) << 20;
        self.near_cache_ttl = a.near_cache_ttl;
        self.freshness = FreshnessConfig {
            eager_refresh: a.eager_refresh.clone(),
            load_soft_timeout: a.load_soft_timeout.clone(),
            load_hard_timeout: a.load_hard_timeout.clone(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn near_cache_settings() {
        let n: NearCacheSetting = "profile=10000".parse().unwrap();
        assert_eq!((n.kind.as_str(), n.entries), ("profile", 10_000));
        for (bad, says) in [
            ("profile", "TYPE=ENTRIES"),
            ("document_meta=10", "available for profile"),
            ("profile=many", "whole number"),
            ("profile=0", "at least one"),
        ] {
            let e = bad.parse::<NearCacheSetting>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn ttl_overrides() {
        let t: TtlOverride = "profile=300".parse().unwrap();
        assert_eq!(t.kind, "profile");
        assert_eq!(t.ttl, Duration::from_secs(300));
        assert!("profile".parse::<TtlOverride>().is_err());
        assert!("Pro=1".parse::<TtlOverride>().is_err());
    }
}
