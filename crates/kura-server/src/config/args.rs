//! The command-line arguments (each also an environment variable) that
//! make a [`Config`](super::Config): the database, the cache, auth, write-behind, the
//! invalidation feed, and `kura serve`'s own.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::db::PoolOptions;

use super::{
    EagerRefreshSetting, FeedConfig, FeedMode, LoadTimeoutSetting, NearCacheSetting, OnFull,
    RateLimitSetting, Switch, TtlOverride, WbConfig, WriteStrategy, parse_duration,
};

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

/// Invalidation feed flags of `kura serve`.
#[derive(Debug, Clone, Args)]
pub struct FeedArgs {
    /// Where the cache learns of the database's committed changes: `wal`
    /// (PostgreSQL's logical replication; no trigger in the fed tables),
    /// `log` (the trigger log; `on` is an alias), `off`; `auto` (default):
    /// `wal` when the PostgreSQL server allows it, else `log`.
    #[arg(long, env = "KURA_INVALIDATION_FEED", value_enum, default_value_t = FeedMode::Auto)]
    pub invalidation_feed: FeedMode,
    /// WAL feed: a transaction changing more rows of one type than this
    /// clears the type instead of invalidating row by row.
    #[arg(long, env = "KURA_FEED_BULK_CLEAR", default_value_t = FeedConfig::DEFAULT_BULK_CLEAR)]
    pub feed_bulk_clear: usize,
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
            bulk_clear: self.feed_bulk_clear.max(1),
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
