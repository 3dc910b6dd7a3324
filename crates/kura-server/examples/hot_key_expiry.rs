//! A hot key across its expiries: closed-loop `GET`s of one path spread
//! over one or more instances, every response's latency and `X-Cache`
//! recorded, and the moments loads happened (from each instance's
//! `/metrics`, or, for a service without them, the moments this tool
//! deleted the key to stand for an expiry).
//!
//! ```text
//! cargo run --release -p kura-server --example hot_key_expiry -- \
//!   --url http://127.0.0.1:8081 --url http://127.0.0.1:8082 \
//!   --path /api/v1/profiles/<id>/settings --token "$(kura token --admin)" \
//!   --loads-metric 'cache_loads_total{cache_type="settings"}' --duration 60s
//! ```
//!
//! Prints one JSON object: the whole run (requests, throughput, p50, p99,
//! max, misses), one entry per load event (loads within 500 ms of each
//! other are one event) with the p99, max and misses of the requests from
//! 1 s before to 1 s after it, and the per-second p99, max and misses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Flags.
#[derive(Debug, Parser)]
struct Args {
    /// An instance (repeatable): the workers are spread over them.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// The path read.
    #[arg(long)]
    path: String,
    /// Bearer token.
    #[arg(long)]
    token: Option<String>,
    /// Closed-loop workers in all.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to measure.
    #[arg(long, default_value = "60s", value_parser = kura_server::config::parse_duration)]
    duration: Duration,
    /// A counter of loads in each instance's `/metrics`, as it appears
    /// before the value (`name{labels}`).
    #[arg(long)]
    loads_metric: Option<String>,
    /// How often the counter is read.
    #[arg(long, default_value = "20ms", value_parser = kura_server::config::parse_duration)]
    poll: Duration,
    /// Stand for expiries by deleting this key on `--expire-redis` every
    /// `--expire-every` (a service whose TTL cannot be set).
    #[arg(long)]
    expire_key: Option<String>,
    /// The Redis of `--expire-key`.
    #[arg(long)]
    expire_redis: Option<String>,
    /// The interval of the deletions.
    #[arg(long, default_value = "5s", value_parser = kura_server::config::parse_duration)]
    expire_every: Duration,
}

/// One response: when it started (since the start), how long it took, and
/// whether it was a miss (anything but `X-Cache: hit`, errors included).
#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    took: Duration,
    miss: bool,
}

async fn worker(
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut out = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let mut req = http.get(&url);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let miss = match req.send().await {
            Ok(r) => {
                let hit = r.status().is_success()
                    && r.headers().get("x-cache").and_then(|v| v.to_str().ok()) == Some("hit");
                let _ = r.bytes().await;
                !hit
            }
            Err(_) => true,
        };
        out.push(Sample {
            at: start - t0,
            took: start.elapsed(),
            miss,
        });
    }
    out
}

async fn counter(http: &reqwest::Client, url: &str, metric: &str) -> Option<f64> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(metric))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn stats(samples: &[&Sample]) -> Value {
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    let mut misses = 0;
    for s in samples {
        let _ = h.record(s.took.as_micros().max(1) as u64);
        misses += u64::from(s.miss);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "requests": samples.len(),
        "misses": misses,
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency)
        .timeout(Duration::from_secs(10))
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for i in 0..a.concurrency {
        let url = format!("{}{}", a.urls[i % a.urls.len()], a.path);
        workers.push(tokio::spawn(worker(
            http.clone(),
            url,
            a.token.clone(),
            t0,
            stop.clone(),
        )));
    }
    // Load events: counter increases, or the deletions standing for
    // expiries.
    let mut events: Vec<(Duration, f64)> = Vec::new();
    let mut last: Option<f64> = None;
    let mut expirer = match (&a.expire_key, &a.expire_redis) {
        (Some(_), Some(url)) => Some(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        ),
        _ => None,
    };
    let mut next_expiry = a.expire_every;
    while t0.elapsed() < a.duration {
        tokio::time::sleep(a.poll).await;
        if let Some(metric) = &a.loads_metric {
            let mut total = 0.0;
            for u in &a.urls {
                total += counter(&http, u, metric).await.unwrap_or(0.0);
            }
            if let Some(prev) = last {
                if total > prev {
                    events.push((t0.elapsed(), total - prev));
                }
            }
            last = Some(total);
        }
        if let (Some(c), Some(key)) = (expirer.as_mut(), &a.expire_key) {
            if t0.elapsed() >= next_expiry {
                let _: () = redis::cmd("DEL").arg(key).query_async(c).await?;
                events.push((t0.elapsed(), 1.0));
                next_expiry += a.expire_every;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await?);
    }
    samples.sort_by_key(|s| s.at);
    // Loads within 500 ms of each other are one event.
    let mut grouped: Vec<(Duration, f64)> = Vec::new();
    for (at, n) in events {
        match grouped.last_mut() {
            Some((t, m)) if at - *t < Duration::from_millis(500) => *m += n,
            _ => grouped.push((at, n)),
        }
    }
    let window = |from: Duration, to: Duration| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .collect()
    };
    let per_event: Vec<Value> = grouped
        .iter()
        .map(|(at, n)| {
            let from = at.saturating_sub(Duration::from_secs(1));
            let mut v = stats(&window(from, *at + Duration::from_secs(1)));
            v["at_s"] = json!(at.as_secs_f64());
            v["loads"] = json!(n);
            v
        })
        .collect();
    let secs = a.duration.as_secs();
    let per_second: Vec<Value> = (0..secs)
        .map(|s| {
            let mut v = stats(&window(Duration::from_secs(s), Duration::from_secs(s + 1)));
            v["second"] = json!(s);
            v
        })
        .collect();
    let all: Vec<&Sample> = samples.iter().collect();
    let mut whole = stats(&all);
    whole["throughput"] = json!(samples.len() as f64 / a.duration.as_secs_f64());
    let report = json!({
        "urls": a.urls,
        "path": a.path,
        "concurrency": a.concurrency,
        "duration_s": a.duration.as_secs_f64(),
        "whole": whole,
        "events": per_event,
        "per_second": per_second,
    });
    println!("{report}");
    Ok(())
}
