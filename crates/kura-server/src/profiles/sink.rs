//! The database side of write-behind: version-guarded writes of whole
//! profiles, and [`kura::Sink`] for [`Db`].
//!
//! A queued write carries the full profile at its new version. It is
//! written only over an older row:
//!
//! ```sql
//! UPDATE profiles SET first_name = …, …, version = $new, updated_at = $ts
//!  WHERE user_id = $id AND version < $new
//! ```
//!
//! so a replay (a flusher that died after the commit and before its
//! acknowledgement, a batch retried after a lost answer) changes nothing.
//! A row that was not written is looked at to say why ([`Guarded`]).
//!
//! Only the same version with the same fields counts as a replay. A row
//! already past the queued version was moved there by writes that did not
//! build on the queued one (direct writes that overtook it: the flusher
//! writes a key's newest pending copy, so the queue's own later writes
//! include it), so the queued write was never applied: it is rejected as
//! a conflict and, after `--wb-max-attempts`, dead-lettered, never
//! acknowledged silently. (A flusher that read a pending copy just before
//! a newer one was flushed by another gets the same answer for that older
//! copy; on its retry the copy is gone and the entry is only
//! acknowledged.)
//!
//! PostgreSQL applies a whole batch as one `UPDATE … FROM UNNEST(…)`
//! statement (one round trip, its own transaction); SQLite runs one
//! `UPDATE` per row in one transaction. If a row makes the database raise
//! an error (a constraint, bad data), the batch is applied again row by
//! row, each row in a savepoint, so that only that row is refused.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kura::{Applied, BoxError};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::model::Profile;
use super::repo::{COLUMNS, profile};
use crate::db::sql::{DbRow, Tx, hyphenated, sql, sql_built};
use crate::db::{Db, DbError};

/// The longest a batch may take before the flusher treats the database as
/// unavailable and retries it (a partitioned connection would otherwise
/// hang the flusher until TCP gives up). A batch that committed just
/// before the limit is harmless to retry: the replay is a no-op.
pub const SINK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a version-guarded write of one profile found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Guarded {
    /// The row was older: written.
    Written,
    /// The row already holds this version with the same fields (a replay).
    Replayed,
    /// The row holds a newer version: other writes overtook this one.
    Newer(i64),
    /// The row holds this version with other fields: another write took
    /// the same version number.
    Conflict(i64),
    /// The user has no profile (any more).
    Missing,
    /// The database refused this row, or the row cannot be a profile of
    /// this id; the message says why.
    Refused(String),
}

impl Guarded {
    /// The flusher's view: a replay is [`Applied::Superseded`], anything
    /// else not written (a newer row included: see the module docs) is
    /// [`Applied::Rejected`] with a reason.
    #[must_use]
    pub fn applied(&self) -> Applied {
        match self {
            Guarded::Written => Applied::Written,
            Guarded::Replayed => Applied::Superseded,
            Guarded::Newer(v) => Applied::Rejected(format!(
                "conflict: overtaken by other writes, the row is at version {v}"
            )),
            Guarded::Conflict(v) => Applied::Rejected(format!("conflicting write at version {v}")),
            Guarded::Missing => Applied::Rejected("profile no longer exists".to_owned()),
            Guarded::Refused(why) => Applied::Rejected(why.clone()),
        }
    }
}

/// Why a row was not written, from what the row holds now.
fn classify(new: &Profile, found: Option<&Profile>) -> Guarded {
    match found {
        None => Guarded::Missing,
        Some(row) if row.version == new.version && row.same_fields(new) => Guarded::Replayed,
        Some(row) if row.version == new.version => Guarded::Conflict(row.version),
        Some(row) if row.version > new.version => Guarded::Newer(row.version),
        // Versions only grow, so an older row means it was deleted and
        // created again between the UPDATE and this look: try again later.
        Some(row) => Guarded::Refused(format!(
            "the row changed during the write (now at version {})",
            row.version
        )),
    }
}

/// Whether a database error is about the data of one row (refuse that
/// row) rather than the database being unavailable or busy (retry the
/// whole batch).
fn row_error(e: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let transient = match code.parse::<u32>() {
        // SQLite result codes: BUSY, LOCKED, IOERR, FULL, CANTOPEN.
        Ok(n) => matches!(n & 0xff, 5 | 6 | 10 | 13 | 14),
        // SQLSTATE classes: connection exception, transaction rollback
        // (serialization, deadlock), insufficient resources, operator
        // intervention (shutdown), system error, internal error.
        Err(_) => matches!(
            code.get(..2),
            Some("08" | "40" | "53" | "57" | "58" | "XX") | None
        ),
    };
    (!transient).then(|| db.message().to_owned())
}

/// The user id a queued write names, checked against its value.
fn check_row(id: &str, p: &Profile) -> Result<Uuid, String> {
    let u = Uuid::parse_str(id).map_err(|_| format!("{id:?} is not a user id"))?;
    if p.user_id != u {
        return Err(format!(
            "the queued value belongs to user {}, not {id}",
            p.user_id
        ));
    }
    Ok(u)
}

/// Writes `p` only over an older row; whether it was written.
async fn update_one(tx: &mut Tx<'_>, p: &Profile) -> Result<bool, DbError> {
    Ok(sql(
        "UPDATE profiles SET first_name = $2, last_name = $3, name = $4, email = $5, \
         phone = $6, address = $7, version = $8, updated_at = $9 \
         WHERE user_id = $1 AND version < $8 RETURNING user_id",
    )
    .bind(p.user_id)
    .bind(p.first_name.clone())
    .bind(p.last_name.clone())
    .bind(p.name.clone())
    .bind(p.email.clone())
    .bind(p.phone.clone())
    .bind(p.address.clone())
    .bind(p.version)
    .bind(p.updated_at)
    .fetch_optional(tx)
    .await?
    .is_some())
}

/// The row of `user_id` as it is now.
async fn fetch_one(tx: &mut Tx<'_>, user_id: Uuid) -> Result<Option<Profile>, DbError> {
    sql_built(format!("SELECT {COLUMNS} FROM profiles WHERE user_id = $1"))
        .bind(user_id)
        .fetch_optional(tx)
        .await?
        .as_ref()
        .map(profile)
        .transpose()
}

/// The rows of a batch that can be written, by index, and the verdicts of
/// those that cannot.
fn checked<'a>(rows: &[(&'a str, &'a Profile)]) -> (Vec<Option<Guarded>>, Vec<(usize, Uuid)>) {
    let mut out = vec![None; rows.len()];
    let mut ok = Vec::with_capacity(rows.len());
    for (i, (id, p)) in rows.iter().enumerate() {
        match check_row(id, p) {
            Ok(u) => ok.push((i, u)),
            Err(why) => out[i] = Some(Guarded::Refused(why)),
        }
    }
    (out, ok)
}

impl Db {
    /// Writes each profile of `rows` (`(user id, profile at its new
    /// version)`) only over an older row, and says what happened to each,
    /// in order.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the database is unavailable or busy: then nothing
    /// is known to be written, and the call can be repeated as it is.
    pub async fn write_versioned(
        &self,
        rows: &[(&str, &Profile)],
    ) -> Result<Vec<Guarded>, DbError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // One statement on PostgreSQL; SQLite has no arrays.
        let fast = match self {
            Db::Postgres(p) => self.pg_batch(p, rows).await,
            Db::Sqlite(_) => self.tx_batch(rows).await,
        };
        match fast {
            Err(DbError::Sqlx(e)) if row_error(&e).is_some() => {
                tracing::warn!(error = %e, rows = rows.len(), "a row of a write-behind batch was refused; applying the batch row by row");
                self.row_by_row(rows).await
            }
            r => r,
        }
    }

    /// Writes one profile only over an older row (see
    /// [`Db::write_versioned`]).
    ///
    /// # Errors
    ///
    /// As [`Db::write_versioned`].
    pub async fn write_if_newer(&self, profile: &Profile) -> Result<Guarded, DbError> {
        let id = hyphenated(profile.user_id);
        let mut r = self.write_versioned(&[(&id, profile)]).await?;
        Ok(r.pop().unwrap_or(Guarded::Missing))
    }

    /// One `UPDATE … FROM UNNEST` for the whole batch, then one `SELECT`
    /// for the rows it did not write.
    async fn pg_batch(
        &self,
        pool: &PgPool,
        rows: &[(&str, &Profile)],
    ) -> Result<Vec<Guarded>, DbError> {
        let (mut out, ok) = checked(rows);
        let unique: HashSet<Uuid> = ok.iter().map(|(_, u)| *u).collect();
        if unique.len() != ok.len() {
            // One statement cannot order two writes of one row.
            return self.row_by_row(rows).await;
        }
        let col = |f: fn(&Profile) -> Option<String>| -> Vec<Option<String>> {
            ok.iter().map(|(i, _)| f(rows[*i].1)).collect()
        };
        let written: HashSet<Uuid> = if ok.is_empty() {
            HashSet::new()
        } else {
            sqlx::query(
                "UPDATE profiles AS p SET first_name = t.first_name, last_name = t.last_name, \
                 name = t.name, email = t.email, phone = t.phone, address = t.address, \
                 version = t.version, updated_at = t.updated_at \
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::bigint[], $9::timestamptz[]) \
                 AS t(user_id, first_name, last_name, name, email, phone, address, version, \
                 updated_at) \
                 WHERE p.user_id = t.user_id AND p.version < t.version \
                 RETURNING p.user_id",
            )
            .bind(ok.iter().map(|(_, u)| *u).collect::<Vec<_>>())
            .bind(col(|p| p.first_name.clone()))
            .bind(col(|p| p.last_name.clone()))
            .bind(col(|p| p.name.clone()))
            .bind(col(|p| p.email.clone()))
            .bind(col(|p| p.phone.clone()))
            .bind(col(|p| p.address.clone()))
            .bind(
                ok.iter()
                    .map(|(i, _)| rows[*i].1.version)
                    .collect::<Vec<_>>(),
            )
            .bind(
                ok.iter()
                    .map(|(i, _)| rows[*i].1.updated_at)
                    .collect::<Vec<_>>(),
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| DbRow::Pg(r).uuid("user_id"))
            .collect::<Result<_, _>>()?
        };
        let missed: Vec<Uuid> = ok
            .iter()
            .map(|(_, u)| *u)
            .filter(|u| !written.contains(u))
            .collect();
        let found: HashMap<Uuid, Profile> = self
            .fetch_many(&missed)
            .await?
            .into_iter()
            .map(|p| (p.user_id, p))
            .collect();
        for (i, u) in ok {
            out[i] = Some(if written.contains(&u) {
                Guarded::Written
            } else {
                classify(rows[i].1, found.get(&u))
            });
        }
        Ok(out
            .into_iter()
            .map(|g| g.unwrap_or(Guarded::Missing))
            .collect())
    }

    /// One transaction, one `UPDATE` per row (and a `SELECT` for each row
    /// not written).
    async fn tx_batch(&self, rows: &[(&str, &Profile)]) -> Result<Vec<Guarded>, DbError> {
        let (mut out, ok) = checked(rows);
        let mut tx = self.begin().await?;
        for (i, u) in ok {
            let p = rows[i].1;
            out[i] = Some(if update_one(&mut tx, p).await? {
                Guarded::Written
            } else {
                classify(p, fetch_one(&mut tx, u).await?.as_ref())
            });
        }
        tx.commit().await?;
        Ok(out
            .into_iter()
            .map(|g| g.unwrap_or(Guarded::Missing))
            .collect())
    }

    /// One transaction, each row in a savepoint: a row the database refuses
    /// is rolled back alone and reported as [`Guarded::Refused`].
    async fn row_by_row(&self, rows: &[(&str, &Profile)]) -> Result<Vec<Guarded>, DbError> {
        let (mut out, ok) = checked(rows);
        let mut tx = self.begin().await?;
        for (i, u) in ok {
            let p = rows[i].1;
            let mut sp = tx.savepoint().await?;
            let g = match update_one(&mut sp, p).await {
                Ok(true) => Guarded::Written,
                Ok(false) => classify(p, fetch_one(&mut sp, u).await?.as_ref()),
                Err(DbError::Sqlx(e)) => match row_error(&e) {
                    Some(why) => {
                        sp.rollback().await?;
                        out[i] = Some(Guarded::Refused(why));
                        continue;
                    }
                    None => return Err(e.into()),
                },
                Err(e) => return Err(e),
            };
            sp.commit().await?;
            out[i] = Some(g);
        }
        tx.commit().await?;
        Ok(out
            .into_iter()
            .map(|g| g.unwrap_or(Guarded::Missing))
            .collect())
    }
}

/// The write-behind flusher applies batches of queued profiles here.
///
/// Each row is written only over an older version; `Err` (the database is
/// unreachable, busy, or took longer than [`SINK_TIMEOUT`]) makes the
/// flusher retry the whole batch.
impl kura::Sink for Db {
    type Value = Profile;

    async fn apply(&self, batch: &[(String, Profile)]) -> Result<Vec<Applied>, BoxError> {
        let rows: Vec<(&str, &Profile)> = batch.iter().map(|(id, p)| (id.as_str(), p)).collect();
        match tokio::time::timeout(SINK_TIMEOUT, self.write_versioned(&rows)).await {
            Ok(Ok(r)) => Ok(r.iter().map(Guarded::applied).collect()),
            Ok(Err(e)) => Err(Box::new(e)),
            Err(_) => Err(format!("the database did not answer within {SINK_TIMEOUT:?}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn profile(version: i64, name: &str) -> Profile {
        let t = Utc::now();
        Profile {
            id: Uuid::nil(),
            user_id: Uuid::nil(),
            first_name: None,
            last_name: None,
            name: Some(name.to_owned()),
            email: None,
            phone: None,
            address: None,
            created_at: t,
            updated_at: t,
            version,
        }
    }

    #[test]
    fn verdicts() {
        let new = profile(5, "b");
        assert_eq!(classify(&new, None), Guarded::Missing);
        assert_eq!(classify(&new, Some(&profile(5, "b"))), Guarded::Replayed);
        assert_eq!(classify(&new, Some(&profile(5, "c"))), Guarded::Conflict(5));
        assert_eq!(classify(&new, Some(&profile(7, "c"))), Guarded::Newer(7));
        assert!(matches!(
            classify(&new, Some(&profile(1, "a"))),
            Guarded::Refused(_)
        ));
        assert_eq!(Guarded::Replayed.applied(), Applied::Superseded);
        assert_eq!(
            Guarded::Newer(9).applied(),
            Applied::Rejected(
                "conflict: overtaken by other writes, the row is at version 9".into()
            )
        );
        assert_eq!(
            Guarded::Missing.applied(),
            Applied::Rejected("profile no longer exists".into())
        );
        assert_eq!(
            Guarded::Conflict(5).applied(),
            Applied::Rejected("conflicting write at version 5".into())
        );
    }

    #[test]
    fn ids_are_checked_against_values() {
        let p = profile(2, "a");
        assert!(check_row(&Uuid::nil().to_string(), &p).is_ok());
        assert!(check_row("nobody", &p).is_err());
        assert!(check_row(&Uuid::new_v4().to_string(), &p).is_err());
    }
}
