//! Soak of the embedded store in the scenario of a black-box report (a
//! 4 MiB bound, 2,000 profile-sized values, 16 concurrent readers, rounds of
//! reading everything and waiting past the TTL, then two passes, once in
//! four runs answered with 0 % hits): round after round, a pass right after
//! a pass that filled the cache is answered from it, the adaptive rule's
//! longer TTL keeps hot values through the wait, and the store's byte count
//! stays within its bound. Time is scaled down (TTL 400 ms, waits of
//! 460 ms) so that four runs take seconds.
//!
//! The second test shows what gives 0 %: a pass of misses that takes longer
//! than the TTL. Both passes read the keys in the same order at the same
//! pace, so each key is read again one pass later, after its value expired:
//! every read of the second pass is a miss, and so is every read of any
//! later pass. The store loses nothing; the keys are read less often than
//! once per TTL.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kura::store::MemoryStore;
use kura::{Adaptive, Cache, Kind, Status};
use support::{Db, TestDb, ns};

const KEYS: usize = 2000;
const READERS: usize = 16;
const BOUND: usize = 4 << 20;
const TTL: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_millis(460);

/// One pass: every key read once, spread over the readers; the hit ratio.
async fn pass(profiles: &kura::CacheAside<Db>, ids: &Arc<Vec<String>>) -> f64 {
    let reads = timed_pass(profiles, ids).await;
    reads.iter().filter(|r| r.1).count() as f64 / KEYS as f64
}

/// One pass; for each key (in `ids` order) when its read ended and whether
/// it was a hit.
async fn timed_pass(
    profiles: &kura::CacheAside<Db>,
    ids: &Arc<Vec<String>>,
) -> Vec<(std::time::Instant, bool)> {
    let mut tasks = Vec::new();
    for r in 0..READERS {
        let (p, ids) = (profiles.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (i, id) in ids.iter().enumerate().skip(r).step_by(READERS) {
                let hit = p.get(id).await.unwrap().status() == Status::Hit;
                out.push((i, std::time::Instant::now(), hit));
            }
            out
        }));
    }
    let mut all = vec![(std::time::Instant::now(), false); KEYS];
    for t in tasks {
        for (i, at, hit) in t.await.unwrap() {
            all[i] = (at, hit);
        }
    }
    all
}

fn profile_ids(db: &TestDb) -> Arc<Vec<String>> {
    let name = "山".repeat(130);
    Arc::new(
        (0..KEYS)
            .map(|i| {
                let id = format!("{i:08x}-2b1c-4d3e-9f80-{i:012x}");
                db.put(&id, &name);
                id
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_caching_round_after_round() {
    for run in 0..4 {
        let store = MemoryStore::new().with_max_bytes(BOUND);
        let mut policy = support::seed_policy();
        let mut p = policy.get("profile");
        p.ttl = TTL;
        // The service's rule for `--ttl profile=…`: read more than 10 times
        // in the window, a key lives twice as long.
        p.adaptive = Some(Adaptive::new(10, Duration::from_secs(3600), TTL * 2));
        policy.set("profile", p);
        let cache = Cache::builder(store.clone())
            .namespace(ns())
            .ttl_policy(policy)
            .build()
            .unwrap();
        let db = TestDb::new();
        let ids = profile_ids(&db);
        let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
        let mut seen = Vec::new();
        for round in 0..6 {
            let first = pass(&profiles, &ids).await;
            let second = pass(&profiles, &ids).await;
            seen.push((first, second));
            assert!(
                second >= 0.99,
                "run {run} round {round}: {second:.3} hits right after a pass that filled ({seen:?})"
            );
            assert!(
                store.used_bytes() <= BOUND,
                "run {run}: {} bytes",
                store.used_bytes()
            );
            tokio::time::sleep(WAIT).await;
        }
        // Read 12 times each: hot, so their TTL was doubled and the wait did
        // not expire them.
        let after = (pass(&profiles, &ids).await, pass(&profiles, &ids).await);
        assert!(
            after.0 >= 0.95 && after.1 >= 0.99,
            "run {run}: passes after the last round {after:?} ({seen:?})"
        );
        assert!(store.used_bytes() <= BOUND);
    }
}

/// A pass of misses slower than the TTL: the next pass reads each key after
/// its value expired, so it is a miss; a key read again within the TTL is a
/// hit. Whether a read hits is decided by the time since its key was
/// filled, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_slower_than_the_ttl_finds_every_value_expired() {
    let store = MemoryStore::new().with_max_bytes(BOUND);
    let mut policy = support::seed_policy().with_jitter(0.0);
    let mut p = policy.get("profile");
    p.ttl = TTL;
    p.adaptive = None;
    policy.set("profile", p);
    let cache = Cache::builder(store)
        .namespace(ns())
        .ttl_policy(policy)
        .build()
        .unwrap();
    let db = TestDb::new();
    let ids = profile_ids(&db);
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    // 125 loads per reader at 5 ms: a pass of misses takes over 600 ms.
    db.set_delay(Duration::from_millis(5));
    let first = timed_pass(&profiles, &ids).await;
    let second = timed_pass(&profiles, &ids).await;
    let (mut hits, mut misses) = (0, 0);
    for (i, ((filled, _), (read, hit))) in first.iter().zip(&second).enumerate() {
        let since = read.duration_since(*filled);
        if *hit {
            hits += 1;
            assert!(since < TTL, "key {i} hit {since:?} after its fill");
        } else {
            misses += 1;
            // The read began at most one load before it ended.
            assert!(
                since + Duration::from_millis(5) >= TTL,
                "key {i} missed only {since:?} after its fill"
            );
        }
    }
    eprintln!("second pass: {hits} hits, {misses} misses");
    assert!(
        misses * 10 >= KEYS * 9,
        "a pass slower than the TTL reads almost every key after its expiry: {hits} hits"
    );
}
