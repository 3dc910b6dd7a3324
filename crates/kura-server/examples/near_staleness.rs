//! Cross-instance staleness with the near cache: `PUT`s on one `kura serve`,
//! `GET`s of the same profile on another (both `--near-cache`), measured
//! from the moment the write's answer arrived to the first read on the
//! other instance that returns the new version.
//!
//! Before each write the reader's copy is made an L1 hit (it reads until
//! `X-Cache-Layer: l1`), so each write tests an eviction by push. Every read
//! is also checked never to return a version older than one this reader
//! already returned for that profile.
//!
//! ```text
//! cargo run --release -p kura-server --example near_staleness -- \
//!   --writer http://127.0.0.1:8081 --reader http://127.0.0.1:8082 \
//!   --token "$(kura token --admin)" --ids ids.txt --writes 2000
//! ```
//!
//! Prints one JSON object: writes, the staleness p50, p99 and max in
//! milliseconds, reads that answered from L1 while stale, and regressions
//! (reads older than one already seen; must be 0).

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

/// Flags.
#[derive(Debug, Parser)]
struct Args {
    /// The instance written to.
    #[arg(long)]
    writer: String,
    /// The instance read from.
    #[arg(long)]
    reader: String,
    /// An admin token.
    #[arg(long)]
    token: String,
    /// User ids, one per line.
    #[arg(long)]
    ids: std::path::PathBuf,
    /// How many writes.
    #[arg(long, default_value_t = 1000)]
    writes: usize,
}

async fn read(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<(String, i64)> {
    let r = http.get(url).bearer_auth(token).send().await?;
    let layer = r
        .headers()
        .get("x-cache-layer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let v: Value = r.json().await?;
    Ok((layer, v["version"].as_i64().unwrap_or(-1)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let ids: Vec<String> = std::fs::read_to_string(&a.ids)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(!ids.is_empty(), "no ids");
    let http = reqwest::Client::new();
    let mut delays_us = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut seen: std::collections::HashMap<String, i64> = Default::default();
    let (mut stale_l1, mut regressions, mut not_l1_before) = (0u64, 0u64, 0u64);
    for i in 0..a.writes {
        let id = &ids[i % ids.len()];
        let url = format!("{}/api/v1/profiles/{id}", a.reader);
        let mut tries = 0;
        loop {
            let (layer, v) = read(&http, &url, &a.token).await?;
            let last = seen.entry(id.clone()).or_insert(v);
            if v < *last {
                regressions += 1;
            }
            *last = (*last).max(v);
            if layer == "l1" {
                break;
            }
            tries += 1;
            if tries > 200 {
                not_l1_before += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let r = http
            .put(format!("{}/api/v1/profiles/{id}", a.writer))
            .bearer_auth(&a.token)
            .json(&json!({"first_name": format!("s{i}")}))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "PUT {id}: {}", r.status());
        let written: Value = r.json().await?;
        let version = written["version"].as_i64().unwrap_or(i64::MAX);
        let answered = Instant::now();
        loop {
            let (layer, v) = read(&http, &url, &a.token).await?;
            let last = seen.entry(id.clone()).or_insert(v);
            if v < *last {
                regressions += 1;
            }
            *last = (*last).max(v);
            if v >= version {
                delays_us.record(answered.elapsed().as_micros() as u64)?;
                break;
            }
            if layer == "l1" {
                stale_l1 += 1;
            }
            anyhow::ensure!(
                answered.elapsed() < Duration::from_secs(5),
                "{id}: version {v} still served 5 s after version {version} was written"
            );
        }
    }
    let ms = |q: f64| delays_us.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{}",
        json!({
            "writes": a.writes,
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "max_ms": delays_us.max() as f64 / 1000.0,
            "stale_reads_from_l1": stale_l1,
            "regressions": regressions,
            "writes_without_an_l1_copy_first": not_l1_before,
        })
    );
    Ok(())
}
