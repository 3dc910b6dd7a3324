//! Clearing every cached value of a type: `SCAN` + `UNLINK`
//! ([`kura::Cache::invalidate_all`]) against the O(1) clear
//! ([`kura::Cache::clear`]), alone and followed by the sweep that frees the
//! cleared values' memory ([`kura::Cache::sweep`], what
//! `DELETE /api/v1/admin/cache/profiles` does), on a standalone Redis and
//! on a 3-primary Cluster this program starts (and stops) itself.
//!
//! ```text
//! cargo run --release -p kura-server --example clear_bench -- --keys 1000000
//! ```
//!
//! For each topology and each way, it fills `--keys` profile entries
//! (envelopes of ~450 bytes, TTL 1 h) in namespace `clearbench`, makes one
//! of them a hit on a second cache instance, then clears and measures: the
//! call's duration, when the second instance first reads the probe as a
//! miss (time to effect there), the Redis CPU the clear cost (`INFO cpu`,
//! summed over the nodes) and `used_memory` after. Prints one JSON object.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use kura::store::RedisStore;
use kura::{Cache, Source, Status, Versioned};
use kura_testkit::{RedisCluster, RedisServer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Flags.
#[derive(Debug, Parser)]
struct Args {
    /// Cached values per run.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Topologies: `standalone`, `cluster` (comma-separated).
    #[arg(long, default_value = "standalone,cluster", value_delimiter = ',')]
    topologies: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Row {
    user_id: String,
    first_name: String,
    last_name: String,
    email: String,
    address: String,
    bio: String,
    version: u64,
}

impl Versioned for Row {
    fn version(&self) -> u64 {
        self.version
    }
}

fn row(id: &str) -> Row {
    Row {
        user_id: id.to_owned(),
        first_name: "太郎".into(),
        last_name: "山田".into(),
        email: format!("{id}@example.jp"),
        address: "東京都千代田区丸の内1-1-1".into(),
        bio: "x".repeat(200),
        version: 1,
    }
}

/// A source that always has the row (the database is not what is measured).
struct Rows(Arc<AtomicU64>);

impl Source for Rows {
    type Value = Row;
    type Error = std::io::Error;
    async fn load(&self, id: &str) -> Result<Option<Row>, std::io::Error> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Some(row(id)))
    }
}

/// The nodes' CPU (user + sys seconds) and used memory, summed.
async fn node_stats(urls: &[String]) -> anyhow::Result<(f64, u64)> {
    let mut cpu = 0.0;
    let mut mem = 0;
    for u in urls {
        let mut c = redis::Client::open(u.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let info: String = redis::cmd("INFO").arg("all").query_async(&mut c).await?;
        for line in info.lines() {
            let mut kv = line.splitn(2, ':');
            match (kv.next(), kv.next()) {
                (Some("used_cpu_user" | "used_cpu_sys"), Some(v)) => {
                    cpu += v.trim().parse::<f64>().unwrap_or(0.0);
                }
                (Some("used_memory"), Some(v)) => mem += v.trim().parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    Ok((cpu, mem))
}

/// Fills `n` entries with plain pipelined `SET … PX` (what fills leave
/// behind), 10,000 per pipeline.
async fn fill(url: &str, cluster: bool, cache: &Cache, n: u64) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let envelope = |i: u64| {
        let id = format!("u{i:08}");
        let key = cache
            .keys()
            .value_key(&kura_server::registry::PROFILE, &id)
            .expect("key");
        let enc = kura::codec::encode(&row(&id), 1, 1 << 20).expect("encode");
        (key, enc.envelope)
    };
    if cluster {
        let nodes: Vec<String> = url
            .trim_start_matches("redis+cluster://")
            .split(',')
            .map(|a| format!("redis://{a}"))
            .collect();
        let c = redis::cluster::ClusterClient::new(nodes)?
            .get_async_connection()
            .await?;
        // Keys of many slots: one command each, many in flight.
        use futures::StreamExt as _;
        let mut sets = futures::stream::iter(0..n)
            .map(|j| {
                let mut c = c.clone();
                let (k, v) = envelope(j);
                async move {
                    redis::cmd("SET")
                        .arg(k)
                        .arg(&v[..])
                        .arg("PX")
                        .arg(3_600_000)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .buffer_unordered(512);
        while let Some(r) = sets.next().await {
            r?;
        }
    } else {
        let mut c = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let mut i = 0;
        while i < n {
            let mut p = redis::pipe();
            for j in i..(i + 10_000).min(n) {
                let (k, v) = envelope(j);
                p.cmd("SET")
                    .arg(k)
                    .arg(&v[..])
                    .arg("PX")
                    .arg(3_600_000)
                    .ignore();
            }
            let _: () = p.query_async(&mut c).await?;
            i += 10_000;
        }
    }
    Ok(t.elapsed())
}

fn cache(url: &str) -> anyhow::Result<Cache> {
    Ok(Cache::builder(RedisStore::open(url)?)
        .namespace("clearbench")
        .ttl_policy(kura_server::registry::ttl_policy().with_jitter(0.0))
        .build()?)
}

/// One way of clearing, on a freshly filled keyspace.
async fn run(
    way: &str,
    url: &str,
    cluster: bool,
    nodes: &[String],
    n: u64,
) -> anyhow::Result<Value> {
    let a = cache(url)?;
    let b = cache(url)?;
    let filled = fill(url, cluster, &a, n).await?;
    let loads = Arc::new(AtomicU64::new(0));
    let reader = b.aside(kura_server::registry::PROFILE, Rows(loads.clone()));
    // The probe is the last key a scan would reach in order of filling
    // (SCAN's order is the hash table's, so any key is as good).
    let probe = format!("u{:08}", n - 1);
    // Until the second instance's stamps stream is live and the probe hits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.get(&probe).await?.status() != Status::Hit {
        anyhow::ensure!(Instant::now() < deadline, "the probe never became a hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu0, _) = node_stats(nodes).await?;
    let t = Instant::now();
    let (covered, epoch) = match way {
        "scan_unlink" => (
            Some(a.invalidate_all(kura_server::registry::PROFILE).await?),
            None,
        ),
        _ => {
            let c = a.clear(kura_server::registry::PROFILE).await?;
            (c.covered, Some(c.epoch))
        }
    };
    let call = t.elapsed();
    let mut effect = None;
    while t.elapsed() < Duration::from_secs(600) {
        if reader.get(&probe).await?.status() == Status::Miss {
            effect = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let (cpu1, mem) = node_stats(nodes).await?;
    // The sweep after the clear, measured on its own.
    let (swept, sweep_s, sweep_cpu_ms, mem_after_sweep) = match (way, epoch) {
        ("clear_sweep", Some(epoch)) => {
            let t = Instant::now();
            let n = a.sweep(kura_server::registry::PROFILE, epoch).await?;
            let took = t.elapsed();
            let (cpu2, mem2) = node_stats(nodes).await?;
            (
                Some(n),
                Some(took.as_secs_f64()),
                Some((cpu2 - cpu1) * 1000.0),
                Some(mem2 as f64 / 1e6),
            )
        }
        _ => (None, None, None, None),
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(json!({
        "way": way,
        "keys": n,
        "fill_s": filled.as_secs_f64(),
        "call_ms": ms(call),
        "effect_on_other_instance_ms": effect.map(ms),
        "redis_cpu_ms": (cpu1 - cpu0) * 1000.0,
        "used_memory_after_mb": mem as f64 / 1e6,
        "covered": covered,
        "swept": swept,
        "sweep_s": sweep_s,
        "sweep_redis_cpu_ms": sweep_cpu_ms,
        "used_memory_after_sweep_mb": mem_after_sweep,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut out = Vec::new();
    for topo in &a.topologies {
        for way in ["scan_unlink", "clear", "clear_sweep"] {
            // A fresh server (or cluster) per run: no leftovers of the last.
            let result = match topo.as_str() {
                "standalone" => {
                    let s = RedisServer::start().await;
                    let url = s.url();
                    run(way, &url, false, std::slice::from_ref(&url), a.keys).await?
                }
                "cluster" => {
                    let c = RedisCluster::start(3, 0).await;
                    run(way, &c.kura_url(), true, &c.urls(), a.keys).await?
                }
                other => anyhow::bail!("unknown topology {other:?}"),
            };
            eprintln!("{topo} {way}: {result}");
            let mut r = result;
            r["topology"] = json!(topo);
            out.push(r);
        }
    }
    println!("{}", json!({ "runs": out }));
    Ok(())
}
