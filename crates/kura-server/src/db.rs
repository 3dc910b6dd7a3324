//! The system of record: the `profiles` table in PostgreSQL or SQLite.
//!
//! [`Db`] is the [`kura::Source`] the profile cache reads through. Queries
//! are built at run time (no compile-time checked macros, so the crate
//! builds without a database). Every `UPDATE` bumps `version` in the
//! statement that returns the row, which is what lets the cache order
//! concurrent writes.
//!
//! SQLite stores UUIDs as lowercase hyphenated text and timestamps as
//! fixed-width RFC 3339 UTC text, so that text order is time order.
//!
//! [`Db`] is also the [`kura::Sink`] the write-behind flusher applies
//! queued writes through ([`sink`]: version-guarded, batched).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Postgres, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use crate::model::{Fields, NewProfile, Profile, ProfilePatch};

pub mod feed;
pub mod sink;
pub mod tokens;
pub mod userdata;
pub use sink::Guarded;

/// The PostgreSQL migrations, embedded.
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");
/// The SQLite migrations, embedded.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// The SQLite file used when no database URL is given.
pub const DEFAULT_SQLITE_FILE: &str = "kura.db";

const COLUMNS: &str = "id, user_id, first_name, last_name, name, email, phone, address, created_at, updated_at, version";

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

/// A seed row: the editable fields plus the ids and times a generator picks.
#[derive(Debug, Clone)]
pub struct SeedRow {
    /// Row id.
    pub id: Uuid,
    /// User id.
    pub user_id: Uuid,
    /// Editable fields.
    pub fields: Fields,
    /// Last login.
    pub last_login: DateTime<Utc>,
    /// Creation time (also the first `updated_at`).
    pub created_at: DateTime<Utc>,
}

/// What [`Db::migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Schema migrations applied now (0: the schema was up to date).
    pub applied: u64,
    /// Fed tables whose invalidation triggers were (re)installed now.
    pub feed_installed: Vec<String>,
}

/// The profiles database: a PostgreSQL or SQLite pool. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Db {
    /// PostgreSQL (production).
    Postgres(PgPool),
    /// SQLite (the embedded default).
    Sqlite(SqlitePool),
}

/// Fixed-width RFC 3339 UTC text, as SQLite stores timestamps.
fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>, DbError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DbError::Row(format!("timestamp {s:?}: {e}")))
}

fn parse_uuid(s: &str) -> Result<Uuid, DbError> {
    Uuid::parse_str(s).map_err(|e| DbError::Row(format!("uuid {s:?}: {e}")))
}

fn pg_profile(r: &PgRow) -> Result<Profile, DbError> {
    Ok(Profile {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        first_name: r.try_get("first_name")?,
        last_name: r.try_get("last_name")?,
        name: r.try_get("name")?,
        email: r.try_get("email")?,
        phone: r.try_get("phone")?,
        address: r.try_get("address")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        version: r.try_get("version")?,
    })
}

fn sqlite_profile(r: &SqliteRow) -> Result<Profile, DbError> {
    Ok(Profile {
        id: parse_uuid(r.try_get("id")?)?,
        user_id: parse_uuid(r.try_get("user_id")?)?,
        first_name: r.try_get("first_name")?,
        last_name: r.try_get("last_name")?,
        name: r.try_get("name")?,
        email: r.try_get("email")?,
        phone: r.try_get("phone")?,
        address: r.try_get("address")?,
        created_at: parse_ts(r.try_get("created_at")?)?,
        updated_at: parse_ts(r.try_get("updated_at")?)?,
        version: r.try_get("version")?,
    })
}

fn hyphenated(id: Uuid) -> String {
    id.hyphenated().to_string()
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
        let before = self.applied_migrations().await?;
        match self {
            Db::Postgres(p) => PG_MIGRATOR.run(p).await?,
            Db::Sqlite(p) => SQLITE_MIGRATOR.run(p).await?,
        }
        let applied = self.applied_migrations().await?.saturating_sub(before);
        let feed_installed = self.install_feed().await?;
        Ok(Migrated {
            applied,
            feed_installed,
        })
    }

    /// How many migrations the database has recorded (0 before the first).
    async fn applied_migrations(&self) -> Result<u64, DbError> {
        let n: i64 = match self {
            Db::Postgres(p) => {
                let exists: bool =
                    sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                        .fetch_one(p)
                        .await?;
                if exists {
                    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                        .fetch_one(p)
                        .await?
                } else {
                    0
                }
            }
            Db::Sqlite(p) => {
                let exists: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
                     AND name = '_sqlx_migrations'",
                )
                .fetch_one(p)
                .await?;
                if exists == 0 {
                    0
                } else {
                    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                        .fetch_one(p)
                        .await?
                }
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Runs `SELECT 1`.
    ///
    /// # Errors
    ///
    /// [`DbError::Sqlx`] when the database does not answer.
    pub async fn ping(&self) -> Result<(), DbError> {
        match self {
            Db::Postgres(p) => sqlx::query("SELECT 1").execute(p).await.map(drop)?,
            Db::Sqlite(p) => sqlx::query("SELECT 1").execute(p).await.map(drop)?,
        }
        Ok(())
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        match self {
            Db::Postgres(p) => p.close().await,
            Db::Sqlite(p) => p.close().await,
        }
    }

    /// The profile of `user_id`.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn fetch(&self, user_id: Uuid) -> Result<Option<Profile>, DbError> {
        match self {
            Db::Postgres(p) => sqlx::query(
                "SELECT id, user_id, first_name, last_name, name, email, phone, address, \
                     created_at, updated_at, version FROM profiles WHERE user_id = $1",
            )
            .bind(user_id)
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(pg_profile)
            .transpose(),
            Db::Sqlite(p) => sqlx::query(
                "SELECT id, user_id, first_name, last_name, name, email, phone, address, \
                     created_at, updated_at, version FROM profiles WHERE user_id = ?1",
            )
            .bind(hyphenated(user_id))
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(sqlite_profile)
            .transpose(),
        }
    }

    /// Waits until no other transaction holds the row of `user_id` (a write
    /// still running, perhaps for a client that is gone), by locking it for
    /// an instant. SQLite runs statements in-process, where a write cannot
    /// outlive its answer: it returns at once.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn wait_for_row(&self, user_id: Uuid) -> Result<(), DbError> {
        if let Db::Postgres(p) = self {
            sqlx::query("SELECT 1 FROM profiles WHERE user_id = $1 FOR UPDATE")
                .bind(user_id)
                .execute(p)
                .await?;
        }
        Ok(())
    }

    /// The profiles of `user_ids` that exist, in one query.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn fetch_many(&self, user_ids: &[Uuid]) -> Result<Vec<Profile>, DbError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Db::Postgres(p) => sqlx::query(
                "SELECT id, user_id, first_name, last_name, name, email, phone, address, \
                 created_at, updated_at, version FROM profiles WHERE user_id = ANY($1)",
            )
            .bind(user_ids.to_vec())
            .fetch_all(p)
            .await?
            .iter()
            .map(pg_profile)
            .collect(),
            Db::Sqlite(p) => {
                let mut out = Vec::with_capacity(user_ids.len());
                // Well under SQLite's limit of 32,766 parameters per statement.
                for chunk in user_ids.chunks(5000) {
                    let mut qb = QueryBuilder::<Sqlite>::new(format!(
                        "SELECT {COLUMNS} FROM profiles WHERE user_id IN ("
                    ));
                    let mut sep = qb.separated(", ");
                    for id in chunk {
                        sep.push_bind(hyphenated(*id));
                    }
                    qb.push(")");
                    for r in qb.build().fetch_all(p).await? {
                        out.push(sqlite_profile(&r)?);
                    }
                }
                Ok(out)
            }
        }
    }

    /// Inserts a profile; `None` when the user already has one.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn insert(&self, new: &NewProfile) -> Result<Option<Profile>, DbError> {
        let id = Uuid::new_v4();
        let f = new.fields();
        match self {
            Db::Postgres(p) => sqlx::query(
                "INSERT INTO profiles (id, user_id, first_name, last_name, name, email, phone, \
                 address, created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), now(), 1) \
                 ON CONFLICT (user_id) DO NOTHING \
                 RETURNING id, user_id, first_name, last_name, name, email, phone, address, \
                 created_at, updated_at, version",
            )
            .bind(id)
            .bind(new.user_id)
            .bind(f.first_name)
            .bind(f.last_name)
            .bind(f.name)
            .bind(f.email)
            .bind(f.phone)
            .bind(f.address)
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(pg_profile)
            .transpose(),
            Db::Sqlite(p) => {
                let now = ts(Utc::now());
                sqlx::query(
                    "INSERT INTO profiles (id, user_id, first_name, last_name, name, email, \
                     phone, address, created_at, updated_at, version) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, 1) \
                     ON CONFLICT (user_id) DO NOTHING \
                     RETURNING id, user_id, first_name, last_name, name, email, phone, address, \
                     created_at, updated_at, version",
                )
                .bind(hyphenated(id))
                .bind(hyphenated(new.user_id))
                .bind(f.first_name)
                .bind(f.last_name)
                .bind(f.name)
                .bind(f.email)
                .bind(f.phone)
                .bind(f.address)
                .bind(now)
                .fetch_optional(p)
                .await?
                .as_ref()
                .map(sqlite_profile)
                .transpose()
            }
        }
    }

    /// Applies `patch` and bumps `version` in one statement that returns
    /// the committed row; `None` when the user has no profile.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn update(
        &self,
        user_id: Uuid,
        patch: &ProfilePatch,
    ) -> Result<Option<Profile>, DbError> {
        let sets = patch.assignments();
        match self {
            Db::Postgres(p) => {
                let mut qb = QueryBuilder::<Postgres>::new("UPDATE profiles SET ");
                for (col, v) in sets {
                    qb.push(col)
                        .push(" = ")
                        .push_bind(v.map(str::to_owned))
                        .push(", ");
                }
                qb.push("version = version + 1, updated_at = now() WHERE user_id = ")
                    .push_bind(user_id)
                    .push(" RETURNING ")
                    .push(COLUMNS);
                qb.build()
                    .fetch_optional(p)
                    .await?
                    .as_ref()
                    .map(pg_profile)
                    .transpose()
            }
            Db::Sqlite(p) => {
                let mut qb = QueryBuilder::<Sqlite>::new("UPDATE profiles SET ");
                for (col, v) in sets {
                    qb.push(col)
                        .push(" = ")
                        .push_bind(v.map(str::to_owned))
                        .push(", ");
                }
                qb.push("version = version + 1, updated_at = ")
                    .push_bind(ts(Utc::now()))
                    .push(" WHERE user_id = ")
                    .push_bind(hyphenated(user_id))
                    .push(" RETURNING ")
                    .push(COLUMNS);
                qb.build()
                    .fetch_optional(p)
                    .await?
                    .as_ref()
                    .map(sqlite_profile)
                    .transpose()
            }
        }
    }

    /// Deletes the profile of `user_id`; `false` when there was none.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn delete(&self, user_id: Uuid) -> Result<bool, DbError> {
        // The user's settings and preferences go with the profile, in the
        // same transaction.
        let n = match self {
            Db::Postgres(p) => {
                let mut tx = p.begin().await?;
                for t in ["settings", "preferences"] {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DELETE FROM {t} WHERE user_id = $1"
                    )))
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                }
                let n = sqlx::query("DELETE FROM profiles WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                n
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                for t in ["settings", "preferences"] {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DELETE FROM {t} WHERE user_id = ?1"
                    )))
                    .bind(hyphenated(user_id))
                    .execute(&mut *tx)
                    .await?;
                }
                let n = sqlx::query("DELETE FROM profiles WHERE user_id = ?1")
                    .bind(hyphenated(user_id))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                n
            }
        };
        Ok(n > 0)
    }

    /// The users who logged in after `since`, most recent first, at most
    /// `limit` (the warming set; served by the `last_login` index).
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn active_user_ids(
        &self,
        since: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<Uuid>, DbError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match self {
            Db::Postgres(p) => {
                let rows = sqlx::query(
                    "SELECT user_id FROM profiles WHERE last_login > $1 \
                     ORDER BY last_login DESC LIMIT $2",
                )
                .bind(since)
                .bind(limit)
                .fetch_all(p)
                .await?;
                rows.iter()
                    .map(|r| r.try_get::<Uuid, _>("user_id").map_err(DbError::from))
                    .collect()
            }
            Db::Sqlite(p) => {
                let rows = sqlx::query(
                    "SELECT user_id FROM profiles WHERE last_login > ?1 \
                     ORDER BY last_login DESC LIMIT ?2",
                )
                .bind(ts(since))
                .bind(limit)
                .fetch_all(p)
                .await?;
                rows.iter()
                    .map(|r| parse_uuid(r.try_get("user_id")?))
                    .collect()
            }
        }
    }

    /// How many profiles there are.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn count(&self) -> Result<u64, DbError> {
        let n: i64 = match self {
            Db::Postgres(p) => sqlx::query("SELECT COUNT(*) AS n FROM profiles")
                .fetch_one(p)
                .await?
                .try_get("n")?,
            Db::Sqlite(p) => sqlx::query("SELECT COUNT(*) AS n FROM profiles")
                .fetch_one(p)
                .await?
                .try_get("n")?,
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Inserts `rows` in one transaction (PostgreSQL: `UNNEST` arrays;
    /// SQLite: multi-row `INSERT`s), skipping users that already have a
    /// profile. Returns how many rows were inserted.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure (nothing is inserted then).
    pub async fn insert_seed(&self, rows: &[SeedRow]) -> Result<u64, DbError> {
        let mut inserted = 0;
        match self {
            Db::Postgres(p) => {
                let mut tx = p.begin().await?;
                for chunk in rows.chunks(10_000) {
                    let col = |f: fn(&SeedRow) -> Option<String>| -> Vec<Option<String>> {
                        chunk.iter().map(f).collect()
                    };
                    inserted += sqlx::query(
                        "INSERT INTO profiles (id, user_id, first_name, last_name, name, email, \
                         phone, address, last_login, created_at, updated_at, version) \
                         SELECT id, user_id, first_name, last_name, name, email, phone, address, \
                         last_login, created_at, created_at, 1 FROM UNNEST(\
                         $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], \
                         $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[]) \
                         AS t(id, user_id, first_name, last_name, name, email, phone, address, \
                         last_login, created_at) \
                         ON CONFLICT (user_id) DO NOTHING",
                    )
                    .bind(chunk.iter().map(|r| r.id).collect::<Vec<_>>())
                    .bind(chunk.iter().map(|r| r.user_id).collect::<Vec<_>>())
                    .bind(col(|r| r.fields.first_name.clone()))
                    .bind(col(|r| r.fields.last_name.clone()))
                    .bind(col(|r| r.fields.name.clone()))
                    .bind(col(|r| r.fields.email.clone()))
                    .bind(col(|r| r.fields.phone.clone()))
                    .bind(col(|r| r.fields.address.clone()))
                    .bind(chunk.iter().map(|r| r.last_login).collect::<Vec<_>>())
                    .bind(chunk.iter().map(|r| r.created_at).collect::<Vec<_>>())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                tx.commit().await?;
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                // 11 parameters per row, under SQLite's 32,766 per statement.
                for chunk in rows.chunks(2_000) {
                    let mut qb = QueryBuilder::<Sqlite>::new(
                        "INSERT INTO profiles (id, user_id, first_name, last_name, name, email, \
                         phone, address, last_login, created_at, updated_at, version) ",
                    );
                    qb.push_values(chunk, |mut b, r| {
                        let created = ts(r.created_at);
                        b.push_bind(hyphenated(r.id))
                            .push_bind(hyphenated(r.user_id))
                            .push_bind(r.fields.first_name.clone())
                            .push_bind(r.fields.last_name.clone())
                            .push_bind(r.fields.name.clone())
                            .push_bind(r.fields.email.clone())
                            .push_bind(r.fields.phone.clone())
                            .push_bind(r.fields.address.clone())
                            .push_bind(ts(r.last_login))
                            .push_bind(created.clone())
                            .push_bind(created)
                            .push("1");
                    });
                    qb.push(" ON CONFLICT (user_id) DO NOTHING");
                    inserted += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
            }
        }
        Ok(inserted)
    }
}

impl kura::Source for Db {
    type Value = Profile;
    type Error = DbError;

    async fn load(&self, id: &str) -> Result<Option<Profile>, DbError> {
        // Ids reach the cache only after the HTTP layer parsed them.
        match Uuid::parse_str(id) {
            Ok(u) => self.fetch(u).await,
            Err(_) => Ok(None),
        }
    }

    async fn load_many(&self, ids: &[String]) -> Result<Vec<(String, Profile)>, DbError> {
        let uuids: Vec<Uuid> = ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect();
        let rows = self.fetch_many(&uuids).await?;
        Ok(rows
            .into_iter()
            .map(|p| (hyphenated(p.user_id), p))
            .collect())
    }
}
