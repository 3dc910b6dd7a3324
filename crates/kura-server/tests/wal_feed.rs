//! The WAL feed end to end, on a PostgreSQL cluster of the test's own with
//! `wal_level = logical` (never the shared server, whose settings tests
//! do not change) and the machine's Redis under a namespace per test:
//! changes made in the database by anyone reach the cache with no trigger
//! in the fed tables; a lost slot clears instead of serving stale values;
//! a bulk transaction clears its type; takeover by another instance; what
//! is refused at start.

mod support;

use std::time::{Duration, Instant};

use kura::feed::source::wal::WalTable;
use kura_server::config::FeedMode;
use kura_server::db::feed::wal::check_tables;
use kura_server::db::{Db, PoolOptions};
use kura_testkit::PgServer;
use reqwest::StatusCode;
use serde_json::Value;
use support::{Backend, TestApp, TestDb, base_config, random_suffix, redis_url};
use uuid::Uuid;

/// How long a change may take to reach the cache (the profile TTL is
/// 300 s: a missed invalidation cannot pass within it).
const BOUND: Duration = Duration::from_secs(10);

/// A cluster of this test's own with logical decoding.
async fn stamp(app: &TestApp) -> Option<String> {
    let mut c = app.redis().await;
    redis::cmd("HGET")
        .arg(format!("{}:~stamps", app.namespace))
        .arg("kind:profile")
        .query_async::<Option<String>>(&mut c)
        .await
        .unwrap()
}

fn logical_cluster() -> PgServer {
    PgServer::start(&[
        ("wal_level", "logical"),
        ("max_replication_slots", "10"),
        ("max_wal_senders", "10"),
    ])
}

/// A database of its own on `pg`.
async fn database(pg: &PgServer) -> TestDb {
    let name = format!("kura_w_{}", random_suffix());
    let admin = sqlx::PgPool::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    TestDb {
        url: pg.url(&name),
        name,
    }
}

/// A server on `db` with the WAL feed (`mode`), in namespace `ns`.
async fn serve(
    db: &TestDb,
    ns: &str,
    tweak: impl FnOnce(&mut kura_server::Config),
) -> Result<TestApp, String> {
    let secret = format!("secret-{}", random_suffix());
    let mut c = base_config(&secret);
    c.namespace = ns.to_owned();
    c.database_url = Some(db.url.clone());
    c.redis_url = Some(redis_url());
    c.feed.mode = FeedMode::Wal;
    tweak(&mut c);
    let server = kura_server::serve(c).await.map_err(|e| format!("{e:#}"))?;
    Ok(TestApp {
        url: server.url(),
        server: Some(server),
        http: reqwest::Client::new(),
        secret,
        namespace: ns.to_owned(),
        redis_url: Some(redis_url()),
        backend: Backend::PgRedis,
        db: Some(TestDb {
            name: db.name.clone(),
            url: db.url.clone(),
        }),
        tmp: None,
    })
}

async fn get(app: &TestApp, user: &Uuid) -> (StatusCode, String, Value) {
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    let status = r.status();
    let cache = support::x_cache(&r);
    (status, cache, r.json().await.unwrap_or(Value::Null))
}

/// GETs `user` until `done`; returns how long it took.
async fn until(
    app: &TestApp,
    user: &Uuid,
    what: &str,
    done: impl Fn(StatusCode, &Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _, body) = get(app, user).await;
        if done(status, &body) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < BOUND,
            "{what}: still {status} {body} after {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `user` until the answer is a hit (it is cached).
async fn cached(app: &TestApp, user: &Uuid) {
    let start = Instant::now();
    while get(app, user).await.1 != "hit" {
        assert!(start.elapsed() < BOUND, "never a hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn triggers_on(app: &TestApp, table: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&app.db.as_ref().unwrap().url)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgrelid = '{table}'::regclass"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_changes_reach_the_cache_without_a_trigger() {
    let pg = logical_cluster();
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
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
async fn a_lost_slot_clears_the_fed_types_instead_of_serving_stale_values() {
    let pg = logical_cluster();
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
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
async fn a_bulk_transaction_clears_its_type() {
    let pg = logical_cluster();
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
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
    let pg = logical_cluster();
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
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

/// `kura serve` as a process of its own (so that it can be SIGKILLed).
struct Proc {
    child: tokio::process::Child,
    url: String,
    pid: u32,
}

async fn spawn_serve(db_url: &str, ns: &str, secret: &str) -> Proc {
    let port = kura_testkit::free_port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("serve")
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", redis_url())
        .env("KURA_NAMESPACE", ns)
        .env("KURA_JWT_SECRET", secret)
        .env("KURA_INVALIDATION_FEED", "wal")
        .env("KURA_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start kura serve");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/healthz")).await {
            if r.json::<Value>().await.is_ok_and(|v| v["redis"] == "ok") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "kura serve did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.id().expect("running");
    Proc { child, url, pid }
}

/// The instance `/healthz` names as streaming the slot.
async fn relaying(url: &str) -> String {
    let deadline = Instant::now() + BOUND;
    loop {
        let v: Value = reqwest::get(format!("{url}/healthz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(name) = v["feed"]["relaying"].as_str() {
            return name.to_owned();
        }
        assert!(Instant::now() < deadline, "no instance relays: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_skips_nothing_and_the_other_takes_over() {
    let pg = logical_cluster();
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
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
    let pg = logical_cluster();
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_through_kura_is_read_at_once_with_the_wal_feed() {
    let pg = logical_cluster();
    let db = database(&pg).await;
    let ns = format!("w_{}", random_suffix());
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
