//! [`SqlFeedLog`]: the relay's [`ChangeSource`] over the trigger log. It
//! reads, counts and prunes the log over sqlx.
//!
//! # Positions
//!
//! A log row's position is what makes "everything below it is final" true:
//!
//! | backend | position | watermark |
//! |---|---|---|
//! | PostgreSQL | the writing transaction's id (`txid`, `xid8`) | `pg_snapshot_xmin(pg_current_snapshot())`: every transaction below it has finished |
//! | SQLite | `seq` (one writer at a time: seq order is commit order) | the last `seq` handed out, + 1 |
//!
//! On PostgreSQL `seq` is taken at insert, not at commit, so reading by
//! `seq` could skip a transaction that commits after a higher `seq` was
//! read; reading by transaction id below the snapshot's xmin cannot. A
//! transaction left open anywhere in the cluster holds the watermark back:
//! that is lag (`cache_feed_lag_seconds`), never a skipped entry.
//!
//! # Wake-ups
//!
//! On PostgreSQL, [`SqlFeedLog::wait`] listens on the channel the
//! triggers notify (one notification per transaction). A notification is
//! only a wake-up: one missed while the listening connection was down is
//! caught by the next poll. SQLite has no notifications: `wait` sleeps.

use std::time::Duration;

use kura::feed::source::trigger_log::{
    CHANNEL, LOG_TABLE, POSITION_TABLE, RELAY_TABLE, STATE_TABLE,
};
use kura::feed::{ChangeSource, FeedEvent};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::Mutex;

use crate::db::sql::{Val, sql_built};
use crate::db::{Db, DbError};

/// The PostgreSQL listening connection, opened on first use and again
/// after it was lost.
#[derive(Debug, Default)]
struct Listen {
    listener: Option<PgListener>,
    /// When the last wake-up was handed to the relay.
    woke: Option<tokio::time::Instant>,
}

/// Least time between two wake-ups: under a thousand committing
/// transactions a second, one step per notification would spend the
/// database on the relay's fixed cost per step; a step every few
/// milliseconds takes all that committed meanwhile.
const WAKE_GAP: Duration = Duration::from_millis(5);

/// The invalidation log of a [`Db`], for the relay.
///
/// # Concurrent calls
///
/// Reads, counts and prunes run on the pool and may overlap. [`wait`]
/// calls are serialized (one listening connection per log).
///
/// [`wait`]: SqlFeedLog::wait
#[derive(Debug)]
pub struct SqlFeedLog {
    db: Db,
    listen: Mutex<Listen>,
    notify: bool,
}

/// 9999-12-31, Unix ms: later cut-offs mean "any age".
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_000;

/// A position as an SQLite integer; a bound past SQLite's range (the relay
/// reads "to the end" with `u64::MAX`) is the largest one.
fn sqlite_bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> Result<u64, DbError> {
    u64::try_from(v).map_err(|_| DbError::Row(format!("negative log position {v}")))
}

/// A log row as read: position, seq, kind, id, version, committed at (Unix
/// ms), and whether a version was there but not an integer (SQLite).
type LogRow = (i64, i64, String, String, Option<i64>, i64, bool);

/// A log row the relay takes without its version: logged and counted.
fn bad_row(seq: i64, kind: &str, id: &str, why: &str) {
    tracing::warn!(
        seq,
        kind,
        id,
        why,
        "invalidation feed: log row read without its version; its entity is invalidated unconditionally"
    );
    metrics::counter!("cache_feed_bad_rows_total").increment(1);
}

impl SqlFeedLog {
    /// The column that orders the log: the writing transaction's id on
    /// PostgreSQL, `seq` on SQLite (see the module docs).
    fn position_column(&self) -> &'static str {
        match &self.db {
            Db::Postgres(_) => "txid",
            Db::Sqlite(_) => "seq",
        }
    }

    /// The commit time of a row, Unix ms.
    fn committed_ms(&self) -> &'static str {
        match &self.db {
            Db::Postgres(_) => "(extract(epoch FROM committed_at) * 1000)::bigint",
            Db::Sqlite(_) => "committed_at",
        }
    }

    /// A position as bound: text cast to `xid8` on PostgreSQL, an integer
    /// on SQLite (a bound past its range, such as "to the end" with
    /// `u64::MAX`, is the largest one).
    fn position(&self, v: u64) -> Val {
        match &self.db {
            Db::Postgres(_) => Val::Text(Some(v.to_string())),
            Db::Sqlite(_) => Val::Int(Some(sqlite_bound(v))),
        }
    }

    /// The log of `db` (nothing is checked or opened yet).
    #[must_use]
    pub fn new(db: Db) -> Self {
        Self {
            db,
            listen: Mutex::new(Listen::default()),
            notify: true,
        }
    }

    /// Whether [`SqlFeedLog::wait`] listens for notifications on
    /// PostgreSQL (default); without, it only sleeps (polling).
    #[must_use]
    pub fn listen(mut self, yes: bool) -> Self {
        self.notify = yes;
        self
    }

    /// The database.
    #[must_use]
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Whether the database has the log table.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the database cannot be asked.
    pub async fn exists(&self) -> Result<bool, DbError> {
        // The catalogs differ.
        let q = match &self.db {
            Db::Postgres(_) => {
                "SELECT count(*) AS n FROM (SELECT to_regclass($1) AS c) t WHERE c IS NOT NULL"
            }
            Db::Sqlite(_) => {
                "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = $1"
            }
        };
        let n = sql_built(q.to_owned())
            .bind(LOG_TABLE)
            .fetch_one(&self.db)
            .await?
            .int("n")?;
        Ok(n > 0)
    }

    /// Everything below the watermark is final: no row with a lower
    /// position can still appear.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn watermark(&self) -> Result<u64, DbError> {
        let q = match &self.db {
            Db::Postgres(_) => "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS n",
            // `sqlite_sequence` holds the last seq handed out even when
            // retention deleted every row (AUTOINCREMENT never reuses one).
            Db::Sqlite(_) => {
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = $1), 0) + 1 AS n"
            }
        };
        let mut stmt = sql_built(q.to_owned());
        if let Db::Sqlite(_) = &self.db {
            stmt = stmt.bind(LOG_TABLE);
        }
        to_u64(stmt.fetch_one(&self.db).await?.int("n")?)
    }

    /// Rows with position in `[from, to)`, after `after` (the last
    /// `(position, seq)` of the previous page), at most `limit`, in
    /// `(position, seq)` order.
    ///
    /// A row whose version cannot be taken as it is (negative, or on SQLite
    /// not an integer) is read without a version, so that its entity is
    /// invalidated unconditionally: the row is logged and counted
    /// (`cache_feed_bad_rows_total`), and the feed goes on. On SQLite, whose
    /// columns take any type, kind and id are read as text.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Result<Vec<(u64, FeedEvent)>, DbError> {
        if from >= to || limit == 0 {
            return Ok(Vec::new());
        }
        let (after_pos, after_seq) = after.unwrap_or((from, i64::MIN));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<LogRow> = match &self.db {
            Db::Postgres(p) => {
                sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT txid::text::bigint, seq, kind, entity_id, version, \
                 (extract(epoch FROM committed_at) * 1000)::bigint, false \
                 FROM {LOG_TABLE} \
                 WHERE txid >= $1::text::xid8 AND txid < $2::text::xid8 \
                 AND (txid, seq) > ($3::text::xid8, $4) \
                 ORDER BY txid, seq LIMIT $5"
                )))
                .bind(from.to_string())
                .bind(to.to_string())
                .bind(after_pos.to_string())
                .bind(after_seq)
                .bind(limit)
                .fetch_all(p)
                .await?
            }
            Db::Sqlite(p) => {
                sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT seq, seq, CAST(kind AS TEXT), CAST(entity_id AS TEXT), \
                 CASE WHEN typeof(version) = 'integer' THEN version END, \
                 CASE WHEN typeof(committed_at) = 'integer' THEN committed_at ELSE 0 END, \
                 typeof(version) NOT IN ('integer', 'null') \
                 FROM {LOG_TABLE} \
                 WHERE seq >= ?1 AND seq < ?2 AND seq > ?3 \
                 ORDER BY seq LIMIT ?4"
                )))
                .bind(sqlite_bound(from))
                .bind(sqlite_bound(to))
                .bind(after_seq)
                .bind(limit)
                .fetch_all(p)
                .await?
            }
        };
        rows.into_iter()
            .map(|(pos, seq, kind, id, version, at, unreadable)| {
                let version = match version.map(u64::try_from) {
                    Some(Ok(v)) => Some(v),
                    Some(Err(_)) => {
                        bad_row(seq, &kind, &id, "negative version");
                        None
                    }
                    None if unreadable => {
                        bad_row(seq, &kind, &id, "version is not an integer");
                        None
                    }
                    None => None,
                };
                Ok((
                    to_u64(pos)?,
                    FeedEvent {
                        seq,
                        kind,
                        id,
                        version,
                        committed_at_ms: at,
                        clear: false,
                    },
                ))
            })
            .collect()
    }

    /// The lowest position still in the log; `None` when it is empty.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn oldest(&self) -> Result<Option<u64>, DbError> {
        let p = self.position_column();
        sql_built(format!(
            "SELECT {p}::text::bigint AS n FROM {LOG_TABLE} ORDER BY {p}, seq LIMIT 1"
        ))
        .fetch_optional(&self.db)
        .await?
        .map(|r| to_u64(r.int("n")?))
        .transpose()
    }

    /// How many rows are at or past `from`.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn backlog(&self, from: u64) -> Result<u64, DbError> {
        let p = self.position_column();
        let n = sql_built(format!(
            "SELECT count(*) AS n FROM {LOG_TABLE} WHERE {p} >= $1::text::xid8"
        ))
        .bind(self.position(from))
        .fetch_one(&self.db)
        .await?
        .int("n")?;
        to_u64(n)
    }

    /// When the oldest row (by position) was written, Unix ms.
    async fn oldest_written_ms(&self) -> Result<Option<i64>, DbError> {
        let (p, at) = (self.position_column(), self.committed_ms());
        sql_built(format!(
            "SELECT {at} AS n FROM {LOG_TABLE} ORDER BY {p}, seq LIMIT 1"
        ))
        .fetch_optional(&self.db)
        .await?
        .map(|r| r.int("n"))
        .transpose()
    }

    /// Deletes up to `limit` rows below position `below` written before
    /// `before_ms` (Unix ms), oldest first; returns how many.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn prune(&self, below: u64, before_ms: i64, limit: usize) -> Result<u64, DbError> {
        // The oldest row first (one index entry): when it is within the
        // retention window, so is nearly every other, and the DELETE below
        // would walk every row under `below` to find none (the relay
        // prunes on every step).
        if before_ms < MAX_TIMESTAMP_MS {
            match self.oldest_written_ms().await? {
                Some(t) if t < before_ms => {}
                _ => return Ok(0),
            }
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let n = match &self.db {
            Db::Postgres(p) => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {LOG_TABLE} WHERE seq IN (SELECT seq FROM {LOG_TABLE} \
                 WHERE txid < $1::text::xid8 \
                 AND ($2::float8 IS NULL OR committed_at < to_timestamp($2::float8 / 1000)) \
                 ORDER BY txid, seq LIMIT $3)"
            )))
            .bind(below.to_string())
            // `i64::MAX` (any age) is past what a timestamp can hold.
            .bind((before_ms < MAX_TIMESTAMP_MS).then_some(before_ms as f64))
            .bind(limit)
            .execute(p)
            .await?
            .rows_affected(),
            Db::Sqlite(p) => sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {LOG_TABLE} WHERE seq IN (SELECT seq FROM {LOG_TABLE} \
                 WHERE seq < ?1 AND committed_at < ?2 ORDER BY seq LIMIT ?3)"
            )))
            .bind(sqlite_bound(below))
            .bind(before_ms)
            .bind(limit)
            .execute(p)
            .await?
            .rows_affected(),
        };
        Ok(n)
    }

    /// The overflowed kinds and their cuts.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn overflowed(&self) -> Result<Vec<(String, u64)>, DbError> {
        sql_built(format!(
            "SELECT kind, cut::text::bigint AS cut FROM {STATE_TABLE} ORDER BY kind"
        ))
        .fetch_all(&self.db)
        .await?
        .iter()
        .map(|r| Ok((r.text("kind")?, to_u64(r.int("cut")?)?)))
        .collect()
    }

    /// Records an overflow of `kinds` at `cut`, raising a lower cut.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn mark_overflow(&self, kinds: &[String], cut: u64) -> Result<(), DbError> {
        if kinds.is_empty() {
            return Ok(());
        }
        match &self.db {
            Db::Postgres(p) => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {STATE_TABLE} AS s (kind, cut) \
                     SELECT k, $2::text::xid8 FROM unnest($1::text[]) AS k \
                     ON CONFLICT (kind) DO UPDATE SET cut = \
                     CASE WHEN EXCLUDED.cut > s.cut THEN EXCLUDED.cut ELSE s.cut END"
                )))
                .bind(kinds.to_vec())
                .bind(cut.to_string())
                .execute(p)
                .await?;
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                for k in kinds {
                    sqlx::query(AssertSqlSafe(format!(
                        "INSERT INTO {STATE_TABLE} (kind, cut) VALUES (?1, ?2) \
                         ON CONFLICT (kind) DO UPDATE SET cut = max(cut, excluded.cut)"
                    )))
                    .bind(k)
                    .bind(sqlite_bound(cut))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Forgets the overflow of each kind whose cut is still at most the
    /// one given.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn clear_overflow(&self, kinds: &[(String, u64)]) -> Result<(), DbError> {
        for (kind, cut) in kinds {
            sql_built(format!(
                "DELETE FROM {STATE_TABLE} WHERE kind = $1 AND cut <= $2::text::xid8"
            ))
            .bind(kind)
            .bind(self.position(*cut))
            .execute(&self.db)
            .await?;
        }
        Ok(())
    }

    /// Deletes up to `limit` rows of overflowed kinds below their kind's
    /// cut, applied or not, in one statement that reads the cuts itself.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn prune_overflowed(&self, limit: usize) -> Result<u64, DbError> {
        let p = self.position_column();
        sql_built(format!(
            "DELETE FROM {LOG_TABLE} WHERE seq IN (SELECT l.seq FROM {LOG_TABLE} AS l \
             JOIN {STATE_TABLE} AS s ON s.kind = l.kind WHERE l.{p} < s.cut \
             ORDER BY l.{p}, l.seq LIMIT $1)"
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.db)
        .await
    }

    /// Mirrors the fleet position in the database.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn save_position(&self, position: u64) -> Result<(), DbError> {
        match &self.db {
            Db::Postgres(p) => sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {POSITION_TABLE} (id, position) VALUES (TRUE, $1::text::xid8) \
                 ON CONFLICT (id) DO UPDATE SET position = EXCLUDED.position, \
                 updated_at = clock_timestamp()"
            )))
            .bind(position.to_string())
            .execute(p)
            .await
            .map(drop)?,
            Db::Sqlite(p) => sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {POSITION_TABLE} (id, position) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET position = excluded.position, \
                 updated_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
            )))
            .bind(sqlite_bound(position))
            .execute(p)
            .await
            .map(drop)?,
        }
        Ok(())
    }

    /// The position last mirrored by [`SqlFeedLog::save_position`].
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn saved_position(&self) -> Result<Option<u64>, DbError> {
        sql_built(format!(
            "SELECT position::text::bigint AS n FROM {POSITION_TABLE} WHERE id"
        ))
        .fetch_optional(&self.db)
        .await?
        .map(|r| to_u64(r.int("n")?))
        .transpose()
    }

    /// Tells writers that a relay polls for the next `window`
    /// (`kura_feed_relay.polling_until`, PostgreSQL's clock): their
    /// triggers skip the `NOTIFY` meanwhile. Nothing on SQLite, which has
    /// no wake-ups, or when this log does not listen (polling only): then
    /// `false`, and the relay keeps its poll interval.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn polling(&self, window: Duration) -> Result<bool, DbError> {
        let Db::Postgres(p) = &self.db else {
            return Ok(false);
        };
        if !self.notify {
            return Ok(false);
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {RELAY_TABLE} (id, polling_until) \
             VALUES (TRUE, clock_timestamp() + $1 * interval '1 millisecond') \
             ON CONFLICT (id) DO UPDATE SET polling_until = EXCLUDED.polling_until"
        )))
        .bind(window.as_millis() as f64)
        .execute(p)
        .await?;
        Ok(true)
    }

    /// Waits for a wake-up or `timeout`, whichever comes first. On
    /// PostgreSQL a wake-up is a notification on [`CHANNEL`] (the
    /// notifications already received are taken with it, so a burst of
    /// transactions wakes the relay once); on SQLite there are none.
    pub async fn wait(&self, timeout: Duration) {
        let Db::Postgres(pool) = &self.db else {
            tokio::time::sleep(timeout).await;
            return;
        };
        if !self.notify {
            tokio::time::sleep(timeout).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut listen = self.listen.lock().await;
        if listen.listener.is_none() {
            // A connection of its own, outside the service's pool: it is
            // held for as long as the relay runs.
            let own = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout.max(Duration::from_secs(1)))
                .connect_lazy_with((*pool.connect_options()).clone());
            let opened = async {
                let mut l = PgListener::connect_with(&own).await?;
                l.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            match tokio::time::timeout_at(deadline, opened).await {
                Ok(Ok(l)) => listen.listener = Some(l),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "feed: cannot listen for notifications; polling");
                }
                Err(_) => {}
            }
        }
        let Some(l) = listen.listener.as_mut() else {
            tokio::time::sleep_until(deadline).await;
            return;
        };
        match tokio::time::timeout_at(deadline, l.try_recv()).await {
            Ok(Ok(Some(_))) => {
                let now = tokio::time::Instant::now();
                if let Some(last) = listen.woke {
                    let next = (last + WAKE_GAP).min(deadline);
                    if next > now {
                        tokio::time::sleep_until(next).await;
                    }
                }
                if let Some(l) = listen.listener.as_mut() {
                    while l.next_buffered().is_some() {}
                }
                listen.woke = Some(tokio::time::Instant::now());
            }
            // The connection was lost (and re-established): a
            // notification may have been missed, so read now.
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "feed: listening connection failed; polling");
                listen.listener = None;
                tokio::time::sleep_until(deadline).await;
            }
            Err(_) => {}
        }
    }
}

/// The relay's view of the log: each method is the inherent one of the
/// same name.
impl ChangeSource for SqlFeedLog {
    type Error = DbError;

    async fn watermark(&self) -> Result<u64, DbError> {
        SqlFeedLog::watermark(self).await
    }

    async fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Result<Vec<(u64, FeedEvent)>, DbError> {
        SqlFeedLog::read(self, from, to, after, limit).await
    }

    async fn oldest(&self) -> Result<Option<u64>, DbError> {
        SqlFeedLog::oldest(self).await
    }

    async fn backlog(&self, from: u64) -> Result<u64, DbError> {
        SqlFeedLog::backlog(self, from).await
    }

    async fn release(&self, below: u64, before_ms: i64, limit: usize) -> Result<u64, DbError> {
        SqlFeedLog::prune(self, below, before_ms, limit).await
    }

    async fn wait(&self, timeout: Duration) {
        SqlFeedLog::wait(self, timeout).await;
    }

    async fn overflowed(&self) -> Result<Vec<(String, u64)>, DbError> {
        SqlFeedLog::overflowed(self).await
    }

    async fn mark_overflow(&self, kinds: &[String], cut: u64) -> Result<(), DbError> {
        SqlFeedLog::mark_overflow(self, kinds, cut).await
    }

    async fn clear_overflow(&self, kinds: &[(String, u64)]) -> Result<(), DbError> {
        SqlFeedLog::clear_overflow(self, kinds).await
    }

    async fn prune_overflowed(&self, limit: usize) -> Result<u64, DbError> {
        SqlFeedLog::prune_overflowed(self, limit).await
    }

    async fn save_position(&self, position: u64) -> Result<(), DbError> {
        SqlFeedLog::save_position(self, position).await
    }

    async fn saved_position(&self) -> Result<Option<u64>, DbError> {
        SqlFeedLog::saved_position(self).await
    }

    async fn polling(&self, window: Duration) -> Result<bool, DbError> {
        SqlFeedLog::polling(self, window).await
    }
}
