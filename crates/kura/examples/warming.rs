//! Warming: fill the cache from a stream of ids in batches, with progress,
//! once per fleet, never overwriting a cached value.
//!
//! `cargo run -p kura --example warming`

#[path = "common/mod.rs"]
mod common;

use kura::{Cache, Kind, Status};

#[tokio::main]
async fn main() -> Result<(), kura::Error> {
    let db = common::Db::default();
    let ids: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    for id in &ids {
        db.upsert(id, "x");
    }
    let cache = Cache::builder_shared(common::store())
        .namespace("example_warm")
        .build()?;
    let profiles = cache.aside(Kind::new("profile"), db.clone());
    let report = profiles
        .warmer()
        .batch_size(250)
        .on_progress(|p| println!("  warmed {} of {}", p.cached, p.seen))
        .run(futures::stream::iter(ids))
        .await?;
    println!("report: {report:?}");
    assert_eq!(profiles.get("u500").await?.status(), Status::Hit);
    cache.invalidate_all(Kind::new("profile")).await?;
    Ok(())
}
