//! The database side of settings and preferences: one JSON object per
//! user in the `settings` and `preferences` tables, versioned like
//! profiles (every write bumps `version` in the statement that returns the
//! row). A row is only written for a user who has a profile; deleting the
//! profile deletes both ([`Db::delete`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

use super::{Db, DbError, hyphenated, parse_ts, parse_uuid, ts};

/// Which per-user document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    /// `settings`.
    Settings,
    /// `preferences`.
    Preferences,
}

impl DocKind {
    /// The table (and the word in messages).
    #[must_use]
    pub fn table(self) -> &'static str {
        match self {
            DocKind::Settings => "settings",
            DocKind::Preferences => "preferences",
        }
    }

    /// The cached kind.
    #[must_use]
    pub fn kind(self) -> kura::Kind {
        match self {
            DocKind::Settings => kura::Kind::SETTINGS,
            DocKind::Preferences => kura::Kind::PREFERENCES,
        }
    }
}

/// A user's settings or preferences, as stored, cached and returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserDoc {
    /// The user.
    pub user_id: Uuid,
    /// The JSON object.
    #[schema(value_type = Object)]
    pub data: serde_json::Map<String, serde_json::Value>,
    /// Last write, RFC 3339 UTC.
    pub updated_at: DateTime<Utc>,
    /// Row version: every write increases it by one.
    pub version: i64,
}

impl kura::Versioned for UserDoc {
    fn version(&self) -> u64 {
        u64::try_from(self.version).unwrap_or(0)
    }
}

fn doc(
    user_id: Uuid,
    data: &str,
    updated_at: DateTime<Utc>,
    version: i64,
) -> Result<UserDoc, DbError> {
    let data = serde_json::from_str(data)
        .map_err(|e| DbError::Row(format!("document of {user_id} is not a JSON object: {e}")))?;
    Ok(UserDoc {
        user_id,
        data,
        updated_at,
        version,
    })
}

fn pg_doc(r: &sqlx::postgres::PgRow) -> Result<UserDoc, DbError> {
    doc(
        r.try_get("user_id")?,
        r.try_get("data")?,
        r.try_get("updated_at")?,
        r.try_get("version")?,
    )
}

fn sqlite_doc(r: &sqlx::sqlite::SqliteRow) -> Result<UserDoc, DbError> {
    doc(
        parse_uuid(r.try_get("user_id")?)?,
        r.try_get("data")?,
        parse_ts(r.try_get("updated_at")?)?,
        r.try_get("version")?,
    )
}

impl Db {
    /// The document of `user_id`.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn doc(&self, kind: DocKind, user_id: Uuid) -> Result<Option<UserDoc>, DbError> {
        let t = kind.table();
        match self {
            Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT user_id, data::text AS data, updated_at, version FROM {t} WHERE user_id = $1"
            )))
            .bind(user_id)
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(pg_doc)
            .transpose(),
            Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT user_id, data, updated_at, version FROM {t} WHERE user_id = ?1"
            )))
            .bind(hyphenated(user_id))
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(sqlite_doc)
            .transpose(),
        }
    }

    /// Writes the document of `user_id` (created, or replaced with the
    /// version bumped) and returns the row; `None` when the user has no
    /// profile (nothing is written).
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn put_doc(
        &self,
        kind: DocKind,
        user_id: Uuid,
        data: &str,
    ) -> Result<Option<UserDoc>, DbError> {
        let t = kind.table();
        match self {
            Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {t} (user_id, data) \
                 SELECT $1, $2::jsonb WHERE EXISTS (SELECT 1 FROM profiles WHERE user_id = $1) \
                 ON CONFLICT (user_id) DO UPDATE SET data = excluded.data, updated_at = now(), \
                 version = {t}.version + 1 \
                 RETURNING user_id, data::text AS data, updated_at, version"
            )))
            .bind(user_id)
            .bind(data)
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(pg_doc)
            .transpose(),
            Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {t} (user_id, data, updated_at) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM profiles WHERE user_id = ?1) \
                 ON CONFLICT (user_id) DO UPDATE SET data = excluded.data, \
                 updated_at = excluded.updated_at, version = {t}.version + 1 \
                 RETURNING user_id, data, updated_at, version"
            )))
            .bind(hyphenated(user_id))
            .bind(data)
            .bind(ts(Utc::now()))
            .fetch_optional(p)
            .await?
            .as_ref()
            .map(sqlite_doc)
            .transpose(),
        }
    }
}
