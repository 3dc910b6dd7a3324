//! Write-behind crash safety with `kura serve` as a separate process: a few
//! thousand `behind` writes with random patches over a few hundred
//! profiles from concurrent clients, the service killed with SIGKILL
//! mid-stream and restarted (and, in the second test, PostgreSQL
//! partitioned and refusing connections for a while); once the queue has
//! drained, every profile in PostgreSQL must equal the last write
//! acknowledged for it (version and content): nothing lost, nothing
//! reordered.
//!
//! Also here, because they need the binary: the start-up warning on a
//! Redis without AOF, `kura flush --once` and `kura wb status`, and a
//! SIGTERM that leaves the queue for the next flusher.
//!
//! Each test owns its PostgreSQL database, its `redis-server` (AOF with
//! `appendfsync always`) and its key namespace.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kura_server::db::{Db, PoolOptions};
use kura_testkit::{FaultProxy, RedisOptions, RedisServer, free_port};
use serde_json::{Value, json};
use support::{TestDb, random_suffix, token_with};
use uuid::Uuid;

/// Profiles written to.
const KEYS: u64 = 200;
/// Concurrent clients.
const CLIENTS: usize = 4;
const FIELDS: [&str; 6] = [
    "first_name",
    "last_name",
    "name",
    "email",
    "phone",
    "address",
];

/// Everything a `kura` process of a test is started with.
struct Env {
    dir: tempfile::TempDir,
    database_url: String,
    redis_url: String,
    namespace: String,
    secret: String,
    port: u16,
}

impl Env {
    fn new(database_url: String, redis_url: String) -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            database_url,
            redis_url,
            namespace: format!("wbc_{}", random_suffix()),
            secret: format!("secret-{}", random_suffix()),
            port: free_port(),
        }
    }

    fn kura(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kura"));
        c.args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", &self.redis_url)
            .env("KURA_NAMESPACE", &self.namespace)
            .env("KURA_JWT_SECRET", &self.secret)
            .env("RUST_LOG", "info")
            .env_remove("KURA_WRITE_STRATEGY")
            .stdin(Stdio::null());
        c
    }

    /// Runs a `kura` command to completion; returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = self.kura(args).output().expect("run kura");
        assert!(
            out.status.success(),
            "kura {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn token(&self) -> String {
        token_with(
            &self.secret,
            &json!({"sub": Uuid::new_v4().to_string(), "exp": support::now() + 3600, "roles": ["admin"]}),
        )
    }

    /// Seeds the profiles and returns their user ids.
    fn seed(&self, n: u64) -> Vec<Uuid> {
        let ids = self.dir.path().join("ids.txt");
        self.run(&[
            "seed",
            "--profiles",
            &n.to_string(),
            "--ids-out",
            ids.to_str().unwrap(),
        ]);
        std::fs::read_to_string(ids)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }

    /// `kura wb status --json`.
    fn status(&self) -> Value {
        serde_json::from_str(&self.run(&["wb", "status", "--json"])).unwrap()
    }

    /// Waits until the queue is empty (nothing queued, nothing being
    /// applied).
    async fn wait_drained(&self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status();
            if s["depth"] == 0 && s["in_flight"] == 0 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "queue not drained within {within:?}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A running `kura serve`.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `kura serve` with `extra` flags and waits until it answers.
    async fn start(env: &Env, n: usize, extra: &[&str]) -> Service {
        let log = env.dir.path().join(format!("serve-{n}.log"));
        let listen = format!("127.0.0.1:{}", env.port);
        let mut args = vec![
            "serve",
            "--listen",
            &listen,
            "--write-strategy",
            "behind",
            "--wb-claim-idle",
            "2s",
        ];
        args.extend_from_slice(extra);
        let child = env
            .kura(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn kura serve");
        let mut s = Service { child, log };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", env.url())).send().await
                && r.status().is_success()
            {
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("kura serve exited with {st}:\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "kura serve not ready:\n{}",
                s.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no flush, no acknowledgement.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the process to exit.
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A random patch: one to three fields, set to fresh valid values (names
/// sometimes cleared).
fn random_patch() -> Value {
    let mut patch = serde_json::Map::new();
    let n = rand::random_range(1..=3);
    while patch.len() < n {
        let field = FIELDS[rand::random_range(0..FIELDS.len())];
        let r: u32 = rand::random_range(0..100_000_000);
        let v = match field {
            "email" => json!(format!("u{r}@example.jp")),
            "phone" => json!(format!("080-{:04}-{:04}", r / 10_000, r % 10_000)),
            "address" => json!(format!("東京都 {r}")),
            _ if r % 10 == 0 => Value::Null,
            _ => json!(format!("名{r}")),
        };
        patch.insert(field.to_owned(), v);
    }
    Value::Object(patch)
}

/// What the clients saw, per profile.
#[derive(Default)]
struct Ledger {
    /// The acknowledged body with the highest version.
    acked: HashMap<Uuid, Value>,
    /// Patches whose outcome is unknown (sent, no answer or an error).
    unknown: HashMap<Uuid, Vec<Value>>,
    /// Acknowledged writes by `X-Write`.
    paths: HashMap<String, u64>,
    /// Statuses other than 200.
    failures: HashMap<u16, u64>,
}

impl Ledger {
    /// A patch that may or may not have been applied.
    fn unsure(&mut self, id: Uuid, patch: Value) {
        self.unknown.entry(id).or_default().push(patch);
    }
}

/// Clients writing until `stop`.
struct Load {
    ledger: Arc<Mutex<Ledger>>,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(env: &Env, ids: &[Uuid], max_writes: u64) -> Load {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ids = Arc::new(ids.to_vec());
        let tasks = (0..CLIENTS)
            .map(|_| {
                let (ledger, acked, stop, ids) =
                    (ledger.clone(), acked.clone(), stop.clone(), ids.clone());
                let (base, token) = (env.url(), env.token());
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(5))
                        .build()
                        .unwrap();
                    while !stop.load(Ordering::Relaxed)
                        && acked.load(Ordering::Relaxed) < max_writes
                    {
                        let id = ids[rand::random_range(0..ids.len())];
                        let patch = random_patch();
                        let r = http
                            .put(format!("{base}/api/v1/profiles/{id}"))
                            .bearer_auth(&token)
                            .json(&patch)
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 200 => {
                                let path = r
                                    .headers()
                                    .get("x-write")
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default();
                                match r.json::<Value>().await {
                                    Ok(body) => {
                                        let mut l = ledger.lock().unwrap();
                                        let newer = l.acked.get(&id).is_none_or(|cur| {
                                            cur["version"].as_i64() < body["version"].as_i64()
                                        });
                                        if newer {
                                            l.acked.insert(id, body);
                                        }
                                        *l.paths.entry(path).or_default() += 1;
                                        acked.fetch_add(1, Ordering::Relaxed);
                                    }
                                    // The answer was cut: it may have landed.
                                    Err(_) => {
                                        ledger.lock().unwrap().unsure(id, patch);
                                    }
                                }
                            }
                            Ok(r) => {
                                let mut l = ledger.lock().unwrap();
                                *l.failures.entry(r.status().as_u16()).or_default() += 1;
                                l.unsure(id, patch);
                            }
                            // Never reached the service: nothing to record.
                            Err(e) if e.is_connect() => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(_) => {
                                ledger.lock().unwrap().unsure(id, patch);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            ledger,
            acked,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    async fn wait_for(&self, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} writes acknowledged within {within:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `total` acknowledged writes, stops, and waits for the
    /// queue to drain with no dead letter.
    async fn complete(self, env: &Env, total: u64) -> Ledger {
        self.wait_for(total, Duration::from_secs(60)).await;
        let ledger = self.finish().await;
        let s = env.wait_drained(Duration::from_secs(30)).await;
        assert_eq!(s["dead_letters"], 0, "{s}");
        eprintln!(
            "acknowledged by path: {:?}; other answers: {:?}; unknown outcome: {}",
            ledger.paths,
            ledger.failures,
            ledger.unknown.values().map(Vec::len).sum::<usize>()
        );
        ledger
    }

    async fn finish(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.ledger)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// Every profile in the database equals the last acknowledged write for it
/// (version and content); a row ahead of it is only allowed where writes
/// of unknown outcome were in flight, and then holds only their values.
async fn check_database(database_url: &str, ids: &[Uuid], ledger: &Ledger) {
    let db = Db::connect(Some(database_url), PoolOptions::default())
        .await
        .unwrap();
    let rows: HashMap<Uuid, Value> = db
        .fetch_many(ids)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.user_id, serde_json::to_value(&p).unwrap()))
        .collect();
    db.close().await;
    let (mut exact, mut ahead) = (0, 0);
    for (id, acked) in &ledger.acked {
        let row = rows
            .get(id)
            .unwrap_or_else(|| panic!("profile {id} missing"));
        let (rv, av) = (
            row["version"].as_i64().unwrap(),
            acked["version"].as_i64().unwrap(),
        );
        assert!(
            rv >= av,
            "profile {id}: lost writes: the database has version {rv}, version {av} was acknowledged\n  db:    {row}\n  acked: {acked}"
        );
        if rv == av {
            assert_eq!(row, acked, "profile {id}: content differs at version {rv}");
            exact += 1;
            continue;
        }
        let unknown = ledger.unknown.get(id).map_or(&[][..], Vec::as_slice);
        assert!(
            (rv - av) as usize <= unknown.len(),
            "profile {id}: version {rv} is {} ahead of the acknowledged {av} with {} writes of unknown outcome",
            rv - av,
            unknown.len()
        );
        for f in FIELDS {
            assert!(
                row[f] == acked[f] || unknown.iter().any(|p| p.get(f) == Some(&row[f])),
                "profile {id}: {f} = {} is neither acknowledged nor in flight",
                row[f]
            );
        }
        ahead += 1;
    }
    eprintln!(
        "{} profiles written: {exact} equal to their last acknowledged write, {ahead} ahead of it by writes in flight at the crash",
        ledger.acked.len()
    );
}

fn aof_redis() -> RedisOptions {
    // appendfsync always is the testkit's setting with AOF on.
    RedisOptions::default().appendonly(true)
}

fn log_contains(log: &Path, needle: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|s| s.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_and_reorders_nothing() {
    let started = Instant::now();
    let db = TestDb::create().await;
    let redis = RedisServer::start_with(aof_redis()).await;
    let env = Env::new(db.url.clone(), redis.url());
    let ids = env.seed(KEYS);
    let mut service = Service::start(&env, 1, &[]).await;
    assert!(log_contains(&service.log, "Redis AOF is on"));
    assert!(!log_contains(&service.log, "append-only file"));

    let total = 3000;
    let load = Load::start(&env, &ids, total);
    load.wait_for(1200, Duration::from_secs(60)).await;
    service.kill();
    let at_kill = load.acked();
    let queued = env.status();
    eprintln!("killed after {at_kill} acknowledged writes; queue at the kill: {queued}");
    let mut service = Service::start(&env, 2, &[]).await;
    let ledger = load.complete(&env, total).await;
    assert!(ledger.paths.get("behind").copied().unwrap_or(0) > total / 2);
    check_database(&db.url, &ids, &ledger).await;
    assert!(
        log_contains(&service.log, "reclaimed write-behind entries") || queued["in_flight"] == 0,
        "entries taken by the killed flusher were reclaimed:\n{}",
        service.log_text()
    );
    service.terminate(Duration::from_secs(15));
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_and_sigkill_lose_nothing() {
    if !support::pg_base().contains("127.0.0.1:5432") {
        return;
    }
    let started = Instant::now();
    let db = TestDb::create().await;
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db.url.replace("127.0.0.1:5432", &proxy.addr().to_string());
    let redis = RedisServer::start_with(aof_redis()).await;
    let env = Env::new(url, redis.url());
    let ids = env.seed(KEYS);
    let extra = ["--request-timeout", "2s", "--db-acquire-timeout", "1s"];
    let mut service = Service::start(&env, 1, &extra).await;

    let total = 3000;
    let load = Load::start(&env, &ids, total);
    load.wait_for(800, Duration::from_secs(60)).await;
    // Partitioned: the flusher's batch hangs, reads of uncached profiles
    // time out; writes to cached ones are still accepted.
    proxy.blackhole();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Killed while the database is unreachable: its flusher's entries
    // stay claimed until the next one reclaims them.
    service.kill();
    let at_kill = load.acked();
    proxy.heal();
    let mut service = Service::start(&env, 2, &extra).await;
    eprintln!(
        "killed after {at_kill} acknowledged writes; queue: {}",
        env.status()
    );
    // 600 more after the restart, or all of them if fewer are left.
    load.wait_for((at_kill + 600).min(total), Duration::from_secs(60))
        .await;
    // Refusing connections: flushes fail and are retried.
    proxy.refuse();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.heal();
    let ledger = load.complete(&env, total).await;
    check_database(&db.url, &ids, &ledger).await;
    let m = reqwest::get(format!("{}/metrics", env.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retried: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("cache_wb_retried_total{cache_type=\"profile\"} "))
        .expect("cache_wb_retried_total")
        .parse()
        .unwrap();
    assert!(
        retried >= 1.0,
        "the flusher retried while the database refused"
    );
    service.terminate(Duration::from_secs(15));
    eprintln!("took {:?}", started.elapsed());
}

/// `kura flush --once` drains the queue a serving process left (no
/// flushers of its own), `kura wb status` shows depth and dead letters, and
/// SIGTERM stops `kura serve` cleanly with its queue left for the next
/// flusher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_once_and_wb_status() {
    let db = TestDb::create().await;
    let redis = RedisServer::start_with(aof_redis()).await;
    let env = Env::new(db.url.clone(), redis.url());
    let ids = env.seed(20);
    let mut service = Service::start(&env, 1, &["--wb-flushers", "0"]).await;
    let http = reqwest::Client::new();
    let token = env.token();
    let mut last = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        for k in 0..2 {
            let r = http
                .put(format!("{}/api/v1/profiles/{id}", env.url()))
                .bearer_auth(&token)
                .json(&json!({"phone": format!("080-{i:04}-{k:04}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-write"], "behind");
            last.insert(*id, r.json::<Value>().await.unwrap());
        }
    }
    // Nothing flushes in the service: SIGTERM leaves all 40 queued.
    assert_eq!(service.terminate(Duration::from_secs(15)).code(), Some(0));
    let s = env.status();
    assert_eq!(
        (s["depth"].as_u64(), s["dead_letters"].as_u64()),
        (Some(40), Some(0)),
        "{s}"
    );
    let text = env.run(&["wb", "status"]);
    assert!(text.contains("queued        40"), "{text}");

    // One profile disappears before the flush: its write is dead-lettered
    // (after one attempt here), the others land.
    let gone = ids[0];
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("DELETE FROM profiles WHERE user_id = $1")
        .bind(gone)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let out = env.run(&["flush", "--once", "--wb-max-attempts", "1"]);
    assert!(out.contains("40 queued writes read"), "{out}");
    assert!(out.contains("19 rows written"), "{out}");
    assert!(out.contains("20 coalesced"), "{out}");
    assert!(out.contains("1 dead-lettered"), "{out}");
    let s = env.status();
    assert_eq!(
        (s["depth"].as_u64(), s["dead_letters"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
    assert_eq!(s["recent_dead_letters"][0]["id"], gone.to_string());
    assert_eq!(
        s["recent_dead_letters"][0]["error"],
        "profile no longer exists"
    );
    let text = env.run(&["wb", "status"]);
    assert!(
        text.contains(&format!("user {gone} version 3: profile no longer exists")),
        "{text}"
    );
    let ledger = Ledger {
        acked: last.into_iter().filter(|(id, _)| *id != gone).collect(),
        ..Ledger::default()
    };
    check_database(&db.url, &ids, &ledger).await;
}

/// `kura flush` as a dedicated worker (two flushers in one process) beside
/// a `kura serve --wb-flushers 0`; SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_flush_worker() {
    let db = TestDb::create().await;
    let redis = RedisServer::start_with(aof_redis()).await;
    let env = Env::new(db.url.clone(), redis.url());
    let ids = env.seed(50);
    let _service = Service::start(&env, 1, &["--wb-flushers", "0"]).await;
    let worker_log = env.dir.path().join("flush.log");
    let mut worker = Service {
        child: env
            .kura(&["flush", "--wb-flushers", "2", "--wb-linger", "5ms"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&worker_log).unwrap())
            .spawn()
            .unwrap(),
        log: worker_log,
    };
    let load = Load::start(&env, &ids, 500);
    load.wait_for(500, Duration::from_secs(60)).await;
    let ledger = load.finish().await;
    let s = env.wait_drained(Duration::from_secs(30)).await;
    assert_eq!(s["dead_letters"], 0, "{s}");
    check_database(&db.url, &ids, &ledger).await;
    assert_eq!(worker.terminate(Duration::from_secs(15)).code(), Some(0));
    let log = worker.log_text();
    assert!(log.contains("write-behind flushers started"), "{log}");
    assert!(!log.contains("flush step failed"), "{log}");
}

/// `kura serve` warns at start when `behind` is on and queued writes would
/// not survive a restart: a Redis without AOF, or the memory store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warns_when_the_queue_is_not_durable() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite:{}", dir.path().join("kura.db").display());
    // No AOF (the testkit's default).
    let plain = RedisServer::start().await;
    let env = Env::new(sqlite.clone(), plain.url());
    let service = Service::start(&env, 1, &[]).await;
    // The check runs once the listener is up: wait for its line.
    let logged = |s: &Service, text: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = s.log_text();
            if log.contains(text) || std::time::Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let log = logged(&service, "Redis has no append-only file");
    assert!(log.contains("Redis has no append-only file"), "{log}");
    assert!(log.contains("appendonly yes"), "{log}");
    drop(service);
    // The memory store.
    let env = Env::new(sqlite, String::new());
    let service = Service::start(&env, 2, &[]).await;
    let log = logged(&service, "embedded memory store");
    assert!(log.contains("embedded memory store"), "{log}");
}

/// A Redis whose `maxmemory-policy` may evict keys without a TTL
/// (`allkeys-lru` here) can drop pending copies and the queue: `kura serve`
/// warns at start, says what a failover can lose without
/// `--wb-min-replicas`, and writes `behind` requests through, unless
/// `--wb-allow-eviction` accepts the risk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_takes_no_behind_writes_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite:{}", dir.path().join("kura.db").display());
    let redis =
        RedisServer::start_with(aof_redis().args(["--maxmemory-policy", "allkeys-lru"])).await;
    let env = Env::new(sqlite, redis.url());
    let ids = env.seed(1);
    let http = reqwest::Client::new();
    let token = env.token();
    let put = |phone: &'static str| {
        http.put(format!("{}/api/v1/profiles/{}", env.url(), ids[0]))
            .bearer_auth(&token)
            .json(&json!({ "phone": phone }))
            .send()
    };
    let service = Service::start(&env, 1, &["--wb-flushers", "0"]).await;
    let log = service.log_text();
    assert!(log.contains("maxmemory-policy allkeys-lru"), "{log}");
    assert!(log.contains("--wb-min-replicas"), "{log}");
    let r = put("080-0000-0001").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-write"], "through");
    assert_eq!(env.status()["depth"], 0, "nothing queued");
    drop(service);
    let _service = Service::start(&env, 2, &["--wb-flushers", "0", "--wb-allow-eviction"]).await;
    let r = put("080-0000-0002").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-write"], "behind");
    assert_eq!(env.status()["depth"], 1);
}
