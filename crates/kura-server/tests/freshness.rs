//! `--load-soft-timeout`, `--load-hard-timeout` and `--eager-refresh`
//! through `kura serve`, with PostgreSQL slowed by a `FaultProxy`.

#[allow(dead_code)]
mod drills_support;
mod support;

use std::time::{Duration, Instant};

use drills_support::{Api, CacheTag, DrillLock, Fixture, Service, pg_addr};
use kura_testkit::{FaultProxy, RedisServer};

/// A slow database: a profile with a stale copy answers `stale` at the
/// soft timeout, a cold one 504 at the hard timeout, and both loads go on
/// to fill the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_timeouts_through_a_slow_database() {
    let _lock = DrillLock::acquire().await;
    let fx = Fixture::new(20).await;
    let redis = RedisServer::start().await;
    let pg = FaultProxy::start(pg_addr()).await;
    let svc = Service::start(
        &fx,
        &fx.db.url_via(pg.addr()),
        &redis.url(),
        &[
            "--ttl",
            "profile=2s",
            "--max-stale",
            "60s",
            "--load-soft-timeout",
            "profile=150ms",
            "--load-hard-timeout",
            "profile=400ms",
        ],
    )
    .await;
    let api = Api::new(&svc, &fx);
    let (warm, cold) = (fx.ids[0], fx.ids[1]);
    assert_eq!(api.get(&warm).await.cache, CacheTag::Miss);
    // Expired, its stale copy kept.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // Every round trip to PostgreSQL now takes at least 600 ms.
    pg.set_latency(Duration::from_millis(300));
    let r = api.get(&warm).await;
    assert_eq!((r.status, r.cache), (200, CacheTag::Stale), "{:?}", r.body);
    assert!(r.latency < Duration::from_millis(450), "{:?}", r.latency);
    let r = api.get(&cold).await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert!(r.detail().contains("within 400 ms"), "{:?}", r.body);
    assert!(r.latency < Duration::from_millis(700), "{:?}", r.latency);
    let started = Instant::now();
    pg.set_latency(Duration::ZERO);
    // The loads finish in the background and fill.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for id in [warm, cold] {
        let r = api.get(&id).await;
        assert_eq!(
            (r.status, r.cache),
            (200, CacheTag::Hit),
            "{id} after {:?}",
            started.elapsed()
        );
    }
    let soft = api
        .counter("cache_load_timeouts_total", &["timeout=\"soft\""])
        .await;
    let hard = api
        .counter("cache_load_timeouts_total", &["timeout=\"hard\""])
        .await;
    assert_eq!((soft, hard), (1.0, 1.0));
}

/// A hot profile with a 1 s TTL and `--eager-refresh profile=1.0`: every
/// read after the first is a hit, and the key is reloaded in the
/// background about once per TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_refresh_keeps_a_hot_profile_warm() {
    let _lock = DrillLock::acquire().await;
    let fx = Fixture::new(5).await;
    let redis = RedisServer::start().await;
    let svc = Service::start(
        &fx,
        &fx.db.url(),
        &redis.url(),
        &["--ttl", "profile=1s", "--eager-refresh", "profile=1.0"],
    )
    .await;
    let api = Api::new(&svc, &fx);
    let hot = fx.ids[0];
    assert_eq!(api.get(&hot).await.cache, CacheTag::Miss);
    // Cached before the measured reads begin (a fill skipped because Redis answered
    // late on a loaded machine is read again; first-read fills have their own test).
    let filled = Instant::now();
    while api.get(&hot).await.cache != CacheTag::Hit {
        assert!(filled.elapsed() < Duration::from_secs(5), "never cached");
    }
    let until = Instant::now() + Duration::from_millis(3500);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut tags = Vec::new();
            while Instant::now() < until {
                tags.push(api.get(&hot).await.cache);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tags
        }));
    }
    let mut tags = Vec::new();
    for t in tasks {
        tags.extend(t.await.unwrap());
    }
    let not_hits = tags.iter().filter(|t| **t != CacheTag::Hit).count();
    assert_eq!(
        not_hits,
        0,
        "{not_hits} of {} reads were not hits",
        tags.len()
    );
    let stored = api
        .counter("cache_refreshes_total", &["outcome=\"stored\""])
        .await;
    let loads = api
        .counter("cache_loads_total", &["cache_type=\"profile\""])
        .await;
    // The adaptive rule makes the hot key's TTL 2 s after its first
    // refresh: a reload about every 2 s.
    assert!((1.0..=8.0).contains(&stored), "refreshes stored: {stored}");
    assert_eq!(
        loads,
        stored + 1.0,
        "one load per refresh, and the first miss"
    );
}

/// Clears the fixture's namespace from an instance of its own, which then
/// stops: what follows runs on instances that never saw the clear happen.
async fn clear_from_a_past_instance(fx: &Fixture, redis_url: &str) {
    let past = Service::start(fx, &fx.db.url(), redis_url, &[]).await;
    let r = Api::new(&past, fx).clear_profiles().await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    drop(past);
}

/// A new instance on a namespace with a past clear fills from its first
/// read, and serves what it filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_after_a_clear_fills_from_its_first_read() {
    let _lock = DrillLock::acquire().await;
    let fx = Fixture::new(5).await;
    let redis = RedisServer::start().await;
    clear_from_a_past_instance(&fx, &redis.url()).await;
    let svc = Service::start(&fx, &fx.db.url(), &redis.url(), &[]).await;
    let api = Api::new(&svc, &fx);
    for id in &fx.ids {
        assert_eq!(api.get(id).await.cache, CacheTag::Miss);
        let r = api.get(id).await;
        assert_eq!(
            (r.status, r.cache),
            (200, CacheTag::Hit),
            "{id}: {:?}",
            r.body
        );
    }
}

/// A new instance after a clear, a short TTL, a stale window and a soft
/// timeout: an expired profile read first by this instance answers its
/// stale copy at the soft timeout when the database turns slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_after_a_clear_answers_stale_at_the_soft_timeout() {
    let _lock = DrillLock::acquire().await;
    let fx = Fixture::new(5).await;
    let redis = RedisServer::start().await;
    clear_from_a_past_instance(&fx, &redis.url()).await;
    let pg = FaultProxy::start(pg_addr()).await;
    let svc = Service::start(
        &fx,
        &fx.db.url_via(pg.addr()),
        &redis.url(),
        &[
            "--ttl",
            "profile=2s",
            "--max-stale",
            "60s",
            "--load-soft-timeout",
            "profile=100ms",
        ],
    )
    .await;
    let api = Api::new(&svc, &fx);
    let id = fx.ids[0];
    assert_eq!(api.get(&id).await.cache, CacheTag::Miss);
    // The first read fills (a_new_instance_after_a_clear_fills_from_its_first_read
    // holds that to account); here the copy only has to exist before it expires, so a
    // fill skipped because Redis answered late on a loaded machine is read again.
    let filled = std::time::Instant::now();
    while api.get(&id).await.cache != CacheTag::Hit {
        assert!(filled.elapsed() < Duration::from_secs(5), "never cached");
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // Every round trip to PostgreSQL now takes at least a second.
    pg.set_latency(Duration::from_millis(500));
    let r = api.get(&id).await;
    pg.set_latency(Duration::ZERO);
    assert_eq!((r.status, r.cache), (200, CacheTag::Stale), "{:?}", r.body);
    assert!(r.latency < Duration::from_millis(600), "{:?}", r.latency);
}

/// A new instance after a clear keeps a hot profile warm by eager refresh
/// over a slow database: no read after the first waits for a load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_after_a_clear_keeps_a_hot_key_warm() {
    let _lock = DrillLock::acquire().await;
    let fx = Fixture::new(5).await;
    let redis = RedisServer::start().await;
    clear_from_a_past_instance(&fx, &redis.url()).await;
    let pg = FaultProxy::start(pg_addr()).await;
    pg.set_latency(Duration::from_millis(150));
    let svc = Service::start(
        &fx,
        &fx.db.url_via(pg.addr()),
        &redis.url(),
        &["--ttl", "profile=3s", "--eager-refresh", "profile=1.0"],
    )
    .await;
    let api = Api::new(&svc, &fx);
    let hot = fx.ids[0];
    assert_eq!(api.get(&hot).await.cache, CacheTag::Miss);
    let until = Instant::now() + Duration::from_secs(5);
    let mut slow = Vec::new();
    let mut reads = 0;
    while Instant::now() < until {
        let r = api.get(&hot).await;
        reads += 1;
        if r.cache != CacheTag::Hit {
            slow.push((r.cache, r.latency));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(reads > 100, "{reads} reads");
    assert!(
        slow.is_empty(),
        "{} of {reads} reads were not hits: {slow:?}",
        slow.len()
    );
}
