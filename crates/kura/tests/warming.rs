//! Warming on both stores: batches, progress, never overwriting, one
//! instance at a time.

mod support;

use std::sync::{Arc, Mutex};

use kura::{Kind, Status};
use support::{Backend, Db, TestDb, cache_on, cleanup, ns};

async fn warms_in_batches_with_progress(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let ids: Vec<String> = (0..450).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.put(id, "x");
    }
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let mut with_ghosts = ids.clone();
    with_ghosts.push("ghost".into());
    with_ghosts.push("bad id".into());
    let report = profiles
        .warmer()
        .batch_size(100)
        .concurrency(3)
        .on_progress(move |p| s2.lock().unwrap().push(p))
        .run(futures::stream::iter(with_ghosts))
        .await
        .unwrap();
    assert!(!report.locked_out);
    assert_eq!(report.progress.seen, 452);
    assert_eq!(report.progress.cached, 450);
    assert_eq!(report.progress.skipped, 2);
    assert_eq!(report.progress.failed, 0);
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 5, "one progress call per batch");
    assert!(calls.windows(2).all(|w| w[0].seen <= w[1].seen));
    assert_eq!(db.batch_loads(), 5);
    for id in ids.iter().take(20) {
        assert_eq!(profiles.get(id).await.unwrap().status(), Status::Hit);
    }
    cleanup(&ns).await;
}

async fn never_overwrites_a_cached_value(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "v1");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get("u1").await.unwrap(); // v1 cached
    let v2 = db.put("u1", "v2");
    cache
        .write_through(Kind::new("profile"))
        .update("u1", &v2)
        .await
        .unwrap(); // v2 cached
    db.put("u1", "v3-uncommitted-to-cache");
    let report = profiles
        .warmer()
        .run(futures::stream::iter(vec!["u1".to_string()]))
        .await
        .unwrap();
    assert_eq!(report.progress.cached, 0);
    assert_eq!(report.progress.skipped, 1);
    assert_eq!(
        profiles.get("u1").await.unwrap().value().unwrap().name,
        "v2"
    );
    cleanup(&ns).await;
}

async fn one_instance_warms_at_a_time(b: Backend) {
    let ns = ns();
    let db = TestDb::new();
    let ids: Vec<String> = (0..2000).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.put(id, "x");
    }
    db.set_delay(std::time::Duration::from_millis(1));
    let fleet: Vec<_> = b
        .fleet(2)
        .into_iter()
        .map(|s| cache_on(s, &ns).aside(Kind::new("profile"), Db(db.clone())))
        .collect();
    let runs: Vec<_> = fleet
        .iter()
        .map(|p| {
            let p = p.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                p.warmer()
                    .batch_size(50)
                    .concurrency(1)
                    .run(futures::stream::iter(ids))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut reports = Vec::new();
    for r in runs {
        reports.push(r.await.unwrap());
    }
    let locked_out = reports.iter().filter(|r| r.locked_out).count();
    assert_eq!(locked_out, 1, "{reports:?}");
    let total: u64 = reports.iter().map(|r| r.progress.cached).sum();
    assert_eq!(total, 2000);
    // The lock is released: a later run may warm (and finds all cached).
    let again = fleet[0]
        .warmer()
        .run(futures::stream::iter(ids))
        .await
        .unwrap();
    assert!(!again.locked_out);
    assert_eq!(again.progress.skipped, 2000);
    cleanup(&ns).await;
}

both_stores!(
    warms_in_batches_with_progress,
    never_overwrites_a_cached_value,
    one_instance_warms_at_a_time,
);

with_near_cache!(
    warms_in_batches_with_progress,
    never_overwrites_a_cached_value,
    one_instance_warms_at_a_time,
);
