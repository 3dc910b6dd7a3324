//! Cache-aside: a miss loads once and fills, a hit is one round trip, and
//! concurrent readers of a cold key share one load.
//!
//! `cargo run -p kura --example cache_aside` (set `REDIS_URL` to use Redis).

#[path = "common/mod.rs"]
mod common;

use kura::{Cache, Kind};

#[tokio::main]
async fn main() -> Result<(), kura::Error> {
    let db = common::Db::default();
    db.upsert("u1", "山田太郎");
    let cache = Cache::builder_shared(common::store())
        .namespace("example_aside")
        .build()?;
    let profiles = cache.aside(Kind::new("profile"), db.clone());

    let first = profiles.get("u1").await?;
    println!("first read: {} -> {:?}", first.status(), first.value());
    let second = profiles.get("u1").await?;
    println!("second read: {} (no database read)", second.status());

    // 100 concurrent reads of a cold key: one database read.
    db.upsert("u2", "佐藤花子");
    let reads = (0..100).map(|_| profiles.get("u2"));
    let results = futures::future::join_all(reads).await;
    println!("100 concurrent cold reads answered: {}", results.len());

    let missing = profiles.get("nobody").await?;
    println!(
        "unknown id: found={} ({})",
        missing.is_found(),
        missing.status()
    );
    cache.invalidate_all(Kind::new("profile")).await?;
    Ok(())
}
