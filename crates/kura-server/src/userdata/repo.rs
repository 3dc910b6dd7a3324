//! The database side of settings and preferences: one JSON object per
//! user in the `settings` and `preferences` tables, versioned like
//! profiles (every write bumps `version` in the statement that returns the
//! row). A row is only written for a user who has a profile; deleting the
//! profile deletes both ([`Db::delete`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::db::sql::{DbRow, sql_built};
use crate::db::{Db, DbError};

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
            DocKind::Settings => crate::registry::SETTINGS,
            DocKind::Preferences => crate::registry::PREFERENCES,
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

fn doc_of(r: &DbRow) -> Result<UserDoc, DbError> {
    doc(
        r.uuid("user_id")?,
        &r.text("data")?,
        r.time("updated_at")?,
        r.int("version")?,
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
        sql_built(format!(
            "SELECT user_id, data::text AS data, updated_at, version FROM {t} WHERE user_id = $1"
        ))
        .bind(user_id)
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(doc_of)
        .transpose()
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
        sql_built(format!(
            "INSERT INTO {t} (user_id, data, updated_at) \
             SELECT $1, $2::jsonb, $3 WHERE EXISTS (SELECT 1 FROM profiles WHERE user_id = $1) \
             ON CONFLICT (user_id) DO UPDATE SET data = excluded.data, \
             updated_at = excluded.updated_at, version = {t}.version + 1 \
             RETURNING user_id, data::text AS data, updated_at, version"
        ))
        .bind(user_id)
        .bind(data)
        .bind(Utc::now())
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(doc_of)
        .transpose()
    }
}

/// The database as the write-behind sink of one document kind: each queued
/// document is written only over an older row (`… WHERE version < $new`),
/// so a replay changes nothing. A row that was not written is looked at:
/// the same version with the same data is a replay (superseded); anything
/// else is a conflict (refused, then dead-lettered by the flusher), and so
/// is a row that is gone (the profile was deleted).
#[derive(Debug, Clone)]
pub struct DocSink {
    /// The database.
    pub db: Db,
    /// Which documents.
    pub kind: DocKind,
}

impl DocSink {
    fn judge(&self, found: Option<(i64, String)>, doc: &UserDoc) -> kura::Applied {
        match found {
            None => {
                kura::Applied::Rejected(format!("the user's {} row is gone", self.kind.table()))
            }
            Some((v, data)) => {
                let same =
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&data)
                        .is_ok_and(|d| d == doc.data);
                if v == doc.version && same {
                    kura::Applied::Superseded
                } else {
                    kura::Applied::Rejected(format!(
                        "conflict: the row is at version {v}, the queued write is version {}",
                        doc.version
                    ))
                }
            }
        }
    }
}

impl kura::Sink for DocSink {
    type Value = UserDoc;

    async fn apply(
        &self,
        batch: &[(String, UserDoc)],
    ) -> Result<Vec<kura::Applied>, kura::BoxError> {
        let t = self.kind.table();
        let mut out = Vec::with_capacity(batch.len());
        let mut tx = self.db.begin().await?;
        for (_, doc) in batch {
            let data = serde_json::to_string(&doc.data)?;
            let n = sql_built(format!(
                "UPDATE {t} SET data = $2::jsonb, version = $3, updated_at = $4 \
                 WHERE user_id = $1 AND version < $3"
            ))
            .bind(doc.user_id)
            .bind(data)
            .bind(doc.version)
            .bind(doc.updated_at)
            .execute(&mut tx)
            .await?;
            if n == 1 {
                out.push(kura::Applied::Written);
                continue;
            }
            let found = sql_built(format!(
                "SELECT version, data::text AS data FROM {t} WHERE user_id = $1"
            ))
            .bind(doc.user_id)
            .fetch_optional(&mut tx)
            .await?
            .map(|r| Ok::<_, DbError>((r.int("version")?, r.text("data")?)))
            .transpose()?;
            out.push(self.judge(found, doc));
        }
        tx.commit().await?;
        Ok(out)
    }
}
