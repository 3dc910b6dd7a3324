//! The near cache in the service (`--near-cache profile=N`): hits from L1
//! say `X-Cache-Layer: l1`; two instances on one PostgreSQL and Redis,
//! writes on one and reads on the other, every read after a write's answer
//! sees the new version within a bound, and no instance ever goes back to
//! an older version.

mod support;

use std::time::{Duration, Instant};

use kura_server::config::NearCacheSetting;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp};
use uuid::Uuid;

fn near(c: &mut kura_server::Config) {
    c.near_cache = vec![NearCacheSetting {
        kind: "profile".into(),
        entries: 10_000,
    }];
}

fn layer(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache-layer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn read(app: &TestApp, user: &Uuid, token: &str) -> (String, Value) {
    let r = app.get(&format!("/api/v1/profiles/{user}"), token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let l = layer(&r);
    (l, r.json().await.unwrap())
}

async fn until_l1(app: &TestApp, user: &Uuid, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (l, _) = read(app, user, token).await;
        if l == "l1" {
            return;
        }
        assert!(Instant::now() < deadline, "never an l1 hit (last: {l:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_say_which_layer_answered() {
    let app = TestApp::start_with(Backend::PgRedis, near).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let admin = app.admin();
    let r = app.get(&format!("/api/v1/profiles/{user}"), &admin).await;
    assert_eq!(support::x_cache(&r), "miss");
    assert_eq!(layer(&r), "", "no layer on a miss");
    until_l1(&app, &user, &admin).await;
    let r = app.get(&format!("/api/v1/profiles/{user}"), &admin).await;
    assert_eq!(
        (support::x_cache(&r), layer(&r)),
        ("hit".into(), "l1".into())
    );
    // Without the near cache a hit comes from Redis.
    let plain = TestApp::start(Backend::PgRedis).await;
    let other = Uuid::new_v4();
    plain.create(&other).await;
    let admin = plain.admin();
    let _ = plain
        .get(&format!("/api/v1/profiles/{other}"), &admin)
        .await;
    let r = plain
        .get(&format!("/api/v1/profiles/{other}"), &admin)
        .await;
    assert_eq!(
        (support::x_cache(&r), layer(&r)),
        ("hit".into(), "l2".into())
    );
    plain.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_one_instance_are_seen_on_the_other() {
    let writer = TestApp::start_with(Backend::PgRedis, near).await;
    let db_url = writer.db.as_ref().unwrap().url.clone();
    let ns = writer.namespace.clone();
    let reader = TestApp::start_with(Backend::PgRedis, |c| {
        near(c);
        c.database_url = Some(db_url);
        c.namespace = ns;
    })
    .await;
    let user = Uuid::new_v4();
    writer.create(&user).await;
    let token = writer.token(&user, false);
    let rtoken = reader.token(&user, false);
    let mut seen_version = 0;
    let mut delays = Vec::new();
    let mut l1_reads = 0;
    for i in 0..40 {
        until_l1(&reader, &user, &rtoken).await;
        let r = writer
            .call(
                Method::PUT,
                &format!("/api/v1/profiles/{user}"),
                Some(&token),
                Some(&json!({"first_name": format!("n{i}")})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let written: Value = r.json().await.unwrap();
        let version = written["version"].as_i64().unwrap();
        let answered = Instant::now();
        loop {
            let (l, v) = read(&reader, &user, &rtoken).await;
            let got = v["version"].as_i64().unwrap();
            assert!(
                got >= seen_version,
                "went back from version {seen_version} to {got}"
            );
            seen_version = got;
            if l == "l1" {
                l1_reads += 1;
            }
            if got >= version {
                assert_eq!(v["first_name"], format!("n{i}"));
                delays.push(answered.elapsed());
                break;
            }
            assert!(
                answered.elapsed() < Duration::from_secs(1),
                "write {i}: the other instance still served version {got} after 1 s"
            );
        }
    }
    delays.sort();
    let max = *delays.last().unwrap();
    eprintln!(
        "cross-instance staleness after the write's answer: p50 {:?}, max {max:?}, {l1_reads} stale-window reads from l1",
        delays[delays.len() / 2]
    );
    reader.stop().await;
    writer.stop().await;
}
