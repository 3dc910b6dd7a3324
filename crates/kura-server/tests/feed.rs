//! The invalidation feed end to end: changes made in the database by
//! anyone (plain SQL, not kura) reach the cache, and so do kura's own
//! writes whose post-commit invalidation never reached Redis (the writer
//! cut off from Redis, or killed before it could replay it).
//!
//! In-process servers on PostgreSQL + the machine's Redis and on SQLite +
//! the memory store; the crash and partition cases run `kura serve` as
//! separate processes against a `redis-server` of their own, the writer's
//! link to it through a `FaultProxy`. The log itself (installation,
//! positions, wake-ups, bounds): `feed_log.rs`.

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kura_testkit::{FaultProxy, RedisServer, free_port};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::feed::*;
use support::{Backend, TestApp, TestDb, random_suffix, token_with};
use uuid::Uuid;

/// How soon another instance applies a change after the relay holder died
/// or was cut off from Redis.
const TAKEOVER: Duration = Duration::from_secs(3);

both_backends!(
    a_bad_log_row_does_not_halt_the_feed,
    versions_below_zero_are_refused_where_kura_owns_the_table,
    direct_sql_update_and_delete_reach_the_cache,
);

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
