//! The cost of kura's hit path against a bare redis-rs `GET` on the same
//! connection, with a profile-sized value.
//!
//! Run with Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`):
//! `cargo bench -p kura --bench hit_path`. Results are recorded in
//! `docs/bench/`.
//!
//! - `bare_get`: `GET` through the shared `ConnectionManager`, bytes only.
//! - `store_get`: the same through the `Store` seam (plus the `Bytes` copy).
//! - `cache_aside_get`: a full `CacheAside::get` hit: key validation and
//!   building, breaker, `GET`, envelope strip, typed decode, metrics.
//! - `cache_aside_get_json`: `CacheAside::get_json`, the same with the
//!   envelope checked as well-formed JSON instead of decoded (what an HTTP
//!   handler passing the bytes on uses).
//!
//! - `near_cache/l1_get`, `near_cache/l1_get_json`: the same reads with
//!   the type's near cache on, answered from L1; `near_cache/l1_get_absent`
//!   a "not found" answered from L1 (a negative entry: what a revocation
//!   check of a valid token costs).
//!
//! Each is measured one request at a time (latency) and 64 in flight
//! (throughput over the multiplexed connection).

#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use kura::near::{Layer, NearConfig};
use kura::store::RedisStore;
use kura::{Cache, Kind, Source, Store, Versioned};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    id: String,
    user_id: String,
    first_name: String,
    last_name: String,
    name: String,
    email: String,
    phone: Option<String>,
    address: Option<String>,
    created_at: String,
    updated_at: String,
    version: u64,
}

impl Versioned for Profile {
    fn version(&self) -> u64 {
        self.version
    }
}

fn profile(id: &str) -> Profile {
    Profile {
        id: "0b6a1a8e-39a4-4c4e-9f63-2f5b8a0d2c11".into(),
        user_id: id.into(),
        first_name: "太郎0".into(),
        last_name: "山田".into(),
        name: "山田 太郎0".into(),
        email: "user0@example.jp".into(),
        phone: Some("090-1234-5678".into()),
        address: Some("東京都千代田区1-1".into()),
        created_at: "2026-11-01T00:00:00Z".into(),
        updated_at: "2026-11-01T00:00:00Z".into(),
        version: 1,
    }
}

struct Db;

impl Source for Db {
    type Value = Profile;
    type Error = std::io::Error;
    async fn load(&self, id: &str) -> Result<Option<Profile>, std::io::Error> {
        Ok((id != ABSENT).then(|| profile(id)))
    }
}

const ID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
/// An id the source has no row for ("not found", a negative L1 entry).
const ABSENT: &str = "00000000-0000-0000-0000-000000000000";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let ns = format!("bench_{:08x}", rand::random::<u32>());
    let (store, cache, reader) = rt.block_on(async {
        let store = RedisStore::open(&url).unwrap();
        let cache = Cache::builder(store.clone())
            .namespace(&ns)
            .build()
            .unwrap();
        let reader = cache.aside(Kind::new("profile"), Db);
        reader.get(ID).await.unwrap();
        assert_eq!(reader.get(ID).await.unwrap().status(), kura::Status::Hit);
        (store, cache, reader)
    });
    let key = cache.keys().value_key(&Kind::new("profile"), ID).unwrap();
    let conn = store.connection().expect("a standalone Redis");

    let mut g = c.benchmark_group("hit_path");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(1));
    g.bench_function("bare_get", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            let key = key.clone();
            async move {
                let v: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(v.is_some());
            }
        })
    });
    g.bench_function("store_get", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(store.get(&key, None).await.unwrap().is_some()) })
    });
    g.bench_function("cache_aside_get", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(reader.get(ID).await.unwrap().is_found()) })
    });
    g.bench_function("cache_aside_get_json", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(reader.get_json(ID).await.unwrap().is_found()) })
    });
    g.finish();

    // The near cache: the same reads answered from L1 (no round trip, no
    // decode: the entry holds the value and its JSON).
    let (near_cache, near) = rt.block_on(async {
        let cache = Cache::builder(store.clone())
            .namespace(&ns)
            .near_cache(
                Kind::new("profile"),
                // Longer than the benchmarks run, so that no entry ages out.
                NearConfig::entries(1000).max_lifetime(Duration::from_secs(600)),
            )
            .build()
            .unwrap();
        let near = cache.aside(Kind::new("profile"), Db);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while near.get(ID).await.unwrap().layer() != Some(Layer::L1) {
            assert!(std::time::Instant::now() < deadline, "no L1 hit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while near.get(ABSENT).await.unwrap().layer() != Some(Layer::L1) {
            assert!(std::time::Instant::now() < deadline, "no negative L1 hit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (cache, near)
    });
    let mut g = c.benchmark_group("near_cache");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(1));
    g.bench_function("l1_get", |b| {
        b.to_async(&rt).iter(|| async {
            let f = near.get(ID).await.unwrap();
            assert_eq!(f.layer(), Some(Layer::L1));
        })
    });
    g.bench_function("l1_get_absent", |b| {
        b.to_async(&rt).iter(|| async {
            let f = near.get(ABSENT).await.unwrap();
            assert_eq!((f.is_found(), f.layer()), (false, Some(Layer::L1)));
        })
    });
    g.bench_function("l1_get_json", |b| {
        b.to_async(&rt).iter(|| async {
            let f = near.get_json(ID).await.unwrap();
            assert_eq!(f.layer(), Some(Layer::L1));
        })
    });
    g.finish();
    drop((near, near_cache));

    const IN_FLIGHT: usize = 64;
    let mut g = c.benchmark_group("hit_path_64_in_flight");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function("bare_get", |b| {
        b.to_async(&rt).iter(|| {
            join_all((0..IN_FLIGHT).map(|_| {
                let mut conn = conn.clone();
                let key = key.clone();
                async move {
                    let v: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    assert!(v.is_some());
                }
            }))
        })
    });
    g.bench_function("cache_aside_get", |b| {
        b.to_async(&rt).iter(|| {
            join_all((0..IN_FLIGHT).map(|_| async {
                assert!(reader.get(ID).await.unwrap().is_found());
            }))
        })
    });
    g.bench_function("cache_aside_get_json", |b| {
        b.to_async(&rt).iter(|| {
            join_all((0..IN_FLIGHT).map(|_| async {
                assert!(reader.get_json(ID).await.unwrap().is_found());
            }))
        })
    });
    g.finish();

    rt.block_on(async {
        cache.invalidate_all(Kind::new("profile")).await.unwrap();
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
