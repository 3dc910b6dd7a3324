//! Invalidation: one key, many keys in one pipeline, every type of a user,
//! and a pattern by SCAN.
//!
//! `cargo run -p kura --example invalidation`

#[path = "common/mod.rs"]
mod common;

use kura::{Cache, Kind};

#[tokio::main]
async fn main() -> Result<(), kura::Error> {
    let db = common::Db::default();
    let cache = Cache::builder_shared(common::store())
        .namespace("example_inv")
        .build()?;
    let profiles = cache.aside(Kind::new("profile"), db.clone());
    let settings = cache.aside(Kind::new("settings"), db.clone());
    for i in 0..10 {
        db.upsert(&format!("u{i}"), "x");
        profiles.get(&format!("u{i}")).await?;
    }
    settings.get("u0").await?;

    println!(
        "one: {:?}",
        cache.invalidate(Kind::new("profile"), "u9").await?
    );
    println!(
        "many: {:?}",
        cache
            .invalidate_many(Kind::new("profile"), &["u7", "u8"])
            .await?
    );
    let user = [
        Kind::new("profile"),
        Kind::new("settings"),
        Kind::new("preferences"),
    ];
    println!("entity: {:?}", cache.invalidate_entity("u0", &user).await?);
    println!(
        "pattern u[1-3]: {} deleted",
        cache
            .invalidate_pattern(Kind::new("profile"), "u[1-3]")
            .await?
    );
    println!(
        "all profiles: {} deleted",
        cache.invalidate_all(Kind::new("profile")).await?
    );
    // A glob character in an id is rejected, so it can never widen a delete.
    println!(
        "bad id: {}",
        cache
            .invalidate(Kind::new("profile"), "u*")
            .await
            .unwrap_err()
    );
    Ok(())
}
