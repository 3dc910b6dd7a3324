//! The WAL feed through outages, on a PostgreSQL cluster of the test's own
//! with `wal_level = logical`: a slot lost or invalidated by PostgreSQL is
//! made again after a clear; the consumer SIGKILLed mid-batch skips nothing;
//! Redis down for 30 s holds the slot's confirmation and loses nothing.

mod support;

use std::time::{Duration, Instant};

use kura_server::db::{Db, PoolOptions};
use kura_testkit::PgServer;
use reqwest::StatusCode;
use serde_json::Value;
use support::random_suffix;
use support::wal::*;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_clears_the_fed_types_instead_of_serving_stale_values() {
    let (_pg, db, ns) = fresh().await;
    let app = serve(&db, &ns, |_| {}).await.unwrap();
    let user = Uuid::new_v4();
    app.create(&user).await;
    cached(&app, &user).await;
    let (_, _, before) = get(&app, &user).await;
    // Every instance down (its values stay in Redis); meanwhile a change,
    // and the slot gone (a failover to a standby without it, or PostgreSQL
    // invalidated it).
    let mut app = app;
    app.server.take().unwrap().shutdown().await.unwrap();
    assert!(
        app.redis_get(&app.key(&user)).await.is_some(),
        "the value is still cached"
    );
    let direct = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE profiles SET first_name = 'while down' WHERE user_id = '{user}'"
    )))
    .execute(&direct)
    .await
    .unwrap();
    let slot = kura_server::db::feed::wal_names(&ns);
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&direct)
        .await
        .unwrap();
    direct.close().await;
    assert_ne!(before["first_name"], "while down");
    // The value cached before is still in Redis; a new instance must not
    // serve it.
    let app = serve(&db, &ns, |_| {}).await.unwrap();
    let took = until(&app, &user, "after the slot was lost", |s, b| {
        s == StatusCode::OK && b["first_name"] == "while down"
    })
    .await;
    eprintln!("cleared and reloaded after {took:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_skips_nothing_and_the_other_takes_over() {
    let (_pg, db, ns) = fresh().await;
    let secret = format!("secret-{}", random_suffix());
    // The schema and the slot, as `kura migrate` makes them.
    let conn = Db::connect(Some(&db.url), PoolOptions::default())
        .await
        .unwrap();
    conn.migrate_schema().await.unwrap();
    conn.install_wal_feed(&kura_server::db::feed::wal_names(&ns), true)
        .await
        .unwrap();
    let a = spawn_serve(&db.url, &ns, &secret).await;
    let b = spawn_serve(&db.url, &ns, &secret).await;
    let holder = relaying(&a.url).await;
    let (victim, survivor) = if holder.ends_with(&format!("-{}", a.pid)) {
        (a, b)
    } else {
        (b, a)
    };
    let token = support::token_with(
        &secret,
        &serde_json::json!({"sub": Uuid::new_v4().to_string(), "exp": support::now() + 600, "roles": ["admin"]}),
    );
    let http = reqwest::Client::new();
    let users: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    for u in &users {
        sqlx::query("INSERT INTO profiles (id, user_id, first_name) VALUES ($1, $2, 'before')")
            .bind(Uuid::new_v4())
            .bind(u)
            .execute(&pool)
            .await
            .unwrap();
    }
    let read = |u: Uuid| {
        let (http, token, url) = (http.clone(), token.clone(), survivor.url.clone());
        async move {
            let r = http
                .get(format!("{url}/api/v1/profiles/{u}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let hit = r
                .headers()
                .get("x-cache")
                .is_some_and(|v| v.as_bytes() == b"hit");
            let v: Value = r.json().await.unwrap();
            (hit, v["first_name"].as_str().unwrap_or_default().to_owned())
        }
    };
    // Every profile cached, as "before".
    for u in &users {
        let start = Instant::now();
        while read(*u).await != (true, "before".to_owned()) {
            assert!(start.elapsed() < BOUND, "never cached");
        }
    }
    // One transaction per profile while the holder is SIGKILLed midway.
    let writer = {
        let (pool, users) = (pool.clone(), users.clone());
        tokio::spawn(async move {
            for u in users {
                sqlx::query("UPDATE profiles SET first_name = 'after' WHERE user_id = $1")
                    .bind(u)
                    .execute(&pool)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut victim = victim;
    victim.child.kill().await.unwrap();
    let killed = Instant::now();
    writer.await.unwrap();
    for u in &users {
        let start = Instant::now();
        loop {
            let (_, name) = read(*u).await;
            if name == "after" {
                break;
            }
            assert!(
                start.elapsed() < BOUND,
                "{u}: the change was skipped ({name})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let took = killed.elapsed();
    eprintln!("every change seen {took:?} after the SIGKILL");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    pool.close().await;
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_30_s_stops_confirming_and_nothing_is_lost() {
    let (_pg, db, ns) = fresh().await;
    let proxy = kura_testkit::FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let app = serve(&db, &ns, |c| {
        c.redis_url = Some(format!("redis://{}", proxy.addr()));
    })
    .await
    .unwrap();
    let user = Uuid::new_v4();
    app.create(&user).await;
    cached(&app, &user).await;
    let confirmed = || async {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let lsn: String = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(kura_server::db::feed::wal_names(&ns))
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        lsn
    };
    proxy.blackhole();
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.direct_sql(&format!(
        "UPDATE profiles SET first_name = 'during the outage' WHERE user_id = '{user}'"
    ))
    .await;
    // Reads go on from the database meanwhile.
    let (status, _, body) = get(&app, &user).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["first_name"], "during the outage");
    let held = confirmed().await;
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(
        confirmed().await,
        held,
        "confirmed while Redis was unreachable"
    );
    proxy.heal();
    // Once the relay is back, the change made during the outage is applied:
    // what Redis serves is the new value, not the one cached before.
    let healed = Instant::now();
    loop {
        let (_, cache, body) = get(&app, &user).await;
        if cache == "hit" && body["first_name"] == "during the outage" {
            break;
        }
        assert!(
            healed.elapsed() < BOUND,
            "after Redis came back: {cache} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("applied {:?} after Redis came back", healed.elapsed());
    let start = Instant::now();
    while confirmed().await == held {
        assert!(
            start.elapsed() < BOUND,
            "never confirmed after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_postgresql_invalidated_is_made_again_after_a_clear() {
    // The slot may keep at most 1 MB of WAL past what was confirmed.
    let pg = PgServer::start(&[
        ("wal_level", "logical"),
        ("max_replication_slots", "10"),
        ("max_wal_senders", "10"),
        ("max_slot_wal_keep_size", "1MB"),
        ("min_wal_size", "32MB"),
        ("max_wal_size", "32MB"),
    ]);
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
    let mut app = serve(&db, &ns, |_| {}).await.unwrap();
    let user = Uuid::new_v4();
    app.create(&user).await;
    cached(&app, &user).await;
    app.server.take().unwrap().shutdown().await.unwrap();
    // No consumer: a change, then WAL past the bound, then checkpoints.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE profiles SET first_name = 'past the bound' WHERE user_id = '{user}'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let slot = kura_server::db::feed::wal_names(&ns);
    let start = Instant::now();
    loop {
        sqlx::query("CREATE TABLE IF NOT EXISTS filler (x TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 5000)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("SELECT pg_switch_wal()")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("CHECKPOINT").execute(&pool).await.unwrap();
        let status: Option<String> =
            sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&slot)
                .fetch_one(&pool)
                .await
                .unwrap();
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "slot still {status:?}"
        );
    }
    pool.close().await;
    drop(app);
    let app2 = serve(&db, &ns, |_| {}).await.unwrap();
    until(&app2, &user, "after the slot was invalidated", |s, b| {
        s == StatusCode::OK && b["first_name"] == "past the bound"
    })
    .await;
    // The slot is usable again: a later change is streamed.
    app2.direct_sql(&format!(
        "UPDATE profiles SET first_name = 'streamed again' WHERE user_id = '{user}'"
    ))
    .await;
    cached(&app2, &user).await;
    until(&app2, &user, "on the new slot", |_, b| {
        b["first_name"] == "streamed again"
    })
    .await;
    app2.stop().await;
}
