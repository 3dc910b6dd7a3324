//! Failures: Redis down (reads and writes still answer from the database,
//! health says degraded), the database down (503), and slow requests (504).

mod support;

use std::time::{Duration, Instant};

use kura_testkit::{FaultProxy, RedisServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, TestDb, expect_detail, x_cache};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_reads_and_writes_answer_from_the_database() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        c.redis_url = Some(url.clone());
        c.redis_timeout = Duration::from_millis(100);
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    assert_eq!(x_cache(&app.get(&path, &owner).await), "miss");
    assert_eq!(x_cache(&app.get(&path, &owner).await), "hit");

    redis.stop().await;

    let started = Instant::now();
    for _ in 0..5 {
        let r = app.get(&path, &owner).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["first_name"], "太郎");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded latency with Redis down: {:?}",
        started.elapsed()
    );
    let r = app.get(&path, &owner).await;
    assert_eq!(x_cache(&r), "bypass");

    for strategy in ["invalidate", "through"] {
        let name = format!("{strategy}太郎");
        let r = app
            .call(
                Method::PUT,
                &format!("{path}?strategy={strategy}"),
                Some(&owner),
                Some(&json!({"first_name": name})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{strategy} with Redis down");
        let r = app.get(&path, &owner).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.json::<Value>().await.unwrap()["first_name"],
            name.as_str()
        );
    }
    let other = Uuid::new_v4();
    app.create(&other).await;
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/profiles/{other}"),
            Some(&app.admin()),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "Redis down is degraded, not unhealthy"
    );
    assert_eq!(
        without_feed(r.json::<Value>().await.unwrap()),
        json!({"status": "degraded", "database": "ok", "redis": "down"})
    );
    // Admin operations that need Redis say so.
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/profiles",
            Some(&app.admin()),
            None,
        )
        .await;
    expect_detail(r, StatusCode::SERVICE_UNAVAILABLE).await;

    // Back up: the cache is used again and holds the newest row.
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.get(&path, &owner).await;
        let status = x_cache(&r);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["first_name"], "through太郎", "never an older row");
        if status == "hit" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache is used again after Redis returns"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.json::<Value>().await.unwrap()["redis"], "ok");
    app.stop().await;
    redis.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_start_is_not_fatal() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    redis.stop().await;
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.redis_url = Some(url.clone());
        c.redis_timeout = Duration::from_millis(100);
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&r), "bypass");
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["redis"], "down");
    app.stop().await;
}

/// A server whose PostgreSQL connections go through a fault proxy.
async fn behind_proxy(request_timeout: Duration) -> (TestApp, FaultProxy, TestDb) {
    let db = TestDb::create().await;
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = FaultProxy::start(pg).await;
    let url = db.url.replace("127.0.0.1:5432", &proxy.addr().to_string());
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.database_url = Some(url);
        c.pool.acquire_timeout = Duration::from_secs(1);
        c.request_timeout = request_timeout;
    })
    .await;
    (app, proxy, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_is_503_and_cached_profiles_still_answer() {
    if !support::pg_base().contains("127.0.0.1:5432") {
        return;
    }
    let (app, proxy, _db) = behind_proxy(Duration::from_secs(10)).await;
    let (cached, uncached) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(&cached).await;
    app.create(&uncached).await;
    let admin = app.admin();
    app.get(&format!("/api/v1/profiles/{cached}"), &admin).await;

    proxy.refuse();
    let r = app.get(&format!("/api/v1/profiles/{cached}"), &admin).await;
    assert_eq!(r.status(), StatusCode::OK, "a hit needs no database");
    assert_eq!(x_cache(&r), "hit");
    let r = app
        .get(&format!("/api/v1/profiles/{uncached}"), &admin)
        .await;
    assert_eq!(
        expect_detail(r, StatusCode::SERVICE_UNAVAILABLE).await,
        "database unavailable"
    );
    let r = app
        .call(
            Method::PUT,
            &format!("/api/v1/profiles/{cached}"),
            Some(&admin),
            Some(&json!({"first_name": "次郎"})),
        )
        .await;
    expect_detail(r, StatusCode::SERVICE_UNAVAILABLE).await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        without_feed(r.json::<Value>().await.unwrap()),
        json!({"status": "unhealthy", "database": "down", "redis": "memory"})
    );

    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.call(Method::GET, "/healthz", None, None).await;
        if r.status() == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "healthy again after the database returns"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_answer_504() {
    if !support::pg_base().contains("127.0.0.1:5432") {
        return;
    }
    let (app, proxy, _db) = behind_proxy(Duration::from_millis(300)).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    proxy.set_latency(Duration::from_millis(400));
    let started = Instant::now();
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    assert_eq!(
        expect_detail(r, StatusCode::GATEWAY_TIMEOUT).await,
        "request timed out"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    proxy.heal();
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "answers again once the database is fast"
    );
    app.stop().await;
}

/// A write that fails may still commit later, so its profile is
/// invalidated again once its row is free. With many failed writes (here
/// every row is locked by another transaction and the service's
/// statements give up after `lock_timeout`), those waits are few at a
/// time: at most two connections wait on a row lock for them at any
/// moment, however many writes failed; and they still invalidate every
/// profile once the rows are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_wait_for_their_rows_on_few_connections() {
    use sqlx::Connection as _;
    let db = TestDb::create().await;
    let url = format!("{}?options=-c%20lock_timeout%3D200", db.url);
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        c.database_url = Some(url.clone());
        c.wb.flushers = 0;
    })
    .await;
    let users: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        app.create(u).await;
    }
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut watcher = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM profiles WHERE user_id = ANY($1) FOR UPDATE")
        .bind(&users)
        .execute(&mut holder)
        .await
        .unwrap();
    let writes: Vec<_> = users
        .iter()
        .chain(users.iter())
        .map(|u| {
            let (http, url, token) = (
                app.http.clone(),
                format!("{}/api/v1/profiles/{u}", app.url),
                app.admin(),
            );
            tokio::spawn(async move {
                http.put(url)
                    .bearer_auth(token)
                    .json(&json!({"name": "失敗"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for w in writes {
        assert!(w.await.unwrap().is_server_error());
    }
    // Two failures per profile, one entry each.
    let waiting = app.server().service().reinvalidations_pending();
    assert!((1..=12).contains(&waiting), "{waiting} waiting");
    // Cached again from the old rows, which the failed writes might still
    // replace.
    for u in &users {
        assert_eq!(
            app.get(&format!("/api/v1/profiles/{u}"), &app.admin())
                .await
                .status(),
            StatusCode::OK
        );
        assert!(app.redis_get(&app.key(u)).await.is_some());
    }
    let mut most = 0;
    for _ in 0..60 {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE'",
        )
        .bind(&db.name)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        most = most.max(n);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        most <= 2,
        "{most} connections waited on failed writes' rows at once"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    // Once the rows are free, each profile is invalidated again.
    let deadline = Instant::now() + Duration::from_secs(20);
    for u in &users {
        while app.redis_get(&app.key(u)).await.is_some() {
            assert!(Instant::now() < deadline, "{u} still cached");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    app.stop().await;
}

/// A health report without its feed part (tests/feed.rs checks that).
fn without_feed(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("feed");
    }
    v
}
