//! [`WalSource`]: the relay's [`ChangeSource`] over PostgreSQL's WAL — a
//! logical replication slot (`kura_<namespace>`, plugin `pgoutput`) on a
//! publication of the fed tables (`kura_<namespace>`), streamed with the
//! replication protocol (`pgwire-replication`) and assembled by the
//! library ([`kura::feed::source::wal`]).
//!
//! No trigger and no log table: a writer pays nothing beyond the WAL it
//! writes anyway. Only the instance holding the relay's fleet lease streams
//! ([`ChangeSource::lead`]): PostgreSQL lets one consumer read a slot.
//!
//! # Confirmation
//!
//! The slot's confirmed position moves only when the relay lets go of
//! what it applied ([`ChangeSource::release`], after the fleet position in
//! Redis moved past it): a relay cut off from Redis stops confirming and
//! the slot keeps the WAL (at most `max_slot_wal_keep_size`).
//!
//! # A lost or missing slot
//!
//! When PostgreSQL invalidated the slot (it fell further behind than
//! `max_slot_wal_keep_size`), or it is gone (a failover to a standby: slots
//! are not replicated before PostgreSQL 17, a restore), changes were lost:
//! the source creates the slot again and reports every fed kind as
//! overflowed ([`ChangeSource::overflowed`]), which the relay clears before
//! relaying from the new slot. No stale value is served, and there is no
//! crash loop.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use kura::feed::source::wal::{WalChanges, WalTable};
use kura::feed::{ChangeSource, FeedEvent};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;

use crate::db::sql::{sql, sql_built};
use crate::db::{Db, DbError};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// How often the slot's lag is read for the gauges.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Where the replication connection goes, from the database URL.
#[derive(Clone)]
pub struct WalTarget {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
}

impl std::fmt::Debug for WalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl WalTarget {
    /// The replication target of a `postgres://` URL (user, password, host,
    /// port, database).
    ///
    /// # Errors
    ///
    /// [`DbError::Url`] for a URL that is not `postgres://`, or asks for TLS
    /// (`sslmode=require` and stricter): the replication connection has no
    /// TLS in this build.
    pub fn from_url(url: &str) -> Result<Self, DbError> {
        let u = url::Url::parse(url).map_err(|_| DbError::Url(url.to_owned()))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(DbError::Url(url.to_owned()));
        }
        if u.query_pairs()
            .any(|(k, v)| k == "sslmode" && matches!(&*v, "require" | "verify-ca" | "verify-full"))
        {
            return Err(DbError::Row(
                "the WAL feed's replication connection has no TLS in this build: \
                 use --invalidation-feed log with sslmode=require"
                    .to_owned(),
            ));
        }
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        Ok(Self {
            host: u.host_str().unwrap_or("127.0.0.1").to_owned(),
            port: u.port().unwrap_or(5432),
            user: if u.username().is_empty() {
                std::env::var("USER").unwrap_or_else(|_| "postgres".to_owned())
            } else {
                decode(u.username())
            },
            password: u.password().map(decode).unwrap_or_default(),
            database: u.path().trim_start_matches('/').to_owned(),
        })
    }
}

/// What the stream task and the relay share.
#[derive(Debug, Default)]
struct State {
    /// The stream's changes (`None`: not streaming).
    changes: Option<WalChanges>,
    /// Why the stream stopped, once.
    error: Option<String>,
    /// The slot was lost or missing and made again: every fed kind is to be
    /// cleared (with this cut).
    lost: Option<u64>,
}

struct Stream {
    task: JoinHandle<()>,
    applied: watch::Sender<u64>,
}

/// The WAL feed's source.
///
/// # Concurrent calls
///
/// Every method may be called concurrently; the stream is opened and
/// closed under one lock.
pub struct WalSource {
    db: Db,
    target: WalTarget,
    slot: String,
    publication: String,
    tables: Vec<WalTable>,
    kinds: Vec<String>,
    bulk_clear: usize,
    state: Arc<StdMutex<State>>,
    woken: Arc<Notify>,
    stream: Mutex<Option<Stream>>,
    /// When the gauges were last read, the confirmed position then, and
    /// when it last moved.
    lag_at: StdMutex<Option<(Instant, u64, Instant)>>,
}

impl std::fmt::Debug for WalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalSource")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WalSource {
    /// The source of `db` (PostgreSQL), streaming slot `slot` on
    /// publication `publication` over `target`, mapping `tables`.
    #[must_use]
    pub fn new(
        db: Db,
        target: WalTarget,
        names: &str,
        tables: Vec<WalTable>,
        bulk_clear: usize,
    ) -> Self {
        let mut kinds: Vec<String> = tables.iter().map(|t| t.kind.clone()).collect();
        kinds.sort();
        kinds.dedup();
        Self {
            db,
            target,
            slot: names.to_owned(),
            publication: names.to_owned(),
            tables,
            kinds,
            bulk_clear,
            state: Arc::default(),
            woken: Arc::new(Notify::new()),
            stream: Mutex::new(None),
            lag_at: StdMutex::new(None),
        }
    }

    /// The slot's name (and the publication's).
    #[must_use]
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The slot's confirmed position and whether PostgreSQL invalidated it
    /// (`None`: no such slot).
    async fn slot_state(&self) -> Result<Option<(u64, bool)>, DbError> {
        let row = sql(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text AS pos, \
             coalesce(wal_status, '') AS status FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(self.slot.as_str())
        .fetch_optional(&self.db)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let pos = row.opt_text("pos")?.map_or(0, |t| lsn_of(&t));
        Ok(Some((pos, row.text("status")? == "lost")))
    }

    /// Makes the slot (again, dropping it first when PostgreSQL
    /// invalidated it); returns its position.
    async fn create_slot(&self, lost: bool) -> Result<u64, DbError> {
        if lost {
            sql("SELECT pg_drop_replication_slot($1)")
                .bind(self.slot.as_str())
                .execute(&self.db)
                .await?;
        }
        create_slot(&self.db, &self.slot).await
    }

    async fn open(&self) -> Result<(), DbError> {
        let start = match self.slot_state().await? {
            Some((pos, false)) => pos,
            found => {
                let lost = found.is_some();
                let pos = self.create_slot(lost).await?;
                tracing::warn!(
                    slot = self.slot,
                    lost,
                    "invalidation feed: the replication slot was {}; made again, the fed types \
                     will be cleared",
                    if lost {
                        "invalidated by PostgreSQL (max_slot_wal_keep_size)"
                    } else {
                        "missing"
                    }
                );
                metrics::counter!("cache_feed_slot_recreated_total").increment(1);
                lock(&self.state).lost = Some(pos);
                pos
            }
        };
        let cfg = ReplicationConfig::new(
            self.target.host.clone(),
            self.target.user.clone(),
            self.target.password.clone(),
            self.target.database.clone(),
            self.slot.clone(),
            self.publication.clone(),
        )
        .with_port(self.target.port)
        .with_start_lsn(Lsn(start))
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_application_name("kura-feed");
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| DbError::Row(format!("replication connection: {e}")))?;
        {
            let mut st = lock(&self.state);
            st.changes = Some(WalChanges::new(self.tables.clone(), self.bulk_clear, start));
            st.error = None;
        }
        let (applied, mut applied_rx) = watch::channel(start);
        let state = self.state.clone();
        let woken = self.woken.clone();
        let task = tokio::spawn(async move {
            let why = loop {
                tokio::select! {
                    ev = client.recv() => match ev {
                        Ok(Some(ev)) => {
                            if let Err(e) = take(&state, ev) {
                                break e;
                            }
                            woken.notify_waiters();
                        }
                        Ok(None) => break "the server ended the stream".to_owned(),
                        Err(e) => break e.to_string(),
                    },
                    changed = applied_rx.changed() => {
                        if changed.is_err() {
                            client.stop();
                            break String::new();
                        }
                        let lsn = *applied_rx.borrow_and_update();
                        client.update_applied_lsn(Lsn(lsn));
                    }
                }
            };
            let _ = client.shutdown().await;
            let mut st = lock(&state);
            st.changes = None;
            if !why.is_empty() {
                tracing::warn!(error = why, "invalidation feed: replication stream ended");
                st.error = Some(why);
            }
            drop(st);
            woken.notify_waiters();
        });
        *self.stream.lock().await = Some(Stream { task, applied });
        tracing::info!(
            slot = self.slot,
            start,
            "invalidation feed: streaming the WAL"
        );
        Ok(())
    }

    async fn close(&self) {
        if let Some(s) = self.stream.lock().await.take() {
            drop(s.applied);
            let _ = tokio::time::timeout(Duration::from_secs(2), s.task).await;
            lock(&self.state).changes = None;
        }
    }

    /// Refreshes the slot-lag gauges, at most once a second:
    /// `cache_feed_slot_lag_bytes` (WAL between the slot's confirmed
    /// position and the server's current one) and
    /// `cache_feed_slot_lag_seconds` (how long the confirmed position has
    /// not moved while the slot keeps WAL, as this instance saw it).
    async fn gauge_lag(&self) {
        {
            let mut at = lock(&self.lag_at);
            if at.is_some_and(|(t, _, _)| t.elapsed() < LAG_EVERY) {
                return;
            }
            let moved = at.map_or(Instant::now(), |(_, _, m)| m);
            let held = at.map_or(0, |(_, c, _)| c);
            *at = Some((Instant::now(), held, moved));
        }
        let Ok(Some((bytes, confirmed))) = self.lag().await else {
            return;
        };
        let secs = {
            let mut at = lock(&self.lag_at);
            let (t, held, moved) = at.unwrap_or((Instant::now(), 0, Instant::now()));
            let moved = if confirmed != held {
                Instant::now()
            } else {
                moved
            };
            *at = Some((t, confirmed, moved));
            if bytes == 0 {
                0.0
            } else {
                moved.elapsed().as_secs_f64()
            }
        };
        metrics::gauge!("cache_feed_slot_lag_bytes").set(bytes as f64);
        metrics::gauge!("cache_feed_slot_lag_seconds").set(secs);
    }

    /// Bytes of WAL between the slot's confirmed position and the server's
    /// current one (`None`: no slot).
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn lag_bytes(&self) -> Result<Option<u64>, DbError> {
        Ok(self.lag().await?.map(|(b, _)| b))
    }

    async fn lag(&self) -> Result<Option<(u64, u64)>, DbError> {
        let row = sql(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS b, \
             pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint AS c \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(self.slot.as_str())
        .fetch_optional(&self.db)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let b = row.opt_int("b")?.unwrap_or(0).max(0) as u64;
        let c = row.opt_int("c")?.unwrap_or(0).max(0) as u64;
        Ok(Some((b, c)))
    }

    fn error(&self) -> DbError {
        let why = lock(&self.state)
            .error
            .clone()
            .unwrap_or_else(|| "not streaming (this instance does not relay)".to_owned());
        DbError::Row(format!("WAL stream: {why}"))
    }
}

/// One replication event into the shared changes.
fn take(state: &StdMutex<State>, ev: ReplicationEvent) -> Result<(), String> {
    let mut st = lock(state);
    let Some(changes) = st.changes.as_mut() else {
        return Err("closed".to_owned());
    };
    let ms = |micros: i64| micros / 1000 + PG_EPOCH_MS;
    match ev {
        ReplicationEvent::Begin {
            final_lsn,
            commit_time_micros,
            ..
        } => changes.begin(final_lsn.0, ms(commit_time_micros)),
        ReplicationEvent::XLogData { data, .. } => {
            let before = changes.unreadable();
            changes.change(&data).map_err(|e| e.to_string())?;
            let n = changes.unreadable() - before;
            if n > 0 {
                tracing::warn!(
                    rows = n,
                    "invalidation feed: a changed row's id could not be read; its type is cleared"
                );
                metrics::counter!("cache_feed_bad_rows_total").increment(n);
            }
        }
        ReplicationEvent::Commit {
            lsn,
            end_lsn,
            commit_time_micros,
        } => changes.commit(lsn.0, end_lsn.0, ms(commit_time_micros)),
        ReplicationEvent::KeepAlive { wal_end, .. } => changes.keepalive(wal_end.0),
        ReplicationEvent::StoppedAt { .. } => return Err("stopped".to_owned()),
        _ => {}
    }
    Ok(())
}

impl ChangeSource for WalSource {
    type Error = DbError;

    async fn watermark(&self) -> Result<u64, DbError> {
        if let Some(c) = lock(&self.state).changes.as_ref() {
            return Ok(c.watermark());
        }
        // Not streaming: the slot's confirmed position, a lower bound.
        match self.slot_state().await? {
            Some((pos, _)) => Ok(pos),
            None => Err(self.error()),
        }
    }

    async fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Result<Vec<(u64, FeedEvent)>, DbError> {
        Ok(lock(&self.state)
            .changes
            .as_ref()
            .map(|c| c.read(from, to, after, limit))
            .unwrap_or_default())
    }

    async fn oldest(&self) -> Result<Option<u64>, DbError> {
        let st = lock(&self.state);
        Ok(st
            .changes
            .as_ref()
            .and_then(|c| c.oldest().or(Some(c.watermark()))))
    }

    async fn backlog(&self, from: u64) -> Result<u64, DbError> {
        self.gauge_lag().await;
        Ok(lock(&self.state)
            .changes
            .as_ref()
            .map_or(0, |c| c.backlog(from)))
    }

    async fn release(&self, below: u64, _before_ms: i64, _limit: usize) -> Result<u64, DbError> {
        let (n, confirm) = {
            let mut st = lock(&self.state);
            match st.changes.as_mut() {
                Some(c) => {
                    let confirm = below.min(c.watermark());
                    (c.release(below), Some(confirm))
                }
                None => (0, None),
            }
        };
        if let Some(lsn) = confirm {
            if let Some(s) = self.stream.lock().await.as_ref() {
                s.applied.send_if_modified(|held| {
                    let raise = lsn > *held;
                    if raise {
                        *held = lsn;
                    }
                    raise
                });
            }
        }
        self.gauge_lag().await;
        Ok(n)
    }

    async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.woken.notified()).await;
    }

    async fn overflowed(&self) -> Result<Vec<(String, u64)>, DbError> {
        Ok(match lock(&self.state).lost {
            Some(cut) => self.kinds.iter().map(|k| (k.clone(), cut)).collect(),
            None => Vec::new(),
        })
    }

    async fn clear_overflow(&self, kinds: &[(String, u64)]) -> Result<(), DbError> {
        let mut st = lock(&self.state);
        if kinds.iter().any(|(_, cut)| Some(*cut) == st.lost) {
            st.lost = None;
        }
        Ok(())
    }

    async fn lead(&self, leading: bool) {
        let streaming = {
            let s = self.stream.lock().await;
            s.as_ref().is_some_and(|s| !s.task.is_finished())
        };
        if leading && !streaming {
            self.close().await;
            if let Err(e) = self.open().await {
                tracing::warn!(error = %e, "invalidation feed: cannot stream the WAL");
                lock(&self.state).error = Some(e.to_string());
            }
        } else if !leading && streaming {
            self.close().await;
            tracing::info!(slot = self.slot, "invalidation feed: WAL stream let go");
        }
    }

    fn regressions(&self) -> bool {
        false
    }
}

/// A position as PostgreSQL prints `lsn - '0/0'::pg_lsn` (a numeric).
fn lsn_of(text: &str) -> u64 {
    text.split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Creates the logical replication slot `name` (plugin `pgoutput`) on `db`;
/// returns its position.
///
/// # Errors
///
/// When the database fails, or the slot exists already.
pub async fn create_slot(db: &Db, name: &str) -> Result<u64, DbError> {
    let row = sql("SELECT (lsn - '0/0'::pg_lsn)::text AS pos FROM \
         pg_create_logical_replication_slot($1, 'pgoutput')")
    .bind(name)
    .fetch_one(db)
    .await?;
    Ok(lsn_of(&row.text("pos")?))
}

/// Whether `db`'s server has `wal_level = logical`, and if not, what to
/// change.
///
/// # Errors
///
/// When the database fails.
pub async fn wal_ready(db: &Db) -> Result<Result<(), String>, DbError> {
    let row = sql("SELECT current_setting('wal_level') AS level, \
         current_setting('max_replication_slots')::bigint AS slots, \
         current_setting('max_wal_senders')::bigint AS senders")
    .fetch_one(db)
    .await?;
    let level = row.text("level")?;
    let slots = row.int("slots")?;
    let senders = row.int("senders")?;
    if level == "logical" && slots > 0 && senders > 0 {
        return Ok(Ok(()));
    }
    Ok(Err(format!(
        "the WAL feed needs logical decoding, and this server has wal_level = {level}, \
         max_replication_slots = {slots}, max_wal_senders = {senders}. Run \
         `ALTER SYSTEM SET wal_level = logical;` (and, if 0, `ALTER SYSTEM SET \
         max_replication_slots = 10; ALTER SYSTEM SET max_wal_senders = 10;`), then restart \
         PostgreSQL"
    )))
}

/// The statements that make `names`'s publication cover `tables` (and only
/// them).
#[must_use]
pub fn publication_sql(names: &str, tables: &[WalTable]) -> Vec<String> {
    let list = tables
        .iter()
        .map(|t| format!("{}.{}", quote(&t.schema), quote(&t.table)))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        format!("DROP PUBLICATION IF EXISTS {}", quote(names)),
        format!("CREATE PUBLICATION {} FOR TABLE {list}", quote(names)),
    ]
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Checks that every table can be fed from the WAL: it exists, and its id
/// column is in its replica identity (a primary key or `REPLICA IDENTITY
/// USING INDEX` on it, or `FULL`), so that a DELETE names the entity.
///
/// # Errors
///
/// A message naming the table and what to do.
pub async fn check_tables(db: &Db, tables: &[WalTable]) -> Result<Result<(), String>, DbError> {
    for t in tables {
        let qualified = format!("{}.{}", quote(&t.schema), quote(&t.table));
        let row = sql_built(
            "SELECT c.relreplident::text AS ident, \
             (EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
               ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
               WHERE i.indrelid = c.oid AND a.attname = $2 \
               AND ((c.relreplident = 'd' AND i.indisprimary) \
                 OR (c.relreplident = 'i' AND i.indisreplident))))::int::bigint AS keyed \
             FROM pg_class c WHERE c.oid = to_regclass($1)"
                .to_owned(),
        )
        .bind(qualified.as_str())
        .bind(t.id_column.as_str())
        .fetch_optional(db)
        .await?;
        let Some(row) = row else {
            return Ok(Err(format!("fed table {qualified} does not exist")));
        };
        let ident = row.text("ident")?;
        let keyed = row.int("keyed")? == 1;
        if ident != "f" && !keyed {
            return Ok(Err(format!(
                "fed table {qualified}: its id column {:?} is not in its replica identity \
                 (a table without a primary key, or keyed by another column), so a DELETE \
                 would not name the cached entity. Give it a primary key on {0:?}, or \
                 `ALTER TABLE {qualified} REPLICA IDENTITY USING INDEX <a unique index on {0:?}>`, \
                 or use --invalidation-feed log",
                t.id_column
            )));
        }
    }
    Ok(Ok(()))
}
