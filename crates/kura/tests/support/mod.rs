//! Shared test support: stores for both backends, a namespace per test and
//! an in-memory "database" whose loads can be counted, delayed, failed and
//! held at a gate to force interleavings.

#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kura::store::CacheStore;
use kura::store::{MemoryStore, RedisStore};
use kura::{
    Adaptive, Cache, Kind, QueueStore, QueuedCache, Source, TtlPolicy, TypePolicy, Versioned,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The Redis the tests share (never flushed: each test has a namespace).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The seed's TTL table, as an application sets it (the library has no
/// types of its own): profile 300 s (600 s once read more than 10 times in
/// an hour), session 3600 s, settings and preferences 1800 s, document
/// metadata 600 s, the blacklist 3600 s, anything else 300 s.
pub fn seed_policy() -> TtlPolicy {
    let secs = |s| TypePolicy::new(Duration::from_secs(s));
    let hot = Adaptive::new(10, Duration::from_secs(3600), Duration::from_secs(600));
    TtlPolicy::default()
        .with_type("profile", secs(300).adaptive(hot))
        .with_type("session", secs(3600))
        .with_type("rate_limit", secs(3600))
        .with_type("document_meta", secs(600))
        .with_type("settings", secs(1800))
        .with_type("preferences", secs(1800))
        .with_type("blacklist", secs(3600))
}

/// A namespace of this test's own.
pub fn ns() -> String {
    format!("t_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Which store a test runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The shared Redis at `REDIS_URL`.
    Redis,
    /// The in-process store.
    Memory,
    /// Another Redis topology (a cluster or sentinel group a test started).
    Url(String),
    /// The shared Redis, with a near cache of every standard kind on the
    /// caches it builds.
    RedisNear,
}

impl Backend {
    /// `n` stores sharing one cache server: separate Redis connections (as
    /// separate processes would have), or clones of one memory store.
    pub fn fleet(&self, n: usize) -> Vec<Arc<dyn QueueStore>> {
        match self {
            Backend::Redis | Backend::Url(_) | Backend::RedisNear => {
                let url = match self {
                    Backend::Url(u) => u.clone(),
                    _ => redis_url(),
                };
                (0..n)
                    .map(|_| {
                        Arc::new(RedisStore::open(&url).expect("redis url")) as Arc<dyn QueueStore>
                    })
                    .collect()
            }
            Backend::Memory => {
                let m = MemoryStore::new();
                (0..n)
                    .map(|_| Arc::new(m.clone()) as Arc<dyn QueueStore>)
                    .collect()
            }
        }
    }

    /// One store (with the write-behind queue; it upcasts to `Arc<dyn CacheStore>`).
    pub fn store(&self) -> Arc<dyn QueueStore> {
        self.fleet(1).pop().expect("one store")
    }

    /// A cache with its own namespace and no TTL jitter.
    pub fn cache(&self) -> (Cache, String) {
        let ns = ns();
        let b = Cache::builder_shared(self.store())
            .namespace(&ns)
            .ttl_policy(seed_policy().with_jitter(0.0));
        (self.near(b).build().expect("cache"), ns)
    }

    /// [`Backend::cache`] with the write-behind queue.
    pub fn queued(&self) -> (QueuedCache, String) {
        let ns = ns();
        let b = Cache::queued_shared(self.store())
            .namespace(&ns)
            .ttl_policy(seed_policy().with_jitter(0.0));
        (self.near(b).build().expect("cache"), ns)
    }

    fn near<Q>(&self, mut b: kura::CacheBuilder<Q>) -> kura::CacheBuilder<Q> {
        if *self == Backend::RedisNear {
            for k in [
                Kind::new("profile"),
                Kind::new("settings"),
                Kind::new("preferences"),
                Kind::new("document_meta")
                    .with_segment("document")
                    .with_suffix("metadata"),
            ] {
                b = b.near_cache(k, kura::near::NearConfig::entries(10_000));
            }
        }
        b
    }
}

/// A cache over `store` in namespace `ns`, with no TTL jitter.
pub fn cache_on(store: Arc<dyn CacheStore>, ns: &str) -> Cache {
    Cache::builder_shared(store)
        .namespace(ns)
        .ttl_policy(seed_policy().with_jitter(0.0))
        .build()
        .expect("cache")
}

/// [`cache_on`] with the write-behind queue.
pub fn queued_on(store: Arc<dyn QueueStore>, ns: &str) -> QueuedCache {
    Cache::queued_shared(store)
        .namespace(ns)
        .ttl_policy(seed_policy().with_jitter(0.0))
        .build()
        .expect("cache")
}

/// After a test wrote a key behind kura's back (bad data, another program):
/// with the near cache on, that write reaches L1 by its invalidation push (a
/// millisecond or so), and until then L1 serves the copy it held, which is
/// the near cache's documented bound. Waits that out.
pub async fn foreign_write_settles(b: &Backend) {
    if *b == Backend::RedisNear {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A raw Redis connection for looking at keys from the outside.
pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis is running")
}

/// Deletes every key of a test namespace (values expire anyway; the
/// counters do not).
pub async fn cleanup(ns: &str) {
    let mut c = redis_conn().await;
    for pat in [format!("{ns}:*"), format!("metrics:{ns}:*")] {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pat)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub name: String,
    pub version: u64,
}

impl Versioned for Row {
    fn version(&self) -> u64 {
        self.version
    }

    /// A name `x@acme` is tagged `tenant:acme`.
    fn tags(&self) -> Vec<String> {
        self.name
            .split_once('@')
            .map(|(_, t)| vec![format!("tenant:{t}")])
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("database unavailable")]
pub struct DbDown;

/// A gate that holds one load after it read its row, until released.
#[derive(Debug, Default)]
pub struct Gate {
    pub loaded: Notify,
    pub release: Notify,
}

/// The system of record of the tests.
#[derive(Debug, Default)]
pub struct TestDb {
    rows: Mutex<HashMap<String, Row>>,
    applied: AtomicUsize,
    reject: Mutex<std::collections::HashSet<String>>,
    loads: AtomicUsize,
    batch_loads: AtomicUsize,
    fail: AtomicBool,
    delay: Mutex<Duration>,
    gate: Mutex<Option<Arc<Gate>>>,
    load_times: Mutex<Vec<std::time::Instant>>,
}

impl TestDb {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Inserts or updates a row, bumping its version like a committed UPDATE.
    pub fn put(&self, id: &str, name: &str) -> Row {
        let mut rows = self.rows.lock().unwrap();
        let version = rows.get(id).map_or(1, |r| r.version + 1);
        let row = Row {
            id: id.to_owned(),
            name: name.to_owned(),
            version,
        };
        rows.insert(id.to_owned(), row.clone());
        row
    }

    pub fn get(&self, id: &str) -> Option<Row> {
        self.rows.lock().unwrap().get(id).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.rows.lock().unwrap().remove(id);
    }

    /// Rows written by write-behind flushes.
    pub fn applied(&self) -> usize {
        self.applied.load(Ordering::SeqCst)
    }

    /// Make the database refuse write-behind rows of `id`.
    pub fn reject(&self, id: &str) {
        self.reject.lock().unwrap().insert(id.to_owned());
    }

    pub fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    /// When each single load began.
    pub fn load_times(&self) -> Vec<std::time::Instant> {
        self.load_times.lock().unwrap().clone()
    }

    pub fn batch_loads(&self) -> usize {
        self.batch_loads.load(Ordering::SeqCst)
    }

    pub fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    /// The next load will stop at the returned gate after reading its row.
    pub fn arm_gate(&self) -> Arc<Gate> {
        let g = Arc::new(Gate::default());
        *self.gate.lock().unwrap() = Some(g.clone());
        g
    }
}

/// The `Source` over a shared [`TestDb`].
#[derive(Debug, Clone)]
pub struct Db(pub Arc<TestDb>);

impl Source for Db {
    type Value = Row;
    type Error = DbDown;

    async fn load(&self, id: &str) -> Result<Option<Row>, DbDown> {
        self.0.loads.fetch_add(1, Ordering::SeqCst);
        self.0
            .load_times
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
        if self.0.fail.load(Ordering::SeqCst) {
            return Err(DbDown);
        }
        // The row is read first and the delay comes after, so a write can
        // commit between the read and the fill (the window of the race).
        let row = self.0.get(id);
        let delay = *self.0.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let gate = self.0.gate.lock().unwrap().take();
        if let Some(g) = gate {
            g.loaded.notify_one();
            g.release.notified().await;
        }
        Ok(row)
    }

    async fn load_many(&self, ids: &[String]) -> Result<Vec<(String, Row)>, DbDown> {
        self.0.batch_loads.fetch_add(1, Ordering::SeqCst);
        if self.0.fail.load(Ordering::SeqCst) {
            return Err(DbDown);
        }
        Ok(ids
            .iter()
            .filter_map(|id| self.0.get(id).map(|r| (id.clone(), r)))
            .collect())
    }
}

/// Runs each named async test function once per backend.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::Redis).await
                }
            )*
        }
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::Memory).await
                }
            )*
        }
    };
}

/// The same tests once more on Redis with the near cache on
/// ([`Backend::RedisNear`]): every guarantee they check must hold with an
/// L1 above the store.
#[macro_export]
macro_rules! with_near_cache {
    ($($name:ident),* $(,)?) => {
        mod redis_near_cache {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::RedisNear).await
                }
            )*
        }
    };
}

impl kura::Sink for Db {
    type Value = Row;

    async fn apply(&self, batch: &[(String, Row)]) -> Result<Vec<kura::Applied>, kura::BoxError> {
        if self.0.fail.load(Ordering::SeqCst) {
            return Err("database unavailable".into());
        }
        let reject = self.0.reject.lock().unwrap().clone();
        let mut rows = self.0.rows.lock().unwrap();
        Ok(batch
            .iter()
            .map(|(id, row)| {
                if reject.contains(id) {
                    return kura::Applied::Rejected("check constraint failed".into());
                }
                match rows.get_mut(id) {
                    // UPDATE ... WHERE id = $1 AND version < $new
                    Some(cur) if cur.version < row.version => {
                        *cur = row.clone();
                        self.0.applied.fetch_add(1, Ordering::SeqCst);
                        kura::Applied::Written
                    }
                    Some(_) => kura::Applied::Superseded,
                    None => kura::Applied::Rejected("row no longer exists".into()),
                }
            })
            .collect())
    }
}
