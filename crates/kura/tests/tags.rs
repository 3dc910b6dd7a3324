//! Clear by type and invalidation by tag (`kura::tags`): O(1) steps that
//! stop cached values being served, on both stores, with the near cache,
//! across instances, and against a load in flight.

mod support;

use std::time::{Duration, Instant};

use kura::near::Layer;
use kura::{Cache, Error, Kind, Status};
use support::{Backend, Db, TestDb, cleanup, ns};

async fn clear_stops_every_value_of_the_type(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    for i in 0..50 {
        db.put(&format!("u{i}"), &format!("n{i}"));
    }
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let settings = cache.aside(Kind::new("settings"), Db(db.clone()));
    for i in 0..50 {
        profiles.get(&format!("u{i}")).await.unwrap();
    }
    settings.get("u0").await.unwrap();
    assert_eq!(profiles.get("u7").await.unwrap().status(), Status::Hit);
    let cleared = cache.clear(Kind::new("profile")).await.unwrap();
    assert!(cleared.epoch >= 1);
    // The memory store counts what it covered; Redis is not walked.
    let expected = (b == Backend::Memory).then_some(50);
    assert_eq!(cleared.covered, expected);
    for i in 0..50 {
        let f = profiles.get(&format!("u{i}")).await.unwrap();
        assert_eq!(f.status(), Status::Miss, "u{i} was cleared");
    }
    assert_eq!(db.loads(), 101, "50 loads, one of settings, 50 reloads");
    // Reloaded values are served again; the other type was not touched.
    assert_eq!(profiles.get("u3").await.unwrap().status(), Status::Hit);
    assert_eq!(settings.get("u0").await.unwrap().status(), Status::Hit);
    // Batches see the clear too.
    cache.clear(Kind::new("profile")).await.unwrap();
    let batch = profiles.get_many(&["u1", "u2", "u3"]).await.unwrap();
    assert_eq!((batch.hits, batch.misses), (0, 3));
    let batch = profiles.get_many(&["u1", "u2", "u3"]).await.unwrap();
    assert_eq!((batch.hits, batch.misses), (3, 0));
    cleanup(&ns).await;
}

async fn a_tag_stops_only_its_values(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("a", "a@acme");
    db.put("b", "b@acme");
    db.put("c", "c@other");
    db.put("d", "plain");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let settings = cache.aside(Kind::new("settings"), Db(db.clone()));
    for id in ["a", "b", "c", "d"] {
        profiles.get(id).await.unwrap();
    }
    settings.get("a").await.unwrap();
    cache.invalidate_tag("tenant:acme").await.unwrap();
    let status = |f: kura::Fetched<support::Row>| f.status();
    assert_eq!(status(profiles.get("a").await.unwrap()), Status::Miss);
    assert_eq!(status(profiles.get("b").await.unwrap()), Status::Miss);
    assert_eq!(
        status(settings.get("a").await.unwrap()),
        Status::Miss,
        "every type"
    );
    assert_eq!(status(profiles.get("c").await.unwrap()), Status::Hit);
    assert_eq!(status(profiles.get("d").await.unwrap()), Status::Hit);
    assert_eq!(status(profiles.get("a").await.unwrap()), Status::Hit);
    // Bad tags are typed errors.
    for bad in ["", "a b", "x\"y", &"t".repeat(200)] {
        let err = cache.invalidate_tag(bad).await.unwrap_err();
        assert!(matches!(err, Error::Tag(_)), "{bad:?}: {err:?}");
    }
    cleanup(&ns).await;
}

/// What stops the values in a race test: a clear of the type, or an
/// invalidation of the rows' tag.
#[derive(Clone, Copy)]
enum Stop {
    Clear,
    Tag,
}

/// The race: a load that read its row (`old`) before the clear fills after
/// it. Its value must not be served (the fill records the epoch its load
/// began in).
async fn a_fill_that_began_before_it_does_not_land(b: Backend, stop: Stop, old: &str, new: &str) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", old);
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let gate = db.arm_gate();
    let reader = tokio::spawn({
        let p = profiles.clone();
        async move { p.get("u1").await.unwrap() }
    });
    gate.loaded.notified().await;
    // The row changes and the values are stopped while the load holds `old`.
    db.put("u1", new);
    match stop {
        Stop::Clear => cache.clear(Kind::new("profile")).await.unwrap(),
        Stop::Tag => cache.invalidate_tag("tenant:acme").await.unwrap(),
    };
    gate.release.notify_one();
    let first = reader.await.unwrap();
    assert_eq!(
        first.value().unwrap().name,
        old,
        "the caller gets what it loaded"
    );
    // Whatever that fill did, no later read is answered `old`.
    for _ in 0..3 {
        let f = profiles.get("u1").await.unwrap();
        assert_eq!(f.value().unwrap().name, new);
    }
    assert_eq!(db.loads(), 2);
    cleanup(&ns).await;
}

async fn a_fill_that_began_before_a_clear_does_not_land(b: Backend) {
    a_fill_that_began_before_it_does_not_land(b, Stop::Clear, "old", "new").await;
}

/// The same race for a tag: the value's tags are known only after the
/// load, and still the fill does not land.
async fn a_fill_that_began_before_a_tag_invalidation_does_not_land(b: Backend) {
    a_fill_that_began_before_it_does_not_land(b, Stop::Tag, "old@acme", "new@acme").await;
}

/// Another instance stops serving the cleared values as soon as the
/// stamps' push reaches it; its near cache is emptied too.
async fn another_instance_sees_the_clear(b: Backend) {
    let ns = ns();
    let stores = b.fleet(2);
    let build = |s| {
        let mut builder = Cache::builder_shared(s)
            .namespace(&ns)
            .ttl_policy(support::seed_policy().with_jitter(0.0));
        if b == Backend::RedisNear {
            builder =
                builder.near_cache(Kind::new("profile"), kura::near::NearConfig::entries(1000));
        }
        builder.build().unwrap()
    };
    let a = build(stores[0].clone());
    let other = build(stores[1].clone());
    let db = TestDb::new();
    db.put("u1", "v1");
    let pa = a.aside(Kind::new("profile"), Db(db.clone()));
    let pb = other.aside(Kind::new("profile"), Db(db.clone()));
    pa.get("u1").await.unwrap();
    // Until the other instance serves it from its own layers.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let f = pb.get("u1").await.unwrap();
        let warm = match b {
            Backend::RedisNear => f.layer() == Some(Layer::L1),
            _ => f.status() == Status::Hit,
        };
        if warm {
            break;
        }
        assert!(Instant::now() < deadline, "the other instance never warmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cleared_at = Instant::now();
    a.clear(Kind::new("profile")).await.unwrap();
    let deadline = cleared_at + Duration::from_secs(1);
    loop {
        let f = pb.get("u1").await.unwrap();
        if f.status() == Status::Miss {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still served after {:?}",
            cleared_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = cleared_at.elapsed();
    assert!(took < Duration::from_millis(500), "took {took:?}");
    cleanup(&ns).await;
}

/// A cleared entry stays in the store (it expires by its TTL), and one
/// read replaces it; the clear itself touches one key.
async fn clear_touches_one_key(b: Backend) {
    if b == Backend::Memory {
        return;
    }
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "v1");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get("u1").await.unwrap();
    let key = cache.keys().value_key(&Kind::new("profile"), "u1").unwrap();
    let mut c = support::redis_conn().await;
    let before: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    cache.clear(Kind::new("profile")).await.unwrap();
    let after: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(before, after, "the value key was not touched");
    let stamps: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(format!("{ns}:~stamps"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        stamps.iter().any(|(f, _)| f == "kind:profile"),
        "{stamps:?}"
    );
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Miss);
    let replaced: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_ne!(before, replaced);
    let meta = kura::codec::peek_meta(&replaced);
    assert!(meta.epoch >= 1, "the reload records the epoch");
    cleanup(&ns).await;
}

/// With the store unreachable a clear is refused, and kept as a pending
/// invalidation of the type: this process reads the type from the source.
#[tokio::test]
async fn a_clear_without_the_store_is_pending() {
    let store = kura::store::RedisStore::builder("redis://127.0.0.1:1")
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let cache = Cache::builder(store)
        .namespace(ns())
        .op_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = cache.clear(Kind::new("profile")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    let err = cache.invalidate_tag("tenant:a").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    let db = TestDb::new();
    db.put("u1", "v1");
    let f = cache
        .aside(Kind::new("profile"), Db(db))
        .get("u1")
        .await
        .unwrap();
    assert_eq!(f.status(), Status::Bypass);
}

/// The stamps are checked in process: hits cost one `GET` each and no
/// read of the stamps hash, before and after a clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_reads_no_stamps() {
    let server = kura_testkit::RedisServer::start().await;
    let cache = Cache::builder(kura::store::RedisStore::open(&server.url()).unwrap())
        .namespace(ns())
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("u1", "v1");
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let calls = |info: &str, cmd: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for cleared in [false, true] {
        if cleared {
            cache.clear(Kind::new("profile")).await.unwrap();
        }
        // Warm, and wait for the stamps stream to be confirmed.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let _ = p.get("u1").await.unwrap();
            let before: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut admin)
                .await
                .unwrap();
            for _ in 0..200 {
                assert_eq!(p.get("u1").await.unwrap().status(), Status::Hit);
            }
            let after: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut admin)
                .await
                .unwrap();
            let (gets, hgetalls) = (
                calls(&after, "get") - calls(&before, "get"),
                calls(&after, "hgetall") - calls(&before, "hgetall"),
            );
            if hgetalls == 0 {
                assert_eq!(gets, 200, "one GET per hit (cleared: {cleared})");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "hits kept reading the stamps: {hgetalls} HGETALLs"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A write-behind write not yet in the database is newer than the
/// database: a clear does not take it away from readers.
async fn a_pending_write_outlives_a_clear(b: Backend) {
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    db.put("u1", "v1");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get("u1").await.unwrap();
    // No flusher runs: the write stays queued.
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
    wb.accept("u1", |cur| support::Row {
        name: "pending".into(),
        version: cur.version + 1,
        ..cur.clone()
    })
    .await
    .unwrap();
    cache.clear(Kind::new("profile")).await.unwrap();
    for _ in 0..3 {
        let f = profiles.get("u1").await.unwrap();
        assert_eq!(f.value().unwrap().name, "pending", "{:?}", f.status());
    }
    let batch = profiles.get_many(&["u1"]).await.unwrap();
    assert_eq!(batch.entries[0].1.value().unwrap().name, "pending");
    assert_eq!(db.get("u1").unwrap().name, "v1", "still only in the queue");
    cleanup(&ns).await;
}

/// The stamps hash lost after several clears (a Redis restart without
/// persistence, `FLUSHALL`, an eviction under `allkeys-*`): a later clear
/// still stops the values this process filled meanwhile, and the process
/// takes the new hash for what it is.
async fn a_clear_after_the_stamps_were_lost_stops_values(b: Backend) {
    if b == Backend::Memory {
        return; // the in-process store never loses its hash
    }
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "v1");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    for _ in 0..5 {
        cache.clear(Kind::new("settings")).await.unwrap();
    }
    profiles.get("u1").await.unwrap();
    let mut c = support::redis_conn().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{ns}:~stamps"))
        .query_async(&mut c)
        .await
        .unwrap();
    // Read and fill after the loss (the old value is removed first, so the
    // fill is one made with whatever this process holds now).
    cache
        .write_through(Kind::new("profile"))
        .invalidate("u1")
        .await
        .unwrap();
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Miss);
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Hit);
    cache.clear(Kind::new("profile")).await.unwrap();
    assert_eq!(
        profiles.get("u1").await.unwrap().status(),
        Status::Miss,
        "the clear after the loss stops the value filled before it"
    );
    cleanup(&ns).await;
}

/// A process started on a namespace with a past clear fills from its very
/// first read, and serves what it filled.
async fn a_new_instance_fills_from_its_first_read(b: Backend) {
    let ns = ns();
    let stores = b.fleet(2);
    let build = |s| {
        Cache::builder_shared(s)
            .namespace(&ns)
            .ttl_policy(support::seed_policy().with_jitter(0.0))
            .build()
            .unwrap()
    };
    let db = TestDb::new();
    db.put("u1", "v1");
    let first = build(stores[0].clone());
    first.clear(Kind::new("profile")).await.unwrap();
    first.clear(Kind::new("profile")).await.unwrap();
    drop(first);
    let later = build(stores[1].clone());
    let profiles = later.aside(Kind::new("profile"), Db(db.clone()));
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Miss);
    assert_eq!(
        profiles.get("u1").await.unwrap().status(),
        Status::Hit,
        "the first fill is served"
    );
    assert_eq!(db.loads(), 1);
    cleanup(&ns).await;
}

both_stores!(
    a_new_instance_fills_from_its_first_read,
    a_clear_after_the_stamps_were_lost_stops_values,
    a_pending_write_outlives_a_clear,
    clear_stops_every_value_of_the_type,
    a_tag_stops_only_its_values,
    a_fill_that_began_before_a_clear_does_not_land,
    a_fill_that_began_before_a_tag_invalidation_does_not_land,
    another_instance_sees_the_clear,
    clear_touches_one_key,
);

with_near_cache!(
    a_clear_after_the_stamps_were_lost_stops_values,
    clear_stops_every_value_of_the_type,
    a_tag_stops_only_its_values,
    a_fill_that_began_before_a_clear_does_not_land,
    another_instance_sees_the_clear,
);
