//! Write-behind on both stores: accept, read-your-writes, concurrent
//! patches, flush with coalescing and version guard, reclaim after a dead
//! flusher, the database down for a while, dead letters and back-pressure.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kura::{BehindError, BehindLimits, Cache, Kind, Status, TtlPolicy, TypePolicy};
use support::{Backend, Db, Row, TestDb, cache_on, cleanup, ns};

fn rename(suffix: &'static str) -> impl FnMut(&Row) -> Row {
    move |cur| Row {
        name: format!("{}{}", cur.name, suffix),
        version: cur.version + 1,
        ..cur.clone()
    }
}

async fn unknown_ids_are_refused(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let wb = cache.aside(Kind::PROFILE, Db(db.clone())).write_behind();
    let r = wb.accept("nobody", rename("x")).await;
    assert!(matches!(r, Err(BehindError::NotFound)), "{r:?}");
    assert!(matches!(
        wb.accept("bad id", rename("x")).await,
        Err(BehindError::Key(_))
    ));
    assert_eq!(wb.status().await.unwrap().depth, 0, "nothing queued");
    cleanup(&ns).await;
}

async fn reads_see_the_write_before_the_flush(b: Backend) {
    let ns = ns();
    let policy = TtlPolicy::seed()
        .with_jitter(0.0)
        .with_type("profile", TypePolicy::new(Duration::from_millis(1000)));
    let fleet = b.fleet(2);
    let cache = Cache::builder_shared(fleet[0].clone())
        .namespace(&ns)
        .ttl_policy(policy.clone())
        .build()
        .unwrap();
    let other = Cache::builder_shared(fleet[1].clone())
        .namespace(&ns)
        .ttl_policy(policy)
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("u1", "a");
    let reader = cache.aside(Kind::PROFILE, Db(db.clone()));
    let wb = reader.write_behind();
    let acc = wb.accept("u1", rename("b")).await.unwrap();
    assert_eq!(acc.value.name, "ab");
    assert_eq!(acc.value.version, 2);
    assert_eq!(db.get("u1").unwrap().name, "a", "not flushed yet");
    let got = reader.get("u1").await.unwrap();
    assert_eq!(
        (got.value().unwrap().name.as_str(), got.status()),
        ("ab", Status::Hit)
    );
    // Another instance sees it.
    let other_reader = other.aside(Kind::PROFILE, Db(db.clone()));
    assert_eq!(
        other_reader.get("u1").await.unwrap().value().unwrap().name,
        "ab"
    );
    // After the value's TTL has passed.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(reader.get("u1").await.unwrap().value().unwrap().name, "ab");
    // After another path invalidated the value.
    cache.invalidate(Kind::PROFILE, "u1").await.unwrap();
    assert_eq!(
        other_reader.get("u1").await.unwrap().value().unwrap().name,
        "ab"
    );
    let batch = reader.get_many(&["u1"]).await.unwrap();
    assert_eq!(batch.entries[0].1.value().unwrap().name, "ab");
    assert_eq!(
        db.loads(),
        1,
        "the database was read once, before the write"
    );
    assert!(wb.is_pending("u1").await.unwrap());
    cleanup(&ns).await;
}

async fn concurrent_patches_both_survive(b: Backend) {
    let ns = ns();
    let db = TestDb::new();
    db.put("u1", "");
    let fleet = b.fleet(3);
    let writers: Vec<_> = fleet
        .into_iter()
        .map(|s| {
            cache_on(s, &ns)
                .aside(Kind::PROFILE, Db(db.clone()))
                .write_behind()
        })
        .collect();
    let letters = "ABCDEFGHIJKLMNOPQRST";
    let tasks: Vec<_> = letters
        .chars()
        .enumerate()
        .map(|(i, ch)| {
            let wb = writers[i % writers.len()].clone();
            tokio::spawn(async move {
                wb.accept("u1", move |cur| Row {
                    name: format!("{}{ch}", cur.name),
                    version: cur.version + 1,
                    ..cur.clone()
                })
                .await
                .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let now = writers[0]
        .reader()
        .get("u1")
        .await
        .unwrap()
        .into_value()
        .unwrap();
    assert_eq!(now.version, 21);
    for ch in letters.chars() {
        assert!(now.name.contains(ch), "patch {ch} lost: {}", now.name);
    }
    // All twenty land in the database as one coalesced row.
    let mut f = writers[0].flusher(Db(db.clone())).linger(Duration::ZERO);
    let r = f.flush_once(false).await.unwrap();
    assert_eq!(r.entries, 20);
    assert_eq!(r.flushed, 1);
    assert_eq!(r.coalesced, 19);
    assert_eq!(db.get("u1").unwrap(), now);
    cleanup(&ns).await;
}

async fn flush_applies_acks_and_replays_are_no_ops(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    for i in 0..50 {
        db.put(&format!("u{i}"), "a");
    }
    let wb = cache.aside(Kind::PROFILE, Db(db.clone())).write_behind();
    for i in 0..50 {
        wb.accept(&format!("u{i}"), rename("b")).await.unwrap();
    }
    assert_eq!(wb.status().await.unwrap().depth, 50);
    let mut f = wb
        .flusher(Db(db.clone()))
        .batch_size(20)
        .linger(Duration::ZERO);
    let mut flushed = 0;
    for _ in 0..3 {
        flushed += f.flush_once(false).await.unwrap().flushed;
    }
    assert_eq!(flushed, 50);
    assert_eq!(db.applied(), 50);
    for i in 0..50 {
        let row = db.get(&format!("u{i}")).unwrap();
        assert_eq!((row.name.as_str(), row.version), ("ab", 2));
        assert!(!wb.is_pending(&format!("u{i}")).await.unwrap());
    }
    let s = wb.status().await.unwrap();
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
    // Reads after the flush still see the write (cached, then from the db).
    cache.invalidate_all(Kind::PROFILE).await.unwrap();
    assert_eq!(
        wb.reader().get("u7").await.unwrap().value().unwrap().name,
        "ab"
    );
    cleanup(&ns).await;
}

async fn entries_of_a_dead_flusher_are_reclaimed(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("u1", "a");
    let wb = cache.aside(Kind::PROFILE, Db(db.clone())).write_behind();
    wb.accept("u1", rename("b")).await.unwrap();
    // A flusher takes the entry and dies before applying it.
    let store = cache.store().clone();
    let taken = store
        .queue_read(wb.queue(), "dead-one", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    let mut f = wb
        .flusher(Db(db.clone()))
        .claim_idle(Duration::from_millis(200))
        .block(Duration::from_millis(50))
        .linger(Duration::ZERO);
    assert_eq!(
        f.flush_once(true).await.unwrap().flushed,
        0,
        "not idle long enough"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.flush_once(true).await.unwrap().flushed, 1);
    assert_eq!(db.get("u1").unwrap().name, "ab");
    // The dead flusher's late acknowledgement attempt changes nothing.
    assert_eq!(wb.status().await.unwrap().depth, 0);
    cleanup(&ns).await;
}

async fn database_down_for_a_while_loses_nothing(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    for i in 0..20 {
        db.put(&format!("u{i}"), "a");
    }
    let wb = cache.aside(Kind::PROFILE, Db(db.clone())).write_behind();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let flusher = wb
        .flusher(Db(db.clone()))
        .block(Duration::from_millis(100))
        .linger(Duration::from_millis(5));
    let run = tokio::spawn(flusher.run(async {
        let _ = stop_rx.await;
    }));
    // Cached before the database goes away: accepts read through the cache.
    for i in 0..20 {
        wb.reader().get(&format!("u{i}")).await.unwrap();
    }
    db.set_fail(true);
    for round in 0..3 {
        for i in 0..20 {
            wb.accept(&format!("u{i}"), move |cur| Row {
                name: format!("r{round}"),
                version: cur.version + 1,
                ..cur.clone()
            })
            .await
            .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(db.applied(), 0);
    db.set_fail(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while wb.status().await.unwrap().depth > 0 {
        assert!(std::time::Instant::now() < deadline, "queue never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(()).unwrap();
    let report = run.await.unwrap();
    assert!(report.retried > 0, "{report:?}");
    for i in 0..20 {
        let row = db.get(&format!("u{i}")).unwrap();
        assert_eq!((row.name.as_str(), row.version), ("r2", 4), "u{i}");
    }
    cleanup(&ns).await;
}

async fn rejected_writes_go_to_dead_letters(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    db.put("good", "a");
    db.put("poison", "a");
    db.reject("poison");
    let reader = cache.aside(Kind::PROFILE, Db(db.clone()));
    let wb = reader.write_behind();
    wb.accept("good", rename("b")).await.unwrap();
    wb.accept("poison", rename("b")).await.unwrap();
    let mut f = wb
        .flusher(Db(db.clone()))
        .max_attempts(3)
        .claim_idle(Duration::ZERO)
        .block(Duration::from_millis(20))
        .linger(Duration::ZERO);
    let mut report = kura::strategy::write_behind::FlushReport::default();
    for _ in 0..5 {
        let r = f.flush_once(true).await.unwrap();
        report.flushed += r.flushed;
        report.dead_lettered += r.dead_lettered;
    }
    assert_eq!((report.flushed, report.dead_lettered), (1, 1));
    let s = wb.status().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (0, 1));
    let dead = wb.dead_letters(10).await.unwrap();
    assert_eq!(dead[0].id, "poison");
    assert_eq!(dead[0].version, 2);
    assert!(dead[0].error.contains("constraint"));
    assert!(dead[0].value.contains("ab"));
    // Reads return to what the database has.
    assert_eq!(
        reader.get("poison").await.unwrap().value().unwrap().name,
        "a"
    );
    assert_eq!(db.get("good").unwrap().name, "ab");
    cleanup(&ns).await;
}

async fn back_pressure_refuses_past_the_limit(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    for i in 0..5 {
        db.put(&format!("u{i}"), "a");
    }
    let wb = cache
        .aside(Kind::PROFILE, Db(db.clone()))
        .write_behind()
        .limits(BehindLimits::new(3, Duration::ZERO));
    for i in 0..3 {
        wb.accept(&format!("u{i}"), rename("b")).await.unwrap();
    }
    match wb.accept("u3", rename("b")).await {
        Err(BehindError::Full { depth, .. }) => assert_eq!(depth, 3),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(
        wb.reader().get("u3").await.unwrap().value().unwrap().name,
        "a"
    );
    let aged = cache
        .aside(Kind::PROFILE, Db(db.clone()))
        .write_behind()
        .limits(BehindLimits::new(0, Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        aged.accept("u4", rename("b")).await,
        Err(BehindError::Full { .. })
    ));
    cleanup(&ns).await;
}

both_stores!(
    unknown_ids_are_refused,
    reads_see_the_write_before_the_flush,
    concurrent_patches_both_survive,
    flush_applies_acks_and_replays_are_no_ops,
    entries_of_a_dead_flusher_are_reclaimed,
    database_down_for_a_while_loses_nothing,
    rejected_writes_go_to_dead_letters,
    back_pressure_refuses_past_the_limit,
);

#[tokio::test]
async fn unreachable_redis_refuses_so_the_caller_writes_through() {
    let port = kura_testkit::free_port();
    let store = kura::store::RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .response_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let cache = Cache::builder(store).build().unwrap();
    let db = TestDb::new();
    db.put("u1", "a");
    let wb = cache.aside(Kind::PROFILE, Db(db.clone())).write_behind();
    let r = wb.accept("u1", rename("b")).await;
    assert!(matches!(r, Err(BehindError::Unavailable(_))), "{r:?}");
    let _ = Arc::new(());
}

#[tokio::test]
async fn durability_is_reported() {
    let (cache, _) = Backend::Memory.cache();
    let db = TestDb::new();
    let wb = cache.aside(Kind::PROFILE, Db(db)).write_behind();
    assert_eq!(
        wb.durability().await.unwrap(),
        kura::store::Durability::Volatile
    );
    let aof = kura_testkit::RedisServer::start_with(
        kura_testkit::RedisOptions::default().appendonly(true),
    )
    .await;
    let cache = Cache::builder(kura::store::RedisStore::open(&aof.url()).unwrap())
        .build()
        .unwrap();
    let wb = cache.aside(Kind::PROFILE, Db(TestDb::new())).write_behind();
    assert!(matches!(
        wb.durability().await.unwrap(),
        kura::store::Durability::Logged { .. }
    ));
}
