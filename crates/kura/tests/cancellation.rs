//! A caller that gives up (a request timeout, a client gone) leaves nothing
//! behind that makes other readers wait: every lease it took is released or
//! filled.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kura::{Cache, Kind, Source, Status};
use support::{Backend, Db, DbDown, Row, TestDb, cleanup, ns};
use tokio::sync::Notify;

/// A source whose next batch load stops after it was called, until told.
#[derive(Clone)]
struct HeldBatch {
    db: Db,
    hold: Arc<AtomicBool>,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

impl HeldBatch {
    fn new(db: Arc<TestDb>) -> Self {
        Self {
            db: Db(db),
            hold: Arc::new(AtomicBool::new(true)),
            entered: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        }
    }
}

impl Source for HeldBatch {
    type Value = Row;
    type Error = DbDown;

    async fn load(&self, id: &str) -> Result<Option<Row>, DbDown> {
        self.db.load(id).await
    }

    async fn load_many(&self, ids: &[String]) -> Result<Vec<(String, Row)>, DbDown> {
        if self.hold.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        self.db.load_many(ids).await
    }
}

/// A cache whose leases outlive the test: a reader that waited for an
/// abandoned lease would wait far past the test's bound.
fn long_lease_cache(b: &Backend, ns: &str) -> Cache {
    Cache::builder_shared(b.store())
        .namespace(ns)
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .lease_ttl(Duration::from_secs(120))
        .lease_wait(Duration::from_secs(60))
        .build()
        .expect("cache")
}

async fn a_cancelled_get_many_releases_its_leases(b: Backend) {
    let ns = ns();
    let cache = long_lease_cache(&b, &ns);
    let db = TestDb::new();
    for id in ["u1", "u2", "u3"] {
        db.put(id, "row");
    }
    let source = HeldBatch::new(db.clone());
    let profiles = cache.aside(Kind::new("profile"), source.clone());

    // The batch takes its leases, then its load is held; the caller gives
    // up there (its future is dropped, as a request timeout drops it).
    tokio::select! {
        r = profiles.get_many(&["u1", "u2", "u3"]) => panic!("the held load returned: {r:?}"),
        () = source.entered.notified() => {}
    }

    // Another reader of a leased key: it must get the lease promptly and
    // fill, not poll until the abandoned lease expires (`lease_wait` 60 s,
    // lease TTL 120 s, so 20 s is far inside either).
    let other = cache.aside(Kind::new("profile"), Db(db.clone()));
    for id in ["u1", "u3"] {
        let f = tokio::time::timeout(Duration::from_secs(20), other.get(id))
            .await
            .unwrap_or_else(|_| panic!("{id}: waited for the cancelled batch's lease"))
            .unwrap();
        assert_eq!(f.status(), Status::Miss, "{id}");
        assert_eq!(
            other.get(id).await.unwrap().status(),
            Status::Hit,
            "{id}: the second reader filled"
        );
    }
    // So does a batch.
    let batch = tokio::time::timeout(Duration::from_secs(20), other.get_many(&["u2"]))
        .await
        .expect("waited for the cancelled batch's lease")
        .unwrap();
    assert!(batch.entries[0].1.is_found());
    let f = tokio::time::timeout(Duration::from_secs(20), other.get("u2"))
        .await
        .expect("u2: waited for the cancelled batch's lease")
        .unwrap();
    assert_eq!(f.status(), Status::Hit, "u2: the batch filled");
    if b == Backend::Redis {
        cleanup(&ns).await;
    }
}

/// The same for a warming run dropped while its batch load is held.
async fn a_cancelled_warming_batch_releases_its_leases(b: Backend) {
    let ns = ns();
    let cache = long_lease_cache(&b, &ns);
    let db = TestDb::new();
    for id in ["u1", "u2"] {
        db.put(id, "row");
    }
    let source = HeldBatch::new(db.clone());
    let profiles = cache.aside(Kind::new("profile"), source.clone());
    let ids = futures::stream::iter(vec!["u1".to_owned(), "u2".to_owned()]);
    tokio::select! {
        r = profiles.warmer().run(ids) => panic!("the held load returned: {r:?}"),
        () = source.entered.notified() => {}
    }
    let other = cache.aside(Kind::new("profile"), Db(db.clone()));
    for id in ["u1", "u2"] {
        let f = tokio::time::timeout(Duration::from_secs(20), other.get(id))
            .await
            .unwrap_or_else(|_| panic!("{id}: waited for the cancelled warming's lease"))
            .unwrap();
        assert_eq!(f.status(), Status::Miss, "{id}");
        assert_eq!(other.get(id).await.unwrap().status(), Status::Hit, "{id}");
    }
    if b == Backend::Redis {
        cleanup(&ns).await;
    }
}

both_stores!(
    a_cancelled_get_many_releases_its_leases,
    a_cancelled_warming_batch_releases_its_leases,
);

with_near_cache!(
    a_cancelled_get_many_releases_its_leases,
    a_cancelled_warming_batch_releases_its_leases,
);
