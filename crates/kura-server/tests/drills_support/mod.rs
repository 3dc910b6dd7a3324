//! Support for the reliability drills in `drills.rs`: a database per drill,
//! the `kura` binary run as a real process, a steady in-test load loop that
//! records every response, and the figures a drill reports.
//!
//! Environment: `KURA_TEST_PG` (default `postgres://postgres@127.0.0.1:5432`),
//! the shared PostgreSQL the drills create their databases in. Redis is
//! always a `RedisServer` the drill owns.

#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::Connection as _;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::{TestDb, pg_base, random_suffix};

pub use crate::support::pg_addr;

/// Drills measure latency: run them one at a time, across processes too
/// (nextest runs each test in its own process), with a session-level
/// advisory lock on the shared PostgreSQL. Released when the connection
/// closes, so a drill that crashes never leaves it held.
pub struct DrillLock {
    _conn: sqlx::PgConnection,
}

impl DrillLock {
    pub async fn acquire() -> DrillLock {
        let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", pg_base()))
            .await
            .expect("connect to postgres for the drill lock");
        // "kura" in ASCII: one lock shared by every drill.
        sqlx::query("SELECT pg_advisory_lock(1802859105)")
            .execute(&mut conn)
            .await
            .expect("take the drill lock");
        DrillLock { _conn: conn }
    }
}

/// A PostgreSQL database created for one drill and dropped after it.
pub struct DrillDb(TestDb);

impl DrillDb {
    pub async fn create() -> DrillDb {
        DrillDb(TestDb::create().await)
    }

    /// The database's URL on the shared server.
    pub fn url(&self) -> String {
        self.0.url.clone()
    }

    /// The database's URL through a proxy listening on `addr`.
    pub fn url_via(&self, addr: SocketAddr) -> String {
        self.0.url_via(addr)
    }

    /// A pool for reading the rows directly (not through the service).
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url())
            .await
            .expect("connect to the drill database")
    }
}

/// `kura <args>` to completion; its stdout.
pub async fn kura(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kura"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("run the kura binary");
    assert!(
        out.status.success(),
        "kura {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A migrated and seeded database, the seeded user ids, and an admin token.
pub struct Fixture {
    pub db: DrillDb,
    pub ids: Vec<Uuid>,
    pub secret: String,
    pub token: String,
    pub namespace: String,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// `kura migrate`, `kura seed --profiles <n> --ids-out …` and
    /// `kura token --admin` against a fresh database.
    pub async fn new(profiles: u64) -> Fixture {
        let db = DrillDb::create().await;
        let dir = tempfile::Builder::new()
            .prefix("kura-drill-")
            .tempdir()
            .expect("tempdir");
        let url = db.url();
        kura(&["migrate", "--database-url", &url], &[]).await;
        let ids_file = dir.path().join("ids.txt");
        let n = profiles.to_string();
        kura(
            &[
                "seed",
                "--profiles",
                &n,
                "--database-url",
                &url,
                "--ids-out",
                ids_file.to_str().expect("utf-8 path"),
            ],
            &[],
        )
        .await;
        let ids: Vec<Uuid> = std::fs::read_to_string(&ids_file)
            .expect("seeded ids")
            .lines()
            .map(|l| Uuid::parse_str(l.trim()).expect("a uuid per line"))
            .collect();
        assert_eq!(ids.len() as u64, profiles, "one id per seeded profile");
        let secret = format!("drill-{}", random_suffix());
        let sub = Uuid::new_v4().to_string();
        let token = kura(
            &["token", "--sub", &sub, "--admin", "--ttl", "3600"],
            &[("KURA_JWT_SECRET", &secret)],
        )
        .await
        .trim()
        .to_owned();
        Fixture {
            db,
            ids,
            secret,
            token,
            namespace: format!("drill_{}", random_suffix()),
            dir,
        }
    }

    /// The profile key of `id` in this drill's namespace.
    pub fn key(&self, id: &Uuid) -> String {
        format!("{}:profile:{id}", self.namespace)
    }

    /// The stale-copy key of `id`.
    pub fn stale_key(&self, id: &Uuid) -> String {
        format!("{}:~s:profile:{id}", self.namespace)
    }
}

/// `kura serve` as a child process; killed when dropped (on every path,
/// panics included), and its log shown when the drill failed.
pub struct Service {
    child: Child,
    pub url: String,
    log: PathBuf,
}

impl Service {
    /// Starts `kura serve` on a free port over `database_url` and
    /// `redis_url`, in the fixture's namespace, with `extra` flags, and
    /// waits for `/healthz` to answer.
    pub async fn start(fx: &Fixture, database_url: &str, redis_url: &str, extra: &[&str]) -> Self {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = kura_testkit::free_port();
            let log = fx.dir.path().join(format!("serve-{port}-{attempt}.log"));
            let file = std::fs::File::create(&log).expect("log file");
            let listen = format!("127.0.0.1:{port}");
            let child = Command::new(env!("CARGO_BIN_EXE_kura"))
                .arg("serve")
                .args(["--listen", &listen])
                .args(["--database-url", database_url])
                .args(["--redis-url", redis_url])
                .args(["--namespace", &fx.namespace])
                .args(["--shutdown-grace", "1s"])
                .args(extra)
                .env("KURA_JWT_SECRET", &fx.secret)
                .env("RUST_LOG", "info")
                .env_remove("DATABASE_URL")
                .env_remove("REDIS_URL")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .expect("spawn kura serve");
            let mut svc = Service {
                child,
                url: format!("http://{listen}"),
                log,
            };
            match svc.wait_ready().await {
                Ok(()) => return svc,
                Err(e) => last = e,
            }
            // Another process may have taken the port: try another.
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("kura serve did not start: {last}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}\n{}", self.log_tail()));
            }
            if let Ok(r) = http
                .get(format!("{}/healthz", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no healthy /healthz in 30 s\n{}", self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the service's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the process is still running (it must never crash).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- kura serve log (last lines) ---\n{}", self.log_tail());
        }
    }
}

/// An HTTP client of the service with the fixture's admin token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
}

/// One response, as a drill looks at it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status; 0 when no response came (connect error, client
    /// timeout).
    pub status: u16,
    pub cache: CacheTag,
    pub body: Value,
    pub latency: Duration,
}

impl Reply {
    pub fn version(&self) -> Option<i64> {
        self.body.get("version").and_then(Value::as_i64)
    }

    pub fn detail(&self) -> &str {
        self.body
            .get("detail")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// The `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTag {
    Hit,
    Miss,
    Stale,
    Bypass,
    None,
}

impl CacheTag {
    fn of(r: &reqwest::Response) -> Self {
        match r.headers().get("x-cache").and_then(|v| v.to_str().ok()) {
            Some("hit") => CacheTag::Hit,
            Some("miss") => CacheTag::Miss,
            Some("stale") => CacheTag::Stale,
            Some("bypass") => CacheTag::Bypass,
            _ => CacheTag::None,
        }
    }
}

impl Api {
    pub fn new(svc: &Service, fx: &Fixture) -> Api {
        Api {
            http: reqwest::Client::builder()
                // A bound on the client side too, so a drill never hangs:
                // far above every bound the service itself must keep.
                .timeout(Duration::from_secs(15))
                .pool_max_idle_per_host(64)
                .build()
                .expect("http client"),
            url: svc.url.clone(),
            token: fx.token.clone(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let started = Instant::now();
        match req.bearer_auth(&self.token).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let cache = CacheTag::of(&r);
                let bytes = r.bytes().await.unwrap_or_default();
                Reply {
                    status,
                    cache,
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    latency: started.elapsed(),
                }
            }
            Err(_) => Reply {
                status: 0,
                cache: CacheTag::None,
                body: Value::Null,
                latency: started.elapsed(),
            },
        }
    }

    pub async fn get(&self, id: &Uuid) -> Reply {
        self.send(self.http.get(format!("{}/api/v1/profiles/{id}", self.url)))
            .await
    }

    /// Reads `id` until it is a cache hit (a Redis call past its timeout on a
    /// busy machine answers `bypass` and caches nothing).
    ///
    /// # Panics
    ///
    /// When 50 reads in a row are not hits.
    pub async fn cache(&self, id: &Uuid) {
        for _ in 0..50 {
            if self.get(id).await.cache == CacheTag::Hit {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{id} never became a cache hit");
    }

    pub async fn put(&self, id: &Uuid, body: &Value, strategy: &str) -> Reply {
        self.send(
            self.http
                .put(format!(
                    "{}/api/v1/profiles/{id}?strategy={strategy}",
                    self.url
                ))
                .json(body),
        )
        .await
    }

    pub async fn delete(&self, id: &Uuid) -> Reply {
        self.send(
            self.http
                .delete(format!("{}/api/v1/profiles/{id}", self.url)),
        )
        .await
    }

    /// `DELETE /api/v1/admin/cache/profiles`: every cached profile cleared.
    pub async fn clear_profiles(&self) -> Reply {
        self.send(
            self.http
                .delete(format!("{}/api/v1/admin/cache/profiles", self.url)),
        )
        .await
    }

    pub async fn batch(&self, ids: &[Uuid]) -> Reply {
        self.send(
            self.http
                .post(format!("{}/api/v1/profiles/batch", self.url))
                .json(&serde_json::json!({ "user_ids": ids })),
        )
        .await
    }

    pub async fn health(&self) -> Reply {
        self.send(self.http.get(format!("{}/healthz", self.url)))
            .await
    }

    /// A counter from `/metrics` with the `cache_type="profile"` label (0
    /// when not yet registered).
    pub async fn profile_counter(&self, name: &str) -> f64 {
        self.counter(name, &["cache_type=\"profile\""]).await
    }

    /// The sum of a counter's series that carry every one of `labels`
    /// (0 when none is registered yet).
    pub async fn counter(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// One request of the load loop.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When the request started, since the load started.
    pub at: Duration,
    pub latency: Duration,
    pub status: u16,
    pub cache: CacheTag,
    /// The profile's `version` in a 200 answer.
    pub version: Option<i64>,
    /// Index of the id in the load's id list.
    pub id: usize,
}

impl Sample {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Answered from the cache (a stale copy counts: it came from Redis).
    pub fn cached(&self) -> bool {
        matches!(self.cache, CacheTag::Hit | CacheTag::Stale)
    }
}

/// Steady read load: `workers` tasks, each paced to `rate / workers`
/// requests per second (a worker that falls behind does not catch up in a
/// burst), GETs of ids picked at random from `ids`.
pub struct Load {
    t0: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The drills' steady load: 8 connections, 400 requests per second in all.
pub const WORKERS: usize = 8;
pub const RATE: f64 = 400.0;

impl Load {
    pub fn start(api: &Api, ids: Vec<Uuid>) -> Load {
        Self::start_with(api, ids, WORKERS, RATE)
    }

    pub fn start_with(api: &Api, ids: Vec<Uuid>, workers: usize, rate: f64) -> Load {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::with_capacity(64 * 1024)));
        let ids = Arc::new(ids);
        let period = Duration::from_secs_f64(workers as f64 / rate);
        let tasks = (0..workers)
            .map(|w| {
                let (api, stop, samples, ids) =
                    (api.clone(), stop.clone(), samples.clone(), ids.clone());
                tokio::spawn(async move {
                    // Spread the workers' ticks over one period.
                    tokio::time::sleep(period * w as u32 / workers as u32).await;
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let i = rand::random_range(0..ids.len());
                        let at = t0.elapsed();
                        let r = api.get(&ids[i]).await;
                        let s = Sample {
                            at,
                            latency: r.latency,
                            status: r.status,
                            cache: r.cache,
                            version: r.version(),
                            id: i,
                        };
                        samples.lock().expect("samples").push(s);
                    }
                })
            })
            .collect();
        Load {
            t0,
            stop,
            samples,
            tasks,
        }
    }

    /// Time since the load started (the clock of [`Sample::at`]).
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// The samples recorded so far.
    pub fn snapshot(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// Stops the workers (requests in flight finish) and returns every
    /// sample in start order.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load worker");
        }
        let mut v = std::mem::take(&mut *self.samples.lock().expect("samples"));
        v.sort_by_key(|s| s.at);
        v
    }
}

/// The samples that started in `[from, to)`.
pub fn window(samples: &[Sample], from: Duration, to: Duration) -> Vec<Sample> {
    samples
        .iter()
        .filter(|s| s.at >= from && s.at < to)
        .copied()
        .collect()
}

/// The 99th percentile latency (HdrHistogram, microsecond resolution).
pub fn p99(samples: &[Sample]) -> Duration {
    percentile(samples.iter().map(|s| s.latency), 99.0)
}

pub fn percentile(latencies: impl Iterator<Item = Duration>, q: f64) -> Duration {
    let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram");
    for l in latencies {
        h.saturating_record(l.as_micros().max(1) as u64);
    }
    if h.is_empty() {
        return Duration::ZERO;
    }
    Duration::from_micros(h.value_at_quantile(q / 100.0))
}

/// Share of successful answers that came from the cache.
pub fn hit_ratio(samples: &[Sample]) -> f64 {
    let ok = samples.iter().filter(|s| s.ok()).count();
    if ok == 0 {
        return 0.0;
    }
    samples.iter().filter(|s| s.ok() && s.cached()).count() as f64 / ok as f64
}

/// How long after `from` the hit ratio is back to `target`: the start of the
/// first 500 ms window (in steps of 100 ms) with at least 20 answers and a
/// hit ratio of `target` or more, measured from `from`.
pub fn recovery(samples: &[Sample], from: Duration, target: f64) -> Option<Duration> {
    let end = samples.last()?.at;
    let span = Duration::from_millis(500);
    let mut t = from;
    while t + span <= end {
        let w = window(samples, t, t + span);
        if w.len() >= 20 && hit_ratio(&w) >= target {
            return Some(t - from);
        }
        t += Duration::from_millis(100);
    }
    None
}

/// Waits (up to `limit`) until [`recovery`] finds the hit ratio back at
/// `target` after `from`, then one more second so the recovered period is
/// on record.
pub async fn await_recovery(load: &Load, from: Duration, target: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if recovery(&load.snapshot(), from, target).is_some() {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Time to recover after the fault ends.
#[derive(Debug, Clone, Copy)]
pub enum Recovery {
    After(Duration),
    Never,
    /// The drill has no outage to recover from.
    NotApplicable,
}

impl From<Option<Duration>> for Recovery {
    fn from(d: Option<Duration>) -> Self {
        d.map_or(Recovery::Never, Recovery::After)
    }
}

/// The one-line summary every drill prints (and `docs/RELIABILITY.md`
/// quotes).
pub struct Summary<'a> {
    pub drill: &'a str,
    pub requests: usize,
    pub non_2xx: usize,
    pub p99_before: Duration,
    pub p99_fault: Duration,
    pub recover: Recovery,
    pub stale_found: usize,
    pub extra: String,
}

impl Summary<'_> {
    pub fn print(&self) {
        let recover = match self.recover {
            Recovery::After(d) => format!("{:.2}s", d.as_secs_f64()),
            Recovery::Never => "never".to_owned(),
            Recovery::NotApplicable => "-".to_owned(),
        };
        println!(
            "DRILL {}: requests={} non_2xx={} p99_before={:.1}ms p99_fault={:.1}ms recover={} stale_found={}{}{}",
            self.drill,
            self.requests,
            self.non_2xx,
            ms(self.p99_before),
            ms(self.p99_fault),
            recover,
            self.stale_found,
            if self.extra.is_empty() { "" } else { " " },
            self.extra,
        );
    }
}

/// A connection to the drill's own Redis (never the shared one).
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// The raw bytes at `key` (`None` when absent or not a string).
pub async fn redis_get(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(key)
        .query_async::<Option<Vec<u8>>>(c)
        .await
        .ok()
        .flatten()
}

/// The `_v` version of a cached envelope, `None` if it is not one.
pub fn envelope_version(bytes: &[u8]) -> Option<i64> {
    serde_json::from_slice::<Value>(bytes)
        .ok()?
        .get("_v")?
        .as_i64()
}

/// Every key matching `pattern` (SCAN).
pub async fn redis_scan(c: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(c)
            .await
            .expect("SCAN");
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return keys;
        }
    }
}

/// `(version, first_name)` of each of `ids` that has a row, read straight
/// from PostgreSQL.
pub async fn db_rows(
    pool: &sqlx::PgPool,
    ids: &[Uuid],
) -> std::collections::HashMap<Uuid, (i64, Option<String>)> {
    use sqlx::Row as _;
    sqlx::query("SELECT user_id, version, first_name FROM profiles WHERE user_id = ANY($1)")
        .bind(ids.to_vec())
        .fetch_all(pool)
        .await
        .expect("read the rows")
        .iter()
        .map(|r| {
            (
                r.get::<Uuid, _>("user_id"),
                (r.get::<i64, _>("version"), r.get("first_name")),
            )
        })
        .collect()
}
