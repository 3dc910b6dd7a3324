//! The WAL feed end to end, on a PostgreSQL cluster of the test's own with
//! `wal_level = logical` (never the shared server, whose settings tests
//! do not change) and the machine's Redis under a namespace per test:
//! changes made in the database by anyone reach the cache with no trigger
//! in the fed tables; a bulk transaction clears its type; takeover by
//! another instance; read-your-writes; what is refused at start. Outages
//! (a lost slot, a SIGKILL, Redis down): `wal_feed_outages.rs`.

mod support;

use std::time::{Duration, Instant};

use kura::feed::source::wal::WalTable;
use kura_server::config::FeedMode;
use kura_server::db::feed::wal::check_tables;
use kura_server::db::{Db, PoolOptions};
use reqwest::StatusCode;
use support::wal::*;
use support::{TestDb, random_suffix};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_changes_reach_the_cache_without_a_trigger() {
    let (_pg, db, ns) = fresh().await;
    let app = serve(&db, &ns, |_| {})
        .await
        .expect("serves with the WAL feed");
    for table in ["profiles", "settings", "preferences", "revocations"] {
        assert_eq!(triggers_on(&app, table).await, 0, "a trigger on {table}");
    }
    let user = Uuid::new_v4();
    app.create(&user).await;
    cached(&app, &user).await;

    // A writer that leaves the version as it was.
    app.direct_sql(&format!(
        "UPDATE profiles SET first_name = 'psql' WHERE user_id = '{user}'"
    ))
    .await;
    let took = until(&app, &user, "UPDATE without a version bump", |s, b| {
        s == StatusCode::OK && b["first_name"] == "psql"
    })
    .await;
    eprintln!("update seen after {took:?}");

    // A transaction committed after a shorter one that started later: both
    // seen, in commit order.
    let other = Uuid::new_v4();
    app.create(&other).await;
    cached(&app, &other).await;
    cached(&app, &user).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut long = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE profiles SET first_name = 'long' WHERE user_id = '{user}'"
    )))
    .execute(&mut *long)
    .await
    .unwrap();
    app.direct_sql(&format!(
        "UPDATE profiles SET first_name = 'short' WHERE user_id = '{other}'"
    ))
    .await;
    until(&app, &other, "the short transaction", |_, b| {
        b["first_name"] == "short"
    })
    .await;
    assert_eq!(
        get(&app, &user).await.2["first_name"],
        "psql",
        "not committed yet"
    );
    long.commit().await.unwrap();
    until(&app, &user, "the long transaction", |_, b| {
        b["first_name"] == "long"
    })
    .await;

    // A DELETE names the entity by its replica identity.
    cached(&app, &user).await;
    app.direct_sql(&format!("DELETE FROM profiles WHERE user_id = '{user}'"))
        .await;
    until(&app, &user, "DELETE", |s, _| s == StatusCode::NOT_FOUND).await;

    // An INSERT of a profile first read as missing.
    let late = Uuid::new_v4();
    assert_eq!(get(&app, &late).await.0, StatusCode::NOT_FOUND);
    app.direct_sql(&format!(
        "INSERT INTO profiles (id, user_id, first_name) VALUES ('{}', '{late}', 'inserted')",
        Uuid::new_v4()
    ))
    .await;
    until(&app, &late, "INSERT", |s, b| {
        s == StatusCode::OK && b["first_name"] == "inserted"
    })
    .await;

    // TRUNCATE clears the type.
    cached(&app, &other).await;
    app.direct_sql("TRUNCATE profiles").await;
    until(&app, &other, "TRUNCATE", |s, _| s == StatusCode::NOT_FOUND).await;
    pool.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transaction_clears_its_type() {
    let (_pg, db, ns) = fresh().await;
    let app = serve(&db, &ns, |c| c.feed.bulk_clear = 3).await.unwrap();
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        app.create(u).await;
        cached(&app, u).await;
    }
    let before = stamp(&app).await;
    app.direct_sql("UPDATE profiles SET first_name = 'bulk'")
        .await;
    for u in &users {
        until(&app, u, "bulk UPDATE", |_, b| b["first_name"] == "bulk").await;
    }
    // The type was cleared (its stamp moved), not invalidated row by row.
    let after = stamp(&app).await;
    assert!(
        after.is_some() && after != before,
        "{before:?} -> {after:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_takes_the_slot_when_the_holder_stops() {
    let (_pg, db, ns) = fresh().await;
    let first = serve(&db, &ns, |_| {}).await.unwrap();
    let second = serve(&db, &ns, |_| {}).await.unwrap();
    let user = Uuid::new_v4();
    first.create(&user).await;
    cached(&second, &user).await;
    // The holder goes (its keys stay: the cached value too).
    let mut first = first;
    first.server.take().unwrap().shutdown().await.unwrap();
    assert_eq!(get(&second, &user).await.1, "hit");
    let start = Instant::now();
    second
        .direct_sql(&format!(
            "UPDATE profiles SET first_name = 'taken over' WHERE user_id = '{user}'"
        ))
        .await;
    until(&second, &user, "after the holder stopped", |_, b| {
        b["first_name"] == "taken over"
    })
    .await;
    let took = start.elapsed();
    eprintln!("takeover and apply after {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_without_logical_decoding_refuses_to_start_and_auto_falls_back() {
    // The shared server runs with wal_level = replica: `wal` is refused
    // with what to change, `auto` relays from the trigger log.
    let db = TestDb::create().await;
    let ns = format!("w_{}", random_suffix());
    let level: String = {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let l = sqlx::query_scalar("SELECT current_setting('wal_level')")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        l
    };
    if level == "logical" {
        eprintln!("the shared server has logical decoding: nothing to refuse");
        return;
    }
    let err = match serve(&db, &ns, |_| {}).await {
        Err(e) => e,
        Ok(app) => {
            app.stop().await;
            panic!("started without logical decoding");
        }
    };
    assert!(
        err.contains("ALTER SYSTEM SET wal_level = logical") && err.contains("restart"),
        "{err}"
    );
    let app = serve(&db, &ns, |c| c.feed.mode = FeedMode::Auto)
        .await
        .unwrap();
    assert!(
        triggers_on(&app, "profiles").await > 0,
        "auto: the trigger log"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_id_is_not_its_replica_identity_is_refused() {
    let pg = logical_cluster();
    let db = database(&pg).await;
    let conn = Db::connect(Some(&db.url), PoolOptions::default())
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE nopk (doc_id TEXT, body TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE keyed (id INT PRIMARY KEY, doc_id TEXT UNIQUE NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let table = |name: &str| WalTable {
        schema: "public".into(),
        table: name.into(),
        kind: "document".into(),
        id_column: "doc_id".into(),
    };
    for name in ["nopk", "keyed"] {
        let why = check_tables(&conn, &[table(name)])
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            why.contains(name) && why.contains("replica identity") && why.contains("doc_id"),
            "{why}"
        );
    }
    let missing = check_tables(&conn, &[table("absent")])
        .await
        .unwrap()
        .unwrap_err();
    assert!(missing.contains("does not exist"), "{missing}");
    // kura's own tables pass (profiles by its replica identity index).
    assert_eq!(
        check_tables(&conn, &kura_server::db::feed::wal_tables())
            .await
            .unwrap(),
        Err("fed table \"public\".\"profiles\" does not exist".to_owned()),
        "before the migration"
    );
    conn.migrate_schema().await.unwrap();
    assert_eq!(
        check_tables(&conn, &kura_server::db::feed::wal_tables())
            .await
            .unwrap(),
        Ok(())
    );
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_from_the_log_to_the_wal_removes_the_triggers() {
    let pg = logical_cluster();
    let db = database(&pg).await;
    let conn = Db::connect(Some(&db.url), PoolOptions::default())
        .await
        .unwrap();
    conn.migrate().await.unwrap();
    let count = || async {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'kura_feed_%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        n
    };
    assert!(count().await > 0, "the log's triggers");
    let done = conn.install_wal_feed("kura_move", true).await.unwrap();
    assert!(
        done.triggers_removed && done.publication && done.slot,
        "{done:?}"
    );
    assert_eq!(count().await, 0);
    // Idempotent.
    let again = conn.install_wal_feed("kura_move", true).await.unwrap();
    assert_eq!(again, kura_server::db::feed::WalInstalled::default());
    conn.remove_wal_feed("kura_move").await.unwrap();
    conn.close().await;
}

#[test]
fn feed_sql_prints_the_publication_of_the_fed_tables() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["feed", "sql", "--mode", "wal", "--namespace", "shop"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("CREATE PUBLICATION \"kura_shop\" FOR TABLE \"public\".\"profiles\""),
        "{text}"
    );
    assert!(text.contains("pg_create_logical_replication_slot('kura_shop', 'pgoutput')"));
    assert!(!text.contains("TRIGGER"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_through_kura_is_read_at_once_with_the_wal_feed() {
    let (_pg, db, ns) = fresh().await;
    let app = serve(&db, &ns, |_| {}).await.unwrap();
    let user = Uuid::new_v4();
    app.create(&user).await;
    for i in 0..20 {
        cached(&app, &user).await;
        let name = format!("put {i}");
        let r = app
            .call(
                reqwest::Method::PUT,
                &format!("/api/v1/profiles/{user}"),
                Some(&app.token(&user, false)),
                Some(&serde_json::json!({ "first_name": name })),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        // The writer's own invalidation: the next read, at once, is the new row.
        assert_eq!(get(&app, &user).await.2["first_name"], name.as_str());
    }
    app.stop().await;
}

#[tokio::test]
async fn sqlite_keeps_the_trigger_log() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("kura.db").display());
    let db = Db::connect(Some(&url), PoolOptions::default())
        .await
        .unwrap();
    let mut config = kura_server::config::FeedConfig::default();
    assert_eq!(
        kura_server::ops::feed::plan(&db, &config).await.unwrap(),
        kura_server::ops::feed::Plan::Log
    );
    config.mode = FeedMode::Wal;
    let err = kura_server::ops::feed::plan(&db, &config)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs PostgreSQL"), "{err}");
    db.close().await;
}
