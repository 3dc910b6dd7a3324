//! The `profiles` table: the profile queries, and [`Db`] as the
//! [`kura::Source`] the profile cache reads through.
//!
//! Every `UPDATE` bumps `version` in the statement that returns the row,
//! which is what lets the cache order concurrent writes. Each query is one
//! SQL text for both backends ([`crate::db::sql`]); the batch read keeps
//! two arms (`= ANY($1)` against a chunked `IN (…)`).

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::model::{NewProfile, Profile, ProfilePatch};
use crate::db::sql::{DbRow, hyphenated, sql, sql_built};
use crate::db::{Db, DbError};

/// The columns of a profile, in [`profile`]'s order.
pub(crate) const COLUMNS: &str = "id, user_id, first_name, last_name, name, email, phone, address, created_at, updated_at, version";

/// A profile from a row of [`COLUMNS`].
pub(crate) fn profile(r: &DbRow) -> Result<Profile, DbError> {
    Ok(Profile {
        id: r.uuid("id")?,
        user_id: r.uuid("user_id")?,
        first_name: r.opt_text("first_name")?,
        last_name: r.opt_text("last_name")?,
        name: r.opt_text("name")?,
        email: r.opt_text("email")?,
        phone: r.opt_text("phone")?,
        address: r.opt_text("address")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        version: r.int("version")?,
    })
}

impl Db {
    /// The profile of `user_id`.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn fetch(&self, user_id: Uuid) -> Result<Option<Profile>, DbError> {
        sql(
            "SELECT id, user_id, first_name, last_name, name, email, phone, address, \
             created_at, updated_at, version FROM profiles WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(profile)
        .transpose()
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
        if let Db::Postgres(_) = self {
            sql("SELECT 1 FROM profiles WHERE user_id = $1 FOR UPDATE")
                .bind(user_id)
                .execute(self)
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
            .into_iter()
            .map(|r| profile(&DbRow::Pg(r)))
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
                        out.push(profile(&DbRow::Lite(r))?);
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
        let f = new.fields();
        sql(
            "INSERT INTO profiles (id, user_id, first_name, last_name, name, email, phone, \
             address, created_at, updated_at, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, 1) \
             ON CONFLICT (user_id) DO NOTHING \
             RETURNING id, user_id, first_name, last_name, name, email, phone, address, \
             created_at, updated_at, version",
        )
        .bind(Uuid::new_v4())
        .bind(new.user_id)
        .bind(f.first_name)
        .bind(f.last_name)
        .bind(f.name)
        .bind(f.email)
        .bind(f.phone)
        .bind(f.address)
        .bind(Utc::now())
        .fetch_optional(self)
        .await?
        .as_ref()
        .map(profile)
        .transpose()
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
        let mut text = String::from("UPDATE profiles SET ");
        for (i, (col, _)) in sets.iter().enumerate() {
            text.push_str(&format!("{col} = ${}, ", i + 1));
        }
        let n = sets.len();
        text.push_str(&format!(
            "version = version + 1, updated_at = ${} WHERE user_id = ${} RETURNING {COLUMNS}",
            n + 1,
            n + 2
        ));
        let mut stmt = sql_built(text);
        for (_, v) in sets {
            stmt = stmt.bind(v);
        }
        stmt.bind(Utc::now())
            .bind(user_id)
            .fetch_optional(self)
            .await?
            .as_ref()
            .map(profile)
            .transpose()
    }

    /// Deletes the profile of `user_id` with the user's settings and
    /// preferences, in one transaction; `false` when there was none.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn delete(&self, user_id: Uuid) -> Result<bool, DbError> {
        let mut tx = self.begin().await?;
        for t in ["settings", "preferences"] {
            sql_built(format!("DELETE FROM {t} WHERE user_id = $1"))
                .bind(user_id)
                .execute(&mut tx)
                .await?;
        }
        let n = sql("DELETE FROM profiles WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut tx)
            .await?;
        tx.commit().await?;
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
        sql("SELECT user_id FROM profiles WHERE last_login > $1 \
             ORDER BY last_login DESC LIMIT $2")
        .bind(since)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self)
        .await?
        .iter()
        .map(|r| r.uuid("user_id"))
        .collect()
    }

    /// How many profiles there are.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn count(&self) -> Result<u64, DbError> {
        let n = sql("SELECT COUNT(*) AS n FROM profiles")
            .fetch_one(self)
            .await?
            .int("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
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
