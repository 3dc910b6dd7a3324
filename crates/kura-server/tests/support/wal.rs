//! Shared by the WAL feed tests (`wal_feed.rs`, `wal_feed_outages.rs`): a
//! PostgreSQL cluster of the test's own with `wal_level = logical`, a server
//! on it with the WAL feed, reads that wait for a change to be served, and
//! `kura serve` as a process of its own.

use std::time::{Duration, Instant};

use kura_server::config::FeedMode;
use kura_testkit::PgServer;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use super::{Backend, TestApp, TestDb, base_config, random_suffix, redis_url};

/// How long a change may take to reach the cache (the profile TTL is
/// 300 s: a missed invalidation cannot pass within it).
pub const BOUND: Duration = Duration::from_secs(10);

/// A cluster of this test's own with logical decoding.
pub async fn stamp(app: &TestApp) -> Option<String> {
    let mut c = app.redis().await;
    redis::cmd("HGET")
        .arg(format!("{}:~stamps", app.namespace))
        .arg("kind:profile")
        .query_async::<Option<String>>(&mut c)
        .await
        .unwrap()
}

/// A cluster of its own with logical decoding, a database on it and a key
/// namespace: what most WAL feed tests start from (keep the cluster alive).
pub async fn fresh() -> (PgServer, TestDb, String) {
    let pg = logical_cluster();
    let db = database(&pg).await;
    (pg, db, format!("w_{}", random_suffix()))
}

pub fn logical_cluster() -> PgServer {
    PgServer::start(&[
        ("wal_level", "logical"),
        ("max_replication_slots", "10"),
        ("max_wal_senders", "10"),
    ])
}

/// A database of its own on `pg`.
pub async fn database(pg: &PgServer) -> TestDb {
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
pub async fn serve(
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

pub async fn get(app: &TestApp, user: &Uuid) -> (StatusCode, String, Value) {
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    let status = r.status();
    let cache = super::x_cache(&r);
    (status, cache, r.json().await.unwrap_or(Value::Null))
}

/// GETs `user` until `done`; returns how long it took.
pub async fn until(
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
pub async fn cached(app: &TestApp, user: &Uuid) {
    let start = Instant::now();
    while get(app, user).await.1 != "hit" {
        assert!(start.elapsed() < BOUND, "never a hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn triggers_on(app: &TestApp, table: &str) -> i64 {
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

/// `kura serve` as a process of its own (so that it can be SIGKILLed).
pub struct Proc {
    pub child: tokio::process::Child,
    pub url: String,
    pub pid: u32,
}

pub async fn spawn_serve(db_url: &str, ns: &str, secret: &str) -> Proc {
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
pub async fn relaying(url: &str) -> String {
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
