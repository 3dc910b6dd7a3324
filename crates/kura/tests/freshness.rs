//! Eager refresh and load timeouts (`kura::freshness`) on both stores, and
//! across two instances sharing Redis.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kura::freshness::EagerRefresh;
use kura::{Cache, Error, Kind, Status, TypePolicy};
use support::{Backend, Db, TestDb, cleanup, ns};

/// A builder over `store` in namespace `ns` with `policy` for profiles and
/// no TTL jitter.
fn profile_cache(
    store: Arc<dyn kura::QueueStore>,
    ns: &str,
    policy: TypePolicy,
) -> kura::CacheBuilder {
    Cache::builder_shared(store).namespace(ns).ttl_policy(
        support::seed_policy()
            .with_jitter(0.0)
            .with_type("profile", policy),
    )
}

/// A hot key with a 1 s TTL read by `readers` tasks on each of `instances`
/// caches for `run`; returns every status seen after the first load, and
/// the database.
async fn hot_key(
    b: &Backend,
    policy: TypePolicy,
    instances: usize,
    run: Duration,
) -> (Vec<Status>, Arc<TestDb>, Vec<Duration>) {
    let ns = ns();
    let db = TestDb::new();
    db.put("hot", "v");
    db.set_delay(Duration::from_millis(100));
    let readers: Vec<_> = b
        .fleet(instances)
        .into_iter()
        .map(|store| {
            profile_cache(store, &ns, policy)
                .build()
                .unwrap()
                .aside(Kind::new("profile"), Db(db.clone()))
        })
        .collect();
    // Warm: the one cold miss.
    assert_eq!(readers[0].get("hot").await.unwrap().status(), Status::Miss);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for r in &readers {
        for _ in 0..4 {
            let r = r.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut waits = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    seen.push(r.get("hot").await.unwrap().status());
                    waits.push(t.elapsed());
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (seen, waits)
            }));
        }
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut waits = Vec::new();
    for t in tasks {
        let (s, w) = t.await.unwrap();
        all.extend(s);
        waits.extend(w);
    }
    cleanup(&ns).await;
    (all, db, waits)
}

fn eager(ttl_ms: u64, beta: f64) -> TypePolicy {
    TypePolicy::new(Duration::from_millis(ttl_ms)).eager_refresh(EagerRefresh::new(beta).unwrap())
}

/// With eager refresh no reader misses: the key is reloaded before it
/// expires, in the background, once per refresh across both instances.
async fn eager_refresh_keeps_a_hot_key_warm(b: Backend) {
    let run = Duration::from_millis(3600);
    // With λ reads/s XFetch reloads about δβ·ln(λδβ) before expiry: with
    // δ = 100 ms, β = 0.5 and ~3,000 reads/s, some 250 ms early.
    let (seen, db, waits) = hot_key(&b, eager(1000, 0.5), 2, run).await;
    let misses = seen.iter().filter(|s| **s != Status::Hit).count();
    assert_eq!(
        misses,
        0,
        "every read after the first was a hit ({} reads)",
        seen.len()
    );
    // No reader waited for a load (a load takes 100 ms here).
    let slowest = waits.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_millis(80),
        "slowest read {slowest:?}"
    );
    // One load per refresh: loads are a TTL apart, never two at once.
    let times = db.load_times();
    assert!(
        (4..=7).contains(&times.len()),
        "about one load per TTL over {run:?}: {} loads",
        times.len()
    );
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(gap > Duration::from_millis(400), "two loads {gap:?} apart");
    }
}

/// Without it, every expiry of the hot key is a miss for some reader: what
/// the previous test would see if the rule did nothing.
async fn without_eager_refresh_expiry_costs_misses(b: Backend) {
    let policy = TypePolicy::new(Duration::from_millis(1000));
    let (seen, _db, waits) = hot_key(&b, policy, 2, Duration::from_millis(2500)).await;
    let misses = seen.iter().filter(|s| **s != Status::Hit).count();
    assert!(misses >= 2, "each expiry cost a miss: {misses}");
    let slowest = waits.iter().max().copied().unwrap_or_default();
    assert!(
        slowest >= Duration::from_millis(80),
        "someone waited for a load: {slowest:?}"
    );
}

/// A load slower than the soft timeout answers the stale copy and still
/// fills the cache in the background.
async fn soft_timeout_serves_stale_and_fills_later(b: Backend) {
    let ns = ns();
    let policy = TypePolicy::new(Duration::from_millis(1000))
        .max_stale(Duration::from_secs(60))
        .load_soft_timeout(Duration::from_millis(100));
    let cache = profile_cache(b.store(), &ns, policy).build().unwrap();
    let db = TestDb::new();
    db.put("u1", "v1");
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    assert_eq!(p.get("u1").await.unwrap().status(), Status::Miss);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    db.put("u1", "v2");
    db.set_delay(Duration::from_millis(500));
    let t = Instant::now();
    let f = p.get("u1").await.unwrap();
    let took = t.elapsed();
    assert_eq!(f.status(), Status::Stale);
    assert_eq!(f.value().unwrap().name, "v1");
    assert!(
        took < Duration::from_millis(400),
        "answered at the soft timeout: {took:?}"
    );
    // The load finished and filled: the next read is a hit of v2.
    tokio::time::sleep(Duration::from_millis(700)).await;
    db.set_delay(Duration::ZERO);
    let f = p.get("u1").await.unwrap();
    assert_eq!(
        (f.status(), f.value().unwrap().name.as_str()),
        (Status::Hit, "v2")
    );
    assert_eq!(db.loads(), 2);
    cleanup(&ns).await;
}

/// Without a stale copy the hard timeout answers an error, and the load
/// still fills the cache for the next reader.
async fn hard_timeout_bounds_a_cold_load(b: Backend) {
    let ns = ns();
    let policy = TypePolicy::new(Duration::from_secs(60))
        .load_soft_timeout(Duration::from_millis(50))
        .load_hard_timeout(Duration::from_millis(150));
    let cache = profile_cache(b.store(), &ns, policy).build().unwrap();
    let db = TestDb::new();
    db.put("u1", "v1");
    db.set_delay(Duration::from_millis(500));
    let p = cache.aside(Kind::new("profile"), Db(db.clone()));
    let t = Instant::now();
    let err = p.get("u1").await.unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(err, Error::LoadTimeout(d) if d == Duration::from_millis(150)),
        "{err:?}"
    );
    assert!(took < Duration::from_millis(400), "{took:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let f = p.get("u1").await.unwrap();
    assert_eq!(
        f.status(),
        Status::Hit,
        "the timed-out load filled the cache"
    );
    assert_eq!(db.loads(), 1);
    cleanup(&ns).await;
}

/// A reader of another instance, waiting on the lease of a slow load, also
/// gets the stale copy once the soft timeout has passed.
async fn waiters_on_another_instance_get_stale_at_the_soft_timeout(b: Backend) {
    let ns = ns();
    let policy = TypePolicy::new(Duration::from_millis(300))
        .max_stale(Duration::from_secs(60))
        .load_soft_timeout(Duration::from_millis(100));
    let caches: Vec<_> = b
        .fleet(2)
        .into_iter()
        .map(|s| {
            profile_cache(s, &ns, policy)
                // Waiters wait for the fill rather than take the stale copy
                // at once: only the soft timeout hands it out.
                .stale_while_loading(false)
                .build()
                .unwrap()
        })
        .collect();
    let db = TestDb::new();
    db.put("u1", "v1");
    let a = caches[0].aside(Kind::new("profile"), Db(db.clone()));
    let b2 = caches[1].aside(Kind::new("profile"), Db(db.clone()));
    a.get("u1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    db.set_delay(Duration::from_millis(800));
    let loader = tokio::spawn({
        let a = a.clone();
        async move { a.get("u1").await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = Instant::now();
    let f = b2.get("u1").await.unwrap();
    assert_eq!(f.status(), Status::Stale);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(loader.await.unwrap(), Status::Stale);
    assert_eq!(db.loads(), 2, "the waiter did not load");
    cleanup(&ns).await;
}

both_stores!(
    eager_refresh_keeps_a_hot_key_warm,
    without_eager_refresh_expiry_costs_misses,
    soft_timeout_serves_stale_and_fills_later,
    hard_timeout_bounds_a_cold_load,
    waiters_on_another_instance_get_stale_at_the_soft_timeout,
);
