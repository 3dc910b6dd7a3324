//! The `kura` command line: every flag is also an environment variable.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::config::{CacheArgs, DbArgs, LogFormat, ServeArgs, WriteBehindArgs};

pub mod commands;
pub mod feed;
mod signal;
pub mod watch;
pub mod wb;

/// Runs a parsed command line.
///
/// # Errors
///
/// Whatever the command fails with.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    crate::telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::Serve(a) => commands::serve(a).await,
        Command::Migrate(a) => commands::migrate(a).await,
        Command::Seed(a) => commands::seed(a).await,
        Command::Warm(a) => commands::warm(a).await,
        Command::Invalidate(a) => commands::invalidate(a).await,
        Command::Stats(a) => commands::stats(a).await,
        Command::Token(a) => commands::token(&a),
        Command::Flush(a) => wb::flush(a).await,
        Command::Wb(a) => wb::wb(a).await,
        Command::Feed(a) => feed::command(a).await,
        Command::Bench(a) => kura_bench::run(a).await.map(drop),
    }
}

/// kura: a user profile service over a Redis cache, and its admin tools.
#[derive(Debug, Parser)]
#[command(name = "kura", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "KURA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Apply the database migrations.
    Migrate(MigrateArgs),
    /// Insert deterministic demo profiles.
    Seed(SeedArgs),
    /// Load recently active users' profiles into the cache.
    Warm(WarmArgs),
    /// Remove entries from the cache.
    Invalidate(InvalidateArgs),
    /// Show the cache hit rate and counters.
    Stats(StatsArgs),
    /// Print an HS256 token signed with `KURA_JWT_SECRET`.
    Token(TokenArgs),
    /// Apply the write-behind queue to the database (a dedicated flush
    /// worker; `--once` drains what is queued and exits).
    Flush(FlushArgs),
    /// Write-behind queue administration.
    Wb(WbArgs),
    /// Invalidation feed administration.
    Feed(FeedCommandArgs),
    /// Load-test a running service (GET or PUT over keep-alive
    /// connections; latency percentiles, X-Cache mix, hit ratio over time).
    Bench(kura_bench::BenchArgs),
}

/// `kura migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Which invalidation feed to prepare: `wal` (a publication and a
    /// replication slot, no trigger; removes kura's log triggers), `log`
    /// (`on`: the trigger log), `off` (the trigger log too, for other
    /// instances); `auto` (default): `wal` when the server allows it.
    #[arg(long, env = "KURA_INVALIDATION_FEED", value_enum, default_value_t = crate::config::FeedMode::Auto)]
    pub invalidation_feed: crate::config::FeedMode,
    /// Key namespace (names the WAL feed's slot and publication
    /// `kura_<namespace>`).
    #[arg(long, env = "KURA_NAMESPACE", default_value = "cache")]
    pub namespace: String,
}

/// `kura seed`.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// How many profiles to generate.
    #[arg(long, env = "KURA_SEED_PROFILES", default_value_t = 1000)]
    pub profiles: u64,
    /// Random seed: the same seed gives the same users.
    #[arg(long, env = "KURA_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Write the generated user ids here, one per line.
    #[arg(long, env = "KURA_SEED_IDS_OUT")]
    pub ids_out: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
}

/// `kura warm`.
#[derive(Debug, Args)]
pub struct WarmArgs {
    /// Most profiles to load.
    #[arg(long, env = "KURA_WARM_LIMIT", default_value_t = 1000)]
    pub limit: u64,
    /// Users who logged in within this many days.
    #[arg(long, env = "KURA_WARM_SINCE_DAYS", default_value_t = 7)]
    pub since_days: u32,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cache: CacheArgs,
}

/// `kura invalidate`: exactly one of `--user`, `--pattern`, `--all-profiles`,
/// `--tag`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["user", "pattern", "all_profiles", "tag"])))]
pub struct InvalidateArgs {
    /// Every cached entry of one user (profile, settings, preferences).
    #[arg(long)]
    pub user: Option<uuid::Uuid>,
    /// Every key matching a glob such as `cache:profile:*` (namespace and
    /// type literal; SCAN + UNLINK, never KEYS).
    #[arg(long)]
    pub pattern: Option<String>,
    /// Every cached profile: one step whatever their number (a clear; the
    /// entries expire by their TTL).
    #[arg(long)]
    pub all_profiles: bool,
    /// Every cached value carrying a tag (profiles carry `kind:profile`).
    #[arg(long)]
    pub tag: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cache: CacheArgs,
}

/// `kura stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print `{"hits","misses","total","hit_rate"}`.
    #[arg(long)]
    pub json: bool,
    /// A live view of running instances from their `/metrics` (hit ratio
    /// per type, req/s, p99, loads, write-behind depth, feed lag),
    /// refreshed every `--interval` until interrupted.
    #[arg(long, conflicts_with = "json")]
    pub watch: bool,
    /// An instance to watch (repeatable; with `--watch`).
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    pub urls: Vec<String>,
    /// How often the view refreshes (with `--watch`).
    #[arg(long, default_value = "1s", value_parser = crate::config::parse_duration)]
    pub interval: std::time::Duration,
    /// Stop after this many refreshes (with `--watch`; default: until
    /// interrupted).
    #[arg(long)]
    pub iterations: Option<u64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cache: CacheArgs,
}

/// `kura flush`.
#[derive(Debug, Args)]
pub struct FlushArgs {
    /// Drain what is queued now, print what was done and exit (instead of
    /// running until SIGTERM or SIGINT).
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cache: CacheArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub wb: WriteBehindArgs,
}

/// `kura wb`.
#[derive(Debug, Args)]
pub struct WbArgs {
    /// The subcommand.
    #[command(subcommand)]
    pub command: WbCommand,
}

/// `kura wb` subcommands.
#[derive(Debug, Subcommand)]
pub enum WbCommand {
    /// Queue depth, oldest pending write (the flush lag), writes being
    /// applied, and dead letters with their errors.
    Status(WbStatusArgs),
}

/// `kura wb status`.
#[derive(Debug, Args)]
pub struct WbStatusArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// How many of the newest dead letters to show.
    #[arg(long, default_value_t = 5)]
    pub dead_letters: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cache: CacheArgs,
}

/// `kura token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: uuid::Uuid,
    /// Add the `admin` role.
    #[arg(long)]
    pub admin: bool,
    /// Lifetime in seconds.
    #[arg(long, env = "KURA_TOKEN_TTL", default_value_t = 3600)]
    pub ttl: u64,
    /// Put the token in this session (`sid` claim): the service keeps a
    /// session for it, and revoking the session revokes the token. Every
    /// token carries a fresh `jti`.
    #[arg(long)]
    pub sid: Option<String>,
    /// The HS256 secret.
    #[arg(long, env = "KURA_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
}

/// `kura feed`.
#[derive(Debug, Args)]
pub struct FeedCommandArgs {
    /// The subcommand.
    #[command(subcommand)]
    pub command: FeedCommand,
}

/// `kura feed` subcommands.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
// Parsed once per process: the size of the status variant (it carries the
// cache flags) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum FeedCommand {
    /// The relay's position, the log's watermark, the backlog (entries not
    /// applied yet), the lag, and which instance is relaying.
    Status(FeedStatusArgs),
    /// Print the SQL that installs (or removes) the invalidation log and the
    /// `profiles` triggers, as `kura migrate` runs it: to review it, or to
    /// apply it with another migration tool.
    Sql(FeedSqlArgs),
}

/// `kura feed sql`.
#[derive(Debug, Args)]
pub struct FeedSqlArgs {
    /// The database dialect.
    #[arg(long, value_enum, default_value_t = SqlDialect::Postgres)]
    pub backend: SqlDialect,
    /// The SQL removing the triggers instead (the log table stays).
    #[arg(long)]
    pub remove: bool,
    /// The SQL of which feed: `log` (the log table and the triggers) or
    /// `wal` (the publication; the slot is made by `kura migrate` or the
    /// relay).
    #[arg(long, value_enum, default_value_t = SqlMode::Log)]
    pub mode: SqlMode,
    /// Key namespace (names the WAL feed's publication `kura_<namespace>`).
    #[arg(long, env = "KURA_NAMESPACE", default_value = "cache")]
    pub namespace: String,
}

/// Which feed's SQL `kura feed sql` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum SqlMode {
    /// The trigger log.
    Log,
    /// The WAL feed's publication.
    Wal,
}

/// A database dialect of `kura feed sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum SqlDialect {
    /// PostgreSQL 13 or later.
    Postgres,
    /// SQLite 3.
    Sqlite,
}

/// `kura feed status`.
#[derive(Debug, Args)]
pub struct FeedStatusArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cache: CacheArgs,
}
