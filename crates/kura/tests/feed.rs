//! The invalidation feed: the generated SQL installed for real on
//! PostgreSQL (a database of the test's own) and SQLite (a file in a
//! tempdir), the late-commit trap, one NOTIFY per transaction, and the
//! relay over a real PostgreSQL log and an SQLite log, against the real
//! Redis and the memory store. The relay's rules over an in-memory source:
//! `feed_relay.rs`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kura::feed::source::trigger_log::{Backend as SqlBackend, TriggerSpec, log_table_statements};
use kura::feed::{ChangeSource, FeedError, FeedEvent, Relay};
use kura::store::RedisStore;
use kura::{BreakerConfig, Cache, Kind, Source, Status, Versioned};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection, PgPool, Row as _};
use support::{Backend, cleanup};
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
