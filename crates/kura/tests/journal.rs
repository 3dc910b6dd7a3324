//! Pending invalidations (the journal of what could not reach the store):
//! only the keys and types they cover bypass the cache until they are
//! replayed, a pattern is kept once however often it failed, and a replay is
//! bounded in time, also when `Cache::ping` runs it.

mod support;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kura::key::{EntryKeys, KeyPattern};
use kura::store::{
    AcquireRequest, Acquired, CacheStore, CounterStore, FillOutcome, FillRequest, LockStore,
    MemoryStore, PositionStore, RateStore, StampStore, StoreResult, Tracking, TrackingSink,
    TrackingStore, UpdateOutcome, UpdateRequest,
};
use kura::{BreakerConfig, Cache, Kind, Status, Store, StoreError};
use support::{Backend, Db, TestDb, cleanup, ns};
use tokio::sync::{Notify, Semaphore};

const PASS: u8 = 0;
const FAIL: u8 = 1;
const HOLD: u8 = 2;
const SLOW: u8 = 3;

/// A store whose invalidations can be made to fail, to stop until
/// released, or to take 25 s (of the test clock) each.
struct Flaky {
    inner: Arc<dyn CacheStore>,
    mode: AtomicU8,
    entered: Notify,
    release: Semaphore,
    /// `SCAN MATCH` arguments of the pattern invalidations asked for.
    matching: Mutex<Vec<String>>,
}

impl Flaky {
    fn new(inner: Arc<dyn CacheStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            mode: AtomicU8::new(PASS),
            entered: Notify::new(),
            release: Semaphore::new(0),
            matching: Mutex::new(Vec::new()),
        })
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Lets every held invalidation go, now and later.
    fn release_all(&self) {
        self.release.close();
    }

    fn calls_of(&self, pattern: &str) -> usize {
        self.matching
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == pattern)
            .count()
    }

    async fn gate(&self) -> StoreResult<()> {
        match self.mode.load(Ordering::SeqCst) {
            FAIL => Err(StoreError::server("refused by the test")),
            HOLD => {
                self.entered.notify_one();
                let _ = self.release.acquire().await;
                Ok(())
            }
            SLOW => {
                tokio::time::sleep(Duration::from_secs(25)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flaky").finish_non_exhaustive()
    }
}

#[async_trait]
impl Store for Flaky {
    async fn get(&self, key: &str, refresh: Option<Duration>) -> StoreResult<Option<Bytes>> {
        self.inner.get(key, refresh).await
    }

    async fn get_many(&self, keys: &[&str]) -> StoreResult<Vec<Option<Bytes>>> {
        self.inner.get_many(keys).await
    }

    async fn acquire(&self, reqs: &[AcquireRequest<'_>]) -> StoreResult<Vec<Acquired>> {
        self.inner.acquire(reqs).await
    }

    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        self.inner.fill(reqs).await
    }

    async fn release(&self, entries: &[(&EntryKeys, &str)]) -> StoreResult<()> {
        self.inner.release(entries).await
    }

    async fn refresh_lease(
        &self,
        keys: &EntryKeys,
        token: &str,
        ttl: Duration,
        seen: u64,
    ) -> StoreResult<bool> {
        self.inner.refresh_lease(keys, token, ttl, seen).await
    }

    async fn refill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        self.inner.refill(reqs).await
    }

    async fn sweep(&self, pattern: &KeyPattern, epoch: u64) -> StoreResult<u64> {
        self.inner.sweep(pattern, epoch).await
    }

    async fn count_matching(&self, pattern: &KeyPattern) -> StoreResult<Option<u64>> {
        self.inner.count_matching(pattern).await
    }

    async fn update(&self, reqs: &[UpdateRequest<'_>]) -> StoreResult<Vec<UpdateOutcome>> {
        self.inner.update(reqs).await
    }

    async fn invalidate(&self, entries: &[&EntryKeys]) -> StoreResult<u64> {
        self.gate().await?;
        self.inner.invalidate(entries).await
    }

    async fn invalidate_older(&self, entries: &[(&EntryKeys, Option<u64>)]) -> StoreResult<u64> {
        self.gate().await?;
        self.inner.invalidate_older(entries).await
    }

    async fn invalidate_matching(&self, pattern: &KeyPattern) -> StoreResult<u64> {
        self.matching.lock().unwrap().push(pattern.scan_match());
        self.gate().await?;
        self.inner.invalidate_matching(pattern).await
    }

    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()> {
        self.inner.discard(key, seen).await
    }

    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()> {
        self.inner.set(key, bytes, ttl).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }

    fn bounds_own_latency(&self) -> bool {
        self.inner.bounds_own_latency()
    }

    fn needs_hash_tags(&self) -> bool {
        self.inner.needs_hash_tags()
    }

    fn describe(&self) -> &'static str {
        "flaky test store"
    }
}

#[async_trait]
impl StampStore for Flaky {
    async fn stamps(&self, key: &str) -> StoreResult<Vec<(String, u64)>> {
        self.inner.stamps(key).await
    }

    async fn bump_stamp(&self, key: &str, field: &str, held: u64) -> StoreResult<u64> {
        self.inner.bump_stamp(key, field, held).await
    }

    fn stamps_version(&self) -> Option<u64> {
        self.inner.stamps_version()
    }
}

#[async_trait]
impl PositionStore for Flaky {
    async fn rewind(&self, key: &str, from: u64, to: u64) -> StoreResult<bool> {
        self.inner.rewind(key, from, to).await
    }

    async fn advance(&self, key: &str, value: u64) -> StoreResult<u64> {
        self.inner.advance(key, value).await
    }
}

#[async_trait]
impl RateStore for Flaky {
    async fn rate(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
    ) -> StoreResult<kura::store::RateDecision> {
        self.inner.rate(key, limit, period).await
    }
}

#[async_trait]
impl CounterStore for Flaky {
    async fn incr(&self, counters: &[(&str, i64)]) -> StoreResult<()> {
        self.inner.incr(counters).await
    }

    async fn counters(&self, keys: &[&str]) -> StoreResult<Vec<i64>> {
        self.inner.counters(keys).await
    }
}

#[async_trait]
impl LockStore for Flaky {
    async fn lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        self.inner.lock(key, token, ttl).await
    }

    async fn extend_lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        self.inner.extend_lock(key, token, ttl).await
    }

    async fn unlock(&self, key: &str, token: &str) -> StoreResult<()> {
        self.inner.unlock(key, token).await
    }
}

impl TrackingStore for Flaky {
    fn track(
        &self,
        prefixes: Vec<String>,
        sink: std::sync::Weak<dyn TrackingSink>,
    ) -> Option<Tracking> {
        self.inner.track(prefixes, sink)
    }
}

/// A cache over `store` whose breaker never opens on the test's refusals
/// and whose maintenance stays out of the way unless a test wants it.
fn cache_over(store: Arc<Flaky>, ns: &str, flush: Duration) -> Cache {
    Cache::builder_shared(store)
        .namespace(ns)
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .breaker(BreakerConfig::new(1_000, Duration::from_millis(10)))
        .flush_interval(flush)
        .build()
        .expect("cache")
}

/// A replay is held while an invalidation of `u1` is pending: `u2` is read
/// from the cache as usual, `u1` from the database.
async fn only_keys_with_pending_invalidations_bypass_during_a_replay(b: Backend) {
    let ns = ns();
    let flaky = Flaky::new(b.store());
    let cache = cache_over(flaky.clone(), &ns, Duration::from_secs(3600));
    let db = TestDb::new();
    db.put("u1", "old");
    db.put("u2", "two");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    for id in ["u1", "u2"] {
        assert_eq!(profiles.get(id).await.unwrap().status(), Status::Miss);
        assert_eq!(profiles.get(id).await.unwrap().status(), Status::Hit);
    }
    flaky.set(FAIL);
    db.put("u1", "new");
    cache
        .write_through(Kind::new("profile"))
        .invalidate("u1")
        .await
        .unwrap();
    assert_eq!(cache.pending_invalidations(), 1);

    // The store is back, but the replay's invalidation is held.
    flaky.set(HOLD);
    let ping = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.ping().await })
    };
    flaky.entered.notified().await;

    let f = profiles.get("u2").await.unwrap();
    assert_eq!(f.status(), Status::Hit, "a key with nothing pending");
    let f = profiles.get("u1").await.unwrap();
    assert_eq!(
        f.status(),
        Status::Bypass,
        "the key with a pending invalidation"
    );
    assert_eq!(f.value().unwrap().name, "new");
    let batch = profiles.get_many(&["u1", "u2"]).await.unwrap();
    assert_eq!(batch.entries[0].1.status(), Status::Bypass);
    assert_eq!(batch.entries[0].1.value().unwrap().name, "new");
    assert_eq!(batch.entries[1].1.status(), Status::Hit);

    flaky.release_all();
    let _ = ping.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.pending_invalidations() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never replayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let f = profiles.get("u1").await.unwrap();
    assert_eq!(f.status(), Status::Miss);
    assert_eq!(f.value().unwrap().name, "new");
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Hit);
    if b == Backend::Redis {
        cleanup(&ns).await;
    }
}

/// A pattern invalidation of every profile is pending and its replay held:
/// profiles bypass the cache, settings do not.
async fn only_types_with_a_pending_pattern_bypass_during_a_replay(b: Backend) {
    let ns = ns();
    let flaky = Flaky::new(b.store());
    let cache = cache_over(flaky.clone(), &ns, Duration::from_secs(3600));
    let db = TestDb::new();
    db.put("u1", "old");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let settings = cache.aside(Kind::new("settings"), Db(db.clone()));
    for reader in [&profiles, &settings] {
        assert_eq!(reader.get("u1").await.unwrap().status(), Status::Miss);
        assert_eq!(reader.get("u1").await.unwrap().status(), Status::Hit);
    }
    flaky.set(FAIL);
    db.put("u1", "new");
    assert!(cache.invalidate_all(Kind::new("profile")).await.is_err());
    assert_eq!(cache.pending_invalidations(), 1);

    flaky.set(HOLD);
    let ping = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.ping().await })
    };
    flaky.entered.notified().await;
    assert_eq!(
        settings.get("u1").await.unwrap().status(),
        Status::Hit,
        "a type with nothing pending"
    );
    let f = profiles.get("u1").await.unwrap();
    assert_eq!(
        f.status(),
        Status::Bypass,
        "the type with a pending pattern"
    );
    assert_eq!(f.value().unwrap().name, "new");

    flaky.release_all();
    let _ = ping.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.pending_invalidations() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never replayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(profiles.get("u1").await.unwrap().status(), Status::Miss);
    if b == Backend::Redis {
        cleanup(&ns).await;
    }
}

both_stores!(
    only_keys_with_pending_invalidations_bypass_during_a_replay,
    only_types_with_a_pending_pattern_bypass_during_a_replay,
);

#[tokio::test]
async fn a_pattern_queued_twice_is_stored_once() {
    let flaky = Flaky::new(Arc::new(MemoryStore::new()));
    let cache = cache_over(flaky.clone(), "journal", Duration::from_secs(3600));
    flaky.set(FAIL);
    assert!(cache.invalidate_all(Kind::new("profile")).await.is_err());
    assert!(cache.invalidate_all(Kind::new("profile")).await.is_err());
    assert!(
        cache
            .invalidate_pattern(Kind::new("profile"), "*")
            .await
            .is_err()
    );
    assert_eq!(cache.pending_invalidations(), 1, "one pattern, kept once");
    assert!(
        cache
            .invalidate_pattern(Kind::new("profile"), "a*")
            .await
            .is_err()
    );
    assert!(cache.invalidate_all(Kind::new("settings")).await.is_err());
    assert_eq!(cache.pending_invalidations(), 3);
    // Replayed once each.
    let all_profiles = cache
        .keys()
        .pattern(&Kind::new("profile"), "*")
        .unwrap()
        .scan_match();
    let before = flaky.calls_of(&all_profiles);
    flaky.set(PASS);
    cache.ping().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.pending_invalidations() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never replayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(flaky.calls_of(&all_profiles) - before, 1, "replayed once");
}

/// Three pending patterns whose scans take 25 s each (within the old
/// per-pattern bound of 60 s): one replay stops at its bound of 60 s in
/// all, and the next one picks up what is left.
#[tokio::test(start_paused = true)]
async fn a_replay_is_bounded_as_a_whole() {
    let flaky = Flaky::new(Arc::new(MemoryStore::new()));
    let cache = cache_over(flaky.clone(), "journal", Duration::from_secs(1));
    flaky.set(FAIL);
    for kind in [
        Kind::new("profile"),
        Kind::new("settings"),
        Kind::new("preferences"),
    ] {
        assert!(cache.invalidate_all(kind).await.is_err());
    }
    assert_eq!(cache.pending_invalidations(), 3);
    let last = cache
        .keys()
        .pattern(&Kind::new("preferences"), "*")
        .unwrap()
        .scan_match();
    let before = flaky.calls_of(&last);
    flaky.set(SLOW);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    // The first replay reaches the third pattern at 50 s and is cut at 60 s;
    // the next one runs it again. A replay bounded per step only runs all
    // three in one go (75 s) and never asks for the third one twice.
    while flaky.calls_of(&last) < before + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay was not cut at its bound: third pattern asked for {} times",
            flaky.calls_of(&last) - before
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    while cache.pending_invalidations() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never replayed");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `ping` answers within its operation timeout even when a replay of
/// pending invalidations cannot finish.
#[tokio::test(start_paused = true)]
async fn ping_waits_for_a_replay_at_most_the_operation_timeout() {
    let flaky = Flaky::new(Arc::new(MemoryStore::new()));
    let cache = cache_over(flaky.clone(), "journal", Duration::from_secs(3600));
    flaky.set(FAIL);
    assert!(cache.invalidate_all(Kind::new("profile")).await.is_err());
    flaky.set(HOLD);
    let started = tokio::time::Instant::now();
    let r = cache.ping().await;
    let took = started.elapsed();
    // The test clock only moves when every task waits on a timer: this is
    // the replay's wait as the cache schedules it, not a speed measurement.
    assert!(
        took <= Duration::from_millis(250) * 2,
        "ping waited {took:?} for the replay"
    );
    assert!(r.is_ok(), "the store answered: {r:?}");
    assert_eq!(cache.pending_invalidations(), 1, "still pending");
    flaky.release_all();
}

/// `put` writes unconditionally: an invalidation of the key that is still
/// pending is applied first, so its replay cannot delete the new value.
#[tokio::test]
async fn a_put_after_a_deferred_invalidation_survives_the_replay() {
    let flaky = Flaky::new(Arc::new(MemoryStore::new()));
    let cache = cache_over(flaky.clone(), "journal", Duration::from_secs(3600));
    let value = serde_json::json!({ "revoked": true });
    cache.put(Kind::new("profile"), "t1", &value).await.unwrap();
    flaky.set(FAIL);
    assert!(
        cache
            .invalidate(Kind::new("profile"), "t1")
            .await
            .unwrap()
            .deferred
    );
    assert_eq!(
        cache
            .peek::<serde_json::Value>(Kind::new("profile"), "t1")
            .await
            .unwrap(),
        None,
        "a value whose invalidation is pending is not served"
    );
    flaky.set(PASS);
    cache.put(Kind::new("profile"), "t1", &value).await.unwrap();
    assert_eq!(cache.pending_invalidations(), 0, "applied by the put");
    cache.ping().await.unwrap();
    assert_eq!(
        cache
            .peek::<serde_json::Value>(Kind::new("profile"), "t1")
            .await
            .unwrap(),
        Some(value)
    );
    // While a pattern over the type is pending, a put is refused rather
    // than written for the replay to delete.
    flaky.set(FAIL);
    assert!(cache.invalidate_all(Kind::new("profile")).await.is_err());
    flaky.set(HOLD);
    let r = cache
        .put(Kind::new("profile"), "t2", &serde_json::json!({ "x": 1 }))
        .await;
    assert!(matches!(r, Err(kura::Error::Unavailable(_))), "{r:?}");
    flaky.release_all();
}
