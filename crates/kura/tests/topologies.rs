//! kura on a real Redis Cluster (3 primaries, 3 replicas) and a Sentinel
//! group (1 master, 2 replicas, 3 sentinels), started by the test: the
//! store conformance suite, the strategies across several connections, and
//! failovers under load.

mod conformance;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kura::{BehindLimits, Cache, Kind, QueuedCache, Status};
use kura_testkit::{RedisCluster, RedisOptions, RedisSentinelGroup};
use support::{Backend, Db, Row, TestDb, ns, queued_on};

/// Strategy-level checks on a shared topology: the fleet-wide stampede
/// guard, pattern invalidation counted across every primary, warming once
/// per fleet, write-behind accept and flush.
async fn strategies(b: Backend) {
    let ns = ns();
    let db = TestDb::new();
    let ids: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.put(id, "x");
    }
    let caches: Vec<QueuedCache> = b.fleet(3).into_iter().map(|s| queued_on(s, &ns)).collect();
    assert_eq!(
        caches[0].keys().hash_tags(),
        caches[0].store().needs_hash_tags()
    );

    // Connected first: a connection still being made (a master looked up
    // through the sentinels) would rightly bypass the cache and load.
    for c in &caches {
        c.ping().await.unwrap();
    }
    // Stampede: 90 concurrent reads of one cold key over three connections.
    db.set_delay(Duration::from_millis(50));
    let readers: Vec<_> = caches
        .iter()
        .map(|c| c.aside(Kind::new("profile"), Db(db.clone())))
        .collect();
    let tasks: Vec<_> = (0..90)
        .map(|i| {
            let r = readers[i % 3].clone();
            tokio::spawn(async move { r.get("u0").await.unwrap().status() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(db.loads(), 1, "one load fleet-wide");
    db.set_delay(Duration::ZERO);

    // Warming once per fleet; batches span every slot.
    let runs: Vec<_> = readers
        .iter()
        .map(|r| {
            let r = r.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                r.warmer()
                    .batch_size(50)
                    .run(futures::stream::iter(ids))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut cached = 0;
    for r in runs {
        cached += r.await.unwrap().progress.cached;
    }
    assert_eq!(cached, 299, "u0 was cached already");
    let batch = readers[1].get_many(&ids).await.unwrap();
    assert_eq!(batch.hits, 300);

    // Pattern invalidation finds every key on every primary: the true count.
    assert_eq!(
        caches[2]
            .invalidate_pattern(Kind::new("profile"), "u1*")
            .await
            .unwrap(),
        111
    );
    assert_eq!(
        caches[0]
            .invalidate_all(Kind::new("profile"))
            .await
            .unwrap(),
        189
    );

    // Write-behind: concurrent patches from three instances, one flush.
    let writers: Vec<_> = readers
        .iter()
        .zip(&caches)
        .map(|(r, c)| c.write_behind(r))
        .collect();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let w = writers[i % 3].clone();
            tokio::spawn(async move {
                w.accept(&format!("u{}", i % 10), move |cur: &Row| Row {
                    name: format!("{}{}", cur.name, i % 10),
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
    let mut f = writers[0]
        .flusher(Db(db.clone()))
        .linger(Duration::ZERO)
        .block(Duration::from_millis(50));
    let mut flushed = 0;
    for _ in 0..5 {
        flushed += f.flush_once(true).await.unwrap().flushed;
    }
    assert_eq!(flushed, 10);
    for i in 0..10 {
        let row = db.get(&format!("u{i}")).unwrap();
        assert_eq!(row.version, 4, "u{i}: three patches applied");
        assert_eq!(row.name, format!("x{i}{i}{i}"));
    }
    assert_eq!(writers[2].status().await.unwrap().depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_the_suite_and_the_strategies() {
    let cluster = RedisCluster::start(3, 1).await;
    let b = Backend::Url(cluster.kura_url());
    assert_eq!(b.store().describe(), "redis-cluster");
    conformance::run_all(b.clone()).await;
    strategies(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_runs_the_suite_and_the_strategies() {
    let group = RedisSentinelGroup::start().await;
    let b = Backend::Url(group.kura_url());
    assert_eq!(b.store().describe(), "redis-sentinel");
    conformance::run_all(b.clone()).await;
    strategies(b).await;
}

/// Readers hammer the cache while the topology loses its master; every
/// read answers (from the cache or the database) and the cache is used
/// again after the failover.
async fn reads_through_a_failover(url: String, fail: impl AsyncFnOnce()) {
    let ns = ns();
    let db = TestDb::new();
    for i in 0..200 {
        db.put(&format!("u{i}"), "x");
    }
    let store = kura::store::RedisStore::builder(&url)
        .response_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let cache = Cache::builder(store)
        .namespace(&ns)
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .op_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let reader = reader.clone();
            let stop = stop.clone();
            let reads = reads.clone();
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let f = reader.get(&format!("u{}", i % 200)).await;
                    assert!(f.unwrap().is_found(), "a read failed during the failover");
                    reads.fetch_add(1, Ordering::Relaxed);
                    i += 7;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fail().await;
    // The cache serves hits again after the switch.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = reader.get("u1").await.unwrap().status();
        if s == Status::Hit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache not used again after failover ({s:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_primary_killed_under_load() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let url = cluster.kura_url();
    let c = &mut cluster;
    reads_through_a_failover(url, async || {
        c.kill_primary(0).await;
        c.wait_until_healthy().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_killed_under_load() {
    let mut group = RedisSentinelGroup::start().await;
    let url = group.kura_url();
    let g = &mut group;
    reads_through_a_failover(url, async || {
        let old = g.kill_master().await;
        g.wait_for_failover(old).await;
    })
    .await;
}

/// Write-behind across a failover: every write acknowledged with one
/// replica's confirmation survives the death of its primary, and reaches
/// the database once a flusher (re-queueing pending copies whose queue
/// entry was lost) drains the queue.
async fn write_behind_through_a_failover(url: String, fail: impl AsyncFnOnce()) {
    let ns = ns();
    let db = TestDb::new();
    let ids: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.put(id, "start");
    }
    let store = kura::store::RedisStore::builder(&url)
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let cache = Cache::queued(store)
        .namespace(&ns)
        .op_timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let reader = cache.aside(Kind::new("profile"), Db(db.clone()));
    let wb = cache
        .write_behind(&reader)
        .limits(BehindLimits::new(0, Duration::ZERO).replicas(1, Duration::from_secs(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        Row,
    >::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (wb, stop, acked, ids) = (wb.clone(), stop.clone(), acked.clone(), ids.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = &ids[(n as usize * 7 + w) % ids.len()];
                    let tag = format!("w{w}-{n}");
                    let t = tag.clone();
                    match wb
                        .accept(id, move |cur: &Row| Row {
                            name: t.clone(),
                            version: cur.version + 1,
                            ..cur.clone()
                        })
                        .await
                    {
                        Ok(a) => {
                            let mut m = acked.lock().unwrap();
                            let newer = m.get(id).is_none_or(|r| r.version < a.value.version);
                            if newer {
                                m.insert(id.clone(), a.value);
                            }
                        }
                        // Not acknowledged: allowed to be lost or applied.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    n += 1;
                }
            })
        })
        .collect();
    // The failure comes once most ids have acknowledged writes (not after a
    // fixed time: on a busy machine the first writes can take a while).
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fail().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "too few acknowledged writes: {}",
        acked.len()
    );
    // Drain, re-queueing pending copies on every step.
    let mut f = wb
        .flusher(Db(db.clone()))
        .sweep_every(Duration::ZERO)
        .claim_idle(Duration::from_millis(200))
        .block(Duration::from_millis(50))
        .linger(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet = 0;
    while quiet < 3 {
        assert!(Instant::now() < deadline, "the queue never drained");
        match f.flush_once(true).await {
            Ok(r) if r.entries == 0 => quiet += 1,
            Ok(_) => quiet = 0,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let mut lost = Vec::new();
    for (id, want) in &acked {
        let row = db.get(id).unwrap();
        let ok = row.version > want.version || row == *want;
        if !ok {
            lost.push(format!("{id}: acknowledged {want:?}, database {row:?}"));
        }
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_write_behind_survives_a_primary_failover() {
    let mut cluster =
        RedisCluster::start_with(3, 1, RedisOptions::default().appendonly(true)).await;
    let url = cluster.kura_url();
    let c = &mut cluster;
    write_behind_through_a_failover(url, async || {
        c.kill_primary(0).await;
        c.wait_until_healthy().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_write_behind_survives_a_master_failover() {
    let mut group = RedisSentinelGroup::start_with(RedisOptions::default().appendonly(true)).await;
    let url = group.kura_url();
    let g = &mut group;
    write_behind_through_a_failover(url, async || {
        let old = g.kill_master().await;
        g.wait_for_failover(old).await;
    })
    .await;
}

/// The near cache on a topology: L1 hits for ids spread over every
/// primary, each evicted by another instance's invalidation; then the
/// topology loses its primary (master) and the stream follows it: L1 is
/// used again and invalidations still evict.
async fn near_cache_follows_the_topology(url: String, fail: impl AsyncFnOnce()) {
    use kura::near::{Layer, NearConfig};
    let ns = ns();
    let db = TestDb::new();
    let ids: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.put(id, "v0");
    }
    let open = |near: bool| {
        let store = kura::store::RedisStore::builder(&url)
            .response_timeout(Duration::from_millis(300))
            .connect_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let mut b = Cache::builder(store)
            .namespace(&ns)
            .op_timeout(Duration::from_millis(400));
        if near {
            b = b.near_cache(Kind::new("profile"), NearConfig::entries(1000));
        }
        b.build().unwrap()
    };
    let near = open(true);
    let other = open(false);
    let reader = near.aside(Kind::new("profile"), Db(db.clone()));
    let writer = other.write_through(Kind::new("profile"));
    let mut round = 0;
    let mut check = async |phase: &str| {
        round += 1;
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(30);
            while reader.get(id).await.unwrap().layer() != Some(Layer::L1) {
                assert!(Instant::now() < deadline, "{phase}: {id} never an L1 hit");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for id in &ids {
            let name = format!("v{round}");
            db.put(id, &name);
            writer.invalidate(id).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(2);
            while reader.get(id).await.unwrap().value().unwrap().name != name {
                assert!(
                    Instant::now() < deadline,
                    "{phase}: {id} still served from L1 after another instance's invalidation"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    check("before the failover").await;
    fail().await;
    check("after the failover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_near_cache_follows_a_primary_failover() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let url = cluster.kura_url();
    let c = &mut cluster;
    near_cache_follows_the_topology(url, async || {
        c.kill_primary(0).await;
        c.wait_until_healthy().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_near_cache_follows_a_master_failover() {
    let mut group = RedisSentinelGroup::start().await;
    let url = group.kura_url();
    let g = &mut group;
    near_cache_follows_the_topology(url, async || {
        let old = g.kill_master().await;
        g.wait_for_failover(old).await;
    })
    .await;
}
