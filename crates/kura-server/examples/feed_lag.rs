//! Lag of the invalidation feed: from the commit of a direct `UPDATE`
//! (plain SQL, not through kura) to the moment the cached profile is gone
//! from Redis, at a fixed rate of UPDATEs per second.
//!
//! Each UPDATE changes a different profile that is cached beforehand
//! (`kura warm`). The deletions are observed through Redis keyspace
//! notifications (`notify-keyspace-events Eg`, which `bench/feed.sh` sets on
//! a `redis-server` of its own), so observing costs nothing per key.
//!
//! ```text
//! cargo run --release -p kura-server --example feed_lag -- \
//!   --database-url postgres://postgres@127.0.0.1/kura_bench_feed \
//!   --redis-url redis://127.0.0.1:6390 --namespace cache \
//!   --ids ids.txt --rate 1000 --seconds 20
//! ```
//!
//! Prints one JSON object: updates sent, the rate achieved, the lag's p50,
//! p99 and max in milliseconds, how many deletions of cached keys were never
//! seen (`missed`), and how many keys were not cached when their UPDATE was
//! sent (`uncached`: nothing to delete, not counted as missed).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt as _;

/// Flags.
#[derive(Debug, Parser)]
struct Args {
    /// PostgreSQL URL of the database `kura serve` uses.
    #[arg(long)]
    database_url: String,
    /// Redis URL (with keyspace notifications on).
    #[arg(long)]
    redis_url: String,
    /// The service's key namespace.
    #[arg(long, default_value = "cache")]
    namespace: String,
    /// User ids, one per line (`kura seed --ids-out`), all cached.
    #[arg(long)]
    ids: std::path::PathBuf,
    /// UPDATEs per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to send them.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Concurrent database connections sending them.
    #[arg(long, default_value_t = 8)]
    connections: u32,
}

/// UPDATEs committed and not yet seen invalidated (key -> commit time), and
/// deletions seen before their UPDATE's answer arrived.
#[derive(Debug, Default)]
struct Track {
    sent: HashMap<String, Instant>,
    early: HashSet<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let ids: Vec<String> = std::fs::read_to_string(&a.ids)?
        .lines()
        .map(str::to_owned)
        .collect();
    let total = (a.rate * a.seconds) as usize;
    anyhow::ensure!(
        ids.len() >= total,
        "{} ids for {total} updates: seed and warm more",
        ids.len()
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(a.connections)
        .connect(&a.database_url)
        .await?;
    let client = redis::Client::open(a.redis_url.as_str())?;
    let mut check = client.get_multiplexed_async_connection().await?;
    let sample: Vec<String> = ids[..total.min(100)]
        .iter()
        .map(|id| format!("{}:profile:{id}", a.namespace))
        .collect();
    let cached: i64 = redis::cmd("EXISTS")
        .arg(&sample)
        .query_async(&mut check)
        .await?;
    anyhow::ensure!(
        cached as usize == sample.len(),
        "only {cached} of the first {} profiles are cached: warm them first",
        sample.len()
    );

    let sent: Arc<Mutex<Track>> = Arc::default();
    let lags: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe("__keyevent@0__:del").await?;
    let watcher = {
        let (sent, lags) = (sent.clone(), lags.clone());
        tokio::spawn(async move {
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                let seen = Instant::now();
                let Ok(key) = msg.get_payload::<String>() else {
                    continue;
                };
                let mut t = lock(&sent);
                match t.sent.remove(&key) {
                    Some(at) => lock(&lags).push(seen.saturating_duration_since(at)),
                    None => {
                        t.early.insert(key);
                    }
                }
            }
        })
    };

    let conn = client.get_multiplexed_async_connection().await?;
    let uncached = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / a.rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total);
    for id in ids.into_iter().take(total) {
        tick.tick().await;
        let (pool, sent, lags, key) = (
            pool.clone(),
            sent.clone(),
            lags.clone(),
            format!("{}:profile:{id}", a.namespace),
        );
        let (mut conn, uncached) = (conn.clone(), uncached.clone());
        tasks.push(tokio::spawn(async move {
            let uuid: uuid::Uuid = id.parse()?;
            // A key not cached when its UPDATE is sent has nothing to
            // delete: counted apart, not as a missed invalidation.
            let cached: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await?;
            if !cached {
                uncached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            sqlx::query("UPDATE profiles SET phone = '000-0000-0000' WHERE user_id = $1")
                .bind(uuid)
                .execute(&pool)
                .await?;
            // Committed (autocommit) once the statement returned: the lag
            // is measured from here, so it reads low by the one-way latency
            // of the answer. A deletion seen before it counts as 0.
            let now = Instant::now();
            let mut t = lock(&sent);
            if t.early.remove(&key) {
                lock(&lags).push(Duration::ZERO);
            } else if cached {
                t.sent.insert(key, now);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    // Let the last invalidations land.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lock(&sent).sent.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    let missed = lock(&sent).sent.len();
    let mut h = hdrhistogram::Histogram::<u64>::new(3)?;
    for d in lock(&lags).iter() {
        h.record(d.as_micros() as u64)?;
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "updates": total,
            "rate": (total as f64 / elapsed.as_secs_f64()).round(),
            "observed": h.len(),
            "missed": missed,
            "uncached": uncached.load(std::sync::atomic::Ordering::Relaxed),
            "p50_ms": ms(0.50),
            "p99_ms": ms(0.99),
            "max_ms": h.max() as f64 / 1000.0,
        })
    );
    Ok(())
}
