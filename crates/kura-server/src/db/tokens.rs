//! The database side of token revocation and sessions: the `revocations`
//! and `sessions` tables.
//!
//! A revocation is kept until its `expires_at` (the token's `exp`, or for
//! a session the latest `exp` among its tokens, plus the verification's
//! clock-skew leeway), then pruned
//! ([`Db::prune_tokens`]). A session row is created by the first request
//! that carries its `sid`, never for a session already revoked (one
//! statement: `INSERT … WHERE NOT EXISTS (revocation)`), and its
//! `last_seen` is written behind in batches ([`Db::touch_sessions`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{Db, DbError, parse_ts, ts};

/// How many expired rows one prune statement deletes per table.
const PRUNE_BATCH: i64 = 1000;

/// A revoked token (`jti`) or session (`sid`), as stored and cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// `jti` or `sid`.
    pub scope: String,
    /// The token's `jti` or the session's `sid`.
    pub token_id: String,
    /// Until when, seconds since the epoch.
    pub expires_at: i64,
    /// Row version.
    pub version: i64,
}

impl kura::Versioned for Revocation {
    fn version(&self) -> u64 {
        u64::try_from(self.version).unwrap_or(0)
    }

    fn expires_at(&self) -> Option<std::time::SystemTime> {
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.expires_at.max(0) as u64))
    }
}

/// A session, as stored and cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Session {
    /// The `sid` claim.
    pub sid: String,
    /// The token subject (user id) the session belongs to.
    pub user_id: String,
    /// When the first request of the session arrived, RFC 3339 UTC.
    pub created_at: DateTime<Utc>,
    /// The last request seen, as of the last flush (written behind).
    pub last_seen: DateTime<Utc>,
    /// The latest `exp` among the session's tokens seen, seconds since
    /// the epoch.
    pub expires_at: i64,
    /// The `User-Agent` of the first request.
    pub user_agent: Option<String>,
    /// Row version.
    #[serde(skip_serializing)]
    #[serde(default)]
    pub version: i64,
}

impl kura::Versioned for Session {
    fn version(&self) -> u64 {
        u64::try_from(self.version).unwrap_or(0)
    }

    fn expires_at(&self) -> Option<std::time::SystemTime> {
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.expires_at.max(0) as u64))
    }
}

/// A new session's row.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    /// Cache id of the session.
    pub key_id: &'a str,
    /// The `sid` claim.
    pub sid: &'a str,
    /// The token subject.
    pub user_sub: &'a str,
    /// The token's `exp`.
    pub expires_at: i64,
    /// The request's `User-Agent`.
    pub user_agent: Option<&'a str>,
    /// The cache id of the session's revocation: no row is made while it
    /// exists.
    pub revocation_key: &'a str,
}

const REVOCATION_COLUMNS: &str = "scope, token_id, expires_at, version";
const SESSION_COLUMNS: &str =
    "sid, user_sub, created_at, last_seen, expires_at, user_agent, version";

fn revocation_of<R: Row>(r: &R) -> Result<Revocation, DbError>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'d> String: sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
    for<'d> i64: sqlx::Decode<'d, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Revocation {
        scope: r.try_get("scope")?,
        token_id: r.try_get("token_id")?,
        expires_at: r.try_get("expires_at")?,
        version: r.try_get("version")?,
    })
}

fn pg_session(r: &sqlx::postgres::PgRow) -> Result<Session, DbError> {
    Ok(Session {
        sid: r.try_get("sid")?,
        user_id: r.try_get("user_sub")?,
        created_at: r.try_get("created_at")?,
        last_seen: r.try_get("last_seen")?,
        expires_at: r.try_get("expires_at")?,
        user_agent: r.try_get("user_agent")?,
        version: r.try_get("version")?,
    })
}

fn sqlite_session(r: &sqlx::sqlite::SqliteRow) -> Result<Session, DbError> {
    Ok(Session {
        sid: r.try_get("sid")?,
        user_id: r.try_get("user_sub")?,
        created_at: parse_ts(r.try_get("created_at")?)?,
        last_seen: parse_ts(r.try_get("last_seen")?)?,
        expires_at: r.try_get("expires_at")?,
        user_agent: r.try_get("user_agent")?,
        version: r.try_get("version")?,
    })
}

fn now_unix() -> i64 {
    Utc::now().timestamp()
}

impl Db {
    /// Records a revocation, or extends one (the later `expires_at` wins),
    /// and returns the row.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn revoke(
        &self,
        key_id: &str,
        scope: &str,
        token_id: &str,
        expires_at: i64,
    ) -> Result<Revocation, DbError> {
        let sql = |p: &str, greatest: &str, now: &str| {
            format!(
                "INSERT INTO revocations (key_id, scope, token_id, expires_at, revoked_at) \
                 VALUES ({p}1, {p}2, {p}3, {p}4, {now}) \
                 ON CONFLICT (key_id) DO UPDATE SET \
                 expires_at = {greatest}(revocations.expires_at, excluded.expires_at), \
                 version = revocations.version + 1 \
                 RETURNING {REVOCATION_COLUMNS}"
            )
        };
        match self {
            Db::Postgres(p) => {
                let r = sqlx::query(sqlx::AssertSqlSafe(sql("$", "GREATEST", "now()")))
                    .bind(key_id)
                    .bind(scope)
                    .bind(token_id)
                    .bind(expires_at)
                    .fetch_one(p)
                    .await?;
                revocation_of(&r)
            }
            Db::Sqlite(p) => {
                let r = sqlx::query(sqlx::AssertSqlSafe(sql("?", "max", "?5")))
                    .bind(key_id)
                    .bind(scope)
                    .bind(token_id)
                    .bind(expires_at)
                    .bind(ts(Utc::now()))
                    .fetch_one(p)
                    .await?;
                revocation_of(&r)
            }
        }
    }

    /// The revocation with cache id `key_id`, unless it has expired.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn revocation(&self, key_id: &str) -> Result<Option<Revocation>, DbError> {
        let sql = |p: &str| {
            format!(
                "SELECT {REVOCATION_COLUMNS} FROM revocations \
                 WHERE key_id = {p}1 AND expires_at > {p}2"
            )
        };
        match self {
            Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(sql("$")))
                .bind(key_id)
                .bind(now_unix())
                .fetch_optional(p)
                .await?
                .as_ref()
                .map(revocation_of)
                .transpose(),
            Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(sql("?")))
                .bind(key_id)
                .bind(now_unix())
                .fetch_optional(p)
                .await?
                .as_ref()
                .map(revocation_of)
                .transpose(),
        }
    }

    /// Deletes expired revocations and sessions, at most a batch of each;
    /// returns how many rows went.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn prune_tokens(&self) -> Result<u64, DbError> {
        let mut n = 0;
        for table in ["revocations", "sessions"] {
            let sql = |p: &str| {
                format!(
                    "DELETE FROM {table} WHERE key_id IN \
                     (SELECT key_id FROM {table} WHERE expires_at <= {p}1 LIMIT {p}2)"
                )
            };
            n += match self {
                Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(sql("$")))
                    .bind(now_unix())
                    .bind(PRUNE_BATCH)
                    .execute(p)
                    .await?
                    .rows_affected(),
                Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(sql("?")))
                    .bind(now_unix())
                    .bind(PRUNE_BATCH)
                    .execute(p)
                    .await?
                    .rows_affected(),
            };
        }
        Ok(n)
    }

    /// Creates a session unless it exists or is revoked; returns the new
    /// row (`None`: nothing was created).
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn create_session(&self, s: &NewSession<'_>) -> Result<Option<Session>, DbError> {
        match self {
            Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO sessions (key_id, sid, user_sub, expires_at, user_agent) \
                 SELECT $1, $2, $3, $4, $5 \
                 WHERE NOT EXISTS (SELECT 1 FROM revocations WHERE key_id = $6) \
                 ON CONFLICT (key_id) DO NOTHING RETURNING {SESSION_COLUMNS}"
            )))
            .bind(s.key_id)
            .bind(s.sid)
            .bind(s.user_sub)
            .bind(s.expires_at)
            .bind(s.user_agent)
            .bind(s.revocation_key)
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(pg_session)
            .transpose(),
            Db::Sqlite(p) => {
                let now = ts(Utc::now());
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO sessions \
                     (key_id, sid, user_sub, expires_at, user_agent, created_at, last_seen) \
                     SELECT ?1, ?2, ?3, ?4, ?5, ?7, ?7 \
                     WHERE NOT EXISTS (SELECT 1 FROM revocations WHERE key_id = ?6) \
                     ON CONFLICT (key_id) DO NOTHING RETURNING {SESSION_COLUMNS}"
                )))
                .bind(s.key_id)
                .bind(s.sid)
                .bind(s.user_sub)
                .bind(s.expires_at)
                .bind(s.user_agent)
                .bind(s.revocation_key)
                .bind(now)
                .fetch_optional(p)
                .await?
                .as_ref()
                .map(sqlite_session)
                .transpose()
            }
        }
    }

    /// The session with cache id `key_id`.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn session(&self, key_id: &str) -> Result<Option<Session>, DbError> {
        self.one_session(
            |p| format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE key_id = {p}1"),
            key_id,
        )
        .await
    }

    /// Runs a statement over one session's key (`sql` is given the
    /// placeholder prefix, `$` or `?`) and reads the row it returns.
    async fn one_session(
        &self,
        sql: impl Fn(&str) -> String,
        key_id: &str,
    ) -> Result<Option<Session>, DbError> {
        match self {
            Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(sql("$")))
                .bind(key_id)
                .fetch_optional(p)
                .await?
                .as_ref()
                .map(pg_session)
                .transpose(),
            Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(sql("?")))
                .bind(key_id)
                .fetch_optional(p)
                .await?
                .as_ref()
                .map(sqlite_session)
                .transpose(),
        }
    }

    /// The unexpired sessions of `user_sub`, oldest first.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn sessions_of(&self, user_sub: &str) -> Result<Vec<Session>, DbError> {
        let sql = |p: &str| {
            format!(
                "SELECT {SESSION_COLUMNS} FROM sessions \
                 WHERE user_sub = {p}1 AND expires_at > {p}2 ORDER BY created_at, sid"
            )
        };
        match self {
            Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(sql("$")))
                .bind(user_sub)
                .bind(now_unix())
                .fetch_all(p)
                .await?
                .iter()
                .map(pg_session)
                .collect(),
            Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(sql("?")))
                .bind(user_sub)
                .bind(now_unix())
                .fetch_all(p)
                .await?
                .iter()
                .map(sqlite_session)
                .collect(),
        }
    }

    /// Deletes the session with cache id `key_id` and returns it.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn delete_session(&self, key_id: &str) -> Result<Option<Session>, DbError> {
        self.one_session(
            |p| format!("DELETE FROM sessions WHERE key_id = {p}1 RETURNING {SESSION_COLUMNS}"),
            key_id,
        )
        .await
    }

    /// Writes a batch of coalesced session activity: per session, the later
    /// `last_seen` and the later `expires_at` win (a batch replayed or
    /// arriving late moves nothing back). One statement on PostgreSQL, one
    /// transaction on SQLite. Returns the rows written.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn touch_sessions(
        &self,
        batch: &[(String, DateTime<Utc>, i64)],
    ) -> Result<u64, DbError> {
        if batch.is_empty() {
            return Ok(0);
        }
        match self {
            Db::Postgres(p) => {
                let keys: Vec<&str> = batch.iter().map(|(k, _, _)| k.as_str()).collect();
                let seen: Vec<DateTime<Utc>> = batch.iter().map(|(_, t, _)| *t).collect();
                let exp: Vec<i64> = batch.iter().map(|(_, _, e)| *e).collect();
                Ok(sqlx::query(
                    "UPDATE sessions s SET last_seen = GREATEST(s.last_seen, u.seen), \
                     expires_at = GREATEST(s.expires_at, u.exp) \
                     FROM UNNEST($1::text[], $2::timestamptz[], $3::bigint[]) AS u(k, seen, exp) \
                     WHERE s.key_id = u.k",
                )
                .bind(&keys)
                .bind(&seen)
                .bind(&exp)
                .execute(p)
                .await?
                .rows_affected())
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let mut n = 0;
                for (k, t, e) in batch {
                    n += sqlx::query(
                        "UPDATE sessions SET last_seen = max(last_seen, ?2), \
                         expires_at = max(expires_at, ?3) WHERE key_id = ?1",
                    )
                    .bind(k)
                    .bind(ts(*t))
                    .bind(e)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                tx.commit().await?;
                Ok(n)
            }
        }
    }

    /// The cache ids of `user_sub`'s sessions beyond the newest `keep`,
    /// oldest first (what a per-user cap revokes).
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn sessions_over_cap(
        &self,
        user_sub: &str,
        keep: u32,
    ) -> Result<Vec<(String, Session)>, DbError> {
        let sql = |p: &str| {
            format!(
                "SELECT key_id, {SESSION_COLUMNS} FROM sessions \
                 WHERE user_sub = {p}1 AND expires_at > {p}2 \
                 ORDER BY created_at DESC, sid DESC LIMIT -1 OFFSET {p}3"
            )
        };
        match self {
            Db::Postgres(p) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(
                    sql("$").replace("LIMIT -1 ", "LIMIT ALL "),
                ))
                .bind(user_sub)
                .bind(now_unix())
                .bind(i64::from(keep))
                .fetch_all(p)
                .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("key_id")?, pg_session(r)?)))
                    .collect()
            }
            Db::Sqlite(p) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql("?")))
                    .bind(user_sub)
                    .bind(now_unix())
                    .bind(i64::from(keep))
                    .fetch_all(p)
                    .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("key_id")?, sqlite_session(r)?)))
                    .collect()
            }
        }
    }
}
