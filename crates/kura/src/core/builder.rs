//! [`CacheBuilder`]: the options of a [`Cache`] (or a [`QueuedCache`]) and
//! the start of its maintenance task.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::breaker::{Breaker, BreakerConfig};
use crate::codec::DEFAULT_MAX_VALUE_BYTES;
use crate::error::Error;
use crate::key::{KeyBuilder, Kind};
use crate::metrics::LocalCounters;
use crate::near::{NearConfig, Tracker};
use crate::policy::TtlPolicy;
use crate::policy::adaptive::ReadCounter;
use crate::store::{CacheStore, QueueStore, TrackingSink};

use super::maintenance::maintenance;
use super::{Cache, CacheInner, NearCaches, QueuedCache};
use crate::consistency::epochs::Epochs;
use crate::consistency::journal::Pending;
use crate::consistency::stamps::Stamps;

/// Builds a [`Cache`], or a [`QueuedCache`] when made by [`Cache::queued`].
///
/// The type parameter records the store's capabilities beyond [`Store`](crate::Store):
/// `()` for [`Cache::builder`] (its `build` makes a [`Cache`]), and
/// `Arc<dyn QueueStore>` for [`Cache::queued`] (its `build` makes a
/// [`QueuedCache`], which can also write behind). The options are the same.
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
///     .ttl_policy(TtlPolicy::default())
///     .op_timeout(Duration::from_millis(200))
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct CacheBuilder<Q = ()> {
    store: Arc<dyn CacheStore>,
    /// The capabilities beyond [`Store`](crate::Store) (see the type's docs).
    queue: Q,
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
    replay_timeout: Duration,
    read_counter_capacity: usize,
    hash_tags: Option<bool>,
    force_timer: bool,
    near: HashMap<&'static str, (Kind, NearConfig)>,
    near_max_silence: Duration,
}

impl<Q> std::fmt::Debug for CacheBuilder<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("store", &self.store.describe())
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl<Q> CacheBuilder<Q> {
    /// The key namespace (default `cache`).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// The TTL table (default [`TtlPolicy::default`]: every type 300 s).
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

    /// The bound of one replay of pending invalidations as a whole (default
    /// 60 s). What a replay applied before the bound is forgotten; the rest
    /// waits for the next replay, a flush interval later. Keys and types
    /// with pending invalidations skip the cache until then.
    pub fn replay_timeout(mut self, d: Duration) -> Self {
        self.replay_timeout = d;
        self
    }

    /// Keeps a near cache (in-process L1) of `kind` above the store, kept
    /// consistent by the store's invalidation stream (see [`crate::near`]).
    /// Over a store without one (the memory store), the option is logged
    /// and ignored.
    pub fn near_cache(mut self, kind: Kind, config: NearConfig) -> Self {
        self.near.insert(kind.name(), (kind, config));
        self
    }

    /// How long the near caches keep serving without a confirmation of the
    /// invalidation stream (default [`crate::near::DEFAULT_MAX_SILENCE`]):
    /// the bound on staleness when Redis stops answering.
    pub fn near_cache_max_silence(mut self, d: Duration) -> Self {
        self.near_max_silence = d;
        self
    }

    /// Forces Redis Cluster hash tags on or off (default: as the store needs).
    pub fn hash_tags(mut self, yes: bool) -> Self {
        self.hash_tags = Some(yes);
        self
    }

    /// The near caches' tracker and settings, with the store's stream
    /// started; `None` when no type has one or the store has no stream.
    fn start_near(&self, keys: &KeyBuilder) -> Option<NearCaches> {
        if self.near.is_empty() {
            return None;
        }
        let mut prefixes: Vec<String> = self
            .near
            .values()
            // Values, and "not found" markers for the negative entries.
            .flat_map(|(kind, _)| [keys.value_prefix(kind), keys.absent_prefix(kind)])
            .collect();
        // The stamps hash rides on the same stream (see `Stamps`).
        prefixes.push(keys.internal("stamps"));
        prefixes.sort();
        prefixes.dedup();
        let tracker = Tracker::new(self.near_max_silence);
        let sink: Arc<dyn TrackingSink> = tracker.clone();
        let Some(tracking) = self.store.track(prefixes, Arc::downgrade(&sink)) else {
            tracing::warn!(
                store = self.store.describe(),
                "near cache: the store has no invalidation stream; off"
            );
            return None;
        };
        tracker.hold(tracking);
        Some(NearCaches {
            tracker,
            configs: self.near.iter().map(|(k, (_, c))| (*k, *c)).collect(),
        })
    }

    /// The cache, and what the builder keeps besides.
    fn build_parts(self) -> Result<(Cache, Q), Error> {
        let hash_tags = self
            .hash_tags
            .unwrap_or_else(|| self.store.needs_hash_tags());
        let keys = KeyBuilder::new(&self.namespace, hash_tags)?;
        let counter_keys = keys.counter_keys();
        let self_bounded = self.store.bounds_own_latency() && !self.force_timer;
        let near = self.start_near(&keys);
        let stamps = Stamps::new(
            keys.internal("stamps"),
            self.near_max_silence,
            near.as_ref().map(|n| n.tracker.clone()),
        );
        match &near {
            Some(n) => {
                let sink: Arc<dyn TrackingSink> = stamps.clone();
                n.tracker.forward(stamps.key(), Arc::downgrade(&sink));
            }
            None => stamps.start(&*self.store),
        }
        let inner = Arc::new_cyclic(|me| CacheInner {
            near,
            stamps,
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
            replay_running: AtomicBool::new(false),
            replay_not_before: Mutex::new(None),
            replay_timeout: self.replay_timeout,
            flush_interval: self.flush_interval,
            me: me.clone(),
            kind_metrics: Mutex::new(HashMap::new()),
            epochs: Epochs::default(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(maintenance(Arc::downgrade(&inner), self.flush_interval));
        }
        Ok((Cache { inner }, self.queue))
    }
}

impl CacheBuilder<()> {
    /// Builds the cache. Inside a Tokio runtime this also starts the
    /// background task that flushes counters and retries invalidations; it
    /// stops when the last handle is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] when the namespace is not `[a-z0-9_]+`.
    pub fn build(self) -> Result<Cache, Error> {
        self.build_parts().map(|(cache, ())| cache)
    }
}

impl CacheBuilder<Arc<dyn QueueStore>> {
    /// Builds the cache with its write-behind queue. Inside a Tokio runtime
    /// this also starts the background task that flushes counters and
    /// retries invalidations; it stops when the last handle is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] when the namespace is not `[a-z0-9_]+`.
    pub fn build(self) -> Result<QueuedCache, Error> {
        self.build_parts()
            .map(|(cache, queue)| QueuedCache::new(cache, queue))
    }
}

impl Cache {
    /// A builder over `store`.
    pub fn builder(store: impl CacheStore) -> CacheBuilder {
        Self::builder_shared(Arc::new(store))
    }

    /// A builder over a shared store.
    pub fn builder_shared(store: Arc<dyn CacheStore>) -> CacheBuilder {
        Self::builder_with(store, ())
    }

    /// A builder over `store` that also writes behind: its `build` makes a
    /// [`QueuedCache`].
    ///
    /// # Examples
    ///
    /// ```
    /// use kura::{Cache, store::MemoryStore};
    ///
    /// # fn main() -> Result<(), kura::Error> {
    /// let cache = Cache::queued(MemoryStore::new()).namespace("cache").build()?;
    /// assert_eq!(cache.store().describe(), "memory");
    /// # Ok(()) }
    /// ```
    pub fn queued(store: impl QueueStore) -> CacheBuilder<Arc<dyn QueueStore>> {
        Self::queued_shared(Arc::new(store))
    }

    /// [`Cache::queued`] over a shared store.
    pub fn queued_shared(store: Arc<dyn QueueStore>) -> CacheBuilder<Arc<dyn QueueStore>> {
        Self::builder_with(store.clone(), store)
    }

    fn builder_with<Q>(store: Arc<dyn CacheStore>, queue: Q) -> CacheBuilder<Q> {
        CacheBuilder {
            store,
            queue,
            namespace: "cache".to_owned(),
            policy: TtlPolicy::default(),
            op_timeout: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(3),
            lease_wait: Duration::from_millis(3500),
            breaker: BreakerConfig::default(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            stale_while_loading: true,
            flush_interval: Duration::from_secs(1),
            pending_limit: 100_000,
            replay_timeout: Duration::from_secs(60),
            read_counter_capacity: 1_000_000,
            hash_tags: None,
            force_timer: false,
            near: HashMap::new(),
            near_max_silence: crate::near::DEFAULT_MAX_SILENCE,
        }
    }
}
