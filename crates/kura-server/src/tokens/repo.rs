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

use crate::db::sql::{DbRow, sql, sql_built};
use crate::db::{Db, DbError};

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

fn revocation_of(r: &DbRow) -> Result<Revocation, DbError> {
    Ok(Revocation {
        scope: r.text("scope")?,
        token_id: r.text("token_id")?,
        expires_at: r.int("expires_at")?,
        version: r.int("version")?,
    })
}

fn session_of(r: &DbRow) -> Result<Session, DbError> {
    Ok(Session {
        sid: r.text("sid")?,
        user_id: r.text("user_sub")?,
        created_at: r.time("created_at")?,
        last_seen: r.time("last_seen")?,
        expires_at: r.int("expires_at")?,
        user_agent: r.opt_text("user_agent")?,
        version: r.int("version")?,
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
        let r = sql_built(format!(
            "INSERT INTO revocations (key_id, scope, token_id, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (key_id) DO UPDATE SET \
             expires_at = GREATEST(revocations.expires_at, excluded.expires_at), \
             version = revocations.version + 1 \
             RETURNING {REVOCATION_COLUMNS}"
        ))
        .bind(key_id)
        .bind(scope)
        .bind(token_id)
        .bind(expires_at)
        .bind(Utc::now())
        .fetch_one(self)
        .await?;
        revocation_of(&r)
    }

    /// The revocation with cache id `key_id`, unless it has expired.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn revocation(&self, key_id: &str) -> Result<Option<Revocation>, DbError> {
        sql_built(format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE key_id = $1 AND expires_at > $2"
        ))
        .bind(key_id)
        .bind(now_unix())
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(revocation_of)
        .transpose()
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
            n += sql_built(format!(
                "DELETE FROM {table} WHERE key_id IN \
                 (SELECT key_id FROM {table} WHERE expires_at <= $1 LIMIT $2)"
            ))
            .bind(now_unix())
            .bind(PRUNE_BATCH)
            .execute(self)
            .await?;
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
        sql_built(format!(
            "INSERT INTO sessions \
             (key_id, sid, user_sub, expires_at, user_agent, created_at, last_seen) \
             SELECT $1, $2, $3, $4, $5, $7, $7 \
             WHERE NOT EXISTS (SELECT 1 FROM revocations WHERE key_id = $6) \
             ON CONFLICT (key_id) DO NOTHING RETURNING {SESSION_COLUMNS}"
        ))
        .bind(s.key_id)
        .bind(s.sid)
        .bind(s.user_sub)
        .bind(s.expires_at)
        .bind(s.user_agent)
        .bind(s.revocation_key)
        .bind(Utc::now())
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(session_of)
        .transpose()
    }

    /// The session with cache id `key_id`.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn session(&self, key_id: &str) -> Result<Option<Session>, DbError> {
        sql_built(format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE key_id = $1"
        ))
        .bind(key_id)
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(session_of)
        .transpose()
    }

    /// The unexpired sessions of `user_sub`, oldest first.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn sessions_of(&self, user_sub: &str) -> Result<Vec<Session>, DbError> {
        sql_built(format!(
            "SELECT {SESSION_COLUMNS} FROM sessions \
             WHERE user_sub = $1 AND expires_at > $2 ORDER BY created_at, sid"
        ))
        .bind(user_sub)
        .bind(now_unix())
        .fetch_all(self)
        .await?
        .iter()
        .map(session_of)
        .collect()
    }

    /// Deletes the session with cache id `key_id` and returns it.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn delete_session(&self, key_id: &str) -> Result<Option<Session>, DbError> {
        sql_built(format!(
            "DELETE FROM sessions WHERE key_id = $1 RETURNING {SESSION_COLUMNS}"
        ))
        .bind(key_id)
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(session_of)
        .transpose()
    }

    /// Writes a batch of coalesced session activity: per session, the later
    /// `last_seen` and the later `expires_at` win (a batch replayed or
    /// arriving late moves nothing back). One statement on PostgreSQL, one
    /// transaction on SQLite (no arrays). Returns the rows written.
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
            Db::Sqlite(_) => {
                let mut tx = self.begin().await?;
                let mut n = 0;
                for (k, t, e) in batch {
                    n += sql("UPDATE sessions SET last_seen = GREATEST(last_seen, $2), \
                         expires_at = GREATEST(expires_at, $3) WHERE key_id = $1")
                    .bind(k)
                    .bind(*t)
                    .bind(*e)
                    .execute(&mut tx)
                    .await?;
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
        sql_built(format!(
            "SELECT key_id, {SESSION_COLUMNS} FROM sessions \
             WHERE user_sub = $1 AND expires_at > $2 \
             ORDER BY created_at DESC, sid DESC LIMIT ALL OFFSET $3"
        ))
        .bind(user_sub)
        .bind(now_unix())
        .bind(i64::from(keep))
        .fetch_all(self)
        .await?
        .iter()
        .map(|r| Ok((r.text("key_id")?, session_of(r)?)))
        .collect()
    }
}
