//! Write-behind on both stores: accept, read-your-writes, concurrent
//! patches, flush with coalescing and version guard, reclaim after a dead
//! flusher, the database down for a while, dead letters and back-pressure.

mod support;

use std::sync::Arc;
use std::time::Duration;

use kura::{BehindError, BehindLimits, Cache, Kind, QueuedCache, Status, TypePolicy};
use support::{Backend, Db, Row, TestDb, cleanup, ns, queued_on};

fn rename(suffix: &'static str) -> impl FnMut(&Row) -> Row {
    move |cur| Row {
        name: format!("{}{}", cur.name, suffix),
        version: cur.version + 1,
        ..cur.clone()
    }
}

async fn unknown_ids_are_refused(b: Backend) {
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
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
    let policy = support::seed_policy()
        .with_jitter(0.0)
        .with_type("profile", TypePolicy::new(Duration::from_millis(1000)));
    let fleet = b.fleet(2);
    let cache = Cache::queued_shared(fleet[0].clone())
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
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let wb = cache.write_behind(&reader);
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
    let other_reader = other.aside(Kind::new("profile"), Db(db.clone()));
    assert_eq!(
        other_reader.get("u1").await.unwrap().value().unwrap().name,
        "ab"
    );
    // After the value's TTL has passed.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(reader.get("u1").await.unwrap().value().unwrap().name, "ab");
    // After another path invalidated the value.
    cache.invalidate(Kind::new("profile"), "u1").await.unwrap();
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
        .map(|s| queued_on(s, &ns).behind(Kind::new("profile"), Db(db.clone())))
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
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    for i in 0..50 {
        db.put(&format!("u{i}"), "a");
    }
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
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
    cache.invalidate_all(Kind::new("profile")).await.unwrap();
    assert_eq!(
        wb.reader().get("u7").await.unwrap().value().unwrap().name,
        "ab"
    );
    cleanup(&ns).await;
}

async fn entries_of_a_dead_flusher_are_reclaimed(b: Backend) {
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    db.put("u1", "a");
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
    wb.accept("u1", rename("b")).await.unwrap();
    // A flusher takes the entry and dies before applying it.
    let store = cache.queue_store().clone();
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
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    for i in 0..20 {
        db.put(&format!("u{i}"), "a");
    }
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
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
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    db.put("good", "a");
    db.put("poison", "a");
    db.reject("poison");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let wb = cache.write_behind(&reader);
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
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    for i in 0..5 {
        db.put(&format!("u{i}"), "a");
    }
    let wb = cache
        .behind(Kind::new("profile"), Db(db.clone()))
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
        .behind(Kind::new("profile"), Db(db.clone()))
        .limits(BehindLimits::new(0, Duration::from_millis(100)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        aged.accept("u4", rename("b")).await,
        Err(BehindError::Full { .. })
    ));
    cleanup(&ns).await;
}

/// B1 reads v1; B2 accepts v2, which is flushed and settled; the cached
/// value goes (expiry, eviction or an invalidation); only then does B1's
/// accept, based on v1, reach the store. With nothing cached to compare
/// with, it must not be acknowledged as a patch of v1: it is re-based on
/// what the database has (B2's v2).
async fn a_write_based_on_a_version_no_longer_cached_is_re_based(b: Backend) {
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    db.put("u1", "a");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let b1 = cache.write_behind(&reader);
    let b2 = cache.write_behind(&reader);
    let interleave = {
        let (cache, db, b2) = (cache.clone(), db.clone(), b2.clone());
        move || {
            let rt = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| {
                rt.block_on(async {
                    b2.accept("u1", rename("+B2")).await.unwrap();
                    let mut f = b2.flusher(Db(db.clone())).linger(Duration::ZERO);
                    assert_eq!(f.flush_once(false).await.unwrap().flushed, 1);
                    assert!(!b2.is_pending("u1").await.unwrap(), "settled");
                    cache.invalidate(Kind::new("profile"), "u1").await.unwrap();
                });
            });
        }
    };
    let mut interleave = Some(interleave);
    let mut seen = Vec::new();
    let acc = b1
        .accept("u1", |cur| {
            seen.push(cur.version);
            // B1 has read its version; the other writer gets in now.
            if let Some(f) = interleave.take() {
                f();
            }
            Row {
                name: format!("{}+B1", cur.name),
                version: cur.version + 1,
                ..cur.clone()
            }
        })
        .await
        .unwrap();
    assert_eq!(db.get("u1").unwrap().name, "a+B2");
    assert_eq!(
        (acc.value.name.as_str(), acc.value.version),
        ("a+B2+B1", 3),
        "B1's patch must be re-based on B2's write (patch saw versions {seen:?})"
    );
    let got = reader.get("u1").await.unwrap().into_value().unwrap();
    assert_eq!(got.name, "a+B2+B1");
    let mut f = b1.flusher(Db(db.clone())).linger(Duration::ZERO);
    assert_eq!(f.flush_once(false).await.unwrap().flushed, 1);
    assert_eq!(db.get("u1").unwrap().name, "a+B2+B1");
    cleanup(&ns).await;
}

/// A row the database refuses must not hold back the others: with the
/// default settings scaled down twenty times (max age 60 s → 3 s, claim
/// idle 30 s → 1.5 s, first retry back-off 1 s → 50 ms, 5 attempts),
/// writes of other rows keep being accepted for longer than the age limit
/// while the refused row is retried and finally dead-lettered.
async fn a_refused_row_does_not_hold_back_the_others(b: Backend) {
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    db.put("poison", "a");
    for i in 0..10 {
        db.put(&format!("u{i}"), "a");
    }
    db.reject("poison");
    let max_age = Duration::from_millis(3000);
    let wb = cache
        .behind(Kind::new("profile"), Db(db.clone()))
        .limits(BehindLimits::new(100_000, max_age));
    let flusher = wb
        .flusher(Db(db.clone()))
        .claim_idle(Duration::from_millis(1500))
        .retry_backoff(Duration::from_millis(50))
        .max_attempts(5)
        .block(Duration::from_millis(50));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(flusher.run(async {
        let _ = stop_rx.await;
    }));
    wb.accept("poison", rename("b")).await.unwrap();
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < max_age + Duration::from_millis(2000) {
        let id = format!("u{}", n % 10);
        match wb.accept(&id, rename("x")).await {
            Ok(_) => {}
            Err(e) => panic!("write {n} of {id} refused after {:?}: {e}", start.elapsed()),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = wb.status().await.unwrap();
        if s.depth == 0 && s.dead_letters == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not drained: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(()).unwrap();
    let report = run.await.unwrap();
    assert_eq!(
        (report.dead_lettered, report.requeued),
        (1, 4),
        "{report:?}"
    );
    assert_eq!(wb.dead_letters(5).await.unwrap()[0].id, "poison");
    assert_eq!(db.get("poison").unwrap().name, "a");
    cleanup(&ns).await;
}

async fn writers_of_one_entity_take_turns(b: Backend) {
    let (cache, ns) = b.queued();
    let db = TestDb::new();
    db.put("u1", "a");
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let wb = cache.write_behind(&reader);
    let first = wb.turn("u1").await.unwrap();
    assert!(first.is_locked());
    // Another entity is not held up.
    let other = wb.turn("u2").await.unwrap();
    assert!(other.is_locked());
    other.release().await;
    // A second writer of u1 waits for the first.
    let wb2 = wb.clone();
    let second = tokio::spawn(async move { wb2.direct_turn("u1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second writer waited for the first"
    );
    first.release().await;
    let second = tokio::time::timeout(Duration::from_secs(2), second)
        .await
        .expect("the second writer got its turn after the release")
        .unwrap()
        .unwrap();
    assert!(second.is_locked());
    // Dropped unreleased: the lock is still given back.
    drop(second);
    let third = tokio::time::timeout(Duration::from_secs(2), wb.turn("u1"))
        .await
        .expect("a dropped turn gives its lock back")
        .unwrap();
    third.release().await;
    // A direct write waits for the entity's queued writes, then gives up.
    wb.accept("u1", rename("b")).await.unwrap();
    let t0 = std::time::Instant::now();
    let r = wb.direct_turn("u1").await;
    assert!(
        matches!(r, Err(kura::TurnError::Queued { kind: "profile" })),
        "{r:?}"
    );
    assert!(t0.elapsed() >= kura::strategy::write_behind::ordering::QUEUED_WAIT);
    // The lock was given back with the refusal.
    wb.turn("u1").await.unwrap().release().await;
    cleanup(&ns).await;
}

both_stores!(
    writers_of_one_entity_take_turns,
    unknown_ids_are_refused,
    reads_see_the_write_before_the_flush,
    concurrent_patches_both_survive,
    flush_applies_acks_and_replays_are_no_ops,
    entries_of_a_dead_flusher_are_reclaimed,
    database_down_for_a_while_loses_nothing,
    rejected_writes_go_to_dead_letters,
    back_pressure_refuses_past_the_limit,
    a_write_based_on_a_version_no_longer_cached_is_re_based,
    a_refused_row_does_not_hold_back_the_others,
);

#[tokio::test]
async fn unreachable_redis_refuses_so_the_caller_writes_through() {
    let port = kura_testkit::free_port();
    let store = kura::store::RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .response_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let cache = Cache::queued(store).build().unwrap();
    let db = TestDb::new();
    db.put("u1", "a");
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
    let r = wb.accept("u1", rename("b")).await;
    assert!(matches!(r, Err(BehindError::Unavailable(_))), "{r:?}");
    let _ = Arc::new(());
}

#[tokio::test]
async fn durability_is_reported() {
    let (cache, _) = Backend::Memory.queued();
    let db = TestDb::new();
    let wb = cache.behind(Kind::new("profile"), Db(db));
    assert_eq!(
        wb.durability().await.unwrap(),
        kura::store::Durability::Volatile
    );
    let aof = kura_testkit::RedisServer::start_with(
        kura_testkit::RedisOptions::default().appendonly(true),
    )
    .await;
    let cache = Cache::queued(kura::store::RedisStore::open(&aof.url()).unwrap())
        .build()
        .unwrap();
    let wb = cache.behind(Kind::new("profile"), Db(TestDb::new()));
    assert!(matches!(
        wb.durability().await.unwrap(),
        kura::store::Durability::Logged { .. }
    ));
}

/// A cache over a Redis server the test started.
fn cache_at(url: &str) -> QueuedCache {
    Cache::queued(kura::store::RedisStore::open(url).unwrap())
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .build()
        .unwrap()
}

async fn admin(srv: &kura_testkit::RedisServer, args: &[&str]) -> kura_testkit::resp::Reply {
    kura_testkit::resp::command(srv.addr(), args).await.unwrap()
}

async fn int_reply(srv: &kura_testkit::RedisServer, args: &[&str]) -> i64 {
    match admin(srv, args).await {
        kura_testkit::resp::Reply::Integer(n) => n,
        other => panic!("{args:?} did not answer a number: {other:?}"),
    }
}

/// The server forgets its scripts (`SCRIPT FLUSH`; a restart or a failover
/// does the same) between an accept and the flush that dead-letters it:
/// the retry after `NOSCRIPT` must not write the dead letter twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_lost_before_a_dead_letter_write_it_once() {
    let srv = kura_testkit::RedisServer::start().await;
    let cache = cache_at(&srv.url());
    let db = TestDb::new();
    db.put("poison", "a");
    db.reject("poison");
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
    wb.accept("poison", rename("b")).await.unwrap();
    admin(&srv, &["SCRIPT", "FLUSH"]).await;
    let mut f = wb
        .flusher(Db(db.clone()))
        .max_attempts(1)
        .linger(Duration::ZERO)
        .block(Duration::from_millis(50));
    let r = f.flush_once(false).await.unwrap();
    assert_eq!(r.dead_lettered, 1);
    let s = wb.status().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (0, 1), "{s:?}");
    assert!(!wb.is_pending("poison").await.unwrap());
}

/// The settle step cannot run (the scripts are gone and cannot be loaded
/// again at that moment, as while a restarted Redis comes back): the
/// acknowledgement must not happen without it, or a pending copy without
/// TTL and without a queue entry stays behind for ever (and direct writes
/// of that row answer 503 for ever). Settle and acknowledgement are one
/// step: either both happen or neither, and a later flush finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_that_cannot_run_leaves_the_write_queued() {
    let srv = kura_testkit::RedisServer::start().await;
    // The flusher's user may run scripts but not load them.
    admin(
        &srv,
        &[
            "ACL", "SETUSER", "flusher", "on", ">pw", "~*", "&*", "+@all", "-script",
        ],
    )
    .await;
    let writer = cache_at(&srv.url());
    let flusher_cache = cache_at(&format!("redis://flusher:pw@127.0.0.1:{}", srv.port()));
    let db = TestDb::new();
    db.put("u1", "a");
    db.put("u2", "a");
    let wb = writer.behind(Kind::new("profile"), Db(db.clone()));
    wb.accept("u1", rename("b")).await.unwrap();
    admin(&srv, &["SCRIPT", "FLUSH"]).await;
    let fwb = flusher_cache.behind(Kind::new("profile"), Db(db.clone()));
    let mut f = fwb
        .flusher(Db(db.clone()))
        .claim_idle(Duration::ZERO)
        .linger(Duration::ZERO)
        .block(Duration::from_millis(50));
    let _ = f.flush_once(false).await;
    let pending = wb.is_pending("u1").await.unwrap();
    let queued = int_reply(&srv, &["XLEN", &wb.queue().stream]).await;
    assert!(
        !pending || queued > 0,
        "a pending copy was left without a queue entry"
    );
    // The scripts are back (any accept loads them): the next flush finishes.
    wb.accept("u2", rename("b")).await.unwrap();
    for _ in 0..3 {
        f.flush_once(true).await.unwrap();
    }
    assert!(!wb.is_pending("u1").await.unwrap());
    assert!(!wb.is_pending("u2").await.unwrap());
    assert_eq!(wb.status().await.unwrap().depth, 0);
    assert_eq!(db.get("u1").unwrap().name, "ab");
}

/// Redis restarts (AOF on: the data is back, the scripts are not) between
/// the accept and the flush: the flush lands the write, and no pending copy
/// is left without a queue entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_between_accept_and_flush_leaves_no_orphan() {
    let mut srv = kura_testkit::RedisServer::start_with(
        kura_testkit::RedisOptions::default().appendonly(true),
    )
    .await;
    let cache = cache_at(&srv.url());
    let db = TestDb::new();
    for i in 0..10 {
        db.put(&format!("u{i}"), "a");
    }
    db.put("poison", "a");
    db.reject("poison");
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
    for i in 0..10 {
        wb.accept(&format!("u{i}"), rename("b")).await.unwrap();
    }
    wb.accept("poison", rename("b")).await.unwrap();
    srv.stop().await;
    srv.restart().await;
    let mut f = wb
        .flusher(Db(db.clone()))
        .max_attempts(1)
        .claim_idle(Duration::ZERO)
        .linger(Duration::ZERO)
        .block(Duration::from_millis(50));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut report = kura::strategy::write_behind::FlushReport::default();
    while report.flushed + report.dead_lettered < 11 {
        assert!(std::time::Instant::now() < deadline, "{report:?}");
        match f.flush_once(true).await {
            Ok(r) => report += r,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(
        (report.flushed, report.dead_lettered),
        (10, 1),
        "{report:?}"
    );
    for i in 0..10 {
        assert!(!wb.is_pending(&format!("u{i}")).await.unwrap());
        assert_eq!(db.get(&format!("u{i}")).unwrap().name, "ab");
    }
    assert!(!wb.is_pending("poison").await.unwrap());
    let s = wb.status().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (0, 1), "{s:?}");
}

/// `XAUTOCLAIM` looks at no more than ten times `COUNT` pending entries per
/// call: the claims must go on from where the last one stopped, or entries
/// of a dead flusher behind many live ones are never taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_go_on_past_live_entries() {
    use kura::QueueStore;
    let srv = kura_testkit::RedisServer::start().await;
    let store = kura::store::RedisStore::open(&srv.url()).unwrap();
    let cache = cache_at(&srv.url());
    let db = TestDb::new();
    for i in 0..40 {
        db.put(&format!("u{i}"), "a");
    }
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
    for i in 0..40 {
        wb.accept(&format!("u{i}"), rename("b")).await.unwrap();
    }
    let q = wb.queue();
    let live = store
        .queue_read(q, "live", 30, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(live.len(), 30);
    let dead = store
        .queue_read(q, "dead", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(dead.len(), 10);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut claimed = Vec::new();
    for _ in 0..4 {
        // The live flusher keeps its (older) entries busy.
        let mut cmd = vec!["XCLAIM", &q.stream, &q.group, "live", "0"];
        cmd.extend(live.iter().map(|e| e.entry_id.as_str()));
        admin(&srv, &cmd).await;
        claimed.extend(
            store
                .queue_claim(q, "other", Duration::from_millis(100), 2)
                .await
                .unwrap(),
        );
    }
    assert!(
        claimed
            .iter()
            .any(|c| dead.iter().any(|d| d.entry_id == c.entry_id)),
        "the dead flusher's entries were never reached: {claimed:?}"
    );
    assert!(
        claimed
            .iter()
            .all(|c| !live.iter().any(|l| l.entry_id == c.entry_id)),
        "a live entry was taken"
    );
}

/// A Redis that may evict keys without TTL (`allkeys-*`) can drop pending
/// copies and the queue itself: `behind` writes are refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_refuses_write_behind() {
    let srv = kura_testkit::RedisServer::start_with(
        kura_testkit::RedisOptions::default().args(["--maxmemory-policy", "allkeys-lru"]),
    )
    .await;
    let cache = cache_at(&srv.url());
    let db = TestDb::new();
    db.put("u1", "a");
    let wb = cache.behind(Kind::new("profile"), Db(db.clone()));
    let r = wb.accept("u1", rename("b")).await;
    match &r {
        Err(BehindError::Evicting { policy }) => assert_eq!(policy, "allkeys-lru"),
        other => panic!("accepted on an evicting Redis: {other:?}"),
    }
    assert!(!wb.is_pending("u1").await.unwrap());
    assert_eq!(
        wb.eviction_policy().await.unwrap().as_deref(),
        Some("allkeys-lru")
    );
    // Allowed explicitly, at the operator's risk.
    let risky = wb
        .clone()
        .limits(BehindLimits::default().allow_eviction(true));
    risky.accept("u1", rename("b")).await.unwrap();
    assert!(risky.is_pending("u1").await.unwrap());
}

with_near_cache!(
    unknown_ids_are_refused,
    reads_see_the_write_before_the_flush,
    concurrent_patches_both_survive,
    flush_applies_acks_and_replays_are_no_ops,
    entries_of_a_dead_flusher_are_reclaimed,
    database_down_for_a_while_loses_nothing,
    rejected_writes_go_to_dead_letters,
    back_pressure_refuses_past_the_limit,
    a_write_based_on_a_version_no_longer_cached_is_re_based,
    a_refused_row_does_not_hold_back_the_others,
);
