//! Against the real Redis: what other services see with a plain GET, the
//! TTLs written, the adaptive rule and the seed's counters.

mod support;

use std::time::Duration;

use kura::{Cache, Kind};
use redis::AsyncCommands;
use support::{Backend, Db, TestDb, cleanup, ns, redis_conn};

#[tokio::test]
async fn plain_get_shows_the_json_with_cached_at_and_the_seed_ttl() {
    let ns = ns();
    let cache = Cache::builder_shared(Backend::Redis.store())
        .namespace(&ns)
        .build()
        .unwrap(); // default ±10 % jitter
    let db = TestDb::new();
    db.put("3f1c2e4a-0000-4000-8000-000000000001", "山田太郎");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles
        .get("3f1c2e4a-0000-4000-8000-000000000001")
        .await
        .unwrap();
    let mut c = redis_conn().await;
    let key = format!("{ns}:profile:3f1c2e4a-0000-4000-8000-000000000001");
    let raw: Vec<u8> = c.get(&key).await.unwrap();
    let text = String::from_utf8(raw).expect("UTF-8");
    assert!(text.contains("山田太郎"), "not ASCII-escaped: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["name"], "山田太郎");
    assert!(v["cached_at"].as_str().unwrap().ends_with('Z'));
    let ttl: i64 = c.ttl(&key).await.unwrap();
    assert!((270..=330).contains(&ttl), "ttl {ttl}");
    cleanup(&ns).await;
}

#[tokio::test]
async fn ttls_follow_the_type_table() {
    let ns = ns();
    let cache = Cache::builder_shared(Backend::Redis.store())
        .namespace(&ns)
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("d1", "doc");
    let mut c = redis_conn().await;
    for (kind, key, want) in [
        (Kind::new("settings"), format!("{ns}:settings:d1"), 1800),
        (
            Kind::new("document_meta")
                .with_segment("document")
                .with_suffix("metadata"),
            format!("{ns}:document:d1:metadata"),
            600,
        ),
        (
            Kind::new("unknown_type"),
            format!("{ns}:unknown_type:d1"),
            300,
        ),
    ] {
        cache.aside(kind, Db(db.clone())).get("d1").await.unwrap();
        let ttl: i64 = c.ttl(&key).await.unwrap();
        assert!((want - 2..=want).contains(&ttl), "{key}: {ttl} vs {want}");
    }
    // An absolute expiry (the token blacklist).
    let exp = std::time::SystemTime::now() + Duration::from_secs(90);
    cache
        .put_until(
            Kind::new("blacklist"),
            "jti-1",
            &serde_json::json!({"revoked": true}),
            exp,
        )
        .await
        .unwrap();
    let ttl: i64 = c.ttl(format!("{ns}:blacklist:jti-1")).await.unwrap();
    assert!((88..=90).contains(&ttl), "blacklist ttl {ttl}");
    let seen: Option<serde_json::Value> =
        cache.peek(Kind::new("blacklist"), "jti-1").await.unwrap();
    assert_eq!(seen.unwrap()["revoked"], true);
    cleanup(&ns).await;
}

#[tokio::test]
async fn adaptive_ttl_extends_hot_keys_without_extra_round_trips() {
    let ns = ns();
    let cache = Cache::builder_shared(Backend::Redis.store())
        .namespace(&ns)
        .ttl_policy(support::seed_policy().with_jitter(0.0))
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("hot", "x");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let key = format!("{ns}:profile:hot");
    let mut c = redis_conn().await;
    for _ in 0..10 {
        profiles.get("hot").await.unwrap();
    }
    let ttl: i64 = c.ttl(&key).await.unwrap();
    assert!(ttl <= 300, "ten reads: still the base TTL ({ttl})");
    let before: redis::InfoDict = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    profiles.get("hot").await.unwrap(); // the 11th read in the hour
    let ttl: i64 = c.ttl(&key).await.unwrap();
    assert!((598..=600).contains(&ttl), "hot key TTL {ttl}");
    let after: redis::InfoDict = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    let calls = |d: &redis::InfoDict, cmd: &str| -> u64 {
        d.get::<String>(&format!("cmdstat_{cmd}"))
            .and_then(|s| {
                s.split(',')
                    .next()
                    .and_then(|c| c.strip_prefix("calls="))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    };
    // The hot read was one script call (the GETEX of the value and the
    // same move of its stale copy's end), not GET + INCR + EXPIRE. (INFO
    // itself is the only other command this connection sent; other tests
    // share the server, so only commands kura would add are checked.)
    assert!(calls(&after, "evalsha") > calls(&before, "evalsha"));
    cleanup(&ns).await;
}

#[tokio::test]
async fn seed_counters_are_kept_in_aggregate() {
    let ns = ns();
    let cache = Cache::builder_shared(Backend::Redis.store())
        .namespace(&ns)
        .build()
        .unwrap();
    let db = TestDb::new();
    db.put("u1", "x");
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get("u1").await.unwrap();
    for _ in 0..7 {
        profiles.get("u1").await.unwrap();
    }
    profiles.get("missing").await.unwrap();
    cache.flush_metrics().await.unwrap();
    let mut c = redis_conn().await;
    let hits: i64 = c.get(format!("metrics:{ns}:hits")).await.unwrap();
    let misses: i64 = c.get(format!("metrics:{ns}:misses")).await.unwrap();
    assert_eq!((hits, misses), (7, 2));
    let s = cache.stats().await;
    assert_eq!((s.hits, s.misses, s.total), (7, 2, 9));
    assert_eq!(s.hit_rate, 77.78);
    // A second instance adds to the same fleet-wide counters.
    let other = Cache::builder_shared(Backend::Redis.store())
        .namespace(&ns)
        .build()
        .unwrap();
    other
        .aside(Kind::new("profile"), Db(db.clone()))
        .get("u1")
        .await
        .unwrap();
    assert_eq!(other.stats().await.hits, 8);
    cleanup(&ns).await;
}
