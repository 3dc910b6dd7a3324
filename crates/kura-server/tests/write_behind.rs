//! `PUT ?strategy=behind` over HTTP, against PostgreSQL + Redis and SQLite +
//! the memory store: reads between accept and flush (after the TTL, after
//! an invalidation, from a second instance), concurrent patches of one
//! profile, unknown users, back-pressure (503 + `Retry-After`, or write
//! through), Redis down (write through), the flushers of `kura serve`, the
//! version-guarded sink, and the `/metrics` series.
//!
//! The crash tests (a separate `kura serve` process killed mid-stream) are
//! in `write_behind_crash.rs`.

mod support;

use std::time::{Duration, Instant};

use kura::{Applied, Sink};
use kura_server::profiles::model::Profile;
use kura_testkit::{FaultProxy, RedisServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, expect_detail};
use uuid::Uuid;

both_backends!(
    reads_see_the_write_before_the_flush,
    concurrent_patches_to_different_fields_all_survive,
    unknown_users_and_bad_patches_queue_nothing,
    a_full_queue_rejects_with_retry_after,
    a_full_queue_writes_through_unless_the_profile_has_queued_writes,
    serve_flushes_in_the_background,
    sink_writes_only_over_older_rows,
    dead_letters_are_reported,
    a_delete_waits_for_queued_writes,
    a_direct_write_waits_for_queued_writes,
    unconfirmed_replication_answers_503_and_stays_queued,
    a_behind_write_overtaken_by_direct_writes_is_dead_lettered,
);

async fn put_behind(app: &TestApp, user: &Uuid, body: &Value) -> reqwest::Response {
    app.call(
        Method::PUT,
        &format!("/api/v1/profiles/{user}?strategy=behind"),
        Some(&app.admin()),
        Some(body),
    )
    .await
}

fn x_write(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-write")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A profile as read, without its `cached_at` (to compare with rows and
/// write answers).
async fn read(app: &TestApp, user: &Uuid) -> Value {
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    support::without_cached_at(r.json().await.unwrap())
}

async fn db_row(app: &TestApp, user: &Uuid) -> Option<Profile> {
    app.server().service().db().fetch(*user).await.unwrap()
}

fn as_json(p: &Profile) -> Value {
    serde_json::to_value(p).unwrap()
}

/// Applies everything queued (from this test's point of view: no other
/// flusher runs).
async fn flush_all(app: &TestApp) -> kura::strategy::write_behind::FlushReport {
    let mut f = app
        .server()
        .service()
        .flusher()
        .linger(Duration::ZERO)
        .block(Duration::from_millis(50));
    let mut total = kura::strategy::write_behind::FlushReport::default();
    loop {
        let r = f.flush_once(false).await.unwrap();
        total += r;
        if r.entries == 0 {
            return total;
        }
    }
}

async fn metrics_text(app: &TestApp) -> String {
    app.call(Method::GET, "/metrics", None, None)
        .await
        .text()
        .await
        .unwrap()
}

async fn depth(app: &TestApp) -> u64 {
    app.server()
        .service()
        .write_behind()
        .status()
        .await
        .unwrap()
        .depth
}

async fn wait_drained(app: &TestApp, within: Duration) {
    let deadline = Instant::now() + within;
    while depth(app).await > 0 {
        assert!(
            Instant::now() < deadline,
            "queue not drained in {within:?}: {:?}",
            app.server().service().write_behind().status().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reads_see_the_write_before_the_flush(b: Backend) {
    let tweak = |c: &mut kura_server::Config| {
        c.wb.flushers = 0;
        c.ttl = vec!["profile=1s".parse().unwrap()];
    };
    let app = TestApp::start_with(b, tweak).await;
    // A second instance on the same database and Redis namespace (with
    // Redis only: the memory store is per process).
    let other = if b == Backend::PgRedis {
        let (url, ns) = (app.db.as_ref().unwrap().url.clone(), app.namespace.clone());
        Some(
            TestApp::start_with(b, move |c| {
                tweak(c);
                c.database_url = Some(url);
                c.namespace = ns;
            })
            .await,
        )
    } else {
        None
    };
    let user = Uuid::new_v4();
    let created = app.create(&user).await;
    // Cached before the write, so the TTL test below expires a real value.
    read(&app, &user).await;

    let r = put_behind(&app, &user, &json!({"phone": "080-0000-0001"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_write(&r), "behind");
    let accepted: Value = r.json().await.unwrap();
    assert_eq!(accepted["phone"], "080-0000-0001");
    assert_eq!(accepted["version"], 2);
    assert_eq!(accepted["first_name"], created["first_name"], "a full row");
    let row = db_row(&app, &user).await.unwrap();
    assert_eq!(row.version, 1, "not in the database yet");

    let check = |label: &'static str, v: Value| {
        assert_eq!(support::without_cached_at(v), accepted, "{label}");
    };
    check("read", read(&app, &user).await);
    if let Some(o) = &other {
        check("other instance", read(o, &user).await);
    }
    // Past the value's TTL.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    check("after the TTL", read(&app, &user).await);
    if let Some(o) = &other {
        check("other instance after the TTL", read(o, &user).await);
    }
    // After another path invalidated the cached profile.
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/admin/cache/users/{user}"),
            Some(&app.admin()),
            None,
        )
        .await;
    assert!(r.status().is_success());
    check("after an invalidation", read(&app, &user).await);
    // A batch read.
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&app.admin()),
            Some(&json!({"user_ids": [user]})),
        )
        .await;
    let batch: Value = r.json().await.unwrap();
    check("batch", batch["profiles"][0].clone());
    assert_eq!(db_row(&app, &user).await.unwrap().version, 1);

    // The flush writes exactly the accepted profile.
    let f = flush_all(&app).await;
    assert_eq!(f.flushed, 1);
    assert_eq!(as_json(&db_row(&app, &user).await.unwrap()), accepted);
    assert!(
        !app.server()
            .service()
            .write_behind()
            .is_pending(&user.to_string())
            .await
            .unwrap()
    );
    check("after the flush", read(&app, &user).await);
    if let Some(o) = other {
        check("other instance after the flush", read(&o, &user).await);
        o.stop().await;
    }
    app.stop().await;
}

async fn concurrent_patches_to_different_fields_all_survive(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let rounds = 8;
    for round in 0..rounds {
        let bodies = [
            json!({"first_name": format!("名{round}")}),
            json!({"last_name": format!("姓{round}")}),
            json!({"name": format!("表示{round}")}),
            json!({"email": format!("u{round}@example.jp")}),
            json!({"phone": format!("080-0000-{round:04}")}),
            json!({"address": format!("住所{round}")}),
        ];
        let tasks: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                let (http, url, token) = (
                    app.http.clone(),
                    format!("{}/api/v1/profiles/{user}?strategy=behind", app.url),
                    app.admin(),
                );
                tokio::spawn(async move {
                    let r = http
                        .put(url)
                        .bearer_auth(token)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    (r.status(), x_write(&r))
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(
                t.await.unwrap(),
                (StatusCode::OK, "behind".to_owned()),
                "round {round}"
            );
        }
        let v = read(&app, &user).await;
        assert_eq!(v["version"], 1 + 6 * (round + 1), "no write lost");
        assert_eq!(v["first_name"], format!("名{round}"));
        assert_eq!(v["last_name"], format!("姓{round}"));
        assert_eq!(v["name"], format!("表示{round}"));
        assert_eq!(v["email"], format!("u{round}@example.jp"));
        assert_eq!(v["phone"], format!("080-0000-{round:04}"));
        assert_eq!(v["address"], format!("住所{round}"));
    }
    wait_drained(&app, Duration::from_secs(20)).await;
    let v = read(&app, &user).await;
    assert_eq!(as_json(&db_row(&app, &user).await.unwrap()), v);
    app.stop().await;
}

async fn unknown_users_and_bad_patches_queue_nothing(b: Backend) {
    let app = TestApp::start_with(b, |c| c.wb.flushers = 0).await;
    let r = put_behind(&app, &Uuid::new_v4(), &json!({"name": "誰"})).await;
    expect_detail(r, StatusCode::NOT_FOUND).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = put_behind(&app, &user, &json!({"email": "not an address"})).await;
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = put_behind(&app, &user, &json!({"role": "admin"})).await;
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(depth(&app).await, 0);
    // An empty patch answers the profile as it stands, queued writes
    // included, and queues nothing.
    put_behind(&app, &user, &json!({"name": "山田 花子"})).await;
    let r = put_behind(&app, &user, &json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["name"].clone(), v["version"].clone()),
        (json!("山田 花子"), json!(2))
    );
    assert_eq!(depth(&app).await, 1);
    app.stop().await;
}

async fn a_full_queue_rejects_with_retry_after(b: Backend) {
    let app = TestApp::start_with(b, |c| {
        c.wb.flushers = 0;
        c.wb.max_depth = 2;
        c.wb.on_full = kura_server::config::OnFull::Reject;
    })
    .await;
    let users = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    for u in &users {
        app.create(u).await;
    }
    for u in &users[..2] {
        let r = put_behind(&app, u, &json!({"name": "一"})).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = put_behind(&app, &users[2], &json!({"name": "二"})).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let d = expect_detail(r, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(d, "the write queue is full; retry later");
    // Nothing accepted, nothing written.
    assert_eq!(read(&app, &users[2]).await["version"], 1);
    assert_eq!(db_row(&app, &users[2]).await.unwrap().version, 1);
    // The limit shows in the metrics. The gauge is process-wide: other
    // tests of this binary publish their own limits at the same time, and
    // each scrape publishes this server's again, so read until no other
    // test got between.
    let shows = |m: &str| {
        m.lines()
            .any(|l| l.starts_with("cache_wb_limit_depth{") && l.ends_with(" 2"))
    };
    let mut m = String::new();
    for _ in 0..50 {
        m = metrics_text(&app).await;
        if shows(&m) {
            break;
        }
    }
    assert!(shows(&m), "{m}");
    // Once flushed, writes are accepted again.
    assert_eq!(flush_all(&app).await.flushed, 2);
    let r = put_behind(&app, &users[2], &json!({"name": "二"})).await;
    assert_eq!(
        (r.status(), x_write(&r).as_str()),
        (StatusCode::OK, "behind")
    );
    app.stop().await;
}

/// `--wb-min-replicas`: without the replicas' confirmation a `behind` write
/// is not acknowledged (503 + `Retry-After`), but it is queued, so it may
/// still be applied, as the answer says. The Redis of the tests has no
/// replica and the memory store none either.
async fn unconfirmed_replication_answers_503_and_stays_queued(b: Backend) {
    let app = TestApp::start_with(b, |c| {
        c.wb.flushers = 0;
        c.wb.min_replicas = 1;
        c.wb.replica_timeout = Duration::from_millis(100);
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = put_behind(&app, &user, &json!({"phone": "080-1111-2222"})).await;
    assert!(r.headers().contains_key("retry-after"));
    let d = expect_detail(r, StatusCode::SERVICE_UNAVAILABLE).await;
    // Replica counts and timeouts are logged, not shown.
    assert_eq!(
        d,
        "the write was not confirmed in time; it is queued and may still be applied, so retrying is safe"
    );
    assert_eq!(depth(&app).await, 1, "queued all the same");
    assert_eq!(flush_all(&app).await.flushed, 1);
    let row = db_row(&app, &user).await.unwrap();
    assert_eq!(
        (row.version, row.phone.as_deref()),
        (2, Some("080-1111-2222"))
    );
    let m = metrics_text(&app).await;
    // One recorder per test process: other tests may have counted too.
    let unreplicated = m
        .lines()
        .find(|l| l.starts_with("cache_wb_unreplicated_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(unreplicated >= Some(1.0), "{m}");
    app.stop().await;
}

async fn a_full_queue_writes_through_unless_the_profile_has_queued_writes(b: Backend) {
    let app = TestApp::start_with(b, |c| {
        c.wb.flushers = 0;
        c.wb.max_depth = 1;
    })
    .await;
    let (queued, other) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(&queued).await;
    app.create(&other).await;
    let r = put_behind(&app, &queued, &json!({"name": "一"})).await;
    assert_eq!(x_write(&r), "behind");
    // Full: a profile without queued writes is written through.
    let r = put_behind(&app, &other, &json!({"name": "二"})).await;
    assert_eq!(
        (r.status(), x_write(&r).as_str()),
        (StatusCode::OK, "through")
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(as_json(&db_row(&app, &other).await.unwrap()), v);
    assert_eq!(read(&app, &other).await, v);
    // A profile with queued writes is not: the direct write would be
    // overtaken by the cached copies of the queued one.
    let r = put_behind(&app, &queued, &json!({"name": "三"})).await;
    assert!(r.headers().contains_key("retry-after"));
    let d = expect_detail(r, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        d,
        "the profile has writes waiting for the database; retry later"
    );
    assert_eq!(read(&app, &queued).await["name"], "一");
    assert_eq!(flush_all(&app).await.flushed, 1);
    assert_eq!(
        db_row(&app, &queued).await.unwrap().name.as_deref(),
        Some("一")
    );
    app.stop().await;
}

async fn serve_flushes_in_the_background(b: Backend) {
    let app = TestApp::start_with(b, |c| c.wb.flushers = 2).await;
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        app.create(u).await;
    }
    let mut last = Vec::new();
    for (i, u) in users.iter().enumerate() {
        for k in 0..3 {
            let r = put_behind(&app, u, &json!({"phone": format!("080-{i:04}-{k:04}")})).await;
            assert_eq!(r.status(), StatusCode::OK);
            if k == 2 {
                last.push(r.json::<Value>().await.unwrap());
            }
        }
    }
    wait_drained(&app, Duration::from_secs(20)).await;
    for (u, want) in users.iter().zip(&last) {
        assert_eq!(&as_json(&db_row(&app, u).await.unwrap()), want);
    }
    let m = metrics_text(&app).await;
    let flushed: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("cache_wb_flushed_total{cache_type=\"profile\"} "))
        .expect("cache_wb_flushed_total")
        .parse()
        .unwrap();
    assert!(flushed >= 20.0, "{flushed}");
    app.stop().await;
}

fn at(p: &Profile, version: i64, phone: &str) -> Profile {
    let mut p = p.clone();
    p.version = version;
    p.phone = Some(phone.to_owned());
    p
}

async fn sink_writes_only_over_older_rows(b: Backend) {
    let app = TestApp::start_with(b, |c| c.wb.flushers = 0).await;
    let users: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        app.create(u).await;
    }
    let db = app.server().service().db().clone();
    let rows: Vec<Profile> = futures::future::join_all(users.iter().map(|u| db.fetch(*u)))
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    let gone = Uuid::new_v4();
    let mut ghost = at(&rows[0], 2, "000-0000-0000");
    ghost.user_id = gone;
    let batch = vec![
        (users[0].to_string(), at(&rows[0], 2, "080-1111-0000")),
        (users[1].to_string(), at(&rows[1], 3, "080-1111-0001")),
        (gone.to_string(), ghost.clone()),
        ("not-a-uuid".to_owned(), ghost.clone()),
        (users[3].to_string(), at(&rows[2], 2, "080-1111-0003")),
    ];
    let r = db.apply(&batch).await.unwrap();
    assert_eq!(r[0], Applied::Written);
    assert_eq!(r[1], Applied::Written);
    assert_eq!(r[2], Applied::Rejected("profile no longer exists".into()));
    assert!(matches!(&r[3], Applied::Rejected(m) if m.contains("not a user id")));
    assert!(matches!(&r[4], Applied::Rejected(m) if m.contains("belongs to user")));
    assert_eq!(db.fetch(users[0]).await.unwrap().unwrap(), batch[0].1);
    assert_eq!(db.fetch(users[1]).await.unwrap().unwrap(), batch[1].1);

    // A replay of the batch changes nothing.
    let again = db.apply(&batch[..2]).await.unwrap();
    assert_eq!(again, vec![Applied::Superseded, Applied::Superseded]);
    // An older version was overtaken; the same version with other content
    // is a conflict; both are rejected, neither is written.
    let stale = vec![
        (users[1].to_string(), at(&rows[1], 2, "080-2222-0001")),
        (users[0].to_string(), at(&rows[0], 2, "080-2222-0000")),
    ];
    let r = db.apply(&stale).await.unwrap();
    assert!(
        matches!(&r[0], Applied::Rejected(m) if m.contains("overtaken")),
        "{r:?}"
    );
    assert_eq!(
        r[1],
        Applied::Rejected("conflicting write at version 2".into())
    );
    assert_eq!(db.fetch(users[0]).await.unwrap().unwrap(), batch[0].1);
    assert_eq!(db.fetch(users[1]).await.unwrap().unwrap(), batch[1].1);
    // An empty batch is no work.
    assert!(db.apply(&[]).await.unwrap().is_empty());
    app.stop().await;
}

async fn dead_letters_are_reported(b: Backend) {
    let app = TestApp::start_with(b, |c| {
        c.wb.flushers = 0;
        c.wb.max_attempts = 1;
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = put_behind(&app, &user, &json!({"name": "消える"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The row goes before the flush (deleted behind the service's back).
    app.server().service().db().delete(user).await.unwrap();
    let f = flush_all(&app).await;
    assert_eq!(f.dead_lettered, 1);
    let s = kura_server::ops::write_behind::queue_status(app.server().service().write_behind(), 5)
        .await
        .unwrap();
    assert_eq!((s.depth, s.dead_letters), (0, 1));
    let d = &s.recent_dead_letters[0];
    assert_eq!(d.id, user.to_string());
    assert_eq!(d.version, 2);
    assert_eq!(d.error, "profile no longer exists");
    assert!(d.value.contains("消える"));
    // The gauge is process-wide and per type: other tests of this binary,
    // each with a queue of its own, publish theirs at the same time. Publish
    // this queue's state and read it back until no other test got between.
    let mut m = String::new();
    for _ in 0..50 {
        kura_server::ops::write_behind::queue_status(app.server().service().write_behind(), 0)
            .await
            .unwrap();
        m = metrics_text(&app).await;
        if m.contains("cache_wb_dead_letters{cache_type=\"profile\"} 1") {
            break;
        }
    }
    assert!(
        m.contains("cache_wb_dead_letters{cache_type=\"profile\"} 1"),
        "{m}"
    );
    app.stop().await;
}

/// Redis unreachable: a `behind` write is written through instead, and the
/// request still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_writes_through() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        c.redis_url = Some(format!("redis://{}", proxy.addr()));
        c.redis_timeout = Duration::from_millis(100);
        c.wb.flushers = 0;
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    read(&app, &user).await;
    proxy.blackhole();
    let started = Instant::now();
    let r = put_behind(&app, &user, &json!({"name": "直接"})).await;
    assert_eq!(
        (r.status(), x_write(&r).as_str()),
        (StatusCode::OK, "through")
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(as_json(&db_row(&app, &user).await.unwrap()), v);
    proxy.heal();
    // Back on Redis: the old cached value is gone (deferred invalidation),
    // reads see the committed row, and behind writes are queued again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut version = 2;
    loop {
        let r = put_behind(&app, &user, &json!({"phone": "080-3333-4444"})).await;
        assert_eq!(r.status(), StatusCode::OK);
        let path = x_write(&r);
        let v: Value = r.json().await.unwrap();
        version += 1;
        assert_eq!(
            (v["name"].clone(), v["version"].clone()),
            (json!("直接"), json!(version))
        );
        if path == "behind" {
            break;
        }
        assert!(Instant::now() < deadline, "still writing through");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(read(&app, &user).await["version"], version);
    app.stop().await;
}

/// Every write-behind series is on `/metrics` from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_list_the_write_behind_series() {
    let app = TestApp::start(Backend::SqliteMemory).await;
    let m = metrics_text(&app).await;
    for name in [
        "cache_wb_queue_depth",
        "cache_wb_oldest_age_seconds",
        "cache_wb_flushed_total",
        "cache_wb_coalesced_total",
        "cache_wb_retried_total",
        "cache_wb_dead_lettered_total",
        "cache_wb_limit_depth",
        "cache_wb_limit_age_seconds",
    ] {
        assert!(
            m.lines()
                .any(|l| l.starts_with(&format!("{name}{{cache_type=\"profile\"}} "))),
            "{name} missing from /metrics"
        );
    }
    app.stop().await;
}

async fn a_delete_waits_for_queued_writes(b: Backend) {
    let app = TestApp::start_with(b, |c| c.wb.flushers = 0).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = put_behind(&app, &user, &json!({"name": "最後"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let (http, url, token) = (
        app.http.clone(),
        format!("{}/api/v1/profiles/{user}", app.url),
        app.admin(),
    );
    let delete = tokio::spawn(async move {
        let r = http.delete(url).bearer_auth(token).send().await.unwrap();
        (r.status(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !delete.is_finished(),
        "the delete waits for the queued write"
    );
    let flushed_at = Instant::now();
    assert_eq!(flush_all(&app).await.flushed, 1);
    let (status, done) = delete.await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(done >= flushed_at);
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "deleted, not served from a pending copy"
    );
    let s = app
        .server()
        .service()
        .write_behind()
        .status()
        .await
        .unwrap();
    assert_eq!((s.depth, s.dead_letters), (0, 0));
    app.stop().await;
}

async fn a_direct_write_waits_for_queued_writes(b: Backend) {
    let app = TestApp::start_with(b, |c| c.wb.flushers = 0).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = put_behind(&app, &user, &json!({"name": "裏"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    for (k, strategy) in ["through", "invalidate"].into_iter().enumerate() {
        let (http, url, token) = (
            app.http.clone(),
            format!("{}/api/v1/profiles/{user}?strategy={strategy}", app.url),
            app.admin(),
        );
        let phone = format!("080-5555-000{k}");
        let body = json!({ "phone": phone });
        let write = tokio::spawn(async move {
            let r = http
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), x_write(&r), r.json::<Value>().await.unwrap())
        });
        if k == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                !write.is_finished(),
                "the direct write waits for the queued one"
            );
            assert_eq!(flush_all(&app).await.flushed, 1);
        }
        let (status, path, v) = write.await.unwrap();
        assert_eq!((status, path.as_str()), (StatusCode::OK, strategy));
        // Applied on top of the queued write, not under it.
        assert_eq!(v["version"], 3 + k);
        assert_eq!(
            (v["name"].clone(), v["phone"].clone()),
            (json!("裏"), json!(phone))
        );
        assert_eq!(as_json(&db_row(&app, &user).await.unwrap()), v);
        assert_eq!(read(&app, &user).await, v);
    }
    let s = app
        .server()
        .service()
        .write_behind()
        .status()
        .await
        .unwrap();
    assert_eq!((s.depth, s.dead_letters), (0, 0));
    app.stop().await;
}

/// A `behind` write sent while a direct write of the same profile is past
/// its wait for queued writes but not yet committed (held here on the row
/// lock of an open transaction) is ordered after the direct write: it is
/// re-based on the committed row, so both patches survive, in the cache
/// and in the database. Without the per-profile write lock the accept
/// lands between the check and the commit, takes the same version as the
/// direct write from the old cached value, and its pending copy hides the
/// direct write until the flush conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_behind_write_during_a_direct_write_is_ordered_after_it() {
    use sqlx::Connection as _;
    let app = TestApp::start_with(Backend::PgRedis, |c| c.wb.flushers = 0).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    assert_eq!(read(&app, &user).await["version"], 1, "cached at v1");
    let db_url = app.db.as_ref().unwrap().url.clone();
    let db_name = app.db.as_ref().unwrap().name.clone();
    let mut holder = sqlx::PgConnection::connect(&db_url).await.unwrap();
    let mut watcher = sqlx::PgConnection::connect(&db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM profiles WHERE user_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut holder)
        .await
        .unwrap();

    let put = |strategy: &str, body: Value| {
        let (http, url, token) = (
            app.http.clone(),
            format!("{}/api/v1/profiles/{user}?strategy={strategy}", app.url),
            app.admin(),
        );
        tokio::spawn(async move {
            let r = http
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), x_write(&r), r.json::<Value>().await.unwrap())
        })
    };
    let direct = put("invalidate", json!({"name": "直接"}));
    // The direct write has passed its check and waits on the row lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND wait_event_type = 'Lock' AND query LIKE 'UPDATE profiles%'",
        )
        .bind(&db_name)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if n > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the direct write never reached its UPDATE"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut behind = put("behind", json!({"phone": "080-7777-0000"}));
    // Give the behind write every chance to land before the commit (it
    // waits for the direct write's lock, and this times out). Longer than
    // the lock's TTL: the direct write keeps renewing it.
    let early = tokio::time::timeout(Duration::from_secs(4), &mut behind).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let (status, path, d) = direct.await.unwrap();
    assert_eq!((status, path.as_str()), (StatusCode::OK, "invalidate"));
    let (status, path, b) = match early {
        Ok(r) => r.unwrap(),
        Err(_) => behind.await.unwrap(),
    };
    assert_eq!((status, path.as_str()), (StatusCode::OK, "behind"), "{b}");
    assert_eq!(d["version"], 2, "{d}");
    // The behind write is applied on top of the direct one.
    assert_eq!(
        (b["version"].clone(), b["name"].clone(), b["phone"].clone()),
        (json!(3), json!("直接"), json!("080-7777-0000")),
        "{b}"
    );
    let v = read(&app, &user).await;
    assert_eq!(
        (v["name"].clone(), v["phone"].clone()),
        (json!("直接"), json!("080-7777-0000")),
        "{v}"
    );
    let r = flush_all(&app).await;
    assert_eq!((r.flushed, r.dead_lettered), (1, 0), "{r:?}");
    let row = db_row(&app, &user).await.unwrap();
    assert_eq!(
        (row.version, row.name.as_deref(), row.phone.as_deref()),
        (3, Some("直接"), Some("080-7777-0000"))
    );
    app.stop().await;
}

/// A queued write whose row two other writes moved past (here written to
/// the database directly, as another writer would, or as direct writes do
/// when Redis cannot be asked about queued writes) was never applied: it
/// goes to the dead-letter stream as a conflict, not acknowledged as if
/// the database already had it.
async fn a_behind_write_overtaken_by_direct_writes_is_dead_lettered(b: Backend) {
    let app = TestApp::start_with(b, |c| {
        c.wb.flushers = 0;
        c.wb.max_attempts = 1;
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = put_behind(&app, &user, &json!({"name": "裏"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let db = app.server().service().db();
    for phone in ["080-0000-0001", "080-0000-0002"] {
        let patch = serde_json::from_value(json!({ "phone": phone })).unwrap();
        db.update(user, &patch).await.unwrap().unwrap();
    }
    assert_eq!(db_row(&app, &user).await.unwrap().version, 3);
    // Their cache step; the queued write's pending copy outlives it.
    app.server().service().invalidate_user(user).await.unwrap();
    let r = flush_all(&app).await;
    assert_eq!((r.superseded, r.dead_lettered), (0, 1), "{r:?}");
    let dead = app
        .server()
        .service()
        .write_behind()
        .dead_letters(10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].id.as_str(), dead[0].version),
        (user.to_string().as_str(), 2)
    );
    assert!(dead[0].error.contains("version 3"), "{}", dead[0].error);
    // The row is what the direct writes left; the queued copy is gone.
    let row = db_row(&app, &user).await.unwrap();
    assert_eq!(
        (row.version, row.phone.as_deref()),
        (3, Some("080-0000-0002"))
    );
    assert_ne!(row.name.as_deref(), Some("裏"));
    assert_eq!(read(&app, &user).await["version"], 3);
    app.stop().await;
}

/// Concurrent `behind`, `through` and `invalidate` writes of one profile,
/// with a flusher running: every acknowledged write is applied exactly
/// once, one after the other, so the row ends at version 1 + the number
/// of acknowledged writes, with nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_writes_of_one_profile_all_apply_in_order() {
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        c.wb.flushers = 1;
        c.wb.linger = Duration::from_millis(1);
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (http, base, token) = (app.http.clone(), app.url.clone(), app.admin());
            tokio::spawn(async move {
                let mut acked = 0u32;
                for i in 0..12 {
                    let strategy = ["behind", "invalidate", "behind", "through"][(w + i) % 4];
                    let r = http
                        .put(format!("{base}/api/v1/profiles/{user}?strategy={strategy}"))
                        .bearer_auth(&token)
                        .json(&json!({"address": format!("writer {w} write {i}")}))
                        .send()
                        .await
                        .unwrap();
                    match r.status() {
                        StatusCode::OK => acked += 1,
                        // Refused, nothing applied: 503 (waited too long), 409.
                        StatusCode::SERVICE_UNAVAILABLE | StatusCode::CONFLICT => {}
                        s => panic!("{strategy}: {s} {}", r.text().await.unwrap()),
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked = 0;
    for w in writers {
        acked += w.await.unwrap();
    }
    assert!(acked > 0);
    wait_drained(&app, Duration::from_secs(30)).await;
    let s = app
        .server()
        .service()
        .write_behind()
        .status()
        .await
        .unwrap();
    assert_eq!(s.dead_letters, 0, "{s:?}");
    let row = db_row(&app, &user).await.unwrap();
    assert_eq!(row.version, 1 + i64::from(acked), "{row:?}");
    assert_eq!(read(&app, &user).await, as_json(&row));
    app.stop().await;
}
