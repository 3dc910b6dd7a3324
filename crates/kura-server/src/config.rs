//! Configuration: the flag groups shared by the commands (each flag also an
//! environment variable) and the [`Config`] the service is started with.
//!
//! Tests build a [`Config`] directly; the binary builds it from
//! [`ServeArgs`].

mod freshness;

pub use self::freshness::{EagerRefreshSetting, FreshnessConfig, LoadTimeoutSetting};

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

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

/// Database flags.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL (`postgres://…`) or SQLite (`sqlite:path`) URL; without
    /// it, SQLite at `./kura.db`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Most database connections open at once.
    #[arg(long, env = "KURA_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Database connections kept open when idle.
    #[arg(long, env = "KURA_DB_MIN_CONNECTIONS", default_value_t = 0)]
    pub db_min_connections: u32,
    /// How long a query waits for a free connection.
    #[arg(long, env = "KURA_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_acquire_timeout: Duration,
}

impl DbArgs {
    /// The pool settings.
    #[must_use]
    pub fn pool(&self) -> PoolOptions {
        PoolOptions {
            max_connections: self.db_max_connections,
            min_connections: self.db_min_connections,
            acquire_timeout: self.db_acquire_timeout,
        }
    }
}

/// Cache flags.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Redis URL (`redis://[:password@]host:port[/db]`, `rediss://` for
    /// TLS); without it, the embedded in-process memory store.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Key namespace: keys are `<namespace>:profile:<user_id>`.
    #[arg(long, env = "KURA_NAMESPACE", default_value = "cache")]
    pub namespace: String,
    /// Upper bound on one Redis operation; past it the database answers.
    #[arg(long, env = "KURA_REDIS_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,
    /// Per-type TTL override, `TYPE=DURATION` (repeatable, or
    /// comma-separated in the variable); `profile=0` disables caching.
    #[arg(long = "ttl", env = "KURA_TTL", value_delimiter = ',')]
    pub ttl: Vec<TtlOverride>,
    /// How long past its TTL a profile is kept to be served flagged
    /// `stale` when the database fails (0: no stale copies).
    #[arg(long, env = "KURA_MAX_STALE", default_value = "0s", value_parser = parse_duration)]
    pub max_stale: Duration,
    /// Memory budget of the embedded store, in MiB (without Redis).
    #[arg(long, env = "KURA_MEMORY_MAX_MB", default_value_t = 256)]
    pub memory_max_mb: usize,
    /// In-process near cache per type, `TYPE=ENTRIES` (repeatable, or
    /// comma-separated in the variable), e.g. `profile=10000`; kept
    /// consistent by Redis client-side tracking. Off by default; ignored on
    /// the embedded store.
    #[arg(long = "near-cache", env = "KURA_NEAR_CACHE", value_delimiter = ',')]
    pub near_cache: Vec<NearCacheSetting>,
    /// Byte bound of each type's near cache, in MiB.
    #[arg(long, env = "KURA_NEAR_CACHE_MAX_MB", default_value_t = 64)]
    pub near_cache_max_mb: u64,
    /// Longest an entry stays in a near cache (a backstop behind the
    /// invalidations).
    #[arg(long, env = "KURA_NEAR_CACHE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub near_cache_ttl: Duration,
    /// Reload hot values before they expire, `TYPE=BETA` (repeatable, or
    /// comma-separated in the variable), e.g. `profile=1.0`: XFetch with
    /// factor BETA, one background reload per key across the fleet. Off by
    /// default.
    #[arg(
        long = "eager-refresh",
        env = "KURA_EAGER_REFRESH",
        value_delimiter = ','
    )]
    pub eager_refresh: Vec<EagerRefreshSetting>,
    /// A load slower than this answers the stale copy (`X-Cache: stale`,
    /// needs `--max-stale`) and fills in the background, `TYPE=DURATION`
    /// (repeatable, or comma-separated), e.g. `profile=100ms`.
    #[arg(
        long = "load-soft-timeout",
        env = "KURA_LOAD_SOFT_TIMEOUT",
        value_delimiter = ','
    )]
    pub load_soft_timeout: Vec<LoadTimeoutSetting>,
    /// A load slower than this answers 504 when no stale copy is on hand
    /// (and still fills in the background), `TYPE=DURATION` (repeatable,
    /// or comma-separated), e.g. `profile=2s`.
    #[arg(
        long = "load-hard-timeout",
        env = "KURA_LOAD_HARD_TIMEOUT",
        value_delimiter = ','
    )]
    pub load_hard_timeout: Vec<LoadTimeoutSetting>,
}

/// Authentication flags.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// HS256 secret the bearer tokens are signed with.
    #[arg(long, env = "KURA_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// JWKS URL to verify RS256 tokens against.
    #[arg(long, env = "KURA_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Required `iss` claim.
    #[arg(long, env = "KURA_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "KURA_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Longest a JWKS is used before it is fetched again (sooner when its
    /// `Cache-Control: max-age` says so): a key removed from the set stops
    /// verifying within it.
    #[arg(long, env = "KURA_JWKS_REFRESH", default_value = "60s", value_parser = parse_duration)]
    pub jwks_refresh: Duration,
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

/// Write-behind flags, shared by `kura serve` and `kura flush`.
#[derive(Debug, Clone, Args)]
pub struct WriteBehindArgs {
    /// Flushers run by this process (`kura serve`: 0 leaves flushing to a
    /// dedicated `kura flush` worker).
    #[arg(long, env = "KURA_WB_FLUSHERS", default_value_t = 1)]
    pub wb_flushers: usize,
    /// Most queued writes applied in one database transaction.
    #[arg(long, env = "KURA_WB_BATCH", default_value_t = 256)]
    pub wb_batch: usize,
    /// How long a flusher waits for a batch to fill once a write arrived.
    #[arg(long, env = "KURA_WB_LINGER", default_value = "20ms", value_parser = parse_duration)]
    pub wb_linger: Duration,
    /// Back-pressure: queued writes past which `behind` writes are refused
    /// (0: no limit).
    #[arg(long, env = "KURA_WB_MAX_DEPTH", default_value_t = 100_000)]
    pub wb_max_depth: u64,
    /// Back-pressure: age of the oldest queued write past which `behind`
    /// writes are refused (0: no limit).
    #[arg(long, env = "KURA_WB_MAX_AGE", default_value = "60s", value_parser = parse_duration)]
    pub wb_max_age: Duration,
    /// What a refused `behind` write does: write through, or answer 503
    /// with `Retry-After`.
    #[arg(long, env = "KURA_WB_ON_FULL", value_enum, default_value_t = OnFull::Through)]
    pub wb_on_full: OnFull,
    /// After how long the writes a stopped flusher had taken are taken over
    /// by another (longer than the slowest batch).
    #[arg(long, env = "KURA_WB_CLAIM_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub wb_claim_idle: Duration,
    /// Database rejections of one write before it goes to the dead-letter
    /// stream.
    #[arg(long, env = "KURA_WB_MAX_ATTEMPTS", default_value_t = 5)]
    pub wb_max_attempts: u32,
    /// Replicas that must confirm a `behind` write (Redis `WAIT`) before it
    /// is acknowledged, so that it survives a failover to one of them
    /// (0: acknowledged once the primary has it).
    #[arg(long, env = "KURA_WB_MIN_REPLICAS", default_value_t = 0)]
    pub wb_min_replicas: u32,
    /// How long a `behind` write waits for those replicas before it answers
    /// 503 (it stays queued and may still be applied; a retry is safe).
    #[arg(long, env = "KURA_WB_REPLICA_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub wb_replica_timeout: Duration,
    /// Dead letters kept in the dead-letter stream (the oldest are trimmed
    /// past it; 0: no bound).
    #[arg(long, env = "KURA_WB_DEAD_LETTER_MAX", default_value_t = kura::BehindLimits::DEFAULT_DEAD_LETTER_MAX)]
    pub wb_dead_letter_max: u64,
    /// Take `behind` writes even on a Redis whose `maxmemory-policy` may
    /// evict keys without a TTL (`allkeys-*`), which can drop queued writes
    /// (without it such writes are written through).
    #[arg(long, env = "KURA_WB_ALLOW_EVICTION")]
    pub wb_allow_eviction: bool,
}

impl WriteBehindArgs {
    /// The settings.
    #[must_use]
    pub fn config(&self) -> WbConfig {
        WbConfig {
            flushers: self.wb_flushers,
            batch: self.wb_batch.max(1),
            linger: self.wb_linger,
            max_depth: self.wb_max_depth,
            max_age: self.wb_max_age,
            on_full: self.wb_on_full,
            claim_idle: self.wb_claim_idle,
            max_attempts: self.wb_max_attempts.max(1),
            min_replicas: self.wb_min_replicas,
            replica_timeout: self.wb_replica_timeout,
            dead_letter_max: self.wb_dead_letter_max,
            allow_eviction: self.wb_allow_eviction,
        }
    }
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

/// `--invalidation-feed`: whether this process relays the database's
/// invalidation log to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
#[non_exhaustive]
pub enum FeedMode {
    /// Relay when the database has the log (every database `kura migrate`
    /// prepared does).
    #[default]
    On,
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

/// Invalidation feed flags of `kura serve`.
#[derive(Debug, Clone, Args)]
pub struct FeedArgs {
    /// Relay the database's invalidation log to the cache (`on` when the
    /// database has one, `off`).
    #[arg(long, env = "KURA_INVALIDATION_FEED", value_enum, default_value_t = FeedMode::On)]
    pub invalidation_feed: FeedMode,
    /// How often the relay reads the log without a wake-up (default 1s on
    /// PostgreSQL, which also wakes it by `NOTIFY`; 100ms on SQLite).
    #[arg(long, env = "KURA_FEED_POLL", value_parser = parse_duration)]
    pub feed_poll: Option<Duration>,
    /// How long applied log entries are kept before they are deleted.
    #[arg(long, env = "KURA_FEED_RETENTION", default_value = "1h", value_parser = parse_duration)]
    pub feed_retention: Duration,
    /// Unapplied log entries past which, while the cache is unreachable,
    /// the relay stops replaying entity by entity and clears the affected
    /// types once the cache is back.
    #[arg(long, env = "KURA_FEED_MAX_BACKLOG", default_value_t = FeedConfig::DEFAULT_MAX_BACKLOG)]
    pub feed_max_backlog: u64,
    /// PostgreSQL: wake the relay by `LISTEN` on the triggers' `NOTIFY`
    /// (`false`: poll only, e.g. behind a transaction-pooling proxy, which
    /// cannot hold a `LISTEN`).
    #[arg(long, env = "KURA_FEED_LISTEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub feed_listen: bool,
}

impl FeedArgs {
    /// The settings.
    #[must_use]
    pub fn config(&self) -> FeedConfig {
        FeedConfig {
            mode: self.invalidation_feed,
            poll: self.feed_poll.filter(|d| !d.is_zero()),
            retention: self.feed_retention,
            max_backlog: self.feed_max_backlog,
            listen: self.feed_listen,
        }
    }
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
}

impl FeedConfig {
    /// Default `--feed-max-backlog`.
    pub const DEFAULT_MAX_BACKLOG: u64 = 100_000;
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
            mode: FeedMode::On,
            poll: None,
            retention: Duration::from_secs(3600),
            max_backlog: Self::DEFAULT_MAX_BACKLOG,
            listen: true,
        }
    }
}

/// `kura serve` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KURA_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Serve `/metrics` on this address, a listener of its own, and not on
    /// the API port (unset: `/metrics` is on the API port).
    #[arg(long, env = "KURA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Write strategy of `PUT` requests that name none.
    #[arg(long, env = "KURA_WRITE_STRATEGY", value_enum, default_value_t = WriteStrategy::Invalidate)]
    pub write_strategy: WriteStrategy,
    /// Warm the cache with recently active users after start-up (in the
    /// background; readiness is not delayed).
    #[arg(long, env = "KURA_WARM_ON_START")]
    pub warm_on_start: bool,
    /// How many profiles start-up warming loads.
    #[arg(long, env = "KURA_WARM_LIMIT", default_value_t = 1000)]
    pub warm_limit: u64,
    /// Start-up warming takes users who logged in within this many days.
    #[arg(long, env = "KURA_WARM_SINCE_DAYS", default_value_t = 7)]
    pub warm_since_days: u32,
    /// Requests that take longer answer 504.
    #[arg(long, env = "KURA_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Rate limit per token subject, `CLASS=N/PERIOD` for the classes
    /// `read`, `write`, `batch` and `admin` (repeatable, or comma-separated
    /// in the variable), e.g. `read=1000/1h,write=100/1h`; off unless set.
    #[arg(long = "rate-limit", env = "KURA_RATE_LIMIT", value_delimiter = ',')]
    pub rate_limit: Vec<RateLimitSetting>,
    /// Check every request's token against the revocations (`jti`,
    /// `sid`); `off` only for measuring what the checks cost.
    #[arg(long, env = "KURA_REVOCATION", value_enum, default_value_t = Switch::On)]
    pub revocation: Switch,
    /// Record per-route request metrics (`http_requests_total`,
    /// `http_request_duration_seconds`).
    #[arg(long, env = "KURA_HTTP_METRICS", value_enum, default_value_t = Switch::On)]
    pub http_metrics: Switch,
    /// Sessions kept per user: a new one past the cap revokes the oldest.
    #[arg(long, env = "KURA_MAX_SESSIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions: u32,
    /// How long shutdown waits for requests in flight.
    #[arg(long, env = "KURA_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Demo mode: embedded SQLite and memory store, demo profiles, a fresh
    /// HS256 secret and a ready-to-paste `curl` line.
    #[arg(long, env = "KURA_DEMO")]
    pub demo: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cache: CacheArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub auth: AuthArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub wb: WriteBehindArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub feed: FeedArgs,
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
