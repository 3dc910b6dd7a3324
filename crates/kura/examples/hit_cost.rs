//! Instruction cost of one hit: runs N sequential reads of one cached key,
//! either a bare redis-rs `GET` on the shared connection or a full
//! `CacheAside::get`, so that `valgrind --tool=callgrind` can count the
//! instructions of each (load-independent, unlike wall-clock time).
//!
//! ```sh
//! cargo build --release -p kura --example hit_cost
//! valgrind --tool=callgrind target/release/examples/hit_cost bare 20000
//! valgrind --tool=callgrind target/release/examples/hit_cost aside 20000
//! ```
//!
//! The difference of the two totals divided by N is kura's cost per hit.

#[path = "common/mod.rs"]
mod common;

use kura::store::RedisStore;
use kura::{Cache, Kind, Status};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "aside".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let db = common::Db::default();
        db.upsert("7c9e6679-7425-40de-944b-e07fc1f90ae7", "山田太郎");
        let store = RedisStore::open(&url).expect("url");
        let cache = Cache::builder(store.clone())
            .namespace("hit_cost")
            .build()
            .expect("cache");
        let reader = cache.aside(Kind::PROFILE, db);
        let id = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        reader.get(id).await.expect("first read");
        assert_eq!(reader.get(id).await.expect("read").status(), Status::Hit);
        let key = cache.keys().value_key(&Kind::PROFILE, id).expect("key");
        let conn = store.connection().expect("standalone redis");
        for _ in 0..n {
            match mode.as_str() {
                "bare" => {
                    let mut c = conn.clone();
                    let v: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut c)
                        .await
                        .expect("get");
                    assert!(v.is_some());
                }
                _ => assert!(reader.get(id).await.expect("read").is_found()),
            }
        }
        cache.invalidate_all(Kind::PROFILE).await.expect("cleanup");
    });
}
