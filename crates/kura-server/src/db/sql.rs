//! One SQL text for both backends: the dialect helper.
//!
//! A query is written once, in PostgreSQL's spelling with `$1, $2, …`
//! placeholders, and run on either pool ([`Stmt`]). SQLite reads `$N` as
//! the N-th argument too (repeated or out of order), so the text only needs
//! these rewrites for SQLite, done by [`sqlite_text`]:
//!
//! | PostgreSQL | SQLite |
//! |---|---|
//! | `x::type`, `x::type[]` (casts) | `x` (SQLite is dynamically typed) |
//! | `GREATEST(a, b)`, `LEAST(a, b)` | `max(a, b)`, `min(a, b)` |
//! | `LIMIT ALL` | `LIMIT -1` |
//!
//! Values are bound as [`Val`]s, each in its backend's representation:
//! UUIDs as `uuid` on PostgreSQL and lowercase hyphenated text on SQLite,
//! times as `timestamptz` and fixed-width RFC 3339 UTC text (so that text
//! order is time order). Rows are read back the same way ([`DbRow`]).
//!
//! Why not sqlx's `Any` driver: it decodes only the plain types (no UUID,
//! no timestamp), so every row would be decoded by hand per backend anyway,
//! and it gives up the typed pools the rest of the service uses (listening
//! on PostgreSQL, SQLite's options). The helper keeps both pools and
//! writes the query once.
//!
//! Statements whose SQL truly differs keep two arms (`match db { … }`):
//! arrays (`= ANY($1)`, `UNNEST`) against SQLite's multi-row statements,
//! row locks, the catalogs, the feed's positions.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{AssertSqlSafe, Postgres, Row as _, Sqlite, Transaction};
use uuid::Uuid;

use super::{Db, DbError};

/// A bound value, in the representation of the backend it goes to.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Val {
    /// A UUID (`uuid` / text).
    Uuid(Uuid),
    /// A time (`timestamptz` / fixed-width RFC 3339 UTC text).
    Time(DateTime<Utc>),
    /// Text, or NULL.
    Text(Option<String>),
    /// An integer, or NULL.
    Int(Option<i64>),
    /// A boolean.
    Bool(bool),
}

impl From<Uuid> for Val {
    fn from(v: Uuid) -> Self {
        Val::Uuid(v)
    }
}

impl From<DateTime<Utc>> for Val {
    fn from(v: DateTime<Utc>) -> Self {
        Val::Time(v)
    }
}

impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(Some(v))
    }
}

impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(Some(v.to_owned()))
    }
}

impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(Some(v.clone()))
    }
}

impl From<Option<String>> for Val {
    fn from(v: Option<String>) -> Self {
        Val::Text(v)
    }
}

impl From<Option<&str>> for Val {
    fn from(v: Option<&str>) -> Self {
        Val::Text(v.map(str::to_owned))
    }
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(Some(v))
    }
}

impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Self {
        Val::Int(v)
    }
}

impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::Bool(v)
    }
}

/// Fixed-width RFC 3339 UTC text, as SQLite stores timestamps.
#[must_use]
pub fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A timestamp as SQLite stores it.
///
/// # Errors
///
/// [`DbError::Row`] when it is not RFC 3339.
pub fn parse_ts(s: &str) -> Result<DateTime<Utc>, DbError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DbError::Row(format!("timestamp {s:?}: {e}")))
}

/// A UUID as SQLite stores it.
///
/// # Errors
///
/// [`DbError::Row`] when it is not a UUID.
pub fn parse_uuid(s: &str) -> Result<Uuid, DbError> {
    Uuid::parse_str(s).map_err(|e| DbError::Row(format!("uuid {s:?}: {e}")))
}

/// `id` as SQLite stores it (lowercase, hyphenated).
#[must_use]
pub fn hyphenated(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// The SQLite spelling of a query written for PostgreSQL (see the module
/// docs for the rewrites). Quoted strings are left alone.
#[must_use]
pub fn sqlite_text(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut quoted = false;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' {
            quoted = !quoted;
        } else if !quoted {
            if c == b':' && b.get(i + 1) == Some(&b':') {
                // A cast: skip `::ident` and an optional `[]`.
                let mut j = i + 2;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                if sql[j..].starts_with("[]") {
                    j += 2;
                }
                i = j;
                continue;
            }
            let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
            if word_start {
                let rest = &sql[i..];
                let swap = [
                    ("GREATEST(", "max("),
                    ("LEAST(", "min("),
                    ("LIMIT ALL", "LIMIT -1"),
                ]
                .into_iter()
                .find(|(from, _)| {
                    rest.get(..from.len())
                        .is_some_and(|head| head.eq_ignore_ascii_case(from))
                });
                if let Some((from, to)) = swap {
                    out.push_str(to);
                    i += from.len();
                    continue;
                }
            }
        }
        // Copy one whole character.
        let ch = sql[i..].chars().next().unwrap_or_default();
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// A row of either backend, read by column name with the backend's
/// representation undone.
#[derive(Debug)]
pub enum DbRow {
    /// A PostgreSQL row.
    Pg(PgRow),
    /// A SQLite row.
    Lite(SqliteRow),
}

impl DbRow {
    /// A UUID column.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the column is missing or does not decode.
    pub fn uuid(&self, col: &str) -> Result<Uuid, DbError> {
        match self {
            DbRow::Pg(r) => Ok(r.try_get(col)?),
            DbRow::Lite(r) => parse_uuid(r.try_get(col)?),
        }
    }

    /// A time column.
    ///
    /// # Errors
    ///
    /// As [`DbRow::uuid`].
    pub fn time(&self, col: &str) -> Result<DateTime<Utc>, DbError> {
        match self {
            DbRow::Pg(r) => Ok(r.try_get(col)?),
            DbRow::Lite(r) => parse_ts(r.try_get(col)?),
        }
    }

    /// A text column.
    ///
    /// # Errors
    ///
    /// As [`DbRow::uuid`]; NULL is an error.
    pub fn text(&self, col: &str) -> Result<String, DbError> {
        Ok(match self {
            DbRow::Pg(r) => r.try_get(col)?,
            DbRow::Lite(r) => r.try_get(col)?,
        })
    }

    /// A text column that may be NULL.
    ///
    /// # Errors
    ///
    /// As [`DbRow::uuid`].
    pub fn opt_text(&self, col: &str) -> Result<Option<String>, DbError> {
        Ok(match self {
            DbRow::Pg(r) => r.try_get(col)?,
            DbRow::Lite(r) => r.try_get(col)?,
        })
    }

    /// An integer column.
    ///
    /// # Errors
    ///
    /// As [`DbRow::uuid`]; NULL is an error.
    pub fn int(&self, col: &str) -> Result<i64, DbError> {
        Ok(match self {
            DbRow::Pg(r) => r.try_get(col)?,
            DbRow::Lite(r) => r.try_get(col)?,
        })
    }

    /// An integer column that may be NULL.
    ///
    /// # Errors
    ///
    /// As [`DbRow::uuid`].
    pub fn opt_int(&self, col: &str) -> Result<Option<i64>, DbError> {
        Ok(match self {
            DbRow::Pg(r) => r.try_get(col)?,
            DbRow::Lite(r) => r.try_get(col)?,
        })
    }
}

/// An open transaction (or a savepoint in one) of either backend; rolled
/// back if dropped without [`Tx::commit`].
#[derive(Debug)]
pub enum Tx<'c> {
    /// On PostgreSQL.
    Pg(Transaction<'c, Postgres>),
    /// On SQLite.
    Lite(Transaction<'c, Sqlite>),
}

impl Tx<'_> {
    /// Commits (a savepoint: releases it).
    ///
    /// # Errors
    ///
    /// [`DbError`] when the commit fails.
    pub async fn commit(self) -> Result<(), DbError> {
        match self {
            Tx::Pg(t) => t.commit().await?,
            Tx::Lite(t) => t.commit().await?,
        }
        Ok(())
    }

    /// Rolls back (a savepoint: to where it was taken).
    ///
    /// # Errors
    ///
    /// [`DbError`] when the rollback fails.
    pub async fn rollback(self) -> Result<(), DbError> {
        match self {
            Tx::Pg(t) => t.rollback().await?,
            Tx::Lite(t) => t.rollback().await?,
        }
        Ok(())
    }

    /// Whether it is a PostgreSQL transaction.
    #[must_use]
    pub fn is_postgres(&self) -> bool {
        matches!(self, Tx::Pg(_))
    }

    /// A savepoint in this transaction.
    ///
    /// # Errors
    ///
    /// [`DbError`] when it cannot be taken.
    pub async fn savepoint(&mut self) -> Result<Tx<'_>, DbError> {
        Ok(match self {
            Tx::Pg(t) => Tx::Pg(sqlx::Acquire::begin(t).await?),
            Tx::Lite(t) => Tx::Lite(sqlx::Acquire::begin(t).await?),
        })
    }
}

impl Db {
    /// Starts a transaction.
    ///
    /// # Errors
    ///
    /// [`DbError`] when no connection can be had.
    pub async fn begin(&self) -> Result<Tx<'static>, DbError> {
        Ok(match self {
            Db::Postgres(p) => Tx::Pg(p.begin().await?),
            Db::Sqlite(p) => Tx::Lite(p.begin().await?),
        })
    }
}

/// Where a statement runs: the pool, or an open transaction.
#[derive(Debug)]
pub enum On<'a, 'c> {
    /// A connection of the pool.
    Pool(&'a Db),
    /// The transaction.
    Tx(&'a mut Tx<'c>),
}

impl<'a> From<&'a Db> for On<'a, 'static> {
    fn from(db: &'a Db) -> Self {
        On::Pool(db)
    }
}

impl<'a, 'c: 'a> From<&'a mut Tx<'c>> for On<'a, 'c> {
    fn from(tx: &'a mut Tx<'c>) -> Self {
        On::Tx(tx)
    }
}

/// One statement: its text (PostgreSQL's spelling) and its arguments.
#[derive(Debug, Clone)]
#[must_use = "a statement does nothing until it is run"]
pub struct Stmt {
    text: String,
    args: Vec<Val>,
    /// Already in the backend's own spelling: not rewritten for SQLite.
    native: bool,
}

/// A statement of fixed text.
pub fn sql(text: &'static str) -> Stmt {
    sql_built(text.to_owned())
}

/// A statement of text built at run time from trusted parts (table and
/// column names from the code, never from input).
pub fn sql_built(text: String) -> Stmt {
    Stmt {
        text,
        args: Vec::new(),
        native: false,
    }
}

/// A statement already written for the backend it runs on (the library's
/// generated DDL): run as it is.
pub fn sql_native(text: String) -> Stmt {
    Stmt {
        native: true,
        ..sql_built(text)
    }
}

fn pg_args(args: Vec<Val>) -> Result<PgArguments, DbError> {
    use sqlx::Arguments as _;
    let mut a = PgArguments::default();
    for v in args {
        let r = match v {
            Val::Uuid(u) => a.add(u),
            Val::Time(t) => a.add(t),
            Val::Text(s) => a.add(s),
            Val::Int(i) => a.add(i),
            Val::Bool(b) => a.add(b),
        };
        r.map_err(|e| DbError::Row(format!("argument does not encode: {e}")))?;
    }
    Ok(a)
}

fn sqlite_args(args: Vec<Val>) -> Result<SqliteArguments, DbError> {
    use sqlx::Arguments as _;
    let mut a = SqliteArguments::default();
    for v in args {
        let r = match v {
            Val::Uuid(u) => a.add(hyphenated(u)),
            Val::Time(t) => a.add(ts(t)),
            Val::Text(s) => a.add(s),
            Val::Int(i) => a.add(i),
            Val::Bool(b) => a.add(b),
        };
        r.map_err(|e| DbError::Row(format!("argument does not encode: {e}")))?;
    }
    Ok(a)
}

type PgQuery = sqlx::query::Query<'static, Postgres, PgArguments>;
type LiteQuery = sqlx::query::Query<'static, Sqlite, SqliteArguments>;

fn pg(text: String, args: Vec<Val>) -> Result<PgQuery, DbError> {
    Ok(sqlx::query_with(AssertSqlSafe(text), pg_args(args)?))
}

fn lite(text: &str, native: bool, args: Vec<Val>) -> Result<LiteQuery, DbError> {
    let text = if native {
        text.to_owned()
    } else {
        sqlite_text(text)
    };
    Ok(sqlx::query_with(AssertSqlSafe(text), sqlite_args(args)?))
}

impl Stmt {
    /// Binds the next argument (`$1`, then `$2`, …).
    pub fn bind(mut self, v: impl Into<Val>) -> Self {
        self.args.push(v.into());
        self
    }

    /// Runs it; the row it returns, if any.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn fetch_optional<'a, 'c: 'a>(
        self,
        on: impl Into<On<'a, 'c>>,
    ) -> Result<Option<DbRow>, DbError> {
        let Stmt { text, args, native } = self;
        Ok(match on.into() {
            On::Pool(Db::Postgres(p)) => pg(text, args)?.fetch_optional(p).await?.map(DbRow::Pg),
            On::Pool(Db::Sqlite(p)) => lite(&text, native, args)?
                .fetch_optional(p)
                .await?
                .map(DbRow::Lite),
            On::Tx(Tx::Pg(t)) => pg(text, args)?
                .fetch_optional(&mut **t)
                .await?
                .map(DbRow::Pg),
            On::Tx(Tx::Lite(t)) => lite(&text, native, args)?
                .fetch_optional(&mut **t)
                .await?
                .map(DbRow::Lite),
        })
    }

    /// Runs it; the one row it returns.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure, or when it returns no row.
    pub async fn fetch_one<'a, 'c: 'a>(self, on: impl Into<On<'a, 'c>>) -> Result<DbRow, DbError> {
        let Stmt { text, args, native } = self;
        Ok(match on.into() {
            On::Pool(Db::Postgres(p)) => DbRow::Pg(pg(text, args)?.fetch_one(p).await?),
            On::Pool(Db::Sqlite(p)) => DbRow::Lite(lite(&text, native, args)?.fetch_one(p).await?),
            On::Tx(Tx::Pg(t)) => DbRow::Pg(pg(text, args)?.fetch_one(&mut **t).await?),
            On::Tx(Tx::Lite(t)) => {
                DbRow::Lite(lite(&text, native, args)?.fetch_one(&mut **t).await?)
            }
        })
    }

    /// Runs it; every row it returns.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn fetch_all<'a, 'c: 'a>(
        self,
        on: impl Into<On<'a, 'c>>,
    ) -> Result<Vec<DbRow>, DbError> {
        let Stmt { text, args, native } = self;
        Ok(match on.into() {
            On::Pool(Db::Postgres(p)) => pg(text, args)?
                .fetch_all(p)
                .await?
                .into_iter()
                .map(DbRow::Pg)
                .collect(),
            On::Pool(Db::Sqlite(p)) => lite(&text, native, args)?
                .fetch_all(p)
                .await?
                .into_iter()
                .map(DbRow::Lite)
                .collect(),
            On::Tx(Tx::Pg(t)) => pg(text, args)?
                .fetch_all(&mut **t)
                .await?
                .into_iter()
                .map(DbRow::Pg)
                .collect(),
            On::Tx(Tx::Lite(t)) => lite(&text, native, args)?
                .fetch_all(&mut **t)
                .await?
                .into_iter()
                .map(DbRow::Lite)
                .collect(),
        })
    }

    /// Runs it; how many rows it changed.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn execute<'a, 'c: 'a>(self, on: impl Into<On<'a, 'c>>) -> Result<u64, DbError> {
        let Stmt { text, args, native } = self;
        Ok(match on.into() {
            On::Pool(Db::Postgres(p)) => pg(text, args)?.execute(p).await?.rows_affected(),
            On::Pool(Db::Sqlite(p)) => lite(&text, native, args)?.execute(p).await?.rows_affected(),
            On::Tx(Tx::Pg(t)) => pg(text, args)?.execute(&mut **t).await?.rows_affected(),
            On::Tx(Tx::Lite(t)) => lite(&text, native, args)?
                .execute(&mut **t)
                .await?
                .rows_affected(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_spelling() {
        assert_eq!(
            sqlite_text("SELECT data::text AS d, $2::jsonb, x::text[] FROM t"),
            "SELECT data AS d, $2, x FROM t"
        );
        assert_eq!(
            sqlite_text("SET a = GREATEST(a, $1), b = least(b, 2) LIMIT ALL OFFSET $3"),
            "SET a = max(a, $1), b = min(b, 2) LIMIT -1 OFFSET $3"
        );
        // Quoted text and longer names are left alone.
        assert_eq!(
            sqlite_text("SELECT 'a::b GREATEST(' , MY_GREATEST(1), café"),
            "SELECT 'a::b GREATEST(' , MY_GREATEST(1), café"
        );
    }
}
