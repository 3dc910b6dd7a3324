//! The trigger log itself, with the service's SQL (`SqlFeedLog`) on real
//! databases: installation, pages and positions, the late-commit trap,
//! `NOTIFY` and polling, the backlog bound while Redis is down. The feed end
//! to end through the service: `feed.rs`.

mod support;

use std::time::{Duration, Instant};

use kura_server::config::FeedConfig;
use kura_server::db::feed::SqlFeedLog;
use kura_server::db::{Db, PoolOptions};
use kura_server::profiles::model::NewProfile;
use kura_testkit::{FaultProxy, RedisServer};
use serde_json::{Value, json};
use support::feed::*;
use support::{Backend, TestApp, TestDb, random_suffix};
use uuid::Uuid;

both_backends!(
    migrate_installs_the_library_sql_once,
    log_reads_pages_prunes_and_keeps_overflow_state,
);

/// A migrated database of one test; the guard keeps it alive.
async fn fresh_db(b: Backend) -> (Db, Box<dyn std::any::Any + Send>) {
    match b {
        Backend::PgRedis => {
            let t = TestDb::create().await;
            let db = Db::connect(Some(&t.url), PoolOptions::default())
                .await
                .unwrap();
            db.migrate().await.unwrap();
            (db, Box::new(t))
        }
        Backend::SqliteMemory => {
            let t = tempfile::tempdir().unwrap();
            let url = format!("sqlite:{}", t.path().join("kura.db").display());
            let db = Db::connect(Some(&url), PoolOptions::default())
                .await
                .unwrap();
            db.migrate().await.unwrap();
            (db, Box::new(t))
        }
    }
}

async fn insert(db: &Db, user: Uuid) {
    let new: NewProfile =
        serde_json::from_value(json!({"user_id": user, "name": "before"})).unwrap();
    db.insert(&new).await.unwrap().expect("inserted");
}

async fn exec(db: &Db, stmt: &str) {
    match db {
        Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(stmt.to_owned()))
            .execute(p)
            .await
            .map(drop),
        Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(stmt.to_owned()))
            .execute(p)
            .await
            .map(drop),
    }
    .unwrap_or_else(|e| panic!("{stmt}: {e}"));
}

async fn migrate_installs_the_library_sql_once(b: Backend) {
    let (db, _guard) = fresh_db(b).await;
    // `fresh_db` migrated once: a second install finds everything current.
    assert_eq!(db.install_feed().await.unwrap(), Vec::<String>::new());
    db.migrate().await.unwrap();
    assert_eq!(db.install_feed().await.unwrap(), Vec::<String>::new());
    // A trigger dropped by hand is put back.
    let drop = match b {
        Backend::PgRedis => "DROP TRIGGER kura_feed_profiles_log ON profiles",
        Backend::SqliteMemory => "DROP TRIGGER kura_feed_profiles_update",
    };
    exec(&db, drop).await;
    assert_eq!(
        db.install_feed().await.unwrap(),
        vec!["profiles".to_owned()]
    );
    // What is installed is the library's script for this backend.
    let spec = &kura_server::db::feed::fed_tables().unwrap()[0];
    let script = spec.install_sql(db.feed_backend());
    let trigger = match b {
        Backend::PgRedis => "CREATE TRIGGER kura_feed_profiles_log",
        Backend::SqliteMemory => "CREATE TRIGGER kura_feed_profiles_update",
    };
    assert!(script.contains(trigger));
    // Removed: writes no longer reach the log; migrate installs again.
    db.remove_feed().await.unwrap();
    let log = SqlFeedLog::new(db.clone());
    let w = log.watermark().await.unwrap();
    insert(&db, Uuid::new_v4()).await;
    assert_eq!(log.backlog(w).await.unwrap(), 0, "no trigger, no log row");
    db.migrate().await.unwrap();
    insert(&db, Uuid::new_v4()).await;
    assert_eq!(log.backlog(w).await.unwrap(), 1);
    db.close().await;
}

/// The watermark once it is past every log row at or above `from`.
async fn watermark_past_rows(log: &SqlFeedLog, from: u64) -> u64 {
    let top = log
        .read(from, u64::MAX, None, 100)
        .await
        .unwrap()
        .iter()
        .map(|(p, _)| *p)
        .max()
        .expect("rows");
    let deadline = Instant::now() + BOUND;
    loop {
        let w = log.watermark().await.unwrap();
        if w > top {
            return w;
        }
        assert!(Instant::now() < deadline, "the watermark stays at {w}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn log_reads_pages_prunes_and_keeps_overflow_state(b: Backend) {
    let (db, _guard) = fresh_db(b).await;
    let log = SqlFeedLog::new(db.clone());
    assert!(log.exists().await.unwrap());
    assert_eq!(log.oldest().await.unwrap(), None);
    let w0 = log.watermark().await.unwrap();
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        insert(&db, *u).await;
    }
    exec(
        &db,
        &format!(
            "UPDATE profiles SET name = 'x' WHERE user_id = '{}'",
            users[0]
        ),
    )
    .await;
    exec(
        &db,
        &format!("DELETE FROM profiles WHERE user_id = '{}'", users[1]),
    )
    .await;
    // Every transaction in the cluster below the watermark has ended: one
    // left open by a test running beside this one holds it back a moment,
    // so wait until it passes the last of these writes.
    let w = watermark_past_rows(&log, w0).await;
    let oldest = log.oldest().await.unwrap().expect("rows");
    assert!(oldest >= w0 && oldest < w);
    assert_eq!(log.backlog(oldest).await.unwrap(), 5);
    assert_eq!(log.backlog(w).await.unwrap(), 0, "all final below w");

    // Paged in (position, seq) order, each page after the last one.
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = log.read(w0, w, after, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|(p, e)| (*p, e.seq));
        all.extend(page);
    }
    assert_eq!(all.len(), 5);
    assert!(
        all.windows(2)
            .all(|p| (p[0].0, p[0].1.seq) < (p[1].0, p[1].1.seq))
    );
    let ids: Vec<&str> = all.iter().map(|(_, e)| e.id.as_str()).collect();
    let want: Vec<String> = [0, 1, 2, 0, 1]
        .iter()
        .map(|i| users[*i].to_string())
        .collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(all.iter().all(|(_, e)| e.kind == "profile"));
    assert_eq!(all[3].1.version, Some(2), "the UPDATE's bumped version");
    assert_eq!(all[4].1.version, None, "a DELETE has no version");
    let now = support::now() as i64 * 1000;
    assert!(
        all.iter()
            .all(|(_, e)| (e.committed_at_ms - now).abs() < 60_000)
    );
    // "To the end", as the relay asks when it measures the lag.
    assert_eq!(log.read(w0, u64::MAX, None, 1).await.unwrap().len(), 1);

    // Retention: only below the position given, only older than the cut-off.
    assert_eq!(log.prune(w, now - 3_600_000, 10).await.unwrap(), 0);
    assert_eq!(log.prune(oldest, i64::MAX, 10).await.unwrap(), 0);
    assert_eq!(log.prune(w, i64::MAX, 2).await.unwrap(), 2, "bounded");
    assert_eq!(log.prune(w, i64::MAX, 10).await.unwrap(), 3);
    assert_eq!(log.oldest().await.unwrap(), None);
    assert!(
        log.watermark().await.unwrap() >= w,
        "the watermark does not go back when the log is emptied"
    );

    // Overflow state: the cut only rises; forgotten only at or above it.
    let k = || vec!["profile".to_owned()];
    log.mark_overflow(&k(), w + 5).await.unwrap();
    log.mark_overflow(&k(), w + 3).await.unwrap();
    assert_eq!(
        log.overflowed().await.unwrap(),
        vec![("profile".to_owned(), w + 5)]
    );
    log.clear_overflow(&[("profile".to_owned(), w + 4)])
        .await
        .unwrap();
    assert_eq!(log.overflowed().await.unwrap().len(), 1, "cut moved past");
    log.clear_overflow(&[("profile".to_owned(), w + 5)])
        .await
        .unwrap();
    assert!(log.overflowed().await.unwrap().is_empty());

    // Overflowed rows below the cut go, applied or not, any age.
    insert(&db, Uuid::new_v4()).await;
    insert(&db, Uuid::new_v4()).await;
    // A cut above both (a transaction left open elsewhere in the cluster
    // holds the watermark back a moment).
    let cut = watermark_past_rows(&log, 0).await;
    insert(&db, Uuid::new_v4()).await;
    assert_eq!(log.prune_overflowed(10).await.unwrap(), 0, "no overflow");
    log.mark_overflow(&k(), cut).await.unwrap();
    assert_eq!(log.prune_overflowed(1).await.unwrap(), 1);
    assert_eq!(log.prune_overflowed(10).await.unwrap(), 1);
    assert_eq!(
        log.backlog(0).await.unwrap(),
        1,
        "the row past the cut stays"
    );

    // The position mirror.
    assert_eq!(log.saved_position().await.unwrap(), None);
    log.save_position(w).await.unwrap();
    log.save_position(w + 1).await.unwrap();
    assert_eq!(log.saved_position().await.unwrap(), Some(w + 1));
    db.close().await;
}

/// The trap of reading by `seq`: a transaction that took a lower `seq`
/// commits after one with a higher `seq` was applied. Reading by the
/// snapshot's xmin, the relay does not move past the open transaction, and
/// applies its row once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_with_a_lower_seq_is_not_skipped() {
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        c.feed.mode = kura_server::config::FeedMode::Off;
    })
    .await;
    let (early, late) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(&early).await;
    app.create(&late).await;
    cached(&app, &early).await;
    cached(&app, &late).await;
    let db = app.server().service().db().clone();
    let relay =
        kura_server::ops::feed::relay(&db, app.server().service().cache(), &FeedConfig::default());
    relay.step().await.unwrap();

    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("UPDATE profiles SET name = 'early' WHERE user_id = $1")
        .bind(early)
        .execute(&mut *tx)
        .await
        .unwrap();
    let (txid, early_seq): (i64, i64) = sqlx::query_as(
        "SELECT pg_current_xact_id()::text::bigint, max(seq) FROM kura_invalidation_log",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    // Committed while `early` is still open, with a higher seq.
    sql(
        &app,
        &format!("UPDATE profiles SET name = 'late' WHERE user_id = '{late}'"),
    )
    .await;
    let (late_seq, late_txid): (i64, i64) = sqlx::query_as(
        "SELECT seq, txid::text::bigint FROM kura_invalidation_log ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        early_seq < late_seq,
        "the trap is set: {early_seq} < {late_seq}"
    );
    let r = relay.step().await.unwrap();
    assert!(
        r.position <= txid as u64,
        "the position stays at or below the open transaction: {r:?}, txid {txid}"
    );
    tx.commit().await.unwrap();
    // The watermark is cluster-wide: other tests' transactions can hold it
    // back for a moment, so step until it has passed both transactions (a
    // transaction of another test opened between the two can keep it
    // between them after the early one committed).
    let deadline = Instant::now() + BOUND;
    let both = txid.max(late_txid) as u64;
    while relay.step().await.unwrap().position <= both {
        assert!(
            Instant::now() < deadline,
            "the watermark never passed {both}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No relay runs in the server: only the steps above invalidated.
    for (user, name) in [(early, "early"), (late, "late")] {
        let admin = app.admin();
        let v: Value = app
            .get(&format!("/api/v1/profiles/{user}"), &admin)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["name"], name, "{user}");
    }
    app.stop().await;
}

/// A busy relay announces its polling window on PostgreSQL, where the
/// triggers read it to skip their NOTIFY; a log that does not listen, and
/// SQLite (no wake-ups), announce nothing, so the relay keeps its poll
/// interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_is_announced_where_writers_send_wake_ups() {
    let (db, _guard) = fresh_db(Backend::PgRedis).await;
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let ahead = async || -> Option<bool> {
        sqlx::query_scalar("SELECT polling_until > clock_timestamp() FROM kura_feed_relay")
            .fetch_optional(pool)
            .await
            .unwrap()
    };
    let quiet = SqlFeedLog::new(db.clone()).listen(false);
    assert!(!quiet.polling(Duration::from_secs(5)).await.unwrap());
    assert_eq!(
        ahead().await,
        None,
        "a log that does not listen says nothing"
    );
    let log = SqlFeedLog::new(db.clone());
    assert!(log.polling(Duration::from_secs(5)).await.unwrap());
    assert_eq!(ahead().await, Some(true));
    assert!(log.polling(Duration::ZERO).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        ahead().await,
        Some(false),
        "a new window replaces the old one"
    );
    let (lite, _lite_guard) = fresh_db(Backend::SqliteMemory).await;
    assert!(
        !SqlFeedLog::new(lite)
            .polling(Duration::from_secs(5))
            .await
            .unwrap()
    );
}

/// A transaction that changes many rows in several statements wakes the
/// relay once: PostgreSQL folds identical notifications of a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_notification_per_transaction() {
    let (db, _guard) = fresh_db(Backend::PgRedis).await;
    for _ in 0..20 {
        insert(&db, Uuid::new_v4()).await;
    }
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .unwrap();
    listener.listen("kura_invalidation").await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for _ in 0..3 {
        sqlx::query("UPDATE profiles SET name = name || '!'")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(first.is_ok(), "a wake-up for the transaction");
    let more = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(more.is_err(), "only one for 60 row changes in 3 statements");
}

/// Redis unreachable while the log grows past `--feed-max-backlog`: the
/// relay records an overflow and deletes the unapplied rows (the log stays
/// bounded); once Redis is back, the next step clears the type and moves
/// on, and no stale value is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_long_backlog_is_bounded_then_the_type_is_cleared() {
    let (db, _guard) = fresh_db(Backend::PgRedis).await;
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut config = kura_server::Config::default();
    config.redis_url = Some(format!("redis://{}", proxy.addr()));
    config.redis_timeout = Duration::from_millis(200);
    config.namespace = format!("ovf_{}", random_suffix());
    let (cache, _) = kura_server::app::open_cache(&config).unwrap();
    let service = kura_server::profiles::ProfileService::new(
        db.clone(),
        cache.clone(),
        kura_server::WriteStrategy::Invalidate,
    );
    let mut feed = FeedConfig::default();
    feed.max_backlog = 20;
    let relay = kura_server::ops::feed::relay(&db, &cache, &feed);
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        insert(&db, *u).await;
    }
    let pos = relay.step().await.unwrap().position;
    for u in &users {
        service.get(u).await.unwrap();
    }
    let raw = |u: &Uuid| format!("{}:profile:{u}", config.namespace);
    let direct = redis::Client::open(redis.url()).unwrap();
    let mut c = direct.get_multiplexed_async_connection().await.unwrap();
    for u in &users {
        let v: Option<String> = redis::cmd("GET")
            .arg(raw(u))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(v.is_some(), "cached before the outage");
    }

    proxy.blackhole();
    for round in 0..10 {
        exec(&db, &format!("UPDATE profiles SET name = 'round {round}'")).await;
    }
    let log = SqlFeedLog::new(db.clone());
    assert_eq!(log.backlog(pos).await.unwrap(), 50);
    assert!(relay.step().await.is_err(), "Redis is unreachable");
    assert_eq!(
        log.overflowed().await.unwrap().len(),
        kura_server::registry::fed_kinds().len(),
        "overflow recorded for every fed kind"
    );
    // Deleted below the cut, a watermark, which other tests' transactions
    // on the same cluster can hold back for a moment: step again until then.
    let deadline = Instant::now() + BOUND;
    while log.backlog(0).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "unapplied rows never deleted");
        assert!(relay.step().await.is_err(), "Redis is unreachable");
    }

    proxy.heal();
    let deadline = Instant::now() + BOUND;
    loop {
        match relay.step().await {
            Ok(r) if r.cleared.iter().any(|k| k == "profile") => break,
            Ok(r) => assert!(Instant::now() < deadline, "never cleared: {r:?}"),
            Err(e) => assert!(Instant::now() < deadline, "never reached Redis: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        log.overflowed().await.unwrap().is_empty(),
        "overflow forgotten"
    );
    for u in &users {
        let v: Option<String> = redis::cmd("GET")
            .arg(raw(u))
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(v.is_none(), "no stale value left: {v:?}");
        let p = service.get(u).await.unwrap();
        assert_eq!(p.value().unwrap().name.as_deref(), Some("round 9"));
    }
    db.close().await;
}
