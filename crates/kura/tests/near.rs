//! The near cache against a real Redis: L1 hits, eviction by any client's
//! change, read-your-writes on the writing process, and what happens when
//! the invalidation stream breaks or goes silent. Connection-loss cases run
//! on a `redis-server` of their own.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kura::near::{Layer, NearConfig};
use kura::store::RedisStore;
use kura::{Cache, CacheAside, Kind, Status};
use kura_testkit::{FaultProxy, RedisServer};
use support::{Db, TestDb, cleanup, ns, redis_conn, redis_url};

fn near_cache(url: &str, ns: &str, silence: Duration) -> Cache {
    let store = RedisStore::builder(url)
        .response_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    Cache::builder(store)
        .namespace(ns)
        .near_cache(Kind::new("profile"), NearConfig::entries(1000))
        .near_cache_max_silence(silence)
        .build()
        .unwrap()
}

/// Reads until the read is answered from L1 (the stream must be confirmed
/// first, and the first read after a fill may race its own push).
async fn until_l1(p: &CacheAside<Db>, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = p.get(id).await.unwrap();
        if f.layer() == Some(Layer::L1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never an L1 hit: {:?}",
            f.layer()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_hits_and_eviction_by_another_client() {
    let ns = ns();
    let cache = near_cache(&redis_url(), &ns, Duration::from_secs(1));
    let db = TestDb::new();
    db.put("u1", "v1");
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    until_l1(&p, "u1").await;
    let loads = db.loads();
    for _ in 0..100 {
        let f = p.get("u1").await.unwrap();
        assert_eq!((f.status(), f.layer()), (Status::Hit, Some(Layer::L1)));
        assert_eq!(f.value().unwrap().name, "v1");
    }
    assert_eq!(db.loads(), loads, "L1 hits load nothing");
    let json = p.get_json("u1").await.unwrap();
    assert_eq!(json.layer(), Some(Layer::L1));

    // Another client deletes the key (as redis-cli, or the feed's relay,
    // would): the push evicts it here.
    db.put("u1", "v2");
    let key = cache.keys().value_key(&Kind::new("profile"), "u1").unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis_conn().await)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let f = p.get("u1").await.unwrap();
        if f.value().unwrap().name == "v2" {
            break;
        }
        assert!(Instant::now() < deadline, "L1 kept the deleted value");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_kura_evicts_before_it_returns() {
    let ns = ns();
    let cache = near_cache(&redis_url(), &ns, Duration::from_secs(1));
    let db = TestDb::new();
    db.put("u1", "v1");
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    let w = cache.write_through(Kind::new("profile"));
    for round in 0..20 {
        until_l1(&p, "u1").await;
        let row = db.put("u1", &format!("w{round}"));
        if round % 2 == 0 {
            w.invalidate("u1").await.unwrap();
        } else {
            w.update("u1", &row).await.unwrap();
        }
        // At once, without waiting for the push.
        let f = p.get("u1").await.unwrap();
        assert_ne!(f.layer(), Some(Layer::L1), "round {round}");
        assert_eq!(
            f.value().unwrap().name,
            format!("w{round}"),
            "round {round}"
        );
    }
    // An invalidation by pattern clears the type's L1.
    until_l1(&p, "u1").await;
    cache
        .invalidate_pattern(Kind::new("profile"), "*")
        .await
        .unwrap();
    assert_ne!(p.get("u1").await.unwrap().layer(), Some(Layer::L1));
    cleanup(&ns).await;
}

/// The tracking connection is killed by the server: L1 is flushed and not
/// served until a new stream is confirmed; then it fills again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tracking_connection_flushes_l1() {
    let server = RedisServer::start().await;
    let ns = ns();
    let cache = near_cache(&server.url(), &ns, Duration::from_secs(1));
    let db = TestDb::new();
    db.put("u1", "v1");
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    until_l1(&p, "u1").await;
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    let tracking: Vec<String> = clients
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|f| f.starts_with("flags=") && f.contains('t'))
        })
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("id=")
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(tracking.len(), 1, "one tracking connection: {clients}");
    // While the stream is down, a change it would have carried.
    db.put("u1", "v2");
    let key = cache.keys().value_key(&Kind::new("profile"), "u1").unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&tracking[0])
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let f = p.get("u1").await.unwrap();
        if f.layer() != Some(Layer::L1) {
            assert_eq!(f.value().unwrap().name, "v2");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "L1 still served after the stream broke"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A new stream: L1 works again, with the new value.
    until_l1(&p, "u1").await;
    assert_eq!(p.get("u1").await.unwrap().value().unwrap().name, "v2");
}

/// The link to Redis black-holed (no error, no answer): L1 stops serving
/// within the allowed silence after the last confirmation, and reads fall
/// back to the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_stops_l1_within_the_allowed_silence() {
    let server = RedisServer::start().await;
    let proxy = FaultProxy::start(server.addr()).await;
    let ns = ns();
    let silence = Duration::from_millis(400);
    let cache = near_cache(&format!("redis://127.0.0.1:{}", proxy.port()), &ns, silence);
    let db = TestDb::new();
    db.put("u1", "v1");
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    until_l1(&p, "u1").await;
    proxy.blackhole();
    let cut = Instant::now();
    let mut last_l1 = cut;
    let deadline = cut + Duration::from_secs(5);
    loop {
        let f = p.get("u1").await.unwrap();
        if f.layer() == Some(Layer::L1) {
            last_l1 = Instant::now();
        } else {
            assert!(
                matches!(f.status(), Status::Bypass | Status::Miss),
                "{:?}",
                f.status()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "L1 served for 5 s without a confirmation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The last confirmation came at most one ping (100 ms) before the cut.
    let served = last_l1 - cut;
    assert!(
        served <= silence + Duration::from_millis(150),
        "L1 served {served:?} after the cut (allowed {silence:?})"
    );
    proxy.heal();
    until_l1(&p, "u1").await;
    drop(proxy);
    let _ = Arc::new(server);
}

/// "Not found" is kept in L1 too (a negative entry), and any client's
/// change of the entry's marker evicts it: another process creating the
/// row (its invalidation removes the marker) is seen here at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_entries_are_served_from_l1_and_evicted_by_any_write() {
    let ns = ns();
    let cache = near_cache(&redis_url(), &ns, Duration::from_secs(1));
    let other = near_cache(&redis_url(), &ns, Duration::from_secs(1));
    let db = TestDb::new();
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    // Until a negative L1 hit: a miss caches the marker, the next read
    // finds it and keeps it in L1.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = p.get("ghost").await.unwrap();
        assert!(!f.is_found());
        if f.layer() == Some(Layer::L1) {
            break;
        }
        assert!(Instant::now() < deadline, "never a negative L1 hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loads = db.loads();
    for _ in 0..50 {
        let f = p.get("ghost").await.unwrap();
        assert_eq!((f.is_found(), f.layer()), (false, Some(Layer::L1)));
        assert!(p.get_json("ghost").await.unwrap().json().is_none());
    }
    assert_eq!(db.loads(), loads, "negative L1 hits load nothing");

    // Another process creates the row and invalidates: the marker's removal
    // reaches this process's L1.
    db.put("ghost", "born");
    other
        .write_through(Kind::new("profile"))
        .invalidate("ghost")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if p.get("ghost").await.unwrap().is_found() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "L1 kept \"not found\" after the row was created elsewhere"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cleanup(&ns).await;
}

/// The near cache stamp: equal while nothing of the type changes, new
/// after any client's change of any key of the type (not only one an L1
/// entry holds) and after this process's own write; `None` while the
/// stream is not live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stamp_changes_with_every_invalidation_of_the_type() {
    let ns = ns();
    let cache = near_cache(&redis_url(), &ns, Duration::from_secs(1));
    let db = TestDb::new();
    db.put("u1", "v1");
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    until_l1(&p, "u1").await;
    let s1 = p.near_stamp().expect("live");
    assert_eq!(p.near_stamp(), Some(s1), "nothing changed");
    assert_eq!(
        p.near_max_lifetime(),
        Some(kura::near::DEFAULT_MAX_LIFETIME)
    );
    // Another client changes a key no L1 entry holds.
    let other = cache
        .keys()
        .value_key(&Kind::new("profile"), "never-read")
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&other)
        .arg("x")
        .query_async(&mut redis_conn().await)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.near_stamp() == Some(s1) {
        assert!(
            Instant::now() < deadline,
            "the push did not change the stamp"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // This process's own write changes it before it returns.
    let s2 = p.near_stamp().expect("live");
    cache
        .write_through(Kind::new("profile"))
        .invalidate("u1")
        .await
        .unwrap();
    assert_ne!(p.near_stamp(), Some(s2));
    // Another type's change leaves it as it is. (The push of the write
    // above moves the stamp again when it arrives: let it arrive first.)
    let mut s3 = p.near_stamp().expect("live");
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = p.near_stamp().expect("live");
        if now == s3 {
            break;
        }
        s3 = now;
    }
    let settings = cache
        .keys()
        .value_key(&Kind::new("settings"), "u1")
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&settings)
        .arg("x")
        .query_async(&mut redis_conn().await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        p.near_stamp(),
        Some(s3),
        "a settings key is not a profile key"
    );
    // Without a near cache there is no stamp.
    let plain = support::cache_on(
        Arc::new(RedisStore::builder(redis_url()).build().unwrap()),
        &ns,
    );
    assert_eq!(
        plain
            .aside(Kind::new("profile"), Db(db.clone()))
            .near_stamp(),
        None
    );
    cleanup(&ns).await;
}
