//! Write-through: after the database commit, invalidate (the default) or
//! update the cached value; an older version never replaces a newer one.
//!
//! `cargo run -p kura --example write_through`

#[path = "common/mod.rs"]
mod common;

use kura::{Cache, Kind};

#[tokio::main]
async fn main() -> Result<(), kura::Error> {
    let db = common::Db::default();
    db.upsert("u1", "v1");
    let cache = Cache::builder_shared(common::store())
        .namespace("example_wt")
        .build()?;
    let profiles = cache.aside(Kind::new("profile"), db.clone());
    let writes = cache.write_through(Kind::new("profile"));
    profiles.get("u1").await?;

    // Invalidate after commit: the next read loads the new row.
    db.upsert("u1", "v2");
    println!("invalidate: {:?}", writes.invalidate("u1").await?);
    println!(
        "read: {:?}",
        profiles.get("u1").await?.value().map(|p| &p.name)
    );

    // Update after commit: the cache holds the new version at once.
    let v3 = db.upsert("u1", "v3");
    println!("update v3: {:?}", writes.update("u1", &v3).await?);

    // A slower writer of an older version arrives late: ignored.
    let stale = common::Profile {
        version: 2,
        ..v3.clone()
    };
    println!("late update v2: {:?}", writes.update("u1", &stale).await?);
    let now = profiles.get("u1").await?;
    println!(
        "read: {} {:?}",
        now.status(),
        now.value().map(|p| p.version)
    );
    cache.invalidate_all(Kind::new("profile")).await?;
    Ok(())
}
