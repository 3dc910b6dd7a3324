//! Rate limits (GCRA in one store step): exact under concurrency across
//! separate connections, no second burst at a window edge, the headers'
//! figures, and the per-process fallback while the store is unreachable.

mod support;

use std::time::{Duration, Instant};

use kura::Cache;
use kura::ratelimit::{Quota, RateLimiter, Scope};
use kura::store::RedisStore;
use kura_testkit::RedisServer;
use support::{Backend, cache_on, cleanup};

/// Many concurrent requests of one subject through several caches (separate
/// connections, as separate instances): exactly the limit is admitted.
async fn exactly_the_limit_under_concurrency(b: Backend) {
    let ns = support::ns();
    let limiters: Vec<RateLimiter> = b
        .fleet(4)
        .into_iter()
        .map(|s| RateLimiter::new(&cache_on(s, &ns)))
        .collect();
    let quota = Quota::new(50, Duration::from_secs(3600));
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let l = limiters[i % 4].clone();
            tokio::spawn(async move { l.check("write", "alice", quota).await.unwrap() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let d = t.await.unwrap();
        assert_eq!(d.scope, Scope::Fleet);
        if d.allowed {
            admitted += 1;
        } else {
            assert!(d.retry_after > Duration::ZERO && d.retry_after <= Duration::from_secs(73));
        }
    }
    assert_eq!(admitted, 50, "400 concurrent requests against 50/1h");
    // Another subject and another class count apart.
    assert!(
        limiters[0]
            .check("write", "bob", quota)
            .await
            .unwrap()
            .allowed
    );
    assert!(
        limiters[0]
            .check("read", "alice", quota)
            .await
            .unwrap()
            .allowed
    );
    cleanup(&ns).await;
}

/// A fixed window admits a second burst right after its edge; GCRA admits
/// one request per `P/N` after a burst, however the clock falls.
async fn no_second_burst_at_a_window_edge(b: Backend) {
    let (cache, ns) = b.cache();
    let l = RateLimiter::new(&cache);
    let quota = Quota::new(10, Duration::from_secs(1));
    let first = l.check("read", "s", quota).await.unwrap();
    assert_eq!((first.limit, first.remaining), (10, 9));
    for _ in 1..10 {
        assert!(l.check("read", "s", quota).await.unwrap().allowed);
    }
    let refused = l.check("read", "s", quota).await.unwrap();
    assert!(!refused.allowed);
    assert!(
        refused.retry_after <= Duration::from_millis(100),
        "{refused:?}"
    );
    assert!(refused.reset > Duration::from_millis(800), "{refused:?}");
    // For the next 300 ms, whatever a window would say: about one per 100 ms.
    let start = Instant::now();
    let mut admitted = 0;
    while start.elapsed() < Duration::from_millis(300) {
        if l.check("read", "s", quota).await.unwrap().allowed {
            admitted += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        (2..=4).contains(&admitted),
        "{admitted} admitted in 300 ms after a burst"
    );
    // Idle for a period: the whole burst again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let whole = l.check("read", "s", quota).await.unwrap();
    assert_eq!(whole.remaining, 9, "{whole:?}");
    cleanup(&ns).await;
}

both_stores!(
    exactly_the_limit_under_concurrency,
    no_second_burst_at_a_window_edge
);

/// Redis stopped: each process counts on its own (the limit then holds per
/// instance), and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_falls_back_to_the_process() {
    let mut server = RedisServer::start().await;
    let store = RedisStore::builder(server.url())
        .response_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let cache = Cache::builder(store)
        .namespace(support::ns())
        .op_timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let l = RateLimiter::new(&cache);
    let quota = Quota::new(3, Duration::from_secs(3600));
    assert_eq!(
        l.check("write", "a", quota).await.unwrap().scope,
        Scope::Fleet
    );
    server.stop().await;
    let mut admitted = 0;
    for _ in 0..10 {
        let d = l.check("write", "a", quota).await.unwrap();
        assert_eq!(d.scope, Scope::Instance);
        admitted += u32::from(d.allowed);
    }
    assert_eq!(
        admitted, 3,
        "the process's own count starts whole and holds the limit"
    );
}
