//! The races of a naive cache-aside / write-through, forced and randomized:
//! kura must end every interleaving with the committed value or nothing
//! cached, never an older one.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kura::{Cache, Kind, Status};
use rand::Rng;
use support::{Backend, Db, Row, TestDb, cache_on, cleanup, ns};

/// What the cache holds for `id`, read from the outside.
async fn cached(cache: &Cache, id: &str) -> Option<Row> {
    let key = cache.keys().value_key(&Kind::new("profile"), id).unwrap();
    cache
        .store()
        .get(&key, None)
        .await
        .unwrap()
        .map(|b| kura::codec::decode::<Row>(&b).unwrap().value)
}

/// The seed's stale set, forced: a reader loads the old row, a writer
/// commits and invalidates, then the reader fills. The fill must be rejected.
async fn forced_stale_set_is_rejected(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "old");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let gate = db.arm_gate();
    let r = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.get("u1").await.unwrap() })
    };
    gate.loaded.notified().await; // the reader holds the old row
    db.put("u1", "new"); // the writer commits ...
    cache
        .write_through(Kind::new("profile"))
        .invalidate("u1")
        .await
        .unwrap(); // ... and invalidates
    gate.release.notify_one(); // the reader fills
    let got = r.await.unwrap();
    assert_eq!(
        got.value().unwrap().name,
        "old",
        "the reader returns what it read"
    );
    assert_eq!(
        cached(&cache, "u1").await,
        None,
        "but its fill was rejected"
    );
    let next = reader.get("u1").await.unwrap();
    assert_eq!(next.value().unwrap().name, "new");
    cleanup(&ns).await;
}

/// The same with a write-through update instead of an invalidation.
async fn forced_stale_set_against_update_is_rejected(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "old");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let gate = db.arm_gate();
    let r = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.get("u1").await.unwrap() })
    };
    gate.loaded.notified().await;
    let row = db.put("u1", "new");
    cache
        .write_through(Kind::new("profile"))
        .update("u1", &row)
        .await
        .unwrap();
    gate.release.notify_one();
    r.await.unwrap();
    let c = cached(&cache, "u1").await;
    assert!(c.is_none() || c.unwrap().name == "new");
    assert_eq!(reader.get("u1").await.unwrap().value().unwrap().name, "new");
    cleanup(&ns).await;
}

/// Two write-through writers finishing in reverse order of commit.
async fn out_of_order_writers_keep_the_newer(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "v1");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    reader.get("u1").await.unwrap(); // v1 cached
    let w = cache.write_through(Kind::new("profile"));
    let v2 = db.put("u1", "v2");
    let v3 = db.put("u1", "v3");
    assert_eq!(
        w.update("u1", &v3).await.unwrap(),
        kura::WriteOutcome::Updated
    );
    assert_eq!(
        w.update("u1", &v2).await.unwrap(),
        kura::WriteOutcome::NotNewer
    );
    assert_eq!(cached(&cache, "u1").await.unwrap().name, "v3");
    cleanup(&ns).await;
}

/// Randomized interleavings of readers (several "processes") and writers
/// of both kinds over a few keys. Readers keep reading while the writers
/// run and after the last write, so a fill that raced the last write would
/// stay cached; at the end each cached value must be the committed row.
/// Repeated many times.
async fn randomized_interleavings_never_leave_stale(b: Backend) {
    let rounds = 30;
    for round in 0..rounds {
        let ns = ns();
        let db = TestDb::new();
        let ids = ["k0", "k1", "k2"];
        for id in ids {
            db.put(id, "initial");
        }
        // Slow loads: fills land after later writes.
        db.set_delay(Duration::from_millis(2));
        let caches: Vec<Cache> = b.fleet(3).into_iter().map(|s| cache_on(s, &ns)).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for t in 0..9 {
            let reader = caches[t % caches.len()].aside(Kind::new("profile"), Db(db.clone()));
            let stop = stop.clone();
            let seed: u64 = rand::random();
            readers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = ids[rng.random_range(0..ids.len())];
                    reader.get(id).await.unwrap();
                    tokio::time::sleep(Duration::from_micros(rng.random_range(0..1500))).await;
                }
            }));
        }
        let mut writers = Vec::new();
        for t in 0..6 {
            let writer = caches[t % caches.len()].write_through(Kind::new("profile"));
            let db = db.clone();
            let seed: u64 = rand::random();
            writers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                for _ in 0..4 {
                    let id = ids[rng.random_range(0..ids.len())];
                    tokio::time::sleep(Duration::from_micros(rng.random_range(0..4000))).await;
                    let row = db.put(id, &format!("w{}", rng.random::<u32>()));
                    tokio::time::sleep(Duration::from_micros(rng.random_range(0..2000))).await;
                    if rng.random_bool(0.5) {
                        writer.invalidate(id).await.unwrap();
                    } else {
                        writer.update(id, &row).await.unwrap();
                    }
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        // Loads that began before the last writes are still in flight.
        tokio::time::sleep(Duration::from_millis(rand::random_range(5..30))).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.await.unwrap();
        }
        for id in ids {
            let committed = db.get(id).unwrap();
            for cache in &caches {
                if let Some(c) = cached(cache, id).await {
                    assert_eq!(
                        c, committed,
                        "round {round}: {id} cached {c:?} but committed {committed:?}"
                    );
                }
                let f = cache
                    .aside(Kind::new("profile"), Db(db.clone()))
                    .get(id)
                    .await
                    .unwrap();
                assert_eq!(
                    f.value().unwrap(),
                    &committed,
                    "round {round}: read of {id}"
                );
            }
        }
        cleanup(&ns).await;
    }
}

/// Readers that started before a burst of writes: whatever order the fills
/// and updates run in, the cache ends with the last committed version.
async fn concurrent_updates_converge(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "v");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    reader.get("u1").await.unwrap();
    let writer = cache.write_through(Kind::new("profile"));
    let rows: Vec<Row> = (0..20).map(|i| db.put("u1", &format!("v{i}"))).collect();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    {
        use rand::seq::SliceRandom;
        order.shuffle(&mut rand::rng());
    }
    let rows = Arc::new(rows);
    let tasks: Vec<_> = order
        .into_iter()
        .map(|i| {
            let w = writer.clone();
            let rows = rows.clone();
            tokio::spawn(async move { w.update("u1", &rows[i]).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let last = rows.last().unwrap().clone();
    assert_eq!(cached(&cache, "u1").await.unwrap(), last);
    assert_eq!(reader.get("u1").await.unwrap().status(), Status::Hit);
    cleanup(&ns).await;
}

/// The write a reader arriving after it must not see past.
#[derive(Debug, Clone, Copy)]
enum Write {
    Invalidate,
    Update,
    CacheInvalidate,
    InvalidateAll,
}

/// A load of the old row is in flight in this process when a write commits
/// and its invalidation (or update) returns. A read that starts after that
/// must not join the old load: it loads the committed row itself.
async fn a_read_after_a_write_does_not_join_an_older_load(b: Backend, write: Write) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "old");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let gate = db.arm_gate();
    let first = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.get("u1").await.unwrap() })
    };
    gate.loaded.notified().await; // the load holds the old row
    let row = db.put("u1", "new");
    match write {
        Write::Invalidate => {
            cache
                .write_through(Kind::new("profile"))
                .invalidate("u1")
                .await
                .unwrap();
        }
        Write::Update => {
            cache
                .write_through(Kind::new("profile"))
                .update("u1", &row)
                .await
                .unwrap();
        }
        Write::CacheInvalidate => {
            cache.invalidate(Kind::new("profile"), "u1").await.unwrap();
        }
        Write::InvalidateAll => {
            cache.invalidate_all(Kind::new("profile")).await.unwrap();
        }
    }
    // The write has returned: this read starts after it.
    let after = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.get("u1").await.unwrap() })
    };
    // A read that loads by itself finishes while the old load is still
    // held. One that joined the old load waits for it: give it a bound,
    // then let the old load go so the failure shows what it would return.
    let got = tokio::select! {
        r = after => r.unwrap(),
        () = tokio::time::sleep(Duration::from_secs(5)) => {
            gate.release.notify_one();
            panic!("{write:?}: the read after the write joined the load of the old row");
        }
    };
    assert_eq!(got.value().unwrap().name, "new", "{write:?}");
    gate.release.notify_one();
    assert_eq!(first.await.unwrap().value().unwrap().name, "old");
    assert_eq!(
        reader.get("u1").await.unwrap().value().unwrap().name,
        "new",
        "{write:?}"
    );
    cleanup(&ns).await;
}

async fn read_after_invalidate_does_not_join_an_older_load(b: Backend) {
    a_read_after_a_write_does_not_join_an_older_load(b, Write::Invalidate).await;
}

async fn read_after_update_does_not_join_an_older_load(b: Backend) {
    a_read_after_a_write_does_not_join_an_older_load(b, Write::Update).await;
}

async fn read_after_cache_invalidate_does_not_join_an_older_load(b: Backend) {
    a_read_after_a_write_does_not_join_an_older_load(b, Write::CacheInvalidate).await;
}

async fn read_after_invalidate_all_does_not_join_an_older_load(b: Backend) {
    a_read_after_a_write_does_not_join_an_older_load(b, Write::InvalidateAll).await;
}

use rand::SeedableRng;

both_stores!(
    forced_stale_set_is_rejected,
    forced_stale_set_against_update_is_rejected,
    out_of_order_writers_keep_the_newer,
    randomized_interleavings_never_leave_stale,
    concurrent_updates_converge,
    read_after_invalidate_does_not_join_an_older_load,
    read_after_update_does_not_join_an_older_load,
    read_after_cache_invalidate_does_not_join_an_older_load,
    read_after_invalidate_all_does_not_join_an_older_load,
);

with_near_cache!(
    forced_stale_set_is_rejected,
    forced_stale_set_against_update_is_rejected,
    out_of_order_writers_keep_the_newer,
    randomized_interleavings_never_leave_stale,
    concurrent_updates_converge,
    read_after_invalidate_does_not_join_an_older_load,
    read_after_update_does_not_join_an_older_load,
    read_after_cache_invalidate_does_not_join_an_older_load,
    read_after_invalidate_all_does_not_join_an_older_load,
);
