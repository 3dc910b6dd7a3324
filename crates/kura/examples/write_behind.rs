//! Write-behind: a write is acknowledged once the cache holds it durably
//! (value + pending copy + queue entry in one atomic step), reads see it at
//! once, and a flusher applies it to the database afterwards, coalesced and
//! version-guarded.
//!
//! `cargo run -p kura --example write_behind` (set `REDIS_URL` to use Redis).

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use kura::{Applied, BoxError, Cache, Kind, Sink};

/// The database side: apply a batch, each row only if newer.
impl Sink for common::Db {
    type Value = common::Profile;

    async fn apply(&self, batch: &[(String, common::Profile)]) -> Result<Vec<Applied>, BoxError> {
        let mut rows = self.0.lock().unwrap();
        println!("  (database: one transaction for {} rows)", batch.len());
        Ok(batch
            .iter()
            .map(|(id, p)| match rows.get(id) {
                // UPDATE profiles SET ... WHERE user_id = $1 AND version < $2
                Some(cur) if cur.version < p.version => {
                    rows.insert(id.clone(), p.clone());
                    Applied::Written
                }
                Some(_) => Applied::Superseded,
                None => Applied::Rejected("no such row".into()),
            })
            .collect())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = common::Db::default();
    db.upsert("u1", "太郎");
    let cache = Cache::queued_shared(common::store())
        .namespace("example_wb")
        .build()?;
    let profiles = cache.aside(Kind::new("profile"), db.clone());
    let writes = cache.write_behind(&profiles);

    // Three quick edits: each is acknowledged without touching the database.
    for suffix in ["!", "!!", "!!!"] {
        let accepted = writes
            .accept("u1", |cur| common::Profile {
                name: format!("太郎{suffix}"),
                version: cur.version + 1,
                ..cur.clone()
            })
            .await?;
        println!(
            "accepted version {} ({})",
            accepted.value.version, accepted.entry_id
        );
    }
    println!(
        "read before the flush: {:?}",
        profiles.get("u1").await?.value().map(|p| &p.name)
    );
    println!("queue: {:?}", writes.status().await?);

    // A flusher applies the three as one row (coalesced), then acknowledges.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let flusher = tokio::spawn(writes.flusher(db.clone()).run(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    println!("flush report: {:?}", flusher.await?);
    println!(
        "database now: {:?}",
        db.0.lock().unwrap().get("u1").map(|p| (&p.name, p.version))
    );
    cache.invalidate_all(Kind::new("profile")).await?;
    Ok(())
}
