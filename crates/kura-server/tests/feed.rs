//! The invalidation feed end to end: changes made in the database by
//! anyone (plain SQL, not kura) reach the cache, and so do kura's own
//! writes whose post-commit invalidation never reached Redis (the writer
//! cut off from Redis, or killed before it could replay it).
//!
//! In-process servers on PostgreSQL + the machine's Redis and on SQLite +
//! the memory store; the crash and partition cases run `kura serve` as
//! separate processes against a `redis-server` of their own, the writer's
//! link to it through a `FaultProxy`.

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kura_server::config::FeedConfig;
use kura_server::db::feed::SqlFeedLog;
use kura_server::db::{Db, PoolOptions};
use kura_server::profiles::model::NewProfile;
use kura_testkit::{FaultProxy, RedisServer, free_port};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, TestDb, random_suffix, token_with};
use uuid::Uuid;

/// How long a change may take to reach the cache. The profile TTL is 300 s,
/// so a missed invalidation cannot pass within it; the relay needs one
/// notification or poll (1 s on PostgreSQL, 100 ms on SQLite) and, when
/// another instance held the relay lease, that lease's expiry.
const BOUND: Duration = Duration::from_secs(20);

/// How soon another instance applies a change after the relay holder died
/// or was cut off from Redis.
const TAKEOVER: Duration = Duration::from_secs(3);

both_backends!(
    a_bad_log_row_does_not_halt_the_feed,
    versions_below_zero_are_refused_where_kura_owns_the_table,
    direct_sql_update_and_delete_reach_the_cache,
    migrate_installs_the_library_sql_once,
    log_reads_pages_prunes_and_keeps_overflow_state,
);

/// The relay on, as `kura serve` runs by default (support turns it off).
fn feed_on(c: &mut kura_server::Config) {
    c.feed.mode = kura_server::config::FeedMode::Log;
}

/// Runs one statement straight on the test's database, not through kura.
async fn sql(app: &TestApp, stmt: &str) -> u64 {
    app.direct_sql(stmt).await
}

/// GETs `user` until `done` holds for the answer (status, body); returns
/// how long that took. Panics past [`BOUND`] with the last answer.
async fn until(
    app: &TestApp,
    user: &Uuid,
    what: &str,
    done: impl Fn(StatusCode, &Value) -> bool,
) -> Duration {
    let admin = app.admin();
    let start = Instant::now();
    loop {
        let r = app.get(&format!("/api/v1/profiles/{user}"), &admin).await;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
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

/// Reads `user` until the answer is a cache hit.
async fn cached(app: &TestApp, user: &Uuid) -> Value {
    let admin = app.admin();
    for _ in 0..50 {
        let r = app.get(&format!("/api/v1/profiles/{user}"), &admin).await;
        assert_eq!(r.status(), StatusCode::OK);
        if support::x_cache(&r) == "hit" {
            return r.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{user} never became a cache hit");
}

/// A log row the relay cannot take as it is (here a negative version, as
/// a broken writer or a hand-made row leaves it): logged, counted, its
/// entity invalidated without a version, and the feed goes on with every
/// later change.
async fn a_bad_log_row_does_not_halt_the_feed(b: Backend) {
    let app = TestApp::start_with(b, feed_on).await;
    let (bad, user) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(&bad).await;
    app.create(&user).await;
    cached(&app, &bad).await;
    cached(&app, &user).await;
    sql(
        &app,
        &format!(
            "INSERT INTO kura_invalidation_log (kind, entity_id, version) \
             VALUES ('profile', '{bad}', -1)"
        ),
    )
    .await;
    sql(
        &app,
        &format!("UPDATE profiles SET name = 'after the bad row' WHERE user_id = '{user}'"),
    )
    .await;
    until(&app, &user, "the change after the bad row", |s, v| {
        s == StatusCode::OK && v["name"] == "after the bad row"
    })
    .await;
    // The bad row's entity was invalidated: its next read loads.
    let r = app
        .get(&format!("/api/v1/profiles/{bad}"), &app.admin())
        .await;
    assert_eq!(support::x_cache(&r), "miss");
    let m = app
        .http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bad_rows: f64 = m
        .lines()
        .find(|l| l.starts_with("cache_feed_bad_rows_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(bad_rows >= 1.0, "bad rows counted: {bad_rows}");
    app.stop().await;
}

/// The tables kura owns refuse a version below zero, whoever writes.
async fn versions_below_zero_are_refused_where_kura_owns_the_table(b: Backend) {
    let app = TestApp::start_with(b, feed_on).await;
    let user = Uuid::new_v4();
    let r = app
        .try_direct_sql(&format!(
            "INSERT INTO settings (user_id, data, updated_at, version) \
             VALUES ('{user}', '{{}}', '2026-01-01T00:00:00Z', -1)"
        ))
        .await;
    let refused = |r: &Result<u64, String>| {
        r.as_ref()
            .is_err_and(|e| e.to_ascii_lowercase().contains("check constraint"))
    };
    assert!(refused(&r), "a version of -1: {r:?}");
    app.create(&user).await;
    let r = app
        .try_direct_sql(&format!(
            "UPDATE profiles SET version = -5 WHERE user_id = '{user}'"
        ))
        .await;
    // Refused, or (PostgreSQL) raised by the feed's trigger, which bumps a
    // version an UPDATE set lower: never stored below zero.
    if r.is_ok() {
        let v: Value = app
            .get(&format!("/api/v1/profiles/{user}"), &app.admin())
            .await
            .json()
            .await
            .unwrap();
        assert!(v["version"].as_i64().unwrap() >= 0, "{v}");
    } else {
        assert!(refused(&r), "a version of -5: {r:?}");
    }
    app.stop().await;
}

async fn direct_sql_update_and_delete_reach_the_cache(b: Backend) {
    let app = TestApp::start_with(b, feed_on).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let before = cached(&app, &user).await;

    // An UPDATE that knows nothing of `version`: the trigger bumps it.
    let n = sql(
        &app,
        &format!("UPDATE profiles SET name = 'direct update' WHERE user_id = '{user}'"),
    )
    .await;
    assert_eq!(n, 1);
    let took = until(&app, &user, "direct UPDATE", |s, v| {
        s == StatusCode::OK && v["name"] == "direct update"
    })
    .await;
    let after = cached(&app, &user).await;
    assert_eq!(
        after["version"].as_i64().unwrap(),
        before["version"].as_i64().unwrap() + 1,
        "the trigger bumps the version of an UPDATE that left it unchanged"
    );
    eprintln!("{b:?}: direct UPDATE served after {took:?}");

    let n = sql(
        &app,
        &format!("DELETE FROM profiles WHERE user_id = '{user}'"),
    )
    .await;
    assert_eq!(n, 1);
    let took = until(&app, &user, "direct DELETE", |s, _| {
        s == StatusCode::NOT_FOUND
    })
    .await;
    eprintln!("{b:?}: direct DELETE served after {took:?}");
    app.stop().await;
}

/// `/healthz` at any request rate costs the database about one statement
/// per second in all (the report is kept for a second; the feed's part
/// comes from what the relay published in Redis), and shows no lease token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_costs_the_database_one_statement_per_second() {
    let db = TestDb::create().await;
    let pg = FaultProxy::start(support::pg_addr()).await;
    let url = db.url_via(pg.addr());
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        feed_on(c);
        c.database_url = Some(url);
    })
    .await;
    let health = || async {
        let v: Value = app
            .call(Method::GET, "/healthz", None, None)
            .await
            .json()
            .await
            .unwrap();
        v
    };
    // Until the relay has published what it measured.
    let deadline = Instant::now() + BOUND;
    while health().await["feed"]["lag_ms"].is_null() {
        assert!(Instant::now() < deadline, "no feed lag in /healthz");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = Duration::from_secs(2);
    // The database's traffic without /healthz calls (the relay polls it).
    let start = pg.bytes_up();
    tokio::time::sleep(window).await;
    let idle = pg.bytes_up() - start;
    // The same window with /healthz called as fast as 4 clients can.
    let start = pg.bytes_up();
    let until = Instant::now() + window;
    let mut calls = 0;
    let mut last = Value::Null;
    while Instant::now() < until {
        let (a, b, c, d) = tokio::join!(health(), health(), health(), health());
        calls += 4;
        for v in [a, b, c, d] {
            last = v;
        }
    }
    let busy = pg.bytes_up() - start;
    eprintln!("{calls} /healthz calls: {busy} bytes to PostgreSQL, {idle} without them");
    assert!(calls >= 100, "{calls} calls");
    // One `SELECT 1` is under 100 bytes: the checks of two seconds send a
    // few hundred. The relay's own polling varies by a step or two between
    // windows (a few hundred bytes each); a statement per call would send
    // hundreds of kilobytes.
    assert!(
        busy <= idle + 2_000,
        "{calls} /healthz calls sent {busy} bytes to PostgreSQL ({idle} without them)"
    );
    assert_eq!(last["database"], "ok", "{last}");
    let relaying = last["feed"]["relaying"].as_str().unwrap_or_default();
    assert!(
        !relaying.is_empty() && !relaying.contains('#'),
        "no token: {last}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_the_feed_lag_and_metrics_the_feed() {
    let app = TestApp::start_with(Backend::PgRedis, feed_on).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let deadline = Instant::now() + BOUND;
    let health = loop {
        let v: Value = app
            .call(Method::GET, "/healthz", None, None)
            .await
            .json()
            .await
            .unwrap();
        if v["feed"]["lag_ms"].is_u64() {
            break v;
        }
        assert!(Instant::now() < deadline, "no feed lag in {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["feed"]["state"], "on", "{health}");
    assert!(health["feed"]["backlog"].is_u64(), "{health}");
    let metrics = app
        .call(Method::GET, "/metrics", None, None)
        .await
        .text()
        .await
        .unwrap();
    for name in ["cache_feed_lag_seconds", "cache_feed_backlog"] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.stop().await;

    let off = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.feed.mode = kura_server::config::FeedMode::Off;
    })
    .await;
    let v: Value = off
        .call(Method::GET, "/healthz", None, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["feed"]["state"], "off", "{v}");
    assert!(v["feed"]["lag_ms"].is_null(), "{v}");
    off.stop().await;
}

/// `kura feed status --json` of a test's database and namespace.
fn feed_status(db: &str, redis: &str, ns: &str) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["feed", "status", "--json"])
        .env("DATABASE_URL", db)
        .env("REDIS_URL", redis)
        .env("KURA_NAMESPACE", ns)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run kura feed status");
    assert!(
        out.status.success(),
        "kura feed status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_status_json_shows_backlog_position_and_relay() {
    // No relay: a direct write stays in the backlog.
    let mut app = TestApp::start_with(Backend::PgRedis, |c| {
        c.feed.mode = kura_server::config::FeedMode::Off;
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let db = app.db.as_ref().unwrap().url.clone();
    let redis = app.redis_url.clone().unwrap();
    let ns = app.namespace.clone();
    sql(
        &app,
        &format!("UPDATE profiles SET name = 'x' WHERE user_id = '{user}'"),
    )
    .await;
    let s = feed_status(&db, &redis, &ns);
    assert!(s["backlog"].as_u64().unwrap() >= 2, "insert + update: {s}");
    assert!(s["relaying"].is_null(), "{s}");
    assert!(s["watermark"].is_u64(), "{s}");
    assert!(s["lag_ms"].as_u64().is_some(), "{s}");
    // The database outlives this server: the next one relays it.
    let _db = app.db.take();
    app.stop().await;

    // A relay on the same database and namespace applies it.
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        feed_on(c);
        c.database_url = Some(db.clone());
        c.namespace = ns.clone();
    })
    .await;
    let deadline = Instant::now() + BOUND;
    let s = loop {
        let s = feed_status(&db, &redis, &ns);
        if s["backlog"] == 0 && s["relaying"].is_string() {
            break s;
        }
        assert!(Instant::now() < deadline, "never applied: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(s["position"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["position"].as_u64() <= s["watermark"].as_u64(),
        "the position never passes the watermark: {s}"
    );
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["feed", "status"])
        .env("DATABASE_URL", &db)
        .env("REDIS_URL", &redis)
        .env("KURA_NAMESPACE", &ns)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("backlog"), "{text}");
    assert!(text.contains("relaying"), "{text}");
    app.stop().await;
}

/// A `kura serve` child process, killed (SIGKILL) when dropped.
struct Instance {
    child: tokio::process::Child,
    url: String,
}

impl Instance {
    async fn start(env: &HashMap<&str, String>) -> Instance {
        let port = free_port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kura"))
            .arg("serve")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("KURA_LISTEN", format!("127.0.0.1:{port}"))
            .env("KURA_REDIS_TIMEOUT", "200ms")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start kura serve");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    if v["redis"] == "ok" {
                        break;
                    }
                }
            }
            assert!(Instant::now() < deadline, "kura serve did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Instance { child, url }
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

/// What the processes of a test share.
struct Fleet {
    _db: TestDb,
    db_url: String,
    redis: RedisServer,
    ns: String,
    secret: String,
    http: reqwest::Client,
}

impl Fleet {
    async fn new() -> Fleet {
        let db = TestDb::create().await;
        Fleet {
            db_url: db.url.clone(),
            _db: db,
            redis: RedisServer::start().await,
            ns: format!("feed_{}", random_suffix()),
            secret: format!("secret-{}", random_suffix()),
            http: reqwest::Client::new(),
        }
    }

    fn env(&self, redis_url: String) -> HashMap<&'static str, String> {
        HashMap::from([
            ("DATABASE_URL", self.db_url.clone()),
            ("REDIS_URL", redis_url),
            ("KURA_NAMESPACE", self.ns.clone()),
            ("KURA_JWT_SECRET", self.secret.clone()),
        ])
    }

    fn admin(&self) -> String {
        token_with(
            &self.secret,
            &json!({"sub": Uuid::new_v4().to_string(), "exp": support::now() + 600, "roles": ["admin"]}),
        )
    }

    async fn create(&self, at: &Instance, user: &Uuid) {
        let r = self
            .http
            .post(format!("{}/api/v1/profiles", at.url))
            .bearer_auth(self.admin())
            .json(&json!({"user_id": user, "name": "before"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }

    async fn get(&self, at: &Instance, user: &Uuid) -> (String, Value) {
        let r = self
            .http
            .get(format!("{}/api/v1/profiles/{user}", at.url))
            .bearer_auth(self.admin())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        (support::x_cache(&r), r.json().await.unwrap())
    }

    /// Reads through `at` until the profile is a cache hit.
    async fn cache(&self, at: &Instance, user: &Uuid) {
        for _ in 0..50 {
            if self.get(at, user).await.0 == "hit" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("never cached");
    }

    async fn put_name(&self, at: &Instance, user: &Uuid, name: &str) {
        let r = self
            .http
            .put(format!("{}/api/v1/profiles/{user}", at.url))
            .bearer_auth(self.admin())
            .json(&json!({"name": name}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "the write commits");
    }

    /// The raw cached profile JSON in Redis, if any.
    async fn cached_raw(&self, user: &Uuid) -> Option<String> {
        let client = redis::Client::open(self.redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("GET")
            .arg(format!("{}:profile:{user}", self.ns))
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Reads through `at` until the name is `want`; returns how long.
    async fn until_name(&self, at: &Instance, user: &Uuid, want: &str) -> Duration {
        let start = Instant::now();
        loop {
            let (_, v) = self.get(at, user).await;
            if v["name"] == want {
                return start.elapsed();
            }
            assert!(start.elapsed() < BOUND, "still serving {v} after {BOUND:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_killed_while_redis_unreachable_leaves_no_stale_value() {
    let fleet = Fleet::new().await;
    let proxy = FaultProxy::start(fleet.redis.addr()).await;
    let writer = Instance::start(&fleet.env(format!("redis://{}", proxy.addr()))).await;
    let user = Uuid::new_v4();
    fleet.create(&writer, &user).await;
    fleet.cache(&writer, &user).await;

    proxy.blackhole();
    fleet.put_name(&writer, &user, "after").await;
    let raw = fleet.cached_raw(&user).await.expect("still cached");
    assert!(
        raw.contains("before"),
        "the writer could not invalidate: {raw}"
    );
    // Its pending invalidation dies with it.
    writer.kill().await;

    let other = Instance::start(&fleet.env(fleet.redis.url())).await;
    let took = fleet.until_name(&other, &user, "after").await;
    eprintln!("new value served by the other instance after {took:?}");
    // The dead writer held the relay lease: another instance takes it and
    // applies the change within 3 s of being up.
    assert!(took < TAKEOVER, "new value served after {took:?}");
    if let Some(raw) = fleet.cached_raw(&user).await {
        assert!(raw.contains("after"), "no stale copy left: {raw}");
    }
    other.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_alone_black_holed_the_other_instance_serves_the_new_value() {
    let fleet = Fleet::new().await;
    let proxy = FaultProxy::start(fleet.redis.addr()).await;
    let writer = Instance::start(&fleet.env(format!("redis://{}", proxy.addr()))).await;
    let reader = Instance::start(&fleet.env(fleet.redis.url())).await;
    let user = Uuid::new_v4();
    fleet.create(&reader, &user).await;
    fleet.cache(&reader, &user).await;

    proxy.blackhole();
    fleet.put_name(&writer, &user, "after").await;
    let took = fleet.until_name(&reader, &user, "after").await;
    eprintln!("new value served by the reader after {took:?}");
    // Whichever instance held the relay lease, the one that reaches Redis
    // applies the change within 3 s of the commit.
    assert!(took < TAKEOVER, "new value served after {took:?}");
    writer.kill().await;
    reader.kill().await;
}

// --- The log itself: installation, positions, the late-commit trap, NOTIFY,
// --- bounds. These run the service's SQL (SqlFeedLog) on real databases.

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
