//! The system of record: a PostgreSQL or SQLite pool ([`Db`]), its
//! migrations, and the invalidation log ([`feed`]).
//!
//! The queries of each table live with the feature that owns it
//! (`profiles/repo.rs`, `userdata/repo.rs`, `tokens/repo.rs`), written once
//! for both backends with the dialect helper ([`sql`]). Queries are built
//! at run time (no compile-time checked macros, so the crate builds
//! without a database).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub mod feed;
pub mod sql;

/// The PostgreSQL migrations, embedded.
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");
/// The SQLite migrations, embedded.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// The SQLite file used when no database URL is given.
pub const DEFAULT_SQLITE_FILE: &str = "kura.db";

/// A database failure. Details are logged, never shown to HTTP clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The database answered with an error or could not be reached.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Applying the migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names no supported backend.
    #[error("unsupported database url {0:?}: use postgres://… or sqlite:…")]
    Url(String),
    /// A row held a value that does not decode (bad UUID or timestamp text).
    #[error("malformed row: {0}")]
    Row(String),
    /// A fed table's trigger specification was refused by the library.
    #[error("invalidation feed: {0}")]
    Feed(#[from] kura::feed::SqlError),
}

/// Connection pool settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    /// Most connections open at once.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a query waits for a free connection.
    pub acquire_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// What [`Db::migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Schema migrations applied now (0: the schema was up to date).
    pub applied: u64,
    /// Fed tables whose invalidation triggers were (re)installed now.
    pub feed_installed: Vec<String>,
}

/// The database: a PostgreSQL or SQLite pool. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Db {
    /// PostgreSQL (production).
    Postgres(PgPool),
    /// SQLite (the embedded default).
    Sqlite(SqlitePool),
}

impl Db {
    /// Connects to `url`: `postgres://…`/`postgresql://…` or `sqlite:…`;
    /// `None` opens (creating it if needed) the SQLite file
    /// [`DEFAULT_SQLITE_FILE`] in the working directory.
    ///
    /// # Errors
    ///
    /// [`DbError::Url`] for an unknown scheme, [`DbError::Sqlx`] when the
    /// database cannot be reached.
    pub async fn connect(url: Option<&str>, pool: PoolOptions) -> Result<Self, DbError> {
        /// Idle time after which a pooled connection is pinged before use.
        const STALE_AFTER: Duration = Duration::from_secs(30);
        let url = url.filter(|u| !u.is_empty());
        match url {
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                // The server's notices ("relation … already exists,
                // skipping" from every idempotent migration step) are not
                // kura's to show: warnings and errors only.
                let opts =
                    PgConnectOptions::from_str(u)?.options([("client_min_messages", "warning")]);
                let pool = PgPoolOptions::new()
                    .max_connections(pool.max_connections)
                    .min_connections(pool.min_connections)
                    .acquire_timeout(pool.acquire_timeout)
                    // The default pings every connection before each use: a
                    // second round trip on every miss and write. Ping only
                    // connections idle long enough to have gone stale (a
                    // broken busy one fails its query, and the pool drops it).
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for > STALE_AFTER {
                                sqlx::Connection::ping(conn).await?;
                            }
                            Ok(true)
                        })
                    })
                    .connect_with(opts)
                    .await?;
                Ok(Db::Postgres(pool))
            }
            Some(u) if u.starts_with("sqlite:") => {
                Self::sqlite(SqliteConnectOptions::from_str(u)?, pool).await
            }
            Some(u) => Err(DbError::Url(u.to_owned())),
            None => {
                Self::sqlite(
                    SqliteConnectOptions::new().filename(DEFAULT_SQLITE_FILE),
                    pool,
                )
                .await
            }
        }
    }

    async fn sqlite(opts: SqliteConnectOptions, pool: PoolOptions) -> Result<Self, DbError> {
        let opts = opts
            .create_if_missing(true)
            // WAL lets readers run while one writer commits.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(pool.max_connections.max(1))
            .min_connections(pool.min_connections)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(opts)
            .await?;
        Ok(Db::Sqlite(pool))
    }

    /// `postgres` or `sqlite`.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the embedded migrations of this backend, then installs the
    /// invalidation log and the fed tables' triggers with the library's SQL
    /// ([`Db::install_feed`]; a no-op when they are current); says what it
    /// did.
    ///
    /// # Errors
    ///
    /// [`DbError::Migrate`], or [`DbError::Sqlx`] from the feed install.
    pub async fn migrate(&self) -> Result<Migrated, DbError> {
        let applied = self.migrate_schema().await?;
        let feed_installed = self.install_feed().await?;
        Ok(Migrated {
            applied,
            feed_installed,
        })
    }

    /// Applies the schema migrations only (no feed triggers: the WAL feed
    /// installs none); returns how many were applied now.
    ///
    /// # Errors
    ///
    /// [`DbError::Migrate`].
    pub async fn migrate_schema(&self) -> Result<u64, DbError> {
        let before = self.applied_migrations().await?;
        match self {
            Db::Postgres(p) => PG_MIGRATOR.run(p).await?,
            Db::Sqlite(p) => SQLITE_MIGRATOR.run(p).await?,
        }
        Ok(self.applied_migrations().await?.saturating_sub(before))
    }

    /// How many migrations the database has recorded (0 before the first).
    async fn applied_migrations(&self) -> Result<u64, DbError> {
        // The catalogs differ: the one question asked two ways.
        let exists = sql::sql(match self {
            Db::Postgres(_) => {
                "SELECT count(*) AS n FROM (SELECT to_regclass('_sqlx_migrations') AS c) t \
                 WHERE c IS NOT NULL"
            }
            Db::Sqlite(_) => {
                "SELECT count(*) AS n FROM sqlite_master \
                 WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
        })
        .fetch_one(self)
        .await?
        .int("n")?;
        let n = if exists == 0 {
            0
        } else {
            sql::sql("SELECT count(*) AS n FROM _sqlx_migrations")
                .fetch_one(self)
                .await?
                .int("n")?
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Runs `SELECT 1`.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlx`] when the database does not answer.
    pub async fn ping(&self) -> Result<(), DbError> {
        sql::sql("SELECT 1").execute(self).await.map(drop)
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        match self {
            Db::Postgres(p) => p.close().await,
            Db::Sqlite(p) => p.close().await,
        }
    }
}
