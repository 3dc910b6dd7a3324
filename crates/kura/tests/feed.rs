//! The invalidation feed: the generated SQL installed for real on
//! PostgreSQL (a database of the test's own) and SQLite (a file in a
//! tempdir), the late-commit trap, one NOTIFY per transaction, and the
//! relay over a real PostgreSQL log and over an in-memory fake log, against
//! the real Redis and the memory store.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kura::feed::source::trigger_log::{Backend as SqlBackend, TriggerSpec, log_table_statements};
use kura::feed::{ChangeSource, FeedError, FeedEvent, Relay};
use kura::store::RedisStore;
use kura::{BreakerConfig, Cache, Kind, Source, Status, Versioned};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection, PgPool, Row as _};
use support::{Backend, Db, TestDb, cache_on, cleanup, ns};
use tokio::sync::Notify;

// ---------------------------------------------------------------------
// A PostgreSQL database of the test's own.

fn pg_base() -> String {
    std::env::var("KURA_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Created for one test, dropped after it (also when the test fails).
struct PgDb {
    name: String,
    url: String,
}

impl PgDb {
    async fn create() -> PgDb {
        let name = format!(
            "kura_feed_{:012x}",
            rand::random::<u64>() & 0xffff_ffff_ffff
        );
        let admin = PgPool::connect(&format!("{}/postgres", pg_base()))
            .await
            .expect("connect to postgres");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = format!("{}/{name}", pg_base());
        PgDb { name, url }
    }

    async fn pool(&self) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = format!("{}/postgres", pg_base());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(pool) = PgPool::connect(&admin).await {
                    let _ = sqlx::query(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

const ITEM: Kind = Kind::new("item");

fn items_spec() -> TriggerSpec {
    TriggerSpec::new("items", ITEM).unwrap()
}

async fn pg_exec(pool: &PgPool, stmts: &[String]) {
    for s in stmts {
        sqlx::raw_sql(AssertSqlSafe(s.clone()))
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{e}: {s}"));
    }
}

/// A fed table `items (id, name, version)` with the log installed.
async fn pg_items(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT NOT NULL, \
         version BIGINT NOT NULL DEFAULT 1)",
    )
    .execute(pool)
    .await
    .unwrap();
    pg_exec(pool, &log_table_statements(SqlBackend::Postgres)).await;
    pg_exec(pool, &items_spec().install_statements(SqlBackend::Postgres)).await;
}

/// The log rows after `seq`, as (id, version).
async fn pg_log_after(pool: &PgPool, seq: i64) -> Vec<(String, Option<i64>)> {
    sqlx::query("SELECT entity_id, version FROM kura_invalidation_log WHERE seq > $1 ORDER BY seq")
        .bind(seq)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn pg_max_seq(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM kura_invalidation_log")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn pg_version(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar("SELECT version FROM items WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn pg(pool: &PgPool, sql: &'static str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap();
}

fn some(id: &str, v: i64) -> (String, Option<i64>) {
    (id.to_owned(), Some(v))
}

fn gone(id: &str) -> (String, Option<i64>) {
    (id.to_owned(), None)
}

// ---------------------------------------------------------------------
// The generated SQL, installed for real.

#[tokio::test]
async fn pg_triggers_log_every_change_and_keep_versions_rising() {
    let db = PgDb::create().await;
    let pool = db.pool().await;
    pg_items(&pool).await;
    // Installing twice is the same as once: still one row per change.
    pg_exec(&pool, &log_table_statements(SqlBackend::Postgres)).await;
    pg_exec(
        &pool,
        &items_spec().install_statements(SqlBackend::Postgres),
    )
    .await;

    let mut at = pg_max_seq(&pool).await;
    pg(
        &pool,
        "INSERT INTO items (id, name) VALUES ('a', 'x'), ('b', 'y')",
    )
    .await;
    assert_eq!(
        pg_log_after(&pool, at).await,
        vec![some("a", 1), some("b", 1)]
    );

    // A writer that knows nothing of the version column: bumped.
    at = pg_max_seq(&pool).await;
    pg(&pool, "UPDATE items SET name = 'x2' WHERE id = 'a'").await;
    assert_eq!(pg_version(&pool, "a").await, 2);
    assert_eq!(pg_log_after(&pool, at).await, vec![some("a", 2)]);

    // A writer that raises it: kept.
    at = pg_max_seq(&pool).await;
    pg(
        &pool,
        "UPDATE items SET name = 'x3', version = 10 WHERE id = 'a'",
    )
    .await;
    assert_eq!(pg_version(&pool, "a").await, 10);
    assert_eq!(pg_log_after(&pool, at).await, vec![some("a", 10)]);

    // A writer that lowers it: still rises.
    at = pg_max_seq(&pool).await;
    pg(&pool, "UPDATE items SET version = 3 WHERE id = 'a'").await;
    assert_eq!(pg_version(&pool, "a").await, 11);
    assert_eq!(pg_log_after(&pool, at).await, vec![some("a", 11)]);

    // A new id: the old one is logged as deleted.
    at = pg_max_seq(&pool).await;
    pg(&pool, "UPDATE items SET id = 'c' WHERE id = 'b'").await;
    assert_eq!(pg_log_after(&pool, at).await, vec![gone("b"), some("c", 2)]);

    at = pg_max_seq(&pool).await;
    pg(&pool, "DELETE FROM items WHERE id = 'a'").await;
    assert_eq!(pg_log_after(&pool, at).await, vec![gone("a")]);

    // The log row carries the writing transaction's id.
    let own: bool = sqlx::query_scalar(
        "SELECT bool_and(txid IS NOT NULL AND committed_at <= clock_timestamp()) \
         FROM kura_invalidation_log",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(own);

    // Removed: no trigger, no function left, and writes no longer log.
    pg_exec(&pool, &items_spec().remove_statements(SqlBackend::Postgres)).await;
    pg_exec(&pool, &items_spec().remove_statements(SqlBackend::Postgres)).await;
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'kura_feed_items_%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let functions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_proc WHERE proname LIKE 'kura_feed_items_%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((triggers, functions), (0, 0));
    at = pg_max_seq(&pool).await;
    pg(&pool, "UPDATE items SET name = 'z' WHERE id = 'c'").await;
    assert_eq!(pg_log_after(&pool, at).await, vec![]);
    assert_eq!(
        pg_version(&pool, "c").await,
        2,
        "no bump without the trigger"
    );
    pool.close().await;
}

#[tokio::test]
async fn sqlite_triggers_log_every_change_and_keep_versions_rising() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("feed.db").display());
    // One connection, as a migration runs: SQLite compiles `DROP TRIGGER IF
    // EXISTS` against the connection's cached schema, which another
    // connection's changes leave stale.
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let exec = |stmts: Vec<String>| {
        let pool = pool.clone();
        async move {
            for s in stmts {
                sqlx::query(AssertSqlSafe(s.clone()))
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{e}: {s}"));
            }
        }
    };
    let run = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
    };
    run("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1)").await;
    for _ in 0..2 {
        exec(log_table_statements(SqlBackend::Sqlite)).await;
        exec(items_spec().install_statements(SqlBackend::Sqlite)).await;
    }
    let log_after = |seq: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "SELECT entity_id, version FROM kura_invalidation_log WHERE seq > ? ORDER BY seq",
            )
            .bind(seq)
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<Option<i64>, _>(1)))
            .collect::<Vec<_>>()
        }
    };
    let max_seq = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COALESCE(max(seq), 0) FROM kura_invalidation_log")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let version = |id: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT version FROM items WHERE id = ?")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    let mut at = max_seq().await;
    run("INSERT INTO items (id, name) VALUES ('a', 'x'), ('b', 'y')").await;
    assert_eq!(log_after(at).await, vec![some("a", 1), some("b", 1)]);
    at = max_seq().await;
    run("UPDATE items SET name = 'x2' WHERE id = 'a'").await;
    assert_eq!(version("a").await, 2);
    assert_eq!(log_after(at).await, vec![some("a", 2)]);
    at = max_seq().await;
    run("UPDATE items SET name = 'x3', version = 10 WHERE id = 'a'").await;
    assert_eq!(version("a").await, 10);
    assert_eq!(log_after(at).await, vec![some("a", 10)]);
    at = max_seq().await;
    run("UPDATE items SET version = 3 WHERE id = 'a'").await;
    assert_eq!(version("a").await, 11);
    assert_eq!(log_after(at).await, vec![some("a", 11)]);
    at = max_seq().await;
    run("UPDATE items SET id = 'c' WHERE id = 'b'").await;
    assert_eq!(log_after(at).await, vec![gone("b"), some("c", 2)]);
    at = max_seq().await;
    run("DELETE FROM items WHERE id = 'a'").await;
    assert_eq!(log_after(at).await, vec![gone("a")]);
    let recent: bool = sqlx::query_scalar(
        "SELECT min(committed_at) > (strftime('%s','now') - 60) * 1000 FROM kura_invalidation_log",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(recent, "committed_at is in Unix milliseconds");

    for _ in 0..2 {
        exec(items_spec().remove_statements(SqlBackend::Sqlite)).await;
    }
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'kura_feed_items_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0);
    at = max_seq().await;
    run("UPDATE items SET name = 'z' WHERE id = 'c'").await;
    assert_eq!(log_after(at).await, vec![]);
    assert_eq!(version("c").await, 2);
    pool.close().await;
}

#[tokio::test]
async fn pg_notifies_at_most_once_per_transaction() {
    let db = PgDb::create().await;
    let pool = db.pool().await;
    pg_items(&pool).await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener
        .listen(kura::feed::source::trigger_log::CHANNEL)
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    for i in 0..50 {
        sqlx::query("INSERT INTO items (id, name) VALUES ($1, 'n')")
            .bind(format!("i{i}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE items SET name = 'm'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // A marker after it: notifications arrive in commit order, so what
    // comes before the marker is everything the transaction sent.
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(kura::feed::source::trigger_log::CHANNEL)
        .execute(&pool)
        .await
        .unwrap();
    let mut before_marker = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("notifications arrive")
            .unwrap();
        if n.payload() == "marker" {
            break;
        }
        before_marker += 1;
    }
    assert_eq!(
        before_marker, 1,
        "51 statements and 100 rows in one transaction: one wake-up"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kura_invalidation_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 100, "but every row is logged");
    drop(listener);
    pool.close().await;
}

/// While a relay says it polls (`kura_feed_relay.polling_until` ahead),
/// writers send no `NOTIFY`, whose commit-time lock serializes a
/// write-heavy database; once the window is over they wake the relay again.
#[tokio::test]
async fn pg_no_notification_while_a_relay_polls() {
    let db = PgDb::create().await;
    let pool = db.pool().await;
    pg_items(&pool).await;
    pg(&pool, "INSERT INTO items (id, name) VALUES ('a', 'x')").await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener
        .listen(kura::feed::source::trigger_log::CHANNEL)
        .await
        .unwrap();
    pg(
        &pool,
        "INSERT INTO kura_feed_relay (id, polling_until) VALUES (TRUE, clock_timestamp() + interval '1 hour')",
    )
    .await;
    pg(&pool, "UPDATE items SET name = 'y' WHERE id = 'a'").await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(quiet.is_err(), "no wake-up while a relay polls: {quiet:?}");
    assert_eq!(
        pg_log_after(&pool, 0).await.last(),
        Some(&some("a", 2)),
        "the change is logged all the same"
    );
    pg(
        &pool,
        "UPDATE kura_feed_relay SET polling_until = clock_timestamp() - interval '1 second'",
    )
    .await;
    pg(&pool, "UPDATE items SET name = 'z' WHERE id = 'a'").await;
    let woke = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await;
    assert!(
        woke.is_ok(),
        "the window is over: writers wake the relay again"
    );
    drop(listener);
    pool.close().await;
}

// ---------------------------------------------------------------------
// A FeedLog over PostgreSQL (as kura-server's, over sqlx).

struct PgLog {
    pool: PgPool,
    listener: tokio::sync::Mutex<Option<sqlx::postgres::PgListener>>,
    url: String,
}

impl PgLog {
    /// Listens from the start: a notification sent before the first
    /// `wait` is kept for it.
    async fn new(db: &PgDb) -> PgLog {
        let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
        listener
            .listen(kura::feed::source::trigger_log::CHANNEL)
            .await
            .unwrap();
        PgLog {
            pool: db.pool().await,
            listener: tokio::sync::Mutex::new(Some(listener)),
            url: db.url.clone(),
        }
    }
}

fn pos(text: Option<String>) -> Result<Option<u64>, sqlx::Error> {
    text.map(|t| t.parse().map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

impl ChangeSource for PgLog {
    type Error = sqlx::Error;

    async fn watermark(&self) -> Result<u64, sqlx::Error> {
        let t: String = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
            .fetch_one(&self.pool)
            .await?;
        Ok(pos(Some(t))?.unwrap_or(0))
    }

    async fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Result<Vec<(u64, FeedEvent)>, sqlx::Error> {
        let (after_pos, after_seq) = after.map_or((None, 0), |(p, s)| (Some(p.to_string()), s));
        let rows = sqlx::query(
            "SELECT txid::text, seq, kind, entity_id, version, \
                    (extract(epoch FROM committed_at) * 1000)::bigint \
             FROM kura_invalidation_log \
             WHERE txid >= $1::xid8 AND txid < $2::xid8 \
               AND ($3::text IS NULL OR (txid, seq) > ($3::xid8, $4)) \
             ORDER BY txid, seq LIMIT $5",
        )
        .bind(from.to_string())
        .bind(to.to_string())
        .bind(after_pos)
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    pos(Some(r.get(0)))?.unwrap_or(0),
                    FeedEvent {
                        seq: r.get(1),
                        kind: r.get(2),
                        id: r.get(3),
                        version: r.get::<Option<i64>, _>(4).map(|v| v.max(0) as u64),
                        committed_at_ms: r.get(5),
                        clear: false,
                    },
                ))
            })
            .collect()
    }

    async fn oldest(&self) -> Result<Option<u64>, sqlx::Error> {
        pos(
            sqlx::query_scalar("SELECT min(txid)::text FROM kura_invalidation_log")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn backlog(&self, from: u64) -> Result<u64, sqlx::Error> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM kura_invalidation_log WHERE txid >= $1::xid8")
                .bind(from.to_string())
                .fetch_one(&self.pool)
                .await?;
        Ok(n as u64)
    }

    async fn release(&self, below: u64, before_ms: i64, limit: usize) -> Result<u64, sqlx::Error> {
        let r = sqlx::query(
            "DELETE FROM kura_invalidation_log WHERE seq IN ( \
               SELECT seq FROM kura_invalidation_log \
               WHERE txid < $1::xid8 AND committed_at < to_timestamp($2::double precision / 1000) \
               LIMIT $3)",
        )
        .bind(below.to_string())
        .bind(before_ms as f64)
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn wait(&self, timeout: Duration) {
        let mut l = self.listener.lock().await;
        if l.is_none() {
            if let Ok(mut new) = sqlx::postgres::PgListener::connect(&self.url).await {
                if new
                    .listen(kura::feed::source::trigger_log::CHANNEL)
                    .await
                    .is_ok()
                {
                    *l = Some(new);
                }
            }
        }
        match l.as_mut() {
            Some(listener) => {
                if let Ok(Err(_)) = tokio::time::timeout(timeout, listener.recv()).await {
                    *l = None;
                }
            }
            None => tokio::time::sleep(timeout).await,
        }
    }

    async fn overflowed(&self) -> Result<Vec<(String, u64)>, sqlx::Error> {
        let rows = sqlx::query("SELECT kind, cut::text FROM kura_feed_state ORDER BY kind")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.get(0), pos(Some(r.get(1)))?.unwrap_or(0))))
            .collect()
    }

    async fn mark_overflow(&self, kinds: &[String], cut: u64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO kura_feed_state (kind, cut) SELECT k, $2::xid8 FROM unnest($1::text[]) k \
             ON CONFLICT (kind) DO UPDATE SET cut = GREATEST(kura_feed_state.cut, EXCLUDED.cut), \
             overflowed_at = clock_timestamp()",
        )
        .bind(kinds)
        .bind(cut.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn clear_overflow(&self, kinds: &[(String, u64)]) -> Result<(), sqlx::Error> {
        for (kind, cut) in kinds {
            sqlx::query("DELETE FROM kura_feed_state WHERE kind = $1 AND cut <= $2::xid8")
                .bind(kind)
                .bind(cut.to_string())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    async fn prune_overflowed(&self, limit: usize) -> Result<u64, sqlx::Error> {
        let r = sqlx::query(
            "DELETE FROM kura_invalidation_log WHERE seq IN ( \
               SELECT l.seq FROM kura_invalidation_log l \
               JOIN kura_feed_state s ON s.kind = l.kind WHERE l.txid < s.cut LIMIT $1)",
        )
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn save_position(&self, position: u64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO kura_feed_position (id, position) VALUES (TRUE, $1::xid8) \
             ON CONFLICT (id) DO UPDATE SET \
             position = GREATEST(kura_feed_position.position, EXCLUDED.position), \
             updated_at = clock_timestamp()",
        )
        .bind(position.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn saved_position(&self) -> Result<Option<u64>, sqlx::Error> {
        pos(
            sqlx::query_scalar("SELECT position::text FROM kura_feed_position")
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}

/// The rows of `items`, as the cache loads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Item {
    id: String,
    name: String,
    version: u64,
}

impl Versioned for Item {
    fn version(&self) -> u64 {
        self.version
    }
}

#[derive(Clone)]
struct Items(PgPool);

impl Source for Items {
    type Value = Item;
    type Error = sqlx::Error;

    async fn load(&self, id: &str) -> Result<Option<Item>, sqlx::Error> {
        Ok(
            sqlx::query("SELECT id, name, version FROM items WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.0)
                .await?
                .map(|r| Item {
                    id: r.get(0),
                    name: r.get(1),
                    version: r.get::<i64, _>(2) as u64,
                }),
        )
    }
}

/// Steps until `done` holds (a long transaction elsewhere in the cluster
/// holds the watermark back: lag, not loss).
async fn step_until<L: ChangeSource>(relay: &Relay<L>, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        relay.step().await.unwrap();
        if done().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the feed did not catch up in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------
// The late-commit trap.

#[tokio::test]
async fn pg_a_late_commit_is_not_skipped_by_the_watermark() {
    let db = PgDb::create().await;
    let pool = db.pool().await;
    pg_items(&pool).await;
    pg(
        &pool,
        "INSERT INTO items (id, name) VALUES ('a', 'a1'), ('b', 'b1')",
    )
    .await;
    let log = PgLog::new(&db).await;
    let start = log.watermark().await.unwrap();
    let seq0 = pg_max_seq(&pool).await;

    // A takes the lower seq (and txid) and stays open; B takes a higher seq
    // and commits.
    let mut a = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut b = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; UPDATE items SET name = 'a2' WHERE id = 'a'")
        .execute(&mut a)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; UPDATE items SET name = 'b2' WHERE id = 'b'; COMMIT")
        .execute(&mut b)
        .await
        .unwrap();

    // A plain `seq > pos` reader sees B's row and moves past A's seq.
    let plain: Vec<(i64, String)> = sqlx::query_as(
        "SELECT seq, entity_id FROM kura_invalidation_log WHERE seq > $1 ORDER BY seq",
    )
    .bind(seq0)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].1, "b");
    let plain_pos = plain[0].0;
    assert!(plain_pos > seq0 + 1, "A holds the seq in between");

    // The watermark reader: A is running, so nothing at or past A's txid is
    // final yet; B's row waits too.
    let w = log.watermark().await.unwrap();
    let early = log.read(start, w, None, 100).await.unwrap();
    assert!(
        early.iter().all(|(_, e)| e.seq <= seq0),
        "nothing of A or B below the watermark: {early:?}"
    );

    sqlx::raw_sql("COMMIT").execute(&mut a).await.unwrap();

    // The plain reader never sees A's row again.
    let plain_after: Vec<String> =
        sqlx::query_scalar("SELECT entity_id FROM kura_invalidation_log WHERE seq > $1")
            .bind(plain_pos)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        plain_after.is_empty(),
        "the plain reader skipped A: {plain_after:?}"
    );

    // The watermark reader, going on from its position (the old watermark),
    // gets both once everything before them finished.
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let w2 = log.watermark().await.unwrap();
        let rows = log.read(w, w2, None, 100).await.unwrap();
        let ids: Vec<String> = rows
            .iter()
            .filter(|(_, e)| e.seq > seq0)
            .map(|(_, e)| e.id.clone())
            .collect();
        if ids.len() == 2 {
            break ids;
        }
        assert!(Instant::now() < deadline, "watermark stuck: {ids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        got,
        vec!["a".to_owned(), "b".to_owned()],
        "A first: commit order by txid"
    );

    // And through a relay: a value cached while A ran is invalidated.
    let (cache, ns) = Backend::Redis.cache();
    let items = cache.aside(ITEM, Items(pool.clone()));
    let relay = Relay::builder(&cache, PgLog::new(&db).await)
        .kind(ITEM)
        .build();
    relay.step().await.unwrap();
    let mut a = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; UPDATE items SET name = 'a3' WHERE id = 'a'")
        .execute(&mut a)
        .await
        .unwrap();
    pg(&pool, "UPDATE items SET name = 'b3' WHERE id = 'b'").await;
    // Cached before A commits: the old name.
    assert_eq!(items.get("a").await.unwrap().value().unwrap().name, "a2");
    relay.step().await.unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut a).await.unwrap();
    step_until(&relay, async || {
        items.get("a").await.unwrap().value().unwrap().name == "a3"
    })
    .await;
    cleanup(&ns).await;
    pool.close().await;
}

// ---------------------------------------------------------------------
// The relay over the PostgreSQL log.

async fn direct_sql_changes_reach_the_cache(b: Backend) {
    let db = PgDb::create().await;
    let pool = db.pool().await;
    pg_items(&pool).await;
    pg(
        &pool,
        "INSERT INTO items (id, name) VALUES ('a', 'old'), ('b', 'old')",
    )
    .await;
    let (cache, ns) = b.cache();
    let items = cache.aside(ITEM, Items(pool.clone()));
    let applied = Arc::new(Mutex::new(Vec::new()));
    let seen = applied.clone();
    let relay = Relay::builder(&cache, PgLog::new(&db).await)
        .kind(ITEM)
        .on_applied(move |evs| {
            seen.lock()
                .unwrap()
                .extend(evs.iter().map(|e| e.id.clone()))
        })
        .build();
    relay.step().await.unwrap();
    for id in ["a", "b"] {
        items.get(id).await.unwrap();
        assert_eq!(items.get(id).await.unwrap().status(), Status::Hit);
    }

    // Not through kura: psql, a migration, another service.
    pg(&pool, "UPDATE items SET name = 'new' WHERE id = 'a'").await;
    pg(&pool, "DELETE FROM items WHERE id = 'b'").await;
    step_until(&relay, async || {
        cache
            .store()
            .get(&cache.keys().value_key(&ITEM, "a").unwrap(), None)
            .await
            .unwrap()
            .is_none()
            && cache
                .store()
                .get(&cache.keys().value_key(&ITEM, "b").unwrap(), None)
                .await
                .unwrap()
                .is_none()
    })
    .await;
    let a = items.get("a").await.unwrap();
    assert_eq!(a.status(), Status::Miss);
    assert_eq!(a.value().unwrap().name, "new");
    assert!(items.get("b").await.unwrap().value().is_none(), "deleted");
    let applied = applied.lock().unwrap().clone();
    assert!(
        applied.contains(&"a".to_owned()) && applied.contains(&"b".to_owned()),
        "{applied:?}"
    );

    let status = relay.status().await.unwrap();
    assert_eq!(status.backlog, 0);
    assert_eq!(status.lag_ms, 0);
    assert!(status.position.is_some() && status.store_reachable);
    cleanup(&ns).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_direct_sql_changes_reach_the_cache() {
    direct_sql_changes_reach_the_cache(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_direct_sql_changes_reach_the_cache() {
    direct_sql_changes_reach_the_cache(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_wakes_on_notify_and_holds_the_fleet_lease() {
    let db = PgDb::create().await;
    let pool = db.pool().await;
    pg_items(&pool).await;
    pg(&pool, "INSERT INTO items (id, name) VALUES ('a', 'old')").await;
    let (cache, ns) = Backend::Redis.cache();
    let items = cache.aside(ITEM, Items(pool.clone()));
    // A poll interval far beyond the test: only NOTIFY can wake the relay.
    let relay = Relay::builder(&cache, PgLog::new(&db).await)
        .kind(ITEM)
        .poll_interval(Duration::from_secs(600))
        .instance("feed-test")
        .build();
    let stop = Arc::new(Notify::new());
    let task = tokio::spawn({
        let relay = relay.clone();
        let stop = stop.clone();
        async move { relay.run(stop.notified()).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.status().await.unwrap().relaying.is_none() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = relay.status().await.unwrap();
    // The instance is shown, not the lease token.
    assert_eq!(status.relaying.as_deref(), Some("feed-test"));
    assert!(relay.token().starts_with("feed-test#"));
    items.get("a").await.unwrap();
    // The log listens from its creation; without the notification the
    // relay would sleep for 600 s.
    pg(&pool, "UPDATE items SET name = 'new' WHERE id = 'a'").await;
    let key = cache.keys().value_key(&ITEM, "a").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache.store().get(&key, None).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the notification did not wake the relay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_one();
    task.await.unwrap();
    assert_eq!(
        relay.status().await.unwrap().relaying,
        None,
        "lease released"
    );
    cleanup(&ns).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_bounds_the_backlog_then_clears_the_kinds() {
    let db = PgDb::create().await;
    let pool = db.pool().await;
    pg_items(&pool).await;
    pg(
        &pool,
        "INSERT INTO items (id, name) SELECT 'i' || g, 'old' FROM generate_series(1, 5) g",
    )
    .await;
    pg(
        &pool,
        "INSERT INTO items (id, name) VALUES ('untouched', 'old')",
    )
    .await;
    let server = kura_testkit::RedisServer::start().await;
    let proxy = kura_testkit::FaultProxy::start(server.addr()).await;
    let store = RedisStore::builder(format!("redis://{}", proxy.addr()))
        .response_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let cache = Cache::builder(store)
        .namespace("feedout")
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .op_timeout(Duration::from_millis(150))
        .breaker(BreakerConfig::new(3, Duration::from_millis(50)))
        .build()
        .unwrap();
    let items = cache.aside(ITEM, Items(pool.clone()));
    let cleared = Arc::new(Mutex::new(Vec::new()));
    let seen = cleared.clone();
    let relay = Relay::builder(&cache, PgLog::new(&db).await)
        .kind(ITEM)
        .max_backlog(20)
        .prune_batch(7)
        .poll_interval(Duration::ZERO)
        .on_cleared(move |k| seen.lock().unwrap().extend(k.iter().map(|k| k.name())))
        .build();
    // Caught up first (an open transaction elsewhere may hold the
    // watermark back for a moment).
    step_until(&relay, async || relay.status().await.unwrap().backlog == 0).await;
    for id in ["i1", "untouched"] {
        items.get(id).await.unwrap();
        assert_eq!(items.get(id).await.unwrap().status(), Status::Hit);
    }

    proxy.blackhole();
    // More writes than the bound, while no relay reaches Redis: 10 rows a
    // round, the bound is 20.
    let rows = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM kura_invalidation_log")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = rows().await;
    for round in 0..3 {
        for i in 1..=5 {
            sqlx::query("UPDATE items SET name = $1 WHERE id = $2")
                .bind(format!("r{round}"))
                .bind(format!("i{i}"))
                .execute(&pool)
                .await
                .unwrap();
        }
        pg(&pool, "UPDATE items SET name = name WHERE id LIKE 'i%'").await;
        match relay.step().await {
            Err(FeedError::Store(e)) => assert!(e.is_outage(), "{e}"),
            other => panic!("Redis is black-holed: {other:?}"),
        }
        if round < 2 {
            let state = relay.log().overflowed().await.unwrap();
            let saved = relay.log().saved_position().await.unwrap();
            let wm = relay.log().watermark().await.unwrap();
            let backlog = relay.log().backlog(saved.unwrap_or(0)).await.unwrap();
            assert!(
                state.is_empty(),
                "within the bound: {state:?} saved {saved:?} watermark {wm} backlog {backlog} rows {}",
                rows().await
            );
            assert_eq!(
                rows().await,
                before + 10 * (round + 1),
                "nothing pruned unapplied"
            );
        }
    }
    // Past the bound: the overflow is recorded and the rows below its cut
    // go (once the watermark passed them, which a long transaction
    // elsewhere may delay).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = relay.log().overflowed().await.unwrap();
        if state.iter().any(|(k, _)| k == "item") && rows().await <= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog not bounded: {} rows, {state:?}",
            rows().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = relay.step().await;
    }
    assert!(cleared.lock().unwrap().is_empty());

    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        match relay.step().await {
            Ok(r) => break r,
            Err(FeedError::Store(_)) => {
                assert!(Instant::now() < deadline, "Redis did not come back");
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(report.cleared, vec!["item".to_owned()]);
    assert_eq!(*cleared.lock().unwrap(), vec!["item"]);
    assert!(
        relay.log().overflowed().await.unwrap().is_empty(),
        "overflow forgotten"
    );
    // The whole kind went, the row never written too: not served, and
    // swept out of Redis in the background.
    for id in ["i1", "untouched"] {
        let key = cache.keys().value_key(&ITEM, id).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.store().get(&key, None).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "{id} never swept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(items.get("i1").await.unwrap().value().unwrap().name, "r2");

    // Normal relaying resumes.
    items.get("i2").await.unwrap();
    pg(&pool, "UPDATE items SET name = 'after' WHERE id = 'i2'").await;
    let key = cache.keys().value_key(&ITEM, "i2").unwrap();
    step_until(&relay, async || {
        cache.store().get(&key, None).await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        items.get("i2").await.unwrap().value().unwrap().name,
        "after"
    );
    pool.close().await;
}

// ---------------------------------------------------------------------
// A FeedLog over SQLite: positions are seqs (one writer at a time).

struct SqliteLog(sqlx::SqlitePool);

fn seq_arg(p: u64) -> i64 {
    i64::try_from(p).unwrap_or(i64::MAX)
}

impl ChangeSource for SqliteLog {
    type Error = sqlx::Error;

    async fn watermark(&self) -> Result<u64, sqlx::Error> {
        let w: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT seq FROM sqlite_sequence \
             WHERE name = 'kura_invalidation_log'), 0) + 1",
        )
        .fetch_one(&self.0)
        .await?;
        Ok(w as u64)
    }

    async fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Result<Vec<(u64, FeedEvent)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT seq, kind, entity_id, version, committed_at FROM kura_invalidation_log \
             WHERE seq >= ? AND seq < ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(seq_arg(from))
        .bind(seq_arg(to))
        .bind(after.map_or(-1, |(_, s)| s))
        .bind(limit as i64)
        .fetch_all(&self.0)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                (
                    seq as u64,
                    FeedEvent {
                        seq,
                        kind: r.get(1),
                        id: r.get(2),
                        version: r.get::<Option<i64>, _>(3).map(|v| v.max(0) as u64),
                        committed_at_ms: r.get(4),
                        clear: false,
                    },
                )
            })
            .collect())
    }

    async fn oldest(&self) -> Result<Option<u64>, sqlx::Error> {
        let p: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM kura_invalidation_log")
            .fetch_one(&self.0)
            .await?;
        Ok(p.map(|p| p as u64))
    }

    async fn backlog(&self, from: u64) -> Result<u64, sqlx::Error> {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM kura_invalidation_log WHERE seq >= ?")
                .bind(seq_arg(from))
                .fetch_one(&self.0)
                .await?;
        Ok(n as u64)
    }

    async fn release(&self, below: u64, before_ms: i64, limit: usize) -> Result<u64, sqlx::Error> {
        let r = sqlx::query(
            "DELETE FROM kura_invalidation_log WHERE seq IN (SELECT seq FROM kura_invalidation_log \
             WHERE seq < ? AND committed_at < ? LIMIT ?)",
        )
        .bind(seq_arg(below))
        .bind(before_ms)
        .bind(limit as i64)
        .execute(&self.0)
        .await?;
        Ok(r.rows_affected())
    }

    async fn wait(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }

    async fn overflowed(&self) -> Result<Vec<(String, u64)>, sqlx::Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT kind, cut FROM kura_feed_state")
            .fetch_all(&self.0)
            .await?;
        Ok(rows.into_iter().map(|(k, c)| (k, c as u64)).collect())
    }

    async fn mark_overflow(&self, kinds: &[String], cut: u64) -> Result<(), sqlx::Error> {
        for k in kinds {
            sqlx::query(
                "INSERT INTO kura_feed_state (kind, cut) VALUES (?, ?) \
                 ON CONFLICT (kind) DO UPDATE SET cut = max(cut, excluded.cut)",
            )
            .bind(k)
            .bind(seq_arg(cut))
            .execute(&self.0)
            .await?;
        }
        Ok(())
    }

    async fn clear_overflow(&self, kinds: &[(String, u64)]) -> Result<(), sqlx::Error> {
        for (k, cut) in kinds {
            sqlx::query("DELETE FROM kura_feed_state WHERE kind = ? AND cut <= ?")
                .bind(k)
                .bind(seq_arg(*cut))
                .execute(&self.0)
                .await?;
        }
        Ok(())
    }

    async fn prune_overflowed(&self, limit: usize) -> Result<u64, sqlx::Error> {
        let r = sqlx::query(
            "DELETE FROM kura_invalidation_log WHERE seq IN (SELECT l.seq FROM \
             kura_invalidation_log l JOIN kura_feed_state s ON s.kind = l.kind \
             WHERE l.seq < s.cut LIMIT ?)",
        )
        .bind(limit as i64)
        .execute(&self.0)
        .await?;
        Ok(r.rows_affected())
    }

    async fn save_position(&self, position: u64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO kura_feed_position (id, position) VALUES (1, ?) \
             ON CONFLICT (id) DO UPDATE SET position = max(position, excluded.position)",
        )
        .bind(seq_arg(position))
        .execute(&self.0)
        .await?;
        Ok(())
    }

    async fn saved_position(&self) -> Result<Option<u64>, sqlx::Error> {
        let p: Option<i64> = sqlx::query_scalar("SELECT position FROM kura_feed_position")
            .fetch_optional(&self.0)
            .await?;
        Ok(p.map(|p| p as u64))
    }
}

#[derive(Clone)]
struct SqliteItems(sqlx::SqlitePool);

impl Source for SqliteItems {
    type Value = Item;
    type Error = sqlx::Error;

    async fn load(&self, id: &str) -> Result<Option<Item>, sqlx::Error> {
        Ok(
            sqlx::query("SELECT id, name, version FROM items WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.0)
                .await?
                .map(|r| Item {
                    id: r.get(0),
                    name: r.get(1),
                    version: r.get::<i64, _>(2) as u64,
                }),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_direct_sql_changes_reach_the_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("feed.db").display());
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1)")
        .execute(&pool)
        .await
        .unwrap();
    for s in log_table_statements(SqlBackend::Sqlite)
        .into_iter()
        .chain(items_spec().install_statements(SqlBackend::Sqlite))
    {
        sqlx::query(AssertSqlSafe(s)).execute(&pool).await.unwrap();
    }
    let run = async |sql: &'static str| {
        sqlx::query(sql).execute(&pool).await.unwrap();
    };
    run("INSERT INTO items (id, name) VALUES ('a', 'old'), ('b', 'old')").await;
    let (cache, _ns) = Backend::Memory.cache();
    let items = cache.aside(ITEM, SqliteItems(pool.clone()));
    let relay = Relay::builder(&cache, SqliteLog(pool.clone()))
        .kind(ITEM)
        .retention(Duration::ZERO)
        .build();
    relay.step().await.unwrap();
    for id in ["a", "b"] {
        items.get(id).await.unwrap();
        assert_eq!(items.get(id).await.unwrap().status(), Status::Hit);
    }
    run("UPDATE items SET name = 'new' WHERE id = 'a'").await;
    run("DELETE FROM items WHERE id = 'b'").await;
    let r = relay.step().await.unwrap();
    assert_eq!((r.applied, r.invalidated), (2, 2));
    let a = items.get("a").await.unwrap();
    assert_eq!(
        (a.status(), a.value().unwrap().name.as_str()),
        (Status::Miss, "new")
    );
    assert!(items.get("b").await.unwrap().value().is_none());
    // Retention deleted every row, the newest too: the watermark does not
    // go back (sqlite_sequence), and the next change is relayed.
    tokio::time::sleep(Duration::from_millis(5)).await;
    relay.step().await.unwrap();
    assert_eq!(
        SqliteLog(pool.clone()).oldest().await.unwrap(),
        None,
        "all pruned"
    );
    assert_eq!(relay.status().await.unwrap().watermark, r.watermark);
    let by_max: i64 =
        sqlx::query_scalar("SELECT COALESCE(max(seq), 0) + 1 FROM kura_invalidation_log")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(by_max, 1, "max(seq) + 1 would have gone back");
    run("UPDATE items SET name = 'newer' WHERE id = 'a'").await;
    let r = relay.step().await.unwrap();
    assert_eq!(r.invalidated, 1);
    assert_eq!(items.get("a").await.unwrap().value().unwrap().name, "newer");
    pool.close().await;
}

// ---------------------------------------------------------------------
// An in-memory FeedLog, for deterministic interleavings.

#[derive(Default)]
struct MemState {
    /// Committed rows by (position, seq).
    rows: BTreeMap<(u64, i64), FeedEvent>,
    next_seq: i64,
    /// Positions of transactions still open: the watermark stays below them.
    open: HashSet<u64>,
    next_pos: u64,
    overflow: BTreeMap<String, u64>,
    saved: Option<u64>,
}

#[derive(Default)]
struct MemLog {
    state: Mutex<MemState>,
    reads: AtomicUsize,
    /// Reads past this many block until the test drops the step.
    block_after: Mutex<Option<usize>>,
    blocked: Notify,
    /// Delay each watermark a little after reading it.
    jitter: std::sync::atomic::AtomicBool,
    /// Emulate PostgreSQL's wake-ups: a commit wakes `wait` unless a relay
    /// said it polls ([`ChangeSource::polling`]), as the NOTIFY trigger does.
    wakes: std::sync::atomic::AtomicBool,
    woken: Notify,
    /// Wake-ups sent by commits.
    wake_ups: AtomicUsize,
    /// Calls of `polling`.
    announced: AtomicUsize,
    polling_until: Mutex<Option<Instant>>,
}

impl MemLog {
    fn new() -> Arc<MemLog> {
        Arc::new(MemLog::default())
    }

    /// Commits one transaction writing `(id, version)` rows.
    fn commit(&self, kind: &str, rows: &[(&str, Option<u64>)]) {
        let mut s = self.state.lock().unwrap();
        s.next_pos += 1;
        let p = s.next_pos;
        for (id, v) in rows {
            s.next_seq += 1;
            let seq = s.next_seq;
            s.rows.insert(
                (p, seq),
                FeedEvent {
                    seq,
                    kind: kind.into(),
                    id: (*id).into(),
                    version: *v,
                    committed_at_ms: chrono::Utc::now().timestamp_millis(),
                    clear: false,
                },
            );
        }
        drop(s);
        let polled = self
            .polling_until
            .lock()
            .unwrap()
            .is_some_and(|t| t > Instant::now());
        if self.wakes.load(Ordering::SeqCst) && !polled {
            self.wake_ups.fetch_add(1, Ordering::SeqCst);
            self.woken.notify_one();
        }
    }

    fn len(&self) -> usize {
        self.state.lock().unwrap().rows.len()
    }

    /// A failover to a standby that never had the transactions at or past
    /// `pos`: their rows are gone and the next transaction takes `pos`, so
    /// the watermark goes back below what a relay may hold.
    fn rewind(&self, pos: u64) {
        let mut s = self.state.lock().unwrap();
        s.rows.retain(|(p, _), _| *p < pos);
        s.next_pos = pos - 1;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("fake log error")]
struct MemErr;

impl ChangeSource for MemLog {
    type Error = MemErr;

    async fn watermark(&self) -> Result<u64, MemErr> {
        let w = {
            let s = self.state.lock().unwrap();
            s.open.iter().min().copied().unwrap_or(s.next_pos + 1)
        };
        // A slow answer: relays then report watermarks out of order.
        if self.jitter.load(Ordering::SeqCst) {
            let us = rand::random::<u64>() % 2000;
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        Ok(w)
    }

    async fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Result<Vec<(u64, FeedEvent)>, MemErr> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let block = *self.block_after.lock().unwrap();
        if block.is_some_and(|b| n > b) {
            self.blocked.notify_one();
            std::future::pending::<()>().await;
        }
        let s = self.state.lock().unwrap();
        Ok(s.rows
            .iter()
            .filter(|((p, seq), _)| *p >= from && *p < to && after.is_none_or(|a| (*p, *seq) > a))
            .take(limit)
            .map(|((p, _), e)| (*p, e.clone()))
            .collect())
    }

    async fn oldest(&self) -> Result<Option<u64>, MemErr> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .rows
            .keys()
            .next()
            .map(|(p, _)| *p))
    }

    async fn backlog(&self, from: u64) -> Result<u64, MemErr> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .rows
            .keys()
            .filter(|(p, _)| *p >= from)
            .count() as u64)
    }

    async fn release(&self, below: u64, before_ms: i64, limit: usize) -> Result<u64, MemErr> {
        let mut s = self.state.lock().unwrap();
        let doomed: Vec<(u64, i64)> = s
            .rows
            .iter()
            .filter(|((p, _), e)| *p < below && e.committed_at_ms < before_ms)
            .take(limit)
            .map(|(k, _)| *k)
            .collect();
        for k in &doomed {
            s.rows.remove(k);
        }
        Ok(doomed.len() as u64)
    }

    async fn wait(&self, timeout: Duration) {
        if self.wakes.load(Ordering::SeqCst) {
            let _ = tokio::time::timeout(timeout, self.woken.notified()).await;
        } else {
            tokio::time::sleep(timeout).await;
        }
    }

    async fn polling(&self, window: Duration) -> Result<bool, MemErr> {
        if !self.wakes.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.announced.fetch_add(1, Ordering::SeqCst);
        *self.polling_until.lock().unwrap() = Some(Instant::now() + window);
        Ok(true)
    }

    async fn overflowed(&self) -> Result<Vec<(String, u64)>, MemErr> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .overflow
            .iter()
            .map(|(k, c)| (k.clone(), *c))
            .collect())
    }

    async fn mark_overflow(&self, kinds: &[String], cut: u64) -> Result<(), MemErr> {
        let mut s = self.state.lock().unwrap();
        for k in kinds {
            let c = s.overflow.entry(k.clone()).or_insert(cut);
            *c = (*c).max(cut);
        }
        Ok(())
    }

    async fn clear_overflow(&self, kinds: &[(String, u64)]) -> Result<(), MemErr> {
        let mut s = self.state.lock().unwrap();
        for (k, cut) in kinds {
            if s.overflow.get(k).is_some_and(|c| c <= cut) {
                s.overflow.remove(k);
            }
        }
        Ok(())
    }

    async fn prune_overflowed(&self, limit: usize) -> Result<u64, MemErr> {
        let mut s = self.state.lock().unwrap();
        let doomed: Vec<(u64, i64)> = s
            .rows
            .iter()
            .filter(|((p, _), e)| s.overflow.get(&e.kind).is_some_and(|c| p < c))
            .take(limit)
            .map(|(k, _)| *k)
            .collect();
        for k in &doomed {
            s.rows.remove(k);
        }
        Ok(doomed.len() as u64)
    }

    async fn save_position(&self, position: u64) -> Result<(), MemErr> {
        let mut s = self.state.lock().unwrap();
        s.saved = Some(s.saved.map_or(position, |p| p.max(position)));
        Ok(())
    }

    async fn saved_position(&self) -> Result<Option<u64>, MemErr> {
        Ok(self.state.lock().unwrap().saved)
    }
}

fn value_key(cache: &Cache, id: &str) -> String {
    cache.keys().value_key(&Kind::new("profile"), id).unwrap()
}

async fn is_cached(cache: &Cache, id: &str) -> bool {
    cache
        .store()
        .get(&value_key(cache, id), None)
        .await
        .unwrap()
        .is_some()
}

async fn position(cache: &Cache) -> Option<u64> {
    cache
        .store()
        .get(&cache.keys().internal("feed:position"), None)
        .await
        .unwrap()
        .map(|b| std::str::from_utf8(&b).unwrap().parse().unwrap())
}

async fn killed_mid_batch_skips_nothing(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let log = MemLog::new();
    let ids: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.put(id, "v1");
        profiles.get(id).await.unwrap();
    }
    // One transaction per id, each raising its version to 2.
    for id in &ids {
        db.put(id, "v2");
        log.commit("profile", &[(id, Some(2))]);
    }
    // The first relay applies one page of 3, then hangs reading the next.
    *log.block_after.lock().unwrap() = Some(1);
    let first = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .batch_size(3)
        .build();
    let blocked = log.blocked.notified();
    let step = tokio::spawn(async move { first.step().await });
    blocked.await;
    step.abort();
    let _ = step.await;
    let mut cached = Vec::new();
    for id in &ids {
        cached.push(is_cached(&cache, id).await);
    }
    assert_eq!(
        cached.iter().filter(|c| !**c).count(),
        3,
        "one page applied: {cached:?}"
    );
    assert_eq!(
        position(&cache).await,
        None,
        "the killed relay moved nothing"
    );

    // Another relay (a restart, or another instance) redoes the batch.
    *log.block_after.lock().unwrap() = None;
    let second = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .batch_size(3)
        .build();
    let r = second.step().await.unwrap();
    assert_eq!(
        r.applied, 10,
        "from the oldest row: the killed page again, then the rest"
    );
    for id in &ids {
        assert!(!is_cached(&cache, id).await, "{id} skipped");
        assert_eq!(profiles.get(id).await.unwrap().value().unwrap().name, "v2");
    }
    assert_eq!(position(&cache).await, Some(11));
    cleanup(&ns).await;
}

/// A first start (no position anywhere) while a transaction with a lower
/// position is still open and a later one has committed: the relay starts
/// from the oldest row it can read, but never above the watermark, or the
/// open transaction's rows would land below the position and be skipped.
/// (Found by `many_relays_apply_everything_and_never_regress`, 224 of 225
/// applied once in a loaded run.)
async fn a_first_start_does_not_skip_an_open_transaction(b: Backend) {
    let (cache, ns) = b.cache();
    let log = MemLog::new();
    let open = {
        let mut s = log.state.lock().unwrap();
        s.next_pos += 1;
        let p = s.next_pos;
        s.open.insert(p);
        p
    };
    log.commit("profile", &[("later", Some(1))]);
    let relay = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .build();
    let r = relay.step().await.unwrap();
    assert!(
        r.position <= open,
        "position {} past the open transaction at {open}",
        r.position
    );
    {
        let mut s = log.state.lock().unwrap();
        s.next_seq += 1;
        let seq = s.next_seq;
        s.rows.insert(
            (open, seq),
            FeedEvent {
                seq,
                kind: "profile".into(),
                id: "early".into(),
                version: Some(1),
                committed_at_ms: chrono::Utc::now().timestamp_millis(),
                clear: false,
            },
        );
        s.open.remove(&open);
    }
    let r = relay.step().await.unwrap();
    assert_eq!(r.applied, 2, "both transactions applied: {r:?}");
    cleanup(&ns).await;
}

async fn many_relays_apply_everything_and_never_regress(b: Backend) {
    let stores = b.fleet(6);
    let ns = ns();
    let caches: Vec<Cache> = stores.iter().map(|s| cache_on(s.clone(), &ns)).collect();
    let log = MemLog::new();
    let db = TestDb::new();
    let profiles = caches[0].aside(Kind::new("profile"), Db(db.clone()));
    let ids: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.put(id, "v1");
        profiles.get(id).await.unwrap();
    }
    log.jitter.store(true, Ordering::SeqCst);
    let applied = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for cache in &caches {
        let seen = applied.clone();
        let relay = Relay::builder(cache, log.clone())
            .kind(Kind::new("profile"))
            .batch_size(7)
            .on_applied(move |evs| seen.lock().unwrap().extend(evs.iter().map(|e| e.seq)))
            .build();
        let stop = stop.clone();
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            // Every value of the position this relay sees: its steps' and
            // plain reads'.
            let mut seen = Vec::new();
            loop {
                let done = stop.load(Ordering::SeqCst);
                // Steps race with each other and with the writer.
                seen.push(relay.step().await.unwrap().position);
                if let Some(p) = position(&cache).await {
                    seen.push(p);
                }
                if done {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    // Writes while the relays run, some transactions committing late.
    for round in 0..5u64 {
        for (i, id) in ids.iter().enumerate() {
            let v = round + 2;
            if i % 9 == 0 {
                // Opened before the next ones, committed after them.
                let p = {
                    let mut s = log.state.lock().unwrap();
                    s.next_pos += 1;
                    let p = s.next_pos;
                    s.open.insert(p);
                    p
                };
                log.commit("profile", &[(id, Some(v))]);
                let mut s = log.state.lock().unwrap();
                s.next_seq += 1;
                let seq = s.next_seq;
                s.rows.insert(
                    (p, seq),
                    FeedEvent {
                        seq,
                        kind: "profile".into(),
                        id: format!("{id}-late"),
                        version: Some(v),
                        committed_at_ms: chrono::Utc::now().timestamp_millis(),
                        clear: false,
                    },
                );
                s.open.remove(&p);
            } else {
                log.commit("profile", &[(id, Some(v))]);
            }
            if i % 5 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let total = log.state.lock().unwrap().next_seq as usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied.lock().unwrap().len() < total {
        assert!(
            Instant::now() < deadline,
            "{} of {total} applied",
            applied.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let seen = t.await.unwrap();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "the position went back: {seen:?}"
        );
    }
    let all: HashSet<i64> = (1..=total as i64).collect();
    assert_eq!(*applied.lock().unwrap(), all, "every entry applied");
    for id in &ids {
        assert!(!is_cached(&caches[0], id).await, "{id}");
    }
    cleanup(&ns).await;
}

async fn duplicates_and_late_batches_are_harmless(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let log = MemLog::new();
    for v in 1..=5 {
        db.put("u1", &format!("v{v}"));
        log.commit("profile", &[("u1", Some(v))]);
    }
    let relay = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .build();
    relay.step().await.unwrap();
    // Loaded after the commits: version 5 is cached.
    assert_eq!(
        profiles.get("u1").await.unwrap().value().unwrap().version,
        5
    );
    // A slow relay applies the same rows again, in order and backwards:
    // nothing they say is newer than what is cached.
    let rows: Vec<(u64, FeedEvent)> = log.read(0, u64::MAX, None, 100).await.unwrap();
    let e = cache.keys().entry(&Kind::new("profile"), "u1").unwrap();
    let forward: Vec<_> = rows.iter().map(|(_, ev)| (&e, ev.version)).collect();
    let backward: Vec<_> = forward.iter().rev().copied().collect();
    assert_eq!(cache.store().invalidate_older(&forward).await.unwrap(), 0);
    assert_eq!(cache.store().invalidate_older(&backward).await.unwrap(), 0);
    assert_eq!(
        profiles.get("u1").await.unwrap().status(),
        Status::Hit,
        "kept"
    );
    if b == Backend::Redis {
        // The position lost (a Redis restart without persistence): the
        // whole log is applied again by a relay that never ran.
        let mut c = support::redis_conn().await;
        let _: () = redis::cmd("DEL")
            .arg(cache.keys().internal("feed:position"))
            .query_async(&mut c)
            .await
            .unwrap();
        let fresh = Relay::builder(&cache, log.clone())
            .kind(Kind::new("profile"))
            .build();
        let r = fresh.step().await.unwrap();
        assert_eq!((r.applied, r.invalidated), (5, 0));
        assert_eq!(
            profiles.get("u1").await.unwrap().status(),
            Status::Hit,
            "kept"
        );
    }
    // A newer change, applied twice: invalidated once, then nothing to do.
    db.put("u1", "v6");
    log.commit("profile", &[("u1", Some(6))]);
    let r = relay.step().await.unwrap();
    assert_eq!((r.applied, r.invalidated), (1, 1));
    assert_eq!(
        cache
            .store()
            .invalidate_older(&[(&e, Some(6))])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        profiles.get("u1").await.unwrap().value().unwrap().version,
        6
    );
    assert_eq!(
        cache
            .store()
            .invalidate_older(&[(&e, Some(6))])
            .await
            .unwrap(),
        0
    );
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Hit);
    // Unknown kinds and ids that cannot be keys are skipped; the position
    // still moves past them.
    log.commit("other", &[("x", Some(1))]);
    log.commit("profile", &[("bad id", Some(1))]);
    let r = relay.step().await.unwrap();
    assert_eq!((r.read, r.applied), (2, 0));
    assert_eq!(position(&cache).await, Some(log.watermark().await.unwrap()));
    cleanup(&ns).await;
}

async fn retention_prunes_applied_rows_in_batches(b: Backend) {
    let (cache, ns) = b.cache();
    let log = MemLog::new();
    for i in 0..25 {
        log.commit("profile", &[(&format!("u{i}"), Some(1))]);
    }
    // Three unapplied rows stay whatever their age: the relay never reaches
    // them (an open transaction holds the watermark).
    {
        let mut s = log.state.lock().unwrap();
        s.next_pos += 1;
        let p = s.next_pos;
        s.open.insert(p);
    }
    for i in 0..3 {
        log.commit("profile", &[(&format!("w{i}"), Some(1))]);
    }
    let relay = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .retention(Duration::ZERO)
        .prune_batch(4)
        .build();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = relay.step().await.unwrap();
    assert_eq!(r.applied, 25);
    assert_eq!(r.pruned, 16, "at most four batches of four per step");
    let r = relay.step().await.unwrap();
    assert_eq!(r.pruned, 9);
    assert_eq!(log.len(), 3, "only the unapplied rows are left");
    let status = relay.status().await.unwrap();
    assert_eq!(status.backlog, 3);
    assert!(status.lag_ms > 0, "the oldest unapplied row is waiting");
    cleanup(&ns).await;
}

/// The writer's own invalidation starts a load, which reads the committed
/// row; the feed's event for that same commit arrives while the load is in
/// flight. The load's fill lands (one miss, not two); a load that read the
/// row before a later change is still refused.
async fn a_load_that_read_the_change_survives_its_feed_event(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let log = MemLog::new();
    let relay = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .build();
    db.put("u1", "v1");
    profiles.get("u1").await.unwrap();
    relay.step().await.unwrap();

    db.put("u1", "v2");
    log.commit("profile", &[("u1", Some(2))]);
    // The writer's own invalidation (through kura, so that this process's
    // near cache, when there is one, does not answer the next read).
    cache
        .write_through(Kind::new("profile"))
        .invalidate("u1")
        .await
        .unwrap();
    let loads = db.loads();
    let gate = db.arm_gate();
    let reader = tokio::spawn({
        let profiles = profiles.clone();
        async move { profiles.get("u1").await.unwrap() }
    });
    gate.loaded.notified().await;
    assert_eq!(relay.step().await.unwrap().applied, 1);
    gate.release.notify_one();
    let got = reader.await.unwrap();
    assert_eq!(
        (got.status(), got.value().unwrap().version),
        (Status::Miss, 2)
    );
    let next = profiles.get("u1").await.unwrap();
    assert_eq!(
        (next.status(), db.loads() - loads),
        (Status::Hit, 1),
        "the load of the committed version filled: no second miss"
    );

    // A load that read v2 while v3 commits: its fill is refused.
    // The writer's own invalidation (through kura, so that this process's
    // near cache, when there is one, does not answer the next read).
    cache
        .write_through(Kind::new("profile"))
        .invalidate("u1")
        .await
        .unwrap();
    let gate = db.arm_gate();
    let reader = tokio::spawn({
        let profiles = profiles.clone();
        async move { profiles.get("u1").await.unwrap() }
    });
    gate.loaded.notified().await;
    db.put("u1", "v3");
    log.commit("profile", &[("u1", Some(3))]);
    relay.step().await.unwrap();
    gate.release.notify_one();
    assert_eq!(reader.await.unwrap().value().unwrap().version, 2);
    let next = profiles.get("u1").await.unwrap();
    assert_eq!(
        (next.status(), next.value().unwrap().version),
        (Status::Miss, 3),
        "the load of the older row did not fill"
    );
    cleanup(&ns).await;
}

/// Under a steady stream of commits the relay polls in place of wake-ups
/// and says so, so that writers stop sending them; when the stream stops,
/// a commit wakes it again. The poll interval is 60 s: only the busy
/// polling (or a wake-up) can apply the rows in time.
async fn a_busy_relay_polls_in_place_of_wake_ups(b: Backend) {
    let (cache, ns) = b.cache();
    let log = MemLog::new();
    log.wakes.store(true, Ordering::SeqCst);
    let relay = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .poll_interval(Duration::from_secs(60))
        .build();
    let stop = Arc::new(Notify::new());
    let task = tokio::spawn({
        let relay = relay.clone();
        let stop = stop.clone();
        async move { relay.run(stop.notified()).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.status().await.unwrap().relaying.is_none() {
        assert!(Instant::now() < deadline, "the relay took no lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let caught_up = async |within: Duration| {
        let end = log.watermark().await.unwrap();
        let deadline = Instant::now() + within;
        while position(&cache).await.is_none_or(|p| p < end) {
            assert!(
                Instant::now() < deadline,
                "rows left unapplied: position {:?}, watermark {end}",
                position(&cache).await
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    for i in 0..300 {
        log.commit("profile", &[(&format!("u{i}"), Some(1))]);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    caught_up(Duration::from_secs(2)).await;
    let sent = log.wake_ups.load(Ordering::SeqCst);
    assert!(
        log.announced.load(Ordering::SeqCst) >= 1,
        "the relay said it polls"
    );
    assert!(sent <= 30, "{sent} of 300 commits sent a wake-up");
    // Idle past the window: the relay sleeps, and a commit wakes it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    log.commit("profile", &[("late", Some(1))]);
    assert_eq!(
        log.wake_ups.load(Ordering::SeqCst),
        sent + 1,
        "a wake-up again"
    );
    caught_up(Duration::from_secs(2)).await;
    stop.notify_one();
    task.await.unwrap();
    cleanup(&ns).await;
}

/// After a failover to a standby that lacks the newest transactions, the
/// database's watermark is below the position the fleet holds: a change
/// committed there must not be skipped, and nothing cached from the lost
/// transactions may stay.
async fn a_watermark_below_the_position_is_a_regression(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let log = MemLog::new();
    let relay = Relay::builder(&cache, log.clone())
        .kind(Kind::new("profile"))
        .build();
    for i in 0..5 {
        log.commit("profile", &[("other", Some(i + 1))]);
    }
    relay.step().await.unwrap();
    assert_eq!(position(&cache).await, Some(6));
    db.put("u1", "v1");
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Miss);
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Hit);
    // The standby lacks transactions 3 to 5; the next change is 3 there.
    log.rewind(3);
    db.put("u1", "v2");
    log.commit("profile", &[("u1", Some(db.get("u1").unwrap().version))]);
    let report = relay.step().await.unwrap();
    assert!(report.watermark < 6, "{report:?}");
    let f = profiles.get("u1").await.unwrap();
    assert_eq!(
        f.value().unwrap().name,
        "v2",
        "{:?} after {report:?}",
        f.status()
    );
    // Relaying goes on from the database's positions.
    db.put("u1", "v3");
    log.commit("profile", &[("u1", Some(db.get("u1").unwrap().version))]);
    relay.step().await.unwrap();
    assert_eq!(
        profiles.get("u1").await.unwrap().value().unwrap().name,
        "v3"
    );
    assert_eq!(position(&cache).await, Some(5));
    cleanup(&ns).await;
}

both_stores!(
    a_watermark_below_the_position_is_a_regression,
    a_first_start_does_not_skip_an_open_transaction,
    a_load_that_read_the_change_survives_its_feed_event,
    a_busy_relay_polls_in_place_of_wake_ups,
    killed_mid_batch_skips_nothing,
    many_relays_apply_everything_and_never_regress,
    duplicates_and_late_batches_are_harmless,
    retention_prunes_applied_rows_in_batches,
);

// ---------------------------------------------------------------------
// The version rule, as a property: any sequence of loads and feed events,
// in any order and with duplicates, leaves the cache holding either
// nothing or a value at least as new as every change applied since it was
// loaded.

#[derive(Debug, Clone)]
enum Op {
    /// A reader loads the row at this version and fills.
    Load(u64),
    /// A change committed at this version (`None`: a delete) is applied.
    Event(Option<u64>),
    /// A reader takes the lease, then the event is applied, then it fills
    /// what it read (at the first version).
    LoadAcross(u64, Option<u64>),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (1u64..12).prop_map(Op::Load),
        proptest::option::weighted(0.8, 1u64..12).prop_map(Op::Event),
        (1u64..12, proptest::option::weighted(0.8, 1u64..12))
            .prop_map(|(l, e)| Op::LoadAcross(l, e)),
    ]
}

async fn version_rule_holds(b: Backend, ops: Vec<Op>) {
    let store = b.store();
    use kura::store::{AcquireRequest, FillOutcome, FillRequest, FillValue, Lifetimes};
    let ns = ns();
    let e = kura::key::KeyBuilder::new(&ns, store.needs_hash_tags())
        .unwrap()
        .entry(&Kind::new("profile"), "u1")
        .unwrap();
    let life = Lifetimes {
        ttl: Duration::from_secs(60),
        stale_ttl: Duration::ZERO,
    };
    let acquire = |token: &'static str| AcquireRequest {
        keys: &e,
        token,
        lease_ttl: Duration::from_secs(5),
        value_ttl: Duration::from_secs(60),
    };
    let fill = |token: &'static str, v: u64| FillRequest {
        keys: &e,
        token,
        value: FillValue::Value {
            bytes: kura::codec::encode(&serde_json::json!({"v": v}), v, 1 << 20)
                .unwrap()
                .envelope,
            version: v,
        },
        lifetimes: life,
    };
    // The model: the version cached, if any.
    let mut model: Option<u64> = None;
    let apply = |model: &mut Option<u64>, ev: Option<u64>| {
        if !matches!((ev, *model), (Some(v), Some(c)) if c >= v) {
            *model = None;
        }
    };
    for op in ops {
        match op {
            Op::Load(v) => {
                store.acquire(&[acquire("r")]).await.unwrap();
                let out = store.fill(&[fill("r", v)]).await.unwrap()[0];
                if out == FillOutcome::Stored {
                    model = Some(v);
                }
            }
            Op::Event(ev) => {
                store.invalidate_older(&[(&e, ev)]).await.unwrap();
                apply(&mut model, ev);
            }
            Op::LoadAcross(v, ev) => {
                let got = store.acquire(&[acquire("x")]).await.unwrap();
                store.invalidate_older(&[(&e, ev)]).await.unwrap();
                apply(&mut model, ev);
                let out = store.fill(&[fill("x", v)]).await.unwrap()[0];
                if matches!(got[0], kura::store::Acquired::Leased { .. }) && model.is_none() {
                    // The event fenced the lease: a load of a row older
                    // than the change (or any load across a delete) never
                    // lands; one of the change's version or newer may.
                    let may = matches!(ev, Some(c) if v >= c);
                    if !may {
                        assert_ne!(
                            out,
                            FillOutcome::Stored,
                            "a load older than the change filled"
                        );
                    }
                }
                if out == FillOutcome::Stored {
                    model = Some(v);
                }
            }
        }
        let cached = store
            .get(&e.value, None)
            .await
            .unwrap()
            .and_then(|b| kura::codec::peek_version(&b));
        assert_eq!(cached, model);
    }
    if store.describe() != "memory" {
        cleanup(&ns).await;
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    #[test]
    fn memory_store_keeps_the_version_rule(ops in proptest::collection::vec(op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(version_rule_holds(Backend::Memory, ops));
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(40))]
    #[test]
    fn redis_store_keeps_the_version_rule(ops in proptest::collection::vec(op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(version_rule_holds(Backend::Redis, ops));
    }
}

with_near_cache!(
    a_first_start_does_not_skip_an_open_transaction,
    a_load_that_read_the_change_survives_its_feed_event,
    a_busy_relay_polls_in_place_of_wake_ups,
    killed_mid_batch_skips_nothing,
    many_relays_apply_everything_and_never_regress,
    duplicates_and_late_batches_are_harmless,
    retention_prunes_applied_rows_in_batches,
);

/// Overflow recovery with two relays: one cut off from Redis keeps stepping
/// (every instance does), the other reaches Redis slowly. The cut-off one
/// must not re-mark the overflow while its backlog is within the bound, so
/// the other clears the type a bounded number of times, by the O(1) clear,
/// and relaying goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_recovery_with_a_cut_off_relay_ends() {
    let server = kura_testkit::RedisServer::start().await;
    let cut = kura_testkit::FaultProxy::start(server.addr()).await;
    let slow = kura_testkit::FaultProxy::start(server.addr()).await;
    let ns = ns();
    let build = |addr: std::net::SocketAddr| {
        let store = RedisStore::builder(format!("redis://{addr}"))
            .response_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        Cache::builder(store)
            .namespace(&ns)
            .ttl_policy(support::seed_policy().with_jitter(0.0))
            .op_timeout(Duration::from_millis(250))
            .breaker(BreakerConfig::new(3, Duration::from_millis(50)))
            .build()
            .unwrap()
    };
    let (a, b) = (build(cut.addr()), build(slow.addr()));
    let db = TestDb::new();
    db.put("u1", "v1");
    let profiles = b.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get("u1").await.unwrap();
    let log = MemLog::new();
    let relay = |cache: &Cache| {
        Relay::builder(cache, log.clone())
            .kind(Kind::new("profile"))
            .kind(Kind::new("settings"))
            .max_backlog(20)
            .poll_interval(Duration::ZERO)
    };
    let clears = Arc::new(AtomicUsize::new(0));
    let counted = clears.clone();
    let ra = relay(&a).build();
    let rb = relay(&b)
        .on_cleared(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .build();
    cut.blackhole();
    for i in 0..50 {
        log.commit("profile", &[(&format!("u{i}"), Some(2))]);
    }
    assert!(ra.step().await.is_err(), "cut off");
    assert!(
        !log.overflowed().await.unwrap().is_empty(),
        "overflow marked"
    );
    // The healthy relay's Redis answers slowly: the cut-off one steps
    // while it clears.
    slow.set_latency(Duration::from_millis(30));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut_off = tokio::spawn({
        let (ra, stop) = (ra.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = ra.step().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    for _ in 0..15 {
        rb.step().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    cut_off.await.unwrap();
    let n = clears.load(Ordering::SeqCst);
    assert!((1..=2).contains(&n), "the types were cleared {n} times");
    assert!(
        log.overflowed().await.unwrap().is_empty(),
        "overflow forgotten"
    );
    // The clear covered what was cached; relaying goes on.
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Miss);
    let before = position(&b).await.unwrap();
    log.commit("profile", &[("u1", Some(9))]);
    rb.step().await.unwrap();
    assert!(position(&b).await.unwrap() > before);
    cleanup(&ns).await;
}
