//! `kura bench`: an HTTP load generator for the kura profile service.
//!
//! It sends GET or PUT requests for ids drawn from a list (one hot id, uniformly, or
//! Zipf-distributed), over one keep-alive HTTP/1.1 connection per concurrent worker, and
//! reports throughput, latency percentiles, HTTP statuses, transport errors and timeouts, the
//! mix of `X-Cache` response headers (`hit`/`miss`/`stale`/`bypass`), and the hit ratio per
//! second — so a Zipf run that starts with a cold cache shows the hit ratio climbing.
//!
//! The `kura` binary exposes it as `kura bench` by flattening [`BenchArgs`] into its `bench`
//! subcommand and calling [`run`].
//!
//! # Layout
//!
//! - `args.rs`: [`BenchArgs`] (the flags), [`parse_duration`], the limits.
//! - `target.rs`: URL parsing and the loopback-only guard.
//! - `template.rs`: [`Template`], the `{id}` / `{rand4}` placeholders.
//! - `sampler.rs`: [`IdSampler`], the id distributions.
//! - `worker.rs`: the request loop of one worker (closed or open loop).
//! - `report.rs`: [`Report`], merged from per-worker counters, printed as a table or JSON.
//!
//! # Flags
//!
//! | flag | default | meaning |
//! |---|---|---|
//! | `--url BASE` | `http://127.0.0.1:8080` | service base URL, `http://` only |
//! | `--path TEMPLATE` | `/api/v1/profiles/{id}` | request path; `{id}` is percent-encoded |
//! | `--method GET\|PUT` | `GET` | |
//! | `--body TEMPLATE` | `{"phone":"080-{rand4}-{rand4}"}` | JSON body for PUT |
//! | `--query QS` | none | appended as `?QS`, e.g. `strategy=through` |
//! | `--token TOKEN` | none | `Authorization: Bearer TOKEN` (env `KURA_BENCH_TOKEN`) |
//! | `--header 'K: V'` | none | extra header, repeatable |
//! | `--ids-file FILE` / `--id ID` | none | ids, one per line / a single id |
//! | `--dist hot\|uniform\|zipf` | `zipf` | how ids are chosen (zipf: by position in the file) |
//! | `--zipf-exponent S` | `1.0` | skew of `zipf` |
//! | `--duration D` | `10s` | measuring time (`500ms`, `10s`, `2m`; at most `1h`) |
//! | `--requests N` | none | measured requests (at most 100,000,000) |
//! | `--concurrency C` | `64` | workers = connections |
//! | `--warmup D` | `2s` | requests sent first and not recorded |
//! | `--timeout D` | `5s` | per request; counted as a timeout |
//! | `--rate R` | none | open loop at R req/s in total (default: closed loop) |
//! | `--seed N` | random | repeatable id and `{rand4}` sequences |
//! | `--allow-remote` | off | allow targets other than loopback |
//! | `--json` | off | print the report as JSON |
//! | `--out FILE` | none | also write the JSON report to FILE |
//!
//! Every value flag can also come from `KURA_BENCH_<FLAG>` (e.g. `KURA_BENCH_URL`,
//! `KURA_BENCH_CONCURRENCY`).
//!
//! # Bounds
//!
//! A run always stops by itself: after `--duration` (10 s by default; when only `--requests`
//! is given, the 1 h cap) or after `--requests`, whichever comes first, not counting the
//! warm-up; on Ctrl-C it stops early and still reports. Requests in flight at the deadline
//! are abandoned and not counted.
//!
//! # Safety
//!
//! Only loopback targets (`127.0.0.0/8`, `::1`, `localhost`) are accepted unless
//! `--allow-remote` is given; a name is refused before it is looked up, and `localhost` must
//! resolve to loopback addresses only.
//!
//! # Open and closed loop
//!
//! Without `--rate`, each worker sends its next request when the previous one is answered
//! (closed loop): throughput is what the service sustains at that concurrency. With
//! `--rate R`, requests are scheduled at fixed times `k / R` and latency is measured from the
//! scheduled time, so queueing behind a slow service shows up in the percentiles instead of
//! being hidden (`--concurrency` then bounds the requests in flight). A wake-up late by no
//! more than the timer's granularity (2 ms) is not charged.
//!
//! # Example
//!
//! ```text
//! kura bench --url http://127.0.0.1:8080 --ids-file ids.txt --dist zipf \
//!     --duration 30s --warmup 0s --concurrency 64 --token "$TOKEN" --out zipf-cold.json
//! ```
//!
//! From Rust:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let args = kura_bench::BenchArgs::from_args(["--id", "42", "--requests", "1000"])?;
//! let report = kura_bench::run(args).await?;
//! println!("{} req/s, p99 {} ms", report.throughput, report.latency_ms.p99);
//! # Ok(())
//! # }
//! ```

mod args;
mod error;
mod report;
mod sampler;
mod target;
mod template;
mod worker;

pub use args::{
    BenchArgs, DEFAULT_DURATION, Dist, HttpMethod, MAX_CONCURRENCY, MAX_DURATION, MAX_REQUESTS,
    parse_duration,
};
pub use error::BenchError;
pub use report::{Interval, Latency, Report, StopReason, XCacheMix};
pub use sampler::IdSampler;
pub use template::Template;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::report::{RunInfo, WorkerStats};
use crate::worker::{BodyPlan, Clock, Plan, Shared};

/// Runs the benchmark described by `args`, prints the report to stdout (a table, or JSON with
/// `--json`), writes it to `--out` if given, and returns it.
///
/// Must be called within a Tokio runtime; the workers are spawned on it (a multi-threaded
/// runtime lets them use every core).
///
/// # Errors
///
/// A [`BenchError`] when the flags are invalid, the target is not loopback and
/// `--allow-remote` was not given, or the ids file cannot be read; an I/O error when the
/// `--out` file cannot be written. Failed requests are not errors: they are counted in the
/// report.
///
/// # Cancellation
///
/// Dropping the returned future stops every worker and closes every connection.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    let report = execute(&args).await?;
    let json = report.to_json();
    if let Some(path) = &args.out {
        tokio::fs::write(path, format!("{json}\n"))
            .await
            .with_context(|| format!("writing the report to {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{report}");
    }
    Ok(report)
}

/// Builds the plan, runs the workers and merges what they measured.
async fn execute(args: &BenchArgs) -> Result<Report, BenchError> {
    args.validate()?;
    let target = target::resolve(&args.url, args.allow_remote).await?;

    if !args.path.starts_with('/') {
        return Err(BenchError::InvalidArgument {
            flag: "--path",
            reason: format!("must start with '/', got {:?}", args.path),
        });
    }
    let mut path_text = format!("{}{}", target.base_path, args.path);
    if let Some(q) = args.query.as_deref().map(|q| q.trim_start_matches('?'))
        && !q.is_empty()
    {
        path_text.push('?');
        path_text.push_str(q);
    }
    let path = Template::parse_url(&path_text);
    let body = match args.method {
        HttpMethod::Get => BodyPlan::Empty,
        HttpMethod::Put => {
            let t = Template::parse(&args.body);
            if t.uses_id() || !t.is_deterministic() {
                BodyPlan::Template(t)
            } else {
                BodyPlan::Fixed(Bytes::from(args.body.clone()))
            }
        }
    };
    let uses_id = path.uses_id() || matches!(&body, BodyPlan::Template(t) if t.uses_id());

    let ids = load_ids(args).await?;
    let ids = match ids {
        Some(ids) if !ids.is_empty() => ids,
        _ if uses_id => return Err(BenchError::NoIds),
        // Nothing to substitute: one placeholder id keeps the sampler simple.
        _ => vec![String::new()],
    };
    let sampler = IdSampler::new(ids, args.dist, args.zipf_exponent)?;
    let probe = path.expand(sampler.id(0), &mut rand::rng());
    if let Err(e) = hyper::Uri::try_from(probe.as_str()) {
        return Err(BenchError::InvalidArgument {
            flag: "--path",
            reason: format!("{probe:?} is not a valid request target: {e}"),
        });
    }

    let headers = build_headers(args, &target)?;
    let duration = args.effective_duration();
    let max_latency = if args.rate.is_some() {
        // Open-loop latency includes time queued behind the schedule, up to the whole run.
        args.timeout + args.warmup + duration
    } else {
        args.timeout
    } + std::time::Duration::from_secs(1);

    let distribution = match args.dist {
        _ if sampler.len() == 1 => "a single id".to_owned(),
        Dist::Hot => format!("hot id of {}", sampler.len()),
        Dist::Uniform => format!("uniform over {} ids", sampler.len()),
        Dist::Zipf => format!("zipf(s={}) over {} ids", args.zipf_exponent, sampler.len()),
    };
    let target_text = format!(
        "{} http://{}{}",
        args.method.to_hyper(),
        target.host.to_str().unwrap_or("?"),
        path_text
    );

    let start = Instant::now();
    let measure_start = start + args.warmup;
    let clock = Clock {
        start,
        measure_start,
        deadline: measure_start + duration,
    };
    let shared = Arc::new(Shared {
        plan: Plan {
            target,
            method: args.method.to_hyper(),
            headers,
            path,
            body,
            sampler,
            timeout: args.timeout,
            rate: args.rate,
            max_requests: args.effective_requests(),
            max_latency,
        },
        clock,
        claimed: AtomicU64::new(0),
        tickets: AtomicU64::new(0),
    });
    tracing::info!(
        target = %target_text,
        concurrency = args.concurrency,
        warmup = ?args.warmup,
        duration = ?duration,
        requests = args.requests,
        rate = args.rate,
        "bench starting"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let base_seed = args.seed.unwrap_or_else(rand::random);
    // A JoinSet aborts its tasks when dropped, so cancelling `run` stops the load.
    let mut workers = JoinSet::new();
    for i in 0..args.concurrency {
        let seed = base_seed.wrapping_add(i as u64);
        workers.spawn(worker::worker(shared.clone(), seed, stop_rx.clone()));
    }

    let mut total = WorkerStats::new(max_latency);
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(Ok(stats)) => total.merge(&stats),
                Some(Err(e)) => tracing::error!(error = %e, "bench worker failed"),
                None => break,
            },
            result = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                if result.is_ok() {
                    tracing::info!("interrupted: stopping the run and reporting what was measured");
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
    let ended = Instant::now().min(clock.deadline);
    let elapsed = ended.saturating_duration_since(measure_start);
    let stopped_by = if interrupted {
        StopReason::Interrupted
    } else if shared.claimed.load(Ordering::Relaxed) >= shared.plan.max_requests {
        StopReason::Requests
    } else {
        StopReason::Duration
    };
    Ok(Report::build(
        &total,
        RunInfo {
            target: target_text,
            distribution,
            concurrency: args.concurrency,
            rate: args.rate,
            elapsed,
            stopped_by,
        },
    ))
}

/// Reads the ids from `--ids-file` or `--id`; `None` when neither is given.
async fn load_ids(args: &BenchArgs) -> Result<Option<Vec<String>>, BenchError> {
    if let Some(path) = &args.ids_file {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| BenchError::IdsFile {
                path: path.clone(),
                source,
            })?;
        let ids = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        return Ok(Some(ids));
    }
    Ok(args.id.clone().map(|id| vec![id]))
}

/// The headers every request carries, built once.
fn build_headers(args: &BenchArgs, target: &target::Target) -> Result<HeaderMap, BenchError> {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, target.host.clone());
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("kura-bench/", env!("CARGO_PKG_VERSION"))),
    );
    if args.method == HttpMethod::Put {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(token) = &args.token {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            BenchError::InvalidArgument {
                flag: "--token",
                reason: "contains characters not allowed in a header".into(),
            }
        })?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    let mut replaced = Vec::new();
    for raw in &args.headers {
        let invalid = |reason: String| BenchError::InvalidArgument {
            flag: "--header",
            reason,
        };
        let (name, value) = raw
            .split_once(':')
            .ok_or_else(|| invalid(format!("expected 'Name: value', got {raw:?}")))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| invalid(format!("bad header name in {raw:?}")))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| invalid(format!("bad header value in {raw:?}")))?;
        // A user header replaces a default one of the same name; repeated user headers add up.
        if !replaced.contains(&name) {
            headers.remove(&name);
            replaced.push(name.clone());
        }
        headers.append(name, value);
    }
    Ok(headers)
}
