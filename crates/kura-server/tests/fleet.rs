//! Two service instances behind one load, on each Redis topology: 200
//! concurrent GETs of one cold id, split across both, load it from the
//! database once. One test in this binary, so the process-wide metrics
//! count its loads alone.

mod support;

use std::time::Duration;

use kura_testkit::{RedisCluster, RedisSentinelGroup};
use support::{Backend, TestApp};
use uuid::Uuid;

/// `cache_loads_total{cache_type="profile"}` from a `/metrics` page.
fn loads(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("cache_loads_total") && l.contains("cache_type=\"profile\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn stampede_on_two_instances(redis_url: String) {
    let url = redis_url.clone();
    let app = TestApp::start_with(Backend::PgRedis, move |c| {
        c.redis_url = Some(url);
        c.redis_timeout = Duration::from_millis(500);
    })
    .await;
    let mut c = support::base_config(&app.secret);
    c.database_url = app.db.as_ref().map(|d| d.url.clone());
    c.redis_url = Some(redis_url);
    c.redis_timeout = Duration::from_millis(500);
    c.namespace = app.namespace.clone();
    let other = kura_server::serve(c).await.expect("second instance");
    let admin = app.admin();
    let http = reqwest::Client::new();
    let metrics = |base: String| {
        let http = http.clone();
        async move {
            http.get(format!("{base}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    // Both instances are connected before the load (a first command may
    // still be connecting, and would rightly go to the database).
    for base in [app.url.clone(), other.url()] {
        let h = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert!(h.status().is_success());
    }
    for round in 0..3 {
        let id = Uuid::new_v4();
        app.create(&id).await;
        let before = loads(&metrics(app.url.clone()).await);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let base = if i % 2 == 0 {
                    app.url.clone()
                } else {
                    other.url()
                };
                let (http, admin) = (http.clone(), admin.clone());
                tokio::spawn(async move {
                    http.get(format!("{base}/api/v1/profiles/{id}"))
                        .bearer_auth(admin)
                        .send()
                        .await
                        .unwrap()
                        .status()
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_success());
        }
        let after = loads(&metrics(app.url.clone()).await);
        assert_eq!(
            after - before,
            1.0,
            "round {round}: loads of one cold id by two instances"
        );
    }
    other.shutdown().await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_load_a_cold_id_once_on_every_topology() {
    stampede_on_two_instances(support::redis_url()).await;
    let cluster = RedisCluster::start(3, 1).await;
    let nodes: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    stampede_on_two_instances(format!("redis+cluster://{}", nodes.join(","))).await;
    drop(cluster);
    let group = RedisSentinelGroup::start().await;
    let sentinels: Vec<String> = group
        .sentinel_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    stampede_on_two_instances(format!(
        "redis+sentinel://{}/{}",
        sentinels.join(","),
        group.master_name()
    ))
    .await;
}
