//! The shared core every strategy handle works through: the store behind a
//! timeout and a circuit breaker, the key builder, the TTL policy, pending
//! invalidations and the metric counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::codec::{self, DEFAULT_MAX_VALUE_BYTES};
use crate::error::{Error, StoreError};
use crate::key::{EntryKeys, KeyBuilder, KeyPattern, Kind};
use crate::metrics::{KindMetrics, LocalCounters, Stats};
use crate::source::Source;
use crate::store::{Lifetimes, Store, StoreResult};
use crate::strategy::{CacheAside, WriteThrough};
use crate::ttl::{ReadCounter, TtlPolicy, TypePolicy};

/// Builds a [`Cache`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use kura::{Cache, TtlPolicy, store::MemoryStore};
///
/// # fn main() -> Result<(), kura::Error> {
/// let cache = Cache::builder(MemoryStore::new())
///     .namespace("cache")
///     .ttl_policy(TtlPolicy::seed())
///     .op_timeout(Duration::from_millis(200))
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct CacheBuilder {
    store: Arc<dyn Store>,
    namespace: String,
    policy: TtlPolicy,
    op_timeout: Duration,
    lease_ttl: Duration,
    lease_wait: Duration,
    breaker: BreakerConfig,
    max_value_bytes: usize,
    stale_while_loading: bool,
    flush_interval: Duration,
    pending_limit: usize,
    read_counter_capacity: usize,
    hash_tags: Option<bool>,
    force_timer: bool,
}

impl std::fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("store", &self.store.describe())
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl CacheBuilder {
    /// The key namespace (default `cache`).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// The TTL table (default [`TtlPolicy::seed`]).
    pub fn ttl_policy(mut self, policy: TtlPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Upper bound on any one store operation (default 250 ms). Past it the
    /// operation counts as a failure and the caller falls back to the source.
    ///
    /// A store that bounds its own operations (a single Redis server with
    /// its response timeout, the memory store) is trusted to do so, and no
    /// timer is armed per operation; give the Redis store a response timeout
    /// no longer than this. [`CacheBuilder::always_time_out`] arms the timer
    /// anyway.
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }

    /// Arms the operation timer on every store call, even when the store
    /// bounds its own latency.
    pub fn always_time_out(mut self, yes: bool) -> Self {
        self.force_timer = yes;
        self
    }

    /// How long a load lease lives if its holder never fills (default 3 s).
    /// Longer than a slow load; a fill after it expired is rejected.
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.lease_ttl = d;
        self
    }

    /// How long a caller waits for another process's fill before loading
    /// itself without caching (default 3.5 s).
    pub fn lease_wait(mut self, d: Duration) -> Self {
        self.lease_wait = d;
        self
    }

    /// Circuit breaker settings.
    pub fn breaker(mut self, cfg: BreakerConfig) -> Self {
        self.breaker = cfg;
        self
    }

    /// Largest value cached, in bytes (default 1 MiB). Larger values are
    /// served but not cached.
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.max_value_bytes = n;
        self
    }

    /// Whether callers that find another caller loading may take the stale
    /// copy at once instead of waiting (default `true`; needs a type policy
    /// with `max_stale` > 0 to have a stale copy).
    pub fn stale_while_loading(mut self, yes: bool) -> Self {
        self.stale_while_loading = yes;
        self
    }

    /// How often hit/miss counts are added to the shared counters and
    /// pending invalidations are retried (default 1 s).
    pub fn flush_interval(mut self, d: Duration) -> Self {
        self.flush_interval = d;
        self
    }

    /// How many failed invalidations are remembered one by one before the
    /// whole affected type is distrusted instead (default 100,000).
    pub fn pending_limit(mut self, n: usize) -> Self {
        self.pending_limit = n;
        self
    }

    /// Forces Redis Cluster hash tags on or off (default: as the store needs).
    pub fn hash_tags(mut self, yes: bool) -> Self {
        self.hash_tags = Some(yes);
        self
    }

    /// Builds the cache. Inside a Tokio runtime this also starts the
    /// background task that flushes counters and retries invalidations; it
    /// stops when the last handle is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] when the namespace is not `[a-z0-9_]+`.
    pub fn build(self) -> Result<Cache, Error> {
        let hash_tags = self
            .hash_tags
            .unwrap_or_else(|| self.store.needs_hash_tags());
        let keys = KeyBuilder::new(&self.namespace, hash_tags)?;
        let counter_keys = keys.counter_keys();
        let self_bounded = self.store.bounds_own_latency() && !self.force_timer;
        let inner = Arc::new(CacheInner {
            self_bounded,
            store: self.store,
            keys,
            counter_keys,
            policy: self.policy,
            op_timeout: self.op_timeout,
            lease_ttl: self.lease_ttl,
            lease_wait: self.lease_wait,
            breaker: Breaker::new(self.breaker),
            max_value_bytes: self.max_value_bytes,
            stale_while_loading: self.stale_while_loading,
            counters: LocalCounters::default(),
            reads: ReadCounter::new(self.read_counter_capacity),
            pending: Mutex::new(Pending::default()),
            has_pending: AtomicBool::new(false),
            pending_limit: self.pending_limit,
            replaying: tokio::sync::Mutex::new(()),
            kind_metrics: Mutex::new(HashMap::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(maintenance(Arc::downgrade(&inner), self.flush_interval));
        }
        Ok(Cache { inner })
    }
}

/// A cache over one store and namespace; cheap to clone, shared by all the
/// strategy handles made from it.
///
/// # Concurrent calls
///
/// `Cache` and the handles made from it are `Send + Sync` and meant to be
/// shared by every task of a process. Store calls run concurrently over one
/// connection; no lock is held across an `.await`.
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<CacheInner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store.describe())
            .field("namespace", &self.inner.keys.namespace())
            .field("breaker", &self.inner.breaker.state())
            .finish_non_exhaustive()
    }
}

/// Invalidations that could not reach the store, kept until they do.
#[derive(Debug, Default)]
struct Pending {
    /// By value key: the entry and a generation, so a replay only forgets
    /// what it actually applied.
    entries: HashMap<String, (Kind, EntryKeys, u64)>,
    patterns: Vec<KeyPattern>,
    generation: u64,
}

impl Pending {
    fn len(&self) -> usize {
        self.entries.len() + self.patterns.len()
    }
}

pub(crate) struct CacheInner {
    pub(crate) store: Arc<dyn Store>,
    /// The store bounds its own operations (see
    /// [`Store::bounds_own_latency`]) within the operation timeout.
    self_bounded: bool,
    pub(crate) keys: KeyBuilder,
    counter_keys: [String; 2],
    pub(crate) policy: TtlPolicy,
    pub(crate) op_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) lease_wait: Duration,
    breaker: Breaker,
    pub(crate) max_value_bytes: usize,
    pub(crate) stale_while_loading: bool,
    pub(crate) counters: LocalCounters,
    reads: ReadCounter,
    pending: Mutex<Pending>,
    has_pending: AtomicBool,
    pending_limit: usize,
    replaying: tokio::sync::Mutex<()>,
    kind_metrics: Mutex<HashMap<&'static str, KindMetrics>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Cache {
    /// A builder over `store`.
    pub fn builder(store: impl Store) -> CacheBuilder {
        Self::builder_shared(Arc::new(store))
    }

    /// A builder over a shared store.
    pub fn builder_shared(store: Arc<dyn Store>) -> CacheBuilder {
        CacheBuilder {
            store,
            namespace: "cache".to_owned(),
            policy: TtlPolicy::seed(),
            op_timeout: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(3),
            lease_wait: Duration::from_millis(3500),
            breaker: BreakerConfig::default(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            stale_while_loading: true,
            flush_interval: Duration::from_secs(1),
            pending_limit: 100_000,
            read_counter_capacity: 1_000_000,
            hash_tags: None,
            force_timer: false,
        }
    }

    /// A cache-aside reader of `kind` through `source`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn aside<S: Source>(&self, kind: Kind, source: S) -> CacheAside<S> {
        CacheAside::new(self.clone(), kind, source)
    }

    /// A write-through writer of `kind`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn write_through(&self, kind: Kind) -> WriteThrough {
        WriteThrough::new(self.clone(), kind)
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The key builder.
    #[must_use]
    pub fn keys(&self) -> &KeyBuilder {
        &self.inner.keys
    }

    /// The TTL policy.
    #[must_use]
    pub fn ttl_policy(&self) -> &TtlPolicy {
        &self.inner.policy
    }

    /// The circuit breaker's state.
    #[must_use]
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Invalidations waiting for the store to come back (entries plus
    /// distrusted patterns).
    #[must_use]
    pub fn pending_invalidations(&self) -> usize {
        lock(&self.inner.pending).len()
    }

    /// Checks the store answers within the operation timeout. A success also
    /// closes an open breaker and replays pending invalidations.
    ///
    /// # Errors
    ///
    /// The store's error or [`StoreError::Timeout`].
    pub async fn ping(&self) -> StoreResult<()> {
        let r = tokio::time::timeout(self.inner.op_timeout, self.inner.store.ping())
            .await
            .unwrap_or(Err(StoreError::Timeout));
        match &r {
            Ok(()) => {
                self.inner.breaker.success();
                if self.inner.has_pending.load(Ordering::Acquire) {
                    self.inner.replay().await?;
                }
            }
            Err(_) => self.inner.breaker.failure(),
        }
        r
    }

    /// Hits and misses of the whole fleet: this process's counts are added to
    /// the shared counters first, then the counters are read. Falls back to
    /// this process's counts when the store is unavailable.
    pub async fn stats(&self) -> Stats {
        let _ = self.inner.flush_counters().await;
        let keys: Vec<&str> = self.inner.counter_keys.iter().map(String::as_str).collect();
        match self
            .inner
            .call(None, self.inner.store.counters(&keys))
            .await
        {
            Ok(v) if v.len() == 2 => Stats::new(v[0].max(0) as u64, v[1].max(0) as u64),
            _ => self.inner.counters.local(),
        }
    }

    /// Hits and misses of this process since it started.
    #[must_use]
    pub fn local_stats(&self) -> Stats {
        self.inner.counters.local()
    }

    /// Adds this process's pending hit/miss counts to the shared counters
    /// now instead of at the next flush interval.
    ///
    /// # Errors
    ///
    /// The store's error; the counts are kept for the next attempt.
    pub async fn flush_metrics(&self) -> StoreResult<()> {
        self.inner.flush_counters().await
    }

    /// Stores a value the cache owns (not loaded from a source), such as a
    /// token blacklist entry, with the type's TTL.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad id, [`Error::Codec`] for a value that is not
    /// a JSON object, [`Error::Unavailable`] when the store cannot be
    /// reached (the caller decides whether that matters).
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        kind: Kind,
        id: &str,
        value: &T,
    ) -> Result<(), Error> {
        let ttl = self
            .inner
            .policy
            .jittered(self.inner.policy.get(kind.name()).ttl);
        self.put_for(kind, id, value, ttl).await
    }

    /// Like [`Cache::put`], with a TTL that ends at `expires_at` (the token
    /// blacklist: the token's remaining lifetime). A moment already past
    /// stores nothing.
    ///
    /// # Errors
    ///
    /// As [`Cache::put`].
    pub async fn put_until<T: Serialize + ?Sized>(
        &self,
        kind: Kind,
        id: &str,
        value: &T,
        expires_at: SystemTime,
    ) -> Result<(), Error> {
        match TtlPolicy::ttl_until(expires_at) {
            Some(ttl) => self.put_for(kind, id, value, ttl).await,
            None => Ok(()),
        }
    }

    async fn put_for<T: Serialize + ?Sized>(
        &self,
        kind: Kind,
        id: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), Error> {
        kind.validate()?;
        let key = self.inner.keys.value_key(&kind, id)?;
        if ttl.is_zero() {
            return Ok(());
        }
        let enc = codec::encode(value, 0, self.inner.max_value_bytes)?;
        self.inner
            .call(None, self.inner.store.set(&key, enc.envelope, ttl))
            .await
            .map_err(Error::Unavailable)
    }

    /// Reads a value stored with [`Cache::put`]; `None` when absent, on a
    /// store error, or when the bytes do not decode.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad id.
    pub async fn peek<T: DeserializeOwned>(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<Option<T>, Error> {
        let key = self.inner.keys.value_key(&kind, id)?;
        Ok(
            match self
                .inner
                .call(None, self.inner.store.get(&key, None))
                .await
            {
                Ok(Some(b)) => codec::decode(&b).ok().map(|d| d.value),
                _ => None,
            },
        )
    }
}

impl CacheInner {
    /// Runs one store operation behind the breaker, the pending-invalidation
    /// gate and the operation timeout.
    pub(crate) async fn call<T>(
        &self,
        metrics: Option<&KindMetrics>,
        op: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        self.call_within(self.op_timeout, metrics, op).await
    }

    /// [`CacheInner::call`] with another timeout, for operations that walk
    /// the keyspace.
    pub(crate) async fn call_within<T>(
        &self,
        timeout: Duration,
        metrics: Option<&KindMetrics>,
        op: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if !self.breaker.allow() {
            return Err(StoreError::Unavailable);
        }
        // The cache is not trusted until what this process failed to
        // invalidate has been applied.
        if self.has_pending.load(Ordering::Acquire) {
            self.replay().await?;
        }
        let r = if self.self_bounded && timeout == self.op_timeout {
            op.await
        } else {
            match tokio::time::timeout(timeout, op).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout),
            }
        };
        match &r {
            Ok(_) => self.breaker.success(),
            Err(e) if e.is_outage() => {
                self.breaker.failure();
                if let Some(m) = metrics {
                    m.redis_errors.increment(1);
                }
                tracing::debug!(error = %e, "cache store error");
            }
            Err(_) => {}
        }
        r
    }

    /// Handles for `kind`, registered once.
    pub(crate) fn kind_metrics(&self, kind: &Kind) -> KindMetrics {
        lock(&self.kind_metrics)
            .entry(kind.name())
            .or_insert_with(|| KindMetrics::new(kind.name()))
            .clone()
    }

    /// Counts a read of `key` for the adaptive rule; returns the TTL to
    /// reset on this read (once, when the key becomes hot).
    pub(crate) fn adaptive_refresh(
        &self,
        key: &str,
        policy: &TypePolicy,
        now: Instant,
    ) -> Option<Duration> {
        let rule = policy.adaptive?;
        (self.reads.record(key, rule.window, now) == rule.reads + 1)
            .then(|| self.policy.jittered(rule.ttl))
    }

    /// Lifetimes for a value written now.
    pub(crate) fn lifetimes(&self, key: &str, policy: &TypePolicy) -> Lifetimes {
        let base = match policy.adaptive {
            Some(rule) if self.reads.count(key, rule.window) > rule.reads => rule.ttl,
            _ => policy.ttl,
        };
        let ttl = self.policy.jittered(base);
        Lifetimes {
            ttl,
            stale_ttl: if policy.max_stale.is_zero() {
                Duration::ZERO
            } else {
                ttl + policy.max_stale
            },
        }
    }

    /// Remembers invalidations that failed, to apply before the cache is
    /// used again.
    pub(crate) fn defer(&self, kind: Kind, entries: impl IntoIterator<Item = EntryKeys>) {
        let mut p = lock(&self.pending);
        for e in entries {
            p.generation += 1;
            let g = p.generation;
            p.entries.insert(e.value.clone(), (kind, e, g));
        }
        if p.entries.len() > self.pending_limit {
            // Too many to track one by one: distrust the affected types
            // wholesale; the replay clears them by pattern.
            let kinds: std::collections::HashSet<Kind> =
                p.entries.values().map(|(k, _, _)| *k).collect();
            tracing::warn!(
                entries = p.entries.len(),
                "too many pending invalidations: the affected types will be cleared"
            );
            p.entries.clear();
            for k in kinds {
                if let Ok(pat) = self.keys.pattern(&k, "*") {
                    p.patterns.push(pat);
                }
            }
        }
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        self.has_pending.store(true, Ordering::Release);
    }

    /// Remembers a pattern invalidation that failed.
    pub(crate) fn defer_pattern(&self, pattern: KeyPattern) {
        let mut p = lock(&self.pending);
        p.patterns.push(pattern);
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        self.has_pending.store(true, Ordering::Release);
    }

    /// Applies pending invalidations. Callers that find a replay running
    /// skip the store meanwhile rather than queue behind it.
    async fn replay(&self) -> StoreResult<()> {
        let Ok(_guard) = self.replaying.try_lock() else {
            return Err(StoreError::Unavailable);
        };
        if !self.has_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let (entries, patterns) = {
            let p = lock(&self.pending);
            let entries: Vec<(String, EntryKeys, u64)> = p
                .entries
                .iter()
                .map(|(k, (_, e, g))| (k.clone(), e.clone(), *g))
                .collect();
            (entries, p.patterns.clone())
        };
        let fail = |e: StoreError| {
            if e.is_outage() {
                self.breaker.failure();
            }
            e
        };
        for chunk in entries.chunks(512) {
            let refs: Vec<&EntryKeys> = chunk.iter().map(|(_, e, _)| e).collect();
            tokio::time::timeout(self.op_timeout * 4, self.store.invalidate(&refs))
                .await
                .unwrap_or(Err(StoreError::Timeout))
                .map_err(fail)?;
        }
        for pat in &patterns {
            tokio::time::timeout(Duration::from_secs(60), self.store.invalidate_matching(pat))
                .await
                .unwrap_or(Err(StoreError::Timeout))
                .map_err(fail)?;
        }
        let mut p = lock(&self.pending);
        for (k, _, g) in &entries {
            if p.entries.get(k).is_some_and(|(_, _, cur)| cur == g) {
                p.entries.remove(k);
            }
        }
        let done = patterns.len();
        let done_now = done.min(p.patterns.len());
        p.patterns.drain(..done_now);
        if p.len() == 0 {
            self.has_pending.store(false, Ordering::Release);
        }
        metrics::gauge!("cache_pending_invalidations").set(p.len() as f64);
        tracing::info!(
            entries = entries.len(),
            patterns = done,
            "pending invalidations applied"
        );
        Ok(())
    }

    pub(crate) async fn flush_counters(&self) -> StoreResult<()> {
        let (h, m) = self.counters.take();
        if h == 0 && m == 0 {
            return Ok(());
        }
        let [hk, mk] = &self.counter_keys;
        let r = self
            .call(None, self.store.incr(&[(hk, h as i64), (mk, m as i64)]))
            .await;
        if r.is_err() {
            self.counters.restore(h, m);
        }
        r
    }

    /// A fresh owner token for a lease or lock.
    pub(crate) fn token() -> String {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        format!(
            "{:016x}{:08x}",
            rand::random::<u64>(),
            SEQ.fetch_add(1, Ordering::Relaxed) as u32
        )
    }

    /// Removes a value that failed to decode (best effort).
    pub(crate) async fn discard(&self, key: &str, seen: &Bytes) {
        if let Err(e) = self.call(None, self.store.discard(key, seen)).await {
            tracing::debug!(error = %e, key, "could not remove an undecodable value");
        }
    }
}

/// Flushes counters and retries pending invalidations until the cache is
/// dropped.
async fn maintenance(cache: Weak<CacheInner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = cache.upgrade() else { return };
        let started = Instant::now();
        if inner.has_pending.load(Ordering::Acquire) && inner.breaker.allow() {
            match inner.replay().await {
                Ok(()) => inner.breaker.success(),
                Err(e) => tracing::debug!(error = %e, "pending invalidations kept"),
            }
        }
        let _ = inner.flush_counters().await;
        tracing::trace!(elapsed = ?started.elapsed(), "cache maintenance");
    }
}
