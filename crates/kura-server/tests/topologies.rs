//! The service on a real Redis Cluster (3 primaries, 3 replicas) and a
//! Sentinel group (1 master, 2 replicas, 3 sentinels): the HTTP routes, two
//! instances sharing the cache, and a failover under load with no client
//! errors.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kura_testkit::{RedisCluster, RedisSentinelGroup};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, x_cache};
use uuid::Uuid;

async fn start(url: &str) -> TestApp {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kura=debug,kura_server=info")
        .with_test_writer()
        .try_init();
    let url = url.to_owned();
    TestApp::start_with(Backend::PgRedis, move |c| {
        c.redis_url = Some(url);
        c.redis_timeout = Duration::from_millis(500);
    })
    .await
}

/// A second instance over the first one's database, cache and namespace.
async fn second_instance(first: &TestApp) -> kura_server::Server {
    let mut c = support::base_config(&first.secret);
    c.database_url = first.db.as_ref().map(|d| d.url.clone());
    c.redis_url = first.redis_url.clone();
    c.redis_timeout = Duration::from_millis(500);
    c.namespace = first.namespace.clone();
    kura_server::serve(c).await.expect("second instance")
}

async fn get(http: &reqwest::Client, base: &str, id: &Uuid, token: &str) -> reqwest::Response {
    http.get(format!("{base}/api/v1/profiles/{id}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

/// The routes that touch the cache, on one topology, and two instances
/// seeing each other's writes at once.
async fn routes_and_two_instances(url: &str) {
    let app = start(url).await;
    let admin = app.admin();
    let health: Value = app.get("/healthz", &admin).await.json().await.unwrap();
    assert_eq!(health["redis"], "ok", "{health}");

    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        app.create(id).await;
    }
    let path = |id: &Uuid| format!("/api/v1/profiles/{id}");
    let r = app.get(&path(&ids[0]), &admin).await;
    assert_eq!((r.status(), x_cache(&r)), (StatusCode::OK, "miss".into()));
    let r = app.get(&path(&ids[0]), &admin).await;
    assert_eq!(x_cache(&r), "hit");

    for (strategy, phone) in [
        ("invalidate", "080-1111-2222"),
        ("through", "080-3333-4444"),
    ] {
        let r = app
            .call(
                Method::PUT,
                &format!("{}?strategy={strategy}", path(&ids[0])),
                Some(&admin),
                Some(&json!({ "phone": phone })),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = app.get(&path(&ids[0]), &admin).await.json().await.unwrap();
        assert_eq!(body["phone"], phone, "{strategy}");
    }

    // Batch: one MGET (split by slot on Cluster), one fill.
    let batch = json!({ "user_ids": ids });
    let r: Value = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&admin),
            Some(&batch),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["count"], 20);
    assert_eq!(r["cache_hits"], 1);
    assert_eq!(r["cache_misses"], 19);

    // Another instance reads what this one cached, and sees its writes.
    let other = second_instance(&app).await;
    let http = reqwest::Client::new();
    let r = get(&http, &other.url(), &ids[3], &admin).await;
    assert_eq!(x_cache(&r), "hit", "shared cache");
    let r = app
        .call(
            Method::PUT,
            &path(&ids[3]),
            Some(&admin),
            Some(&json!({ "email": "moved@example.jp" })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = get(&http, &other.url(), &ids[3], &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["email"], "moved@example.jp",
        "read-after-write across instances"
    );

    // The clear reaches every cached profile on every primary in one step.
    let r: Value = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/profiles",
            Some(&admin),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["cleared"], true, "{r}");
    // The sweep removed the cleared profiles from every primary (20 were
    // cached by the batch and the reads above).
    let deleted = r["deleted"].as_u64().unwrap();
    assert!((18..=20).contains(&deleted), "{r}");
    let r = get(&http, &other.url(), &ids[5], &admin).await;
    assert_eq!(x_cache(&r), "miss");
    other.shutdown().await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_routes_and_two_instances() {
    let cluster = RedisCluster::start(3, 1).await;
    routes_and_two_instances(&cluster.kura_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_routes_and_two_instances() {
    let group = RedisSentinelGroup::start().await;
    routes_and_two_instances(&group.kura_url()).await;
}

/// Reads and writes keep answering 2xx while the topology loses its
/// master, and the cache is used again afterwards.
async fn failover_under_load(url: &str, fail: impl AsyncFnOnce()) {
    let app = Arc::new(start(url).await);
    let admin = app.admin();
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        app.create(id).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (app, stop, ok, bad) = (app.clone(), stop.clone(), ok.clone(), bad.clone());
            let (ids, admin) = (ids.clone(), admin.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let id = ids[i % ids.len()];
                    let r = if i % 5 == 0 {
                        app.call(
                            Method::PUT,
                            &format!("/api/v1/profiles/{id}"),
                            Some(&admin),
                            Some(&json!({ "phone": format!("070-{:04}-{:04}", i % 10_000, w) })),
                        )
                        .await
                    } else {
                        app.get(&format!("/api/v1/profiles/{id}"), &admin).await
                    };
                    if r.status().is_success() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 7;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fail().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app
            .get(&format!("/api/v1/profiles/{}", ids[1]), &admin)
            .await;
        if x_cache(&r) == "hit" {
            break;
        }
        assert!(Instant::now() < deadline, "the cache was not used again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    eprintln!("failover under load: {ok} answered 2xx, {bad} not");
    assert_eq!(bad, 0, "client errors during the failover");
    assert!(ok > 100);
    if let Ok(app) = Arc::try_unwrap(app) {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_primary_killed_under_http_load() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let url = cluster.kura_url();
    let c = &mut cluster;
    failover_under_load(&url, async || {
        c.kill_primary(0).await;
        c.wait_until_healthy().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_killed_under_http_load() {
    let mut group = RedisSentinelGroup::start().await;
    let url = group.kura_url();
    let g = &mut group;
    failover_under_load(&url, async || {
        let old = g.kill_master().await;
        g.wait_for_failover(old).await;
    })
    .await;
}
