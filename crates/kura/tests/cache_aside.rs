//! Cache-aside reads on both stores: hits, misses, "not found", stale
//! fallback, batches, stampedes and bad input.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kura::{Cache, Error, Kind, Status, TypePolicy};
use support::{Backend, Db, TestDb, cache_on, cleanup, ns};

async fn miss_then_hit(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "山田太郎");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let first = profiles.get("u1").await.unwrap();
    assert_eq!(first.status(), Status::Miss);
    assert_eq!(first.value().unwrap().name, "山田太郎");
    let again = profiles.get("u1").await.unwrap();
    assert_eq!(again.status(), Status::Hit);
    assert_eq!(again.value().unwrap().name, "山田太郎");
    assert_eq!(db.loads(), 1);
    // The JSON handed out is the value's own, without the envelope.
    let json: serde_json::Value = serde_json::from_slice(again.json().unwrap()).unwrap();
    assert_eq!(json["name"], "山田太郎");
    assert!(json.get("_v").is_none() && json.get("cached_at").is_none());
    assert_eq!(first.json(), again.json());
    cleanup(&ns).await;
}

async fn not_found_is_cached_briefly(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let f = profiles.get("ghost").await.unwrap();
    assert!(!f.is_found());
    assert_eq!(f.status(), Status::Miss);
    let f = profiles.get("ghost").await.unwrap();
    assert!(!f.is_found());
    assert_eq!(f.status(), Status::Hit, "the penetration guard answers");
    assert_eq!(db.loads(), 1);
    // Creating the row and invalidating (as a POST does) makes it visible.
    db.put("ghost", "now here");
    cache
        .write_through(Kind::new("profile"))
        .invalidate("ghost")
        .await
        .unwrap();
    assert_eq!(
        profiles.get("ghost").await.unwrap().value().unwrap().name,
        "now here"
    );
    cleanup(&ns).await;
}

async fn source_error_serves_stale_or_fails(b: Backend) {
    let ns = ns();
    let policy = support::seed_policy().with_jitter(0.0).with_type(
        "profile",
        TypePolicy::new(Duration::from_millis(1000)).max_stale(Duration::from_secs(60)),
    );
    let cache = Cache::builder_shared(b.store())
        .namespace(&ns)
        .ttl_policy(policy)
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("u1", "v1");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get("u1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    db.set_fail(true);
    let f = profiles.get("u1").await.unwrap();
    assert_eq!(f.status(), Status::Stale);
    assert_eq!(f.value().unwrap().name, "v1");
    // No stale copy for an id never cached: a clear source error.
    let err = profiles.get("u2").await.unwrap_err();
    assert!(matches!(err, Error::Source(_)), "{err:?}");
    db.set_fail(false);
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Miss);
    cleanup(&ns).await;
}

async fn disabled_type_bypasses(b: Backend) {
    let ns = ns();
    let policy = support::seed_policy().with_type("profile", TypePolicy::new(Duration::ZERO));
    let cache = Cache::builder_shared(b.store())
        .namespace(&ns)
        .ttl_policy(policy)
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("u1", "a");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Bypass);
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Bypass);
    assert_eq!(db.loads(), 2);
    cleanup(&ns).await;
}

async fn batch_reads(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    for i in 0..10 {
        db.put(&format!("u{i}"), &format!("n{i}"));
    }
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get("u0").await.unwrap();
    profiles.get("u1").await.unwrap();
    let ids: Vec<String> = (0..12)
        .map(|i| format!("u{i}"))
        .chain(["u3".into()])
        .collect();
    let batch = profiles.get_many(&ids).await.unwrap();
    assert_eq!(batch.entries.len(), 12, "duplicates answered once");
    assert_eq!(batch.hits, 2);
    assert_eq!(batch.misses, 10);
    assert_eq!(db.batch_loads(), 1, "one query for all misses");
    let found = batch.entries.iter().filter(|(_, f)| f.is_found()).count();
    assert_eq!(found, 10);
    assert_eq!(batch.entries[5].0, "u5");
    assert_eq!(batch.entries[5].1.value().unwrap().name, "n5");
    // Everything is cached now, including "not found".
    let batch = profiles.get_many(&ids).await.unwrap();
    assert_eq!((batch.hits, batch.misses), (12, 0));
    assert_eq!(db.batch_loads(), 1);
    cleanup(&ns).await;
}

/// N concurrent reads of one cold key from several independent clients
/// (separate connections, as separate processes would be) load it once.
async fn stampede_loads_once(b: Backend) {
    let ns = ns();
    let db = TestDb::new();
    db.put("hot", "x");
    db.set_delay(Duration::from_millis(50));
    let caches: Vec<Cache> = b.fleet(4).into_iter().map(|s| cache_on(s, &ns)).collect();
    let readers: Vec<_> = caches
        .iter()
        .map(|c| c.aside(Kind::new("profile"), Db(db.clone())))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let r = readers[i % readers.len()].clone();
        tasks.push(tokio::spawn(async move { r.get("hot").await.unwrap() }));
    }
    for t in tasks {
        let f = t.await.unwrap();
        assert_eq!(f.value().unwrap().name, "x");
        assert!(
            matches!(f.status(), Status::Miss | Status::Hit),
            "{:?}",
            f.status()
        );
    }
    assert_eq!(
        db.loads(),
        1,
        "exactly one load for 200 concurrent cold reads"
    );
    cleanup(&ns).await;
}

async fn bad_ids_are_typed_errors(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let writes = cache.write_through(Kind::new("profile"));
    for id in ["", "a b", "a*", "x?", "[a]", "a\\b", "a:b", "a\nb", "{x}"] {
        assert!(
            matches!(profiles.get(id).await, Err(Error::Key(_))),
            "{id:?}"
        );
        assert!(
            matches!(writes.invalidate(id).await, Err(Error::Key(_))),
            "{id:?}"
        );
        assert!(
            matches!(profiles.get_many(&["ok", id]).await, Err(Error::Key(_))),
            "{id:?}"
        );
    }
    let long = "x".repeat(257);
    assert!(matches!(profiles.get(&long).await, Err(Error::Key(_))));
    assert_eq!(db.loads(), 0, "nothing reached the source");
    cleanup(&ns).await;
}

async fn oversize_values_are_served_not_cached(b: Backend) {
    let ns = ns();
    let cache = Cache::builder_shared(b.store())
        .namespace(&ns)
        .max_value_bytes(200)
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("big", &"x".repeat(500));
    db.put("small", "y");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    for _ in 0..2 {
        let f = profiles.get("big").await.unwrap();
        assert_eq!(f.status(), Status::Miss);
        assert_eq!(f.value().unwrap().name.len(), 500);
        let json: serde_json::Value = serde_json::from_slice(f.json().unwrap()).unwrap();
        assert_eq!(json["name"].as_str().unwrap().len(), 500);
    }
    assert_eq!(db.loads(), 2);
    profiles.get("small").await.unwrap();
    assert_eq!(profiles.get("small").await.unwrap().status(), Status::Hit);
    cleanup(&ns).await;
}

async fn undecodable_values_are_misses_and_repaired(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "good");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let key = cache.keys().value_key(&Kind::new("profile"), "u1").unwrap();
    for garbage in [
        &b"\xff\xfe\x00garbage"[..],
        b"{\"_v\":1,\"cached_at\":\"2026-01-01T00:00:00Z\",\"id\":\"u1\",\"na",
        b"[1,2,3]",
        b"{\"unexpected\":true}",
    ] {
        cache
            .store()
            .set(
                &key,
                bytes::Bytes::copy_from_slice(garbage),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        support::foreign_write_settles(&b).await;
        let f = profiles.get("u1").await.unwrap();
        assert_eq!(f.value().unwrap().name, "good", "{garbage:?}");
        assert_ne!(f.status(), Status::Hit);
        let f = profiles.get("u1").await.unwrap();
        assert_eq!(f.status(), Status::Hit, "repaired after {garbage:?}");
    }
    cleanup(&ns).await;
}

async fn single_flight_in_process_survives_cancellation(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "a");
    db.set_delay(Duration::from_millis(100));
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    // The first caller gives up early; the others still get the load.
    let first = {
        let p = profiles.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_millis(10), p.get("u1")).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(2)).await;
    let rest: Vec<_> = (0..20)
        .map(|_| {
            let p = profiles.clone();
            tokio::spawn(async move { p.get("u1").await.unwrap() })
        })
        .collect();
    first.await.unwrap();
    for t in rest {
        assert_eq!(t.await.unwrap().value().unwrap().name, "a");
    }
    assert_eq!(db.loads(), 1);
    cleanup(&ns).await;
}

async fn a_cancelled_reader_still_fills(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "a");
    db.set_delay(Duration::from_millis(100));
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    // The only reader gives up long before the load ends.
    let gave_up = tokio::time::timeout(Duration::from_millis(10), profiles.get("u1")).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let f = profiles.get("u1").await.unwrap();
    assert_eq!(f.status(), Status::Hit, "the load finished and filled");
    assert_eq!(db.loads(), 1);
    cleanup(&ns).await;
}

async fn json_reads_pass_the_cached_bytes_on(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "山田");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let first = profiles.get_json("u1").await.unwrap();
    assert_eq!(first.status(), Status::Miss);
    let again = profiles.get_json("u1").await.unwrap();
    assert_eq!(again.status(), Status::Hit);
    assert_eq!(first.json(), again.json());
    let v: serde_json::Value = serde_json::from_slice(again.json().unwrap()).unwrap();
    assert_eq!(v["name"], "山田");
    assert!(v.get("_v").is_none() && v.get("cached_at").is_none());
    let none = profiles.get_json("ghost").await.unwrap();
    assert!(!none.is_found());
    // Bytes that are not kura's envelope around well-formed JSON are misses,
    // removed and reloaded; a foreign writer's value (no header) too.
    let key = cache.keys().value_key(&Kind::new("profile"), "u1").unwrap();
    for bad in [
        &b"\xff garbage"[..],
        b"{\"_v\":1,\"cached_at\":\"2026-01-01T00:00:00Z\",\"name\":\"tru",
        // Well-formed but for a cut multi-byte character: not UTF-8.
        b"{\"_v\":1,\"cached_at\":\"2026-01-01T00:00:00Z\",\"name\":\"\xe5\xb1\"}",
        b"{\"id\":\"u1\",\"name\":\"written by someone else\",\"version\":9}",
    ] {
        cache
            .store()
            .set(
                &key,
                bytes::Bytes::copy_from_slice(bad),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        support::foreign_write_settles(&b).await;
        let f = profiles.get_json("u1").await.unwrap();
        assert_ne!(f.status(), Status::Hit, "{bad:?}");
        let v: serde_json::Value = serde_json::from_slice(f.json().unwrap()).unwrap();
        assert_eq!(v["name"], "山田");
        assert_eq!(profiles.get_json("u1").await.unwrap().status(), Status::Hit);
    }
    cleanup(&ns).await;
}

/// A value that ends at a fixed time (`Versioned::expires_at`, as a
/// revoked token): cached at most until then, not at all once past it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Ending {
    until_ms: u64,
}

impl kura::Versioned for Ending {
    fn version(&self) -> u64 {
        1
    }
    fn expires_at(&self) -> Option<std::time::SystemTime> {
        Some(std::time::UNIX_EPOCH + Duration::from_millis(self.until_ms))
    }
}

struct EndingDb {
    until: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    loads: std::sync::atomic::AtomicUsize,
}

struct EndingSrc(Arc<EndingDb>);

impl kura::Source for EndingSrc {
    type Value = Ending;
    type Error = std::io::Error;
    async fn load(&self, id: &str) -> Result<Option<Ending>, std::io::Error> {
        self.0
            .loads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self
            .0
            .until
            .lock()
            .unwrap()
            .get(id)
            .map(|&until_ms| Ending { until_ms }))
    }
}

async fn values_with_an_end_are_cached_until_it(b: Backend) {
    let (cache, ns) = b.cache();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let db = Arc::new(EndingDb {
        until: Default::default(),
        loads: Default::default(),
    });
    db.until
        .lock()
        .unwrap()
        .insert("soon".into(), now_ms() + 1_500);
    db.until
        .lock()
        .unwrap()
        .insert("gone".into(), now_ms() - 1_000);
    // The type's TTL is the seed's default (300 s): the value's end is
    // what bounds the entry.
    let r = cache.aside(Kind::new("ending"), EndingSrc(db.clone()));
    let loads = || db.loads.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(r.get("soon").await.unwrap().status(), Status::Miss);
    assert_eq!(r.get("soon").await.unwrap().status(), Status::Hit);
    assert_eq!(loads(), 1);
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert_eq!(
        r.get("soon").await.unwrap().status(),
        Status::Miss,
        "the entry outlived the value's end"
    );
    // Already past its end: served, never cached.
    for _ in 0..3 {
        let f = r.get("gone").await.unwrap();
        assert_eq!(f.status(), Status::Miss);
        assert!(f.is_found());
    }
    assert_eq!(loads(), 5);
    // A batch read follows the same rule.
    let batch = r.get_many(&["gone", "gone2"]).await.unwrap();
    assert_eq!(batch.misses, 2);
    assert_eq!(r.get_many(&["gone"]).await.unwrap().misses, 1);
    // A write-through update of a value past its end removes the entry.
    db.until
        .lock()
        .unwrap()
        .insert("w".into(), now_ms() + 60_000);
    r.get("w").await.unwrap();
    assert_eq!(r.get("w").await.unwrap().status(), Status::Hit);
    let past = Ending {
        until_ms: now_ms() - 1,
    };
    cache
        .write_through(Kind::new("ending"))
        .update("w", &past)
        .await
        .unwrap();
    db.until.lock().unwrap().insert("w".into(), past.until_ms);
    assert_eq!(r.get("w").await.unwrap().status(), Status::Miss);
    cleanup(&ns).await;
}

both_stores!(
    values_with_an_end_are_cached_until_it,
    json_reads_pass_the_cached_bytes_on,
    a_cancelled_reader_still_fills,
    miss_then_hit,
    not_found_is_cached_briefly,
    source_error_serves_stale_or_fails,
    disabled_type_bypasses,
    batch_reads,
    stampede_loads_once,
    bad_ids_are_typed_errors,
    oversize_values_are_served_not_cached,
    undecodable_values_are_misses_and_repaired,
    single_flight_in_process_survives_cancellation,
);

/// Redis only: a stampede across separate connections whose load is slow
/// still loads once, and the waiters in other "processes" see the fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_across_connections_with_slow_source() {
    let ns = ns();
    let db = TestDb::new();
    db.put("cold", "v");
    db.set_delay(Duration::from_millis(300));
    let stores = Backend::Redis.fleet(3);
    let readers: Vec<_> = stores
        .into_iter()
        .map(|s| cache_on(s, &ns).aside(Kind::new("profile"), Db(db.clone())))
        .collect();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let r = readers[i % 3].clone();
            tokio::spawn(async move { r.get("cold").await.unwrap().status() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(db.loads(), 1);
    assert!(
        statuses.contains(&Status::Hit),
        "other processes read the fill"
    );
    cleanup(&ns).await;
}

#[tokio::test]
async fn arc_sources_work_too() {
    // Sources are often shared handles; a clone-per-reader pattern works.
    let db = Arc::new(TestDb::default());
    db.put("a", "1");
    let (cache, ns) = Backend::Memory.cache();
    let p1 = cache.aside(Kind::new("profile"), Db(db.clone()));
    let p2 = cache.aside(Kind::new("settings"), Db(db.clone()));
    assert!(p1.get("a").await.unwrap().is_found());
    assert!(p2.get("a").await.unwrap().is_found());
    assert_eq!(db.loads(), 2, "types are cached separately");
    let _ = ns;
}

with_near_cache!(
    values_with_an_end_are_cached_until_it,
    json_reads_pass_the_cached_bytes_on,
    a_cancelled_reader_still_fills,
    miss_then_hit,
    not_found_is_cached_briefly,
    source_error_serves_stale_or_fails,
    disabled_type_bypasses,
    batch_reads,
    stampede_loads_once,
    bad_ids_are_typed_errors,
    oversize_values_are_served_not_cached,
    undecodable_values_are_misses_and_repaired,
    single_flight_in_process_survives_cancellation,
);
