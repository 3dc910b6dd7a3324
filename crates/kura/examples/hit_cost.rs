//! Instruction cost of one hit: runs N sequential reads of one cached key,
//! a bare redis-rs `GET` on the shared connection (`bare`), a full
//! `CacheAside::get` (`aside`) or `CacheAside::get_json` (`json`), so that `valgrind --tool=callgrind` can count the
//! instructions of each (load-independent, unlike wall-clock time).
//!
//! ```sh
//! cargo build --release -p kura --example hit_cost
//! valgrind --tool=callgrind target/release/examples/hit_cost bare 20000
//! valgrind --tool=callgrind target/release/examples/hit_cost aside 20000
//! ```
//!
//! The difference of the two totals divided by N is kura's cost per hit.

use kura::store::RedisStore;
use kura::{Cache, Kind, Source, Status, Versioned};
use serde::{Deserialize, Serialize};

/// A profile row as the service caches it (eleven fields, ~420 bytes).
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

struct Db;

impl Source for Db {
    type Value = Profile;
    type Error = std::convert::Infallible;
    async fn load(&self, id: &str) -> Result<Option<Profile>, Self::Error> {
        Ok(Some(Profile {
            id: "0b6a1a8e-39a4-4c4e-9f63-2f5b8a0d2c11".into(),
            user_id: id.into(),
            first_name: "太郎0".into(),
            last_name: "山田".into(),
            name: "山田 太郎0".into(),
            email: "user0@example.jp".into(),
            phone: Some("090-1234-5678".into()),
            address: Some("東京都千代田区丸の内1-1-1".into()),
            created_at: "2026-11-01T00:00:00Z".into(),
            updated_at: "2026-11-01T00:00:00Z".into(),
            version: 1,
        }))
    }
}

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
        let store = RedisStore::open(&url).expect("url");
        let cache = Cache::builder(store.clone())
            .namespace("hit_cost")
            .build()
            .expect("cache");
        let reader = cache.aside(Kind::new("profile"), Db);
        let id = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        reader.get(id).await.expect("first read");
        assert_eq!(reader.get(id).await.expect("read").status(), Status::Hit);
        let key = cache
            .keys()
            .value_key(&Kind::new("profile"), id)
            .expect("key");
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
                "json" => assert!(reader.get_json(id).await.expect("read").is_found()),
                _ => assert!(reader.get(id).await.expect("read").is_found()),
            }
        }
        cache
            .invalidate_all(Kind::new("profile"))
            .await
            .expect("cleanup");
    });
}
