//! Cache-aside reads: one round trip on a hit, one load per key per fleet on
//! a miss.
//!
//! # Guarantee
//!
//! A fill lands only while its lease is held, and every invalidation or
//! update after a commit deletes the lease. So a value read from the source
//! before a write can never be cached after that write's invalidation: the
//! seed's stale-set race is closed. Within one process, concurrent callers
//! for one key share one load (single-flight); across processes, the lease
//! makes the others wait for the fill (or take the stale copy). A caller
//! that starts after a write-through invalidation or update of the key
//! returned never joins a load that began before it: each load records the
//! key's write epoch, and only loads of the current epoch are joined.
//!
//! # Failure modes
//!
//! - Store down, slow or circuit open: the source answers (`Status::Bypass`),
//!   still one load per key per process.
//! - Source fails with a stale copy on hand: the stale copy is served,
//!   flagged `Status::Stale`; without one, [`Error::Source`].
//! - Bad bytes at the key: counted as a miss, removed, reloaded.
//! - A load past the type's soft timeout with a stale copy on hand: the
//!   stale copy; past the hard timeout without one: [`Error::LoadTimeout`].
//!   Either way the load finishes in the background and fills (see
//!   [`crate::policy::freshness`]).
//! - A value cleared by type or tag since its load began ([`crate::tags`]):
//!   a miss; it is removed and reloaded.
//!
//! # Layout
//!
//! Here the single reads and the in-process single flight; `batch.rs` the
//! batch path (`get_many` and warming); `refresh.rs` eager refresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::codec::{self, CodecError};
use crate::consistency::epochs::Epoch;
use crate::core::{Cache, CacheInner};
use crate::error::Error;
use crate::key::{EntryKeys, Kind};
use crate::metrics::KindMetrics;
use crate::near::{Layer, Near, NearEntry};
use crate::policy::TypePolicy;
use crate::source::{Source, Versioned};
use crate::store::{AcquireRequest, Acquired, FillOutcome, FillRequest, FillValue};

mod batch;
mod refresh;

pub(crate) use self::batch::BatchMode;

/// Where a read was answered from (the service's `X-Cache` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// From the cache.
    Hit,
    /// From the source, after a miss (and cached, unless a write overtook
    /// the load).
    Miss,
    /// A stale copy, because the source failed or another caller is
    /// reloading it.
    Stale,
    /// From the source without using the cache (store unavailable, or the
    /// type's TTL is 0).
    Bypass,
}

impl Status {
    /// `hit`, `miss`, `stale` or `bypass`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Miss => "miss",
            Status::Stale => "stale",
            Status::Bypass => "bypass",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of a read.
#[derive(Debug, Clone)]
pub struct Fetched<T> {
    value: Option<Arc<T>>,
    json: Option<Bytes>,
    status: Status,
    l1: bool,
    /// Unix ms; 0 unknown.
    cached_at_ms: i64,
}

/// A `cached_at` in Unix milliseconds as a time (`None` for 0, unknown).
fn time_of(ms: i64) -> Option<std::time::SystemTime> {
    let ms = u64::try_from(ms).ok().filter(|&m| m > 0)?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl<T: Clone> Fetched<T> {
    /// Takes the value (cloned when the near cache shares it).
    #[must_use]
    pub fn into_value(self) -> Option<T> {
        self.value.map(Arc::unwrap_or_clone)
    }
}

impl<T> Fetched<T> {
    /// The value, `None` when the source has no such row.
    #[must_use]
    pub fn value(&self) -> Option<&T> {
        self.value.as_deref()
    }

    /// The value as shared (a near cache hit hands out its own).
    #[must_use]
    pub fn shared_value(&self) -> Option<&Arc<T>> {
        self.value.as_ref()
    }

    /// Where a hit came from: [`Layer::L1`] (the near cache) or
    /// [`Layer::L2`] (the store); `None` for anything but a hit.
    #[must_use]
    pub fn layer(&self) -> Option<Layer> {
        layer(self.status, self.l1)
    }

    /// The value's JSON (without the cache envelope): what a handler can
    /// send as is, without serializing again.
    #[must_use]
    pub fn json(&self) -> Option<&Bytes> {
        self.json.as_ref()
    }

    /// Where the read was answered from.
    #[must_use]
    pub fn status(&self) -> Status {
        self.status
    }

    /// Whether a value was found.
    #[must_use]
    pub fn is_found(&self) -> bool {
        self.value.is_some()
    }

    /// When the value was put in the cache (the envelope's `cached_at`): for
    /// a hit or a stale copy, when it was filled; for a miss, when this
    /// read filled it (or now, when it was not cached). `None` when not
    /// found, or for a value another program wrote without `cached_at`.
    #[must_use]
    pub fn cached_at(&self) -> Option<std::time::SystemTime> {
        self.value.as_ref().and(time_of(self.cached_at_ms))
    }

    fn absent(status: Status) -> Self {
        Self {
            value: None,
            json: None,
            status,
            l1: false,
            cached_at_ms: 0,
        }
    }

    fn decoded(d: codec::Decoded<T>, status: Status) -> Self {
        Self::found(d.value, d.json, status, d.cached_at_ms)
    }

    fn found(value: T, json: Bytes, status: Status, cached_at_ms: i64) -> Self {
        Self {
            value: Some(Arc::new(value)),
            json: Some(json),
            status,
            l1: false,
            cached_at_ms,
        }
    }
}

fn layer(status: Status, l1: bool) -> Option<Layer> {
    (status == Status::Hit).then_some(if l1 { Layer::L1 } else { Layer::L2 })
}

/// The result of [`CacheAside::get_json`]: the value's JSON, unparsed on a
/// hit.
#[derive(Debug, Clone)]
pub struct FetchedJson {
    json: Option<Bytes>,
    status: Status,
    l1: bool,
    cached_at_ms: i64,
}

impl FetchedJson {
    /// The value's JSON (without the cache envelope), `None` when the source
    /// has no such row.
    #[must_use]
    pub fn json(&self) -> Option<&Bytes> {
        self.json.as_ref()
    }

    /// Takes the JSON.
    #[must_use]
    pub fn into_json(self) -> Option<Bytes> {
        self.json
    }

    /// Where the read was answered from.
    #[must_use]
    pub fn status(&self) -> Status {
        self.status
    }

    /// Whether a value was found.
    #[must_use]
    pub fn is_found(&self) -> bool {
        self.json.is_some()
    }

    /// Where a hit came from (see [`Fetched::layer`]).
    #[must_use]
    pub fn layer(&self) -> Option<Layer> {
        layer(self.status, self.l1)
    }

    /// When the value was put in the cache (see [`Fetched::cached_at`]).
    #[must_use]
    pub fn cached_at(&self) -> Option<std::time::SystemTime> {
        self.json.as_ref().and(time_of(self.cached_at_ms))
    }
}

impl<T> From<Fetched<T>> for FetchedJson {
    fn from(f: Fetched<T>) -> Self {
        Self {
            json: f.json,
            status: f.status,
            l1: f.l1,
            cached_at_ms: f.cached_at_ms,
        }
    }
}

/// What a read returns, as far as the metrics and the near cache care.
trait Answer<T>: Sized {
    fn status(&self) -> Status;
    /// Where a hit came from.
    #[cfg_attr(not(feature = "spans"), allow(dead_code))]
    fn layer(&self) -> Option<Layer>;
    /// What an L1 entry holds of it: the JSON and, if decoded, the value.
    fn near_parts(&self) -> Option<(&Bytes, Option<&Arc<T>>)>;
    /// When it was cached, Unix ms (0 unknown).
    fn cached_at_ms(&self) -> i64;
    /// The answer to an L1 hit.
    fn from_near(e: &NearEntry<T>) -> Result<Self, CodecError>;
}

impl<T: serde::de::DeserializeOwned> Answer<T> for Fetched<T> {
    fn status(&self) -> Status {
        self.status
    }

    fn layer(&self) -> Option<Layer> {
        Fetched::layer(self)
    }

    fn near_parts(&self) -> Option<(&Bytes, Option<&Arc<T>>)> {
        Some((self.json.as_ref()?, self.value.as_ref()))
    }

    fn cached_at_ms(&self) -> i64 {
        self.cached_at_ms
    }

    fn from_near(e: &NearEntry<T>) -> Result<Self, CodecError> {
        if e.is_absent() {
            return Ok(Self {
                l1: true,
                ..Self::absent(Status::Hit)
            });
        }
        let value = match e.value.get() {
            Some(v) => v.clone(),
            // Filled by `get_json`: decoded once, by the first typed read.
            None => {
                let v: Arc<T> = Arc::new(
                    serde_json::from_slice(&e.json)
                        .map_err(|err| CodecError::Decode(err.to_string()))?,
                );
                e.value.get_or_init(|| v).clone()
            }
        };
        Ok(Self {
            value: Some(value),
            json: Some(e.json.clone()),
            status: Status::Hit,
            l1: true,
            cached_at_ms: e.cached_at_ms,
        })
    }
}

impl<T> Answer<T> for FetchedJson {
    fn status(&self) -> Status {
        self.status
    }

    fn layer(&self) -> Option<Layer> {
        FetchedJson::layer(self)
    }

    fn near_parts(&self) -> Option<(&Bytes, Option<&Arc<T>>)> {
        Some((self.json.as_ref()?, None))
    }

    fn cached_at_ms(&self) -> i64 {
        self.cached_at_ms
    }

    fn from_near(e: &NearEntry<T>) -> Result<Self, CodecError> {
        Ok(Self {
            json: (!e.is_absent()).then(|| e.json.clone()),
            status: Status::Hit,
            l1: true,
            cached_at_ms: e.cached_at_ms,
        })
    }
}

/// The result of [`CacheAside::get_many`].
#[derive(Debug, Clone)]
pub struct Batch<T> {
    /// One result per distinct requested id, in request order.
    pub entries: Vec<(String, Fetched<T>)>,
    /// How many ids were answered from the cache.
    pub hits: usize,
    /// How many ids were loaded from the source.
    pub misses: usize,
}

type Flight<T> = Shared<BoxFuture<'static, Result<Fetched<T>, Error>>>;

/// A load in flight, as the single-flight map keeps it.
struct InFlight<T> {
    /// Tells this flight from a later one of the same key.
    seq: u64,
    /// The key's write epoch when the flight started: a caller joins only
    /// while it is current, so no caller that starts after a write returned
    /// is handed a load that began before it.
    epoch: Epoch,
    result: Flight<T>,
}

type Flights<T> = Mutex<HashMap<String, InFlight<T>>>;

/// Removes a finished flight from the map when dropped, unless a later
/// flight of the key has taken its place.
struct Leave<'a, T>(&'a Flights<T>, String, u64);

impl<T> Drop for Leave<'_, T> {
    fn drop(&mut self) {
        let mut flights = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if flights.get(&self.1).is_some_and(|f| f.seq == self.2) {
            flights.remove(&self.1);
        }
    }
}

/// A cache-aside reader of one data type through a [`Source`].
///
/// # Examples
///
/// ```
/// # use kura::{Cache, Kind, Source, Versioned, store::MemoryStore};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Clone, Serialize, Deserialize)]
/// # struct Row { id: String, version: u64 }
/// # impl Versioned for Row { fn version(&self) -> u64 { self.version } }
/// # struct Db;
/// # impl Source for Db {
/// #     type Value = Row;
/// #     type Error = std::io::Error;
/// #     async fn load(&self, id: &str) -> Result<Option<Row>, std::io::Error> {
/// #         Ok(Some(Row { id: id.into(), version: 1 }))
/// #     }
/// # }
/// # #[tokio::main] async fn main() -> Result<(), kura::Error> {
/// let cache = Cache::builder(MemoryStore::new()).build()?;
/// let profiles = cache.aside(Kind::new("profile"), Db);
/// let first = profiles.get("u1").await?;
/// assert_eq!(first.status(), kura::Status::Miss);
/// let again = profiles.get("u1").await?;
/// assert_eq!(again.status(), kura::Status::Hit);
/// # Ok(()) }
/// ```
///
/// # Concurrent calls
///
/// Concurrent [`get`](Self::get)s of one cold key in one process share one
/// load; across processes sharing a Redis, one process loads while the
/// others wait for its fill (up to the cache's `lease_wait`). The load runs
/// as a task of its own, so a caller that is cancelled cancels neither the
/// load nor the fill. A `get` that starts after an invalidation or update of
/// its key returned does not join a load that began before that write.
///
/// A cancelled [`get_many`](Self::get_many) releases the leases it took and
/// had not filled yet, so other readers do not wait for them to expire.
pub struct CacheAside<S: Source> {
    inner: Arc<Aside<S>>,
}

impl<S: Source> Clone for CacheAside<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Source> std::fmt::Debug for CacheAside<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheAside")
            .field("kind", &self.inner.kind)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Aside<S: Source> {
    pub(crate) cache: Cache,
    pub(crate) kind: Kind,
    pub(crate) source: S,
    pub(crate) metrics: KindMetrics,
    /// The type's policy, looked up once: the policy table does not change
    /// after the cache is built.
    policy: TypePolicy,
    flights: Flights<S::Value>,
    /// The type's near cache, if it has one.
    near: Option<Arc<Near<S::Value>>>,
    /// The type's measured load time.
    load_time: crate::policy::freshness::LoadTime,
    /// The type's measured refresh time, lease to refill (eager refresh's
    /// `δ`, with the load time until a refresh was measured).
    refresh_time: crate::policy::freshness::LoadTime,
    /// Ids with an eager refresh of this process in flight.
    refreshing: Mutex<std::collections::HashSet<String>>,
}

impl<S: Source> CacheAside<S> {
    pub(crate) fn new(cache: Cache, kind: Kind, source: S) -> Self {
        if let Err(e) = kind.validate() {
            panic!("invalid cache kind {kind:?}: {e}");
        }
        let metrics = cache.inner.kind_metrics(&kind);
        let policy = cache.inner.policy.get(kind.name());
        let near = cache.inner.near.as_ref().and_then(|n| {
            let config = n.configs.get(kind.name())?;
            Some(Near::<S::Value>::new(
                kind,
                &cache.inner.keys,
                *config,
                n.tracker.clone(),
            ))
        });
        Self {
            inner: Arc::new(Aside {
                cache,
                kind,
                source,
                metrics,
                policy,
                flights: Mutex::new(HashMap::new()),
                near,
                load_time: crate::policy::freshness::LoadTime::new(),
                refresh_time: crate::policy::freshness::LoadTime::new(),
                refreshing: Mutex::new(std::collections::HashSet::new()),
            }),
        }
    }

    /// The data type.
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.inner.kind
    }

    /// The cache this reader uses.
    #[must_use]
    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// What this reader's near cache holds, if the type has one.
    #[must_use]
    pub fn near_stats(&self) -> Option<crate::near::NearStats> {
        self.inner.near.as_ref().map(|n| n.stats())
    }

    /// The type's near cache stamp now, `None` without a near cache or
    /// while its invalidation stream is not live.
    ///
    /// For callers that keep an answer above the cache (a request memo): an
    /// answer read as a [`Status::Hit`] after taking stamp `s` may be kept
    /// while [`near_stamp`](Self::near_stamp) still returns `s`, and for at
    /// most [`near_max_lifetime`](Self::near_max_lifetime) — the same rule
    /// an L1 entry lives by, since any change of any key of the type that
    /// reaches this process changes the stamp. Answers loaded from the
    /// source ([`Status::Miss`], [`Status::Bypass`]) must not be kept this
    /// way: nothing in the store tracks them.
    #[must_use]
    pub fn near_stamp(&self) -> Option<crate::near::Stamp> {
        self.inner.near.as_ref().and_then(|n| n.stamp())
    }

    /// The longest an entry of the type's near cache lives (`None` without
    /// one).
    #[must_use]
    pub fn near_max_lifetime(&self) -> Option<Duration> {
        self.inner.near.as_ref().map(|n| n.max_lifetime())
    }

    /// The source.
    #[must_use]
    pub fn source(&self) -> &S {
        &self.inner.source
    }

    pub(crate) fn parts(&self) -> &Arc<Aside<S>> {
        &self.inner
    }

    /// Reads `id` through the cache.
    ///
    /// A hit costs one round trip (`GET`). A miss takes the key's lease,
    /// loads from the source, fills the cache if the lease is still held and
    /// returns the loaded value. "Not found" is cached for the type's
    /// `absent_ttl`.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for an id that cannot be a key; [`Error::Source`] when
    /// the source fails and no stale copy is on hand. Store errors never
    /// surface: the source answers instead.
    pub async fn get(&self, id: &str) -> Result<Fetched<S::Value>, Error> {
        self.read(
            id,
            |b| codec::decode(b).map(|d| Fetched::decoded(d, Status::Hit)),
            |f| f,
        )
        .await
    }

    /// Reads `id` through the cache like [`get`](Self::get), for callers
    /// that pass the cached JSON on (an HTTP handler): a hit is checked as
    /// kura's envelope around a well-formed JSON object, not decoded into
    /// the value type, which saves most of a hit's CPU. Bytes that fail the
    /// check count as a miss and are removed, as with `get`.
    ///
    /// The check does not see the value's shape: a well-formed value of
    /// another shape under kura's envelope (written at the key by another
    /// program, or by an older deployment) is served as it is. Use it where
    /// only this type's writers write the namespace, and after a deployment
    /// that changes the shape use a new namespace (or invalidate the type);
    /// where anything else may write the keys, [`get`](Self::get) refuses
    /// such values.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    pub async fn get_json(&self, id: &str) -> Result<FetchedJson, Error> {
        self.read(
            id,
            |b| {
                codec::decode_json(b).map(|(_, json, cached_at_ms)| FetchedJson {
                    json: Some(json),
                    status: Status::Hit,
                    l1: false,
                    cached_at_ms,
                })
            },
            FetchedJson::from,
        )
        .await
    }

    /// The read path shared by [`get`](Self::get) and
    /// [`get_json`](Self::get_json): `hit` checks cached bytes, `miss` shapes
    /// what the load returned.
    async fn read<R: Answer<S::Value>>(
        &self,
        id: &str,
        hit: impl Fn(&Bytes) -> Result<R, CodecError>,
        miss: impl FnOnce(Fetched<S::Value>) -> R,
    ) -> Result<R, Error> {
        let started = Instant::now();
        #[cfg(feature = "spans")]
        let span = tracing::info_span!(
            "cache.read",
            cache.r#type = self.inner.kind.name(),
            cache.outcome = tracing::field::Empty,
            cache.layer = tracing::field::Empty,
        );
        let fut = self.read_inner(id, started, hit, miss);
        #[cfg(feature = "spans")]
        let fut = tracing::Instrument::instrument(fut, span.clone());
        let r = fut.await;
        #[cfg(feature = "spans")]
        if let Ok(f) = &r {
            span.record("cache.outcome", f.status().as_str());
            if let Some(l) = f.layer() {
                span.record("cache.layer", l.as_str());
            }
        }
        self.inner.metrics.get_seconds.record(started.elapsed());
        if let Ok(f) = &r {
            self.inner.count(f.status());
        }
        r
    }

    async fn read_inner<R: Answer<S::Value>>(
        &self,
        id: &str,
        now: Instant,
        hit: impl Fn(&Bytes) -> Result<R, CodecError>,
        miss: impl FnOnce(Fetched<S::Value>) -> R,
    ) -> Result<R, Error> {
        let a = &self.inner;
        let c = &a.cache.inner;
        let policy = &a.policy;
        let near = a.near.as_deref();
        // L1 first, without building the key, while no invalidation is
        // pending anywhere (then nothing is distrusted): an entry exists
        // only for an id that made a valid key.
        let l1_first = near.is_some()
            && policy.enabled()
            && !c.has_pending.load(std::sync::atomic::Ordering::Acquire);
        if l1_first {
            if let Some(r) = near.and_then(|n| self.answer_l1::<R>(n, id)) {
                return Ok(r);
            }
        }
        let key = c.keys.value_key(&a.kind, id)?;
        // A key with an invalidation pending is read from the source until
        // the replay applied it.
        if !policy.enabled() || c.distrusts(&a.kind, &key) {
            return Box::pin(self.flight(id, key, false)).await.map(miss);
        }
        if !l1_first {
            if let Some(r) = near.and_then(|n| self.answer_l1::<R>(n, id)) {
                return Ok(r);
            }
        }
        // Taken before the read is sent: an invalidation that arrives
        // before the reply voids it.
        let ticket = near.map(|n| n.tracker.begin(&key));
        let refresh = c.adaptive_refresh(&key, policy, now);
        match c.call(Some(&a.metrics), c.store.get(&key, refresh)).await {
            Ok(Some(bytes)) => {
                // Cleared (by type or tag) since its load began: removed, so
                // the reload's fill is not refused as "not newer".
                let admitted = match c.stamps.admits_now(&*c.store, a.kind.name(), &bytes) {
                    Some(ok) => ok,
                    None => match Box::pin(c.admits(&a.kind, &bytes)).await {
                        Some(ok) => ok,
                        None => return Box::pin(self.flight(id, key, false)).await.map(miss),
                    },
                };
                if !admitted {
                    a.metrics.cleared.increment(1);
                    c.discard(&key, &bytes).await;
                } else {
                    match hit(&bytes) {
                        Ok(r) => {
                            let expires_ms = match policy.eager_refresh {
                                Some(rule) => {
                                    let at = codec::peek_meta(&bytes).expires_ms;
                                    a.consider_refresh(rule, id, at);
                                    at
                                }
                                None => 0,
                            };
                            if let (Some(n), Some(t)) = (near, &ticket) {
                                if let Some((json, value)) = r.near_parts() {
                                    n.fill(
                                        t,
                                        id,
                                        json.clone(),
                                        value.cloned(),
                                        expires_ms,
                                        r.cached_at_ms(),
                                    );
                                }
                            }
                            return Ok(r);
                        }
                        Err(e) => {
                            tracing::warn!(key, error = %e, "undecodable cached value: removed");
                            c.discard(&key, &bytes).await;
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) if e.kind() == crate::error::StoreErrorKind::WrongType => {
                tracing::warn!(key, "cached key of the wrong type: removed");
                c.discard(&key, &Bytes::new()).await;
            }
            Err(_) => return Box::pin(self.flight(id, key, false)).await.map(miss),
        }
        // Boxed: the miss path's state would otherwise be part of every
        // hit's future, and be moved with it.
        let (fetched, started) = Box::pin(self.flight_from(id, key, true)).await?;
        // A "not found" marker found by a load this caller started (its
        // lease request went out after the ticket was taken) becomes a
        // negative L1 entry. A joined load may have read the marker before
        // the ticket, so a removal between the two would go unseen: no
        // entry from it.
        if let (Some(n), Some(t), true) = (near, &ticket, started) {
            if fetched.status == Status::Hit && fetched.value.is_none() {
                n.fill(t, id, Bytes::new(), None, 0, 0);
            }
        }
        Ok(miss(fetched))
    }

    /// The answer from `id`'s L1 entry, if it has one that may be served
    /// (an entry that does not decode is dropped).
    #[inline]
    fn answer_l1<R: Answer<S::Value>>(&self, n: &Near<S::Value>, id: &str) -> Option<R> {
        let e = n.get(id)?;
        match R::from_near(&e) {
            Ok(r) => {
                // An expiry is recorded only for types with eager refresh.
                if e.expires_ms != 0 {
                    if let Some(rule) = self.inner.policy.eager_refresh {
                        self.inner.consider_refresh(rule, id, e.expires_ms);
                    }
                }
                Some(r)
            }
            Err(err) => {
                tracing::warn!(id, error = %err, "undecodable near cache entry: dropped");
                crate::near::NearLayer::evict(n, id);
                None
            }
        }
    }

    /// Joins or starts the one load of `key` in this process.
    async fn flight(
        &self,
        id: &str,
        key: String,
        use_cache: bool,
    ) -> Result<Fetched<S::Value>, Error> {
        self.flight_from(id, key, use_cache).await.map(|(f, _)| f)
    }

    /// As [`flight`](Self::flight), saying whether this caller started the
    /// load (`true`) or joined one already running.
    async fn flight_from(
        &self,
        id: &str,
        key: String,
        use_cache: bool,
    ) -> Result<(Fetched<S::Value>, bool), Error> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut started = false;
        let epochs = &self.inner.cache.inner.epochs;
        let fut = {
            let mut flights = self
                .inner
                .flights
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Read under the map's lock, so a flight started here records
            // an epoch no older than what a caller checking later compares.
            let epoch = epochs.of(&key);
            match flights.get(&key) {
                Some(f) if f.epoch == epoch => f.result.clone(),
                // None, or one that began before a write returned: its
                // callers keep it, new ones get a load of their own.
                _ => {
                    started = true;
                    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                    let a = self.inner.clone();
                    let id = id.to_owned();
                    let k = key.clone();
                    // The load runs as a task of its own: a caller that gives
                    // up (request timeout, client gone) does not strand it
                    // holding a lease and a database connection, and the
                    // others still get its result.
                    let task = tokio::spawn(async move {
                        // Leaves the map however the load ends, a panic
                        // included.
                        let _leave = Leave(&a.flights, k, seq);
                        if use_cache {
                            a.resolve(&id).await
                        } else {
                            a.load_only(&id, Status::Bypass).await
                        }
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Error::source_error(format!("the load task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    flights.insert(
                        key,
                        InFlight {
                            seq,
                            epoch,
                            result: f.clone(),
                        },
                    );
                    f
                }
            }
        };
        fut.await.map(|f| (f, started))
    }

    /// Reads many ids: one `MGET` for all, then for the misses one pipelined
    /// lease request, one [`Source::load_many`] and one pipelined fill.
    ///
    /// Duplicate ids are answered once. Ids whose lease another caller holds
    /// are loaded without caching rather than waited for.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for the first id that cannot be a key;
    /// [`Error::Source`] when the source fails and some missing id has no
    /// stale copy.
    pub async fn get_many<I: AsRef<str>>(&self, ids: &[I]) -> Result<Batch<S::Value>, Error> {
        let started = Instant::now();
        let r = self.inner.get_many(ids).await;
        self.inner.metrics.get_seconds.record(started.elapsed());
        if let Ok(b) = &r {
            for (_, f) in &b.entries {
                self.inner.count(f.status);
            }
        }
        r
    }
}

impl<S: Source> Aside<S> {
    fn count(&self, status: Status) {
        let c = &self.cache.inner.counters;
        match status {
            Status::Hit => {
                self.metrics.hits.increment(1);
                c.hit();
            }
            Status::Stale => {
                // Served from the cache, so a hit for the hit rate.
                self.metrics.stale.increment(1);
                c.hit();
            }
            Status::Miss => {
                self.metrics.misses.increment(1);
                c.miss();
            }
            Status::Bypass => {
                self.metrics.bypass.increment(1);
                c.miss();
            }
        }
    }

    fn policy(&self) -> TypePolicy {
        self.policy
    }

    /// The cross-process part of a miss: lease, load, fill; or wait for the
    /// lease holder's fill.
    async fn resolve(self: &Arc<Self>, id: &str) -> Result<Fetched<S::Value>, Error> {
        let c = &self.cache.inner;
        let entry = c.keys.entry_unchecked(&self.kind, id);
        let token = CacheInner::token();
        let started = Instant::now();
        let deadline = started + c.lease_wait;
        let soft = self
            .policy
            .load_soft_timeout
            .or(self.policy.load_hard_timeout);
        let mut backoff = Duration::from_millis(2);
        loop {
            // Before the lease is asked for: a clear after this moment
            // refuses what the load brings.
            let epoch = c.load_epoch().await;
            let req = AcquireRequest {
                keys: &entry,
                token: &token,
                lease_ttl: c.lease_ttl,
                value_ttl: self.policy().ttl,
            };
            let acquired = match c.call(Some(&self.metrics), c.store.acquire(&[req])).await {
                Ok(mut v) if v.len() == 1 => v.pop().expect("one result"),
                _ => return self.load_only(id, Status::Bypass).await,
            };
            let stale = match acquired {
                // Served without the stamps check: the value key was just
                // found empty or cleared (and removed), so what the lease
                // request finds is a fill since, or a pending write-behind
                // write put back in place, which a clear does not cover
                // (it is newer than the database).
                Acquired::Value(bytes) => match codec::decode(&bytes) {
                    Ok(d) => return Ok(Fetched::decoded(d, Status::Hit)),
                    Err(_) => {
                        c.discard(&entry.value, &bytes).await;
                        return self.load_only(id, Status::Bypass).await;
                    }
                },
                Acquired::Absent => return Ok(Fetched::absent(Status::Hit)),
                Acquired::Leased { stale } => {
                    let stale = self.usable_stale(stale).await;
                    return self.load_and_fill(id, entry, token, stale, epoch).await;
                }
                Acquired::Busy { stale } => self.usable_stale(stale).await,
            };
            if let Some(d) = stale.clone() {
                // Another process loads: its stale copy now, or once the
                // load has taken the type's soft timeout.
                if c.stale_while_loading || soft.is_some_and(|t| started.elapsed() >= t) {
                    return Ok(Fetched::decoded(d, Status::Stale));
                }
            }
            if Instant::now() >= deadline {
                // The holder is stuck or gone and its lease not yet expired:
                // answer from the source rather than wait longer.
                return self.load_only(id, Status::Miss).await;
            }
            crate::spans::in_span!(
                tokio::time::sleep(backoff),
                "cache.lease_wait",
                cache.r#type = self.kind.name()
            )
            .await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
            if let Ok(Some(bytes)) = c.call(None, c.store.get(&entry.value, None)).await {
                if let Ok(d) = codec::decode(&bytes) {
                    if c.admits(&self.kind, &bytes).await == Some(true) {
                        return Ok(Fetched::decoded(d, Status::Hit));
                    }
                }
            }
        }
    }

    /// A stale copy that decodes and was not cleared.
    async fn usable_stale(&self, stale: Option<Bytes>) -> Option<codec::Decoded<S::Value>> {
        let bytes = stale?;
        let d = codec::decode(&bytes).ok()?;
        (self.cache.inner.admits(&self.kind, &bytes).await == Some(true)).then_some(d)
    }

    async fn timed_load(&self, id: &str) -> Result<Option<S::Value>, S::Error> {
        self.metrics.loads.increment(1);
        let t = Instant::now();
        let r = crate::spans::in_span!(
            self.source.load(id),
            "cache.load",
            cache.r#type = self.kind.name()
        )
        .await;
        let took = t.elapsed();
        self.metrics.load_seconds.record(took);
        self.load_time.record(took);
        if r.is_err() {
            self.metrics.load_errors.increment(1);
        }
        r
    }

    /// Loads under the lease and fills; with a load timeout for the type,
    /// the load runs as a task of its own and a caller past the timeout
    /// gets the stale copy (or [`Error::LoadTimeout`]) while it goes on to
    /// fill (see [`crate::policy::freshness`]).
    async fn load_and_fill(
        self: &Arc<Self>,
        id: &str,
        entry: EntryKeys,
        token: String,
        stale: Option<codec::Decoded<S::Value>>,
        epoch: u64,
    ) -> Result<Fetched<S::Value>, Error> {
        let limit = match (
            &stale,
            self.policy.load_soft_timeout,
            self.policy.load_hard_timeout,
        ) {
            (Some(_), Some(soft), _) => Some((soft, "soft")),
            (_, _, Some(hard)) => Some((hard, "hard")),
            _ => None,
        };
        let Some((limit, which)) = limit else {
            return self.load_then_fill(id, &entry, &token, stale, epoch).await;
        };
        let me = self.clone();
        let id = id.to_owned();
        let fallback = stale.clone();
        let mut task = tokio::spawn(async move {
            me.load_then_fill(&id, &entry, &token, fallback, epoch)
                .await
        });
        match tokio::time::timeout(limit, &mut task).await {
            Ok(r) => {
                r.unwrap_or_else(|e| Err(Error::source_error(format!("the load task failed: {e}"))))
            }
            Err(_) => {
                // The task goes on: it fills the cache for the next reader.
                self.metrics.timed_out(which);
                match stale {
                    Some(d) => Ok(Fetched::decoded(d, Status::Stale)),
                    None => Err(Error::LoadTimeout(limit)),
                }
            }
        }
    }

    /// The value's envelope, its lifetimes (`None`: past its end, not
    /// cached) and whether it may be written: not when a clear this
    /// process knows of covers a load that began at `epoch`.
    fn envelope(
        &self,
        v: &S::Value,
        key: &str,
        epoch: u64,
    ) -> Result<(codec::Encoded, Option<crate::store::Lifetimes>), CodecError> {
        let c = &self.cache.inner;
        let (enc, lifetimes, tags) = c.envelope(v, key, &self.policy, epoch)?;
        let lifetimes = lifetimes.filter(|_| c.writable(&self.kind, epoch, &tags));
        Ok((enc, lifetimes))
    }

    /// The load and fill of [`load_and_fill`](Self::load_and_fill).
    async fn load_then_fill(
        &self,
        id: &str,
        entry: &EntryKeys,
        token: &str,
        stale: Option<codec::Decoded<S::Value>>,
        epoch: u64,
    ) -> Result<Fetched<S::Value>, Error> {
        let c = &self.cache.inner;
        let policy = self.policy();
        let loaded = self.timed_load(id).await;
        let mut lifetimes = None;
        let (fill, result) = match loaded {
            Ok(Some(v)) => match self.envelope(&v, &entry.value, epoch) {
                Ok((enc, l)) => {
                    lifetimes = l;
                    (
                        Some(FillValue::Value {
                            bytes: enc.envelope,
                            version: v.version(),
                        }),
                        Fetched::found(v, enc.json, Status::Miss, enc.cached_at_ms),
                    )
                }
                Err(e @ CodecError::TooLarge { .. }) => {
                    tracing::warn!(key = entry.value, error = %e, "value not cached");
                    (None, self.plain(v, Status::Miss)?)
                }
                Err(e) => {
                    self.release(entry, token).await;
                    return Err(e.into());
                }
            },
            Ok(None) if !policy.absent_ttl.is_zero() => {
                if c.writable(&self.kind, epoch, &[]) {
                    lifetimes = Some(crate::store::Lifetimes {
                        ttl: policy.absent_ttl,
                        stale_ttl: Duration::ZERO,
                    });
                }
                (Some(FillValue::Absent), Fetched::absent(Status::Miss))
            }
            Ok(None) => (None, Fetched::absent(Status::Miss)),
            Err(e) => {
                self.release(entry, token).await;
                if let Some(d) = stale {
                    tracing::warn!(key = entry.value, error = %e, "source failed: serving stale");
                    return Ok(Fetched::decoded(d, Status::Stale));
                }
                return Err(Error::source_error(e));
            }
        };
        match fill.zip(lifetimes) {
            Some((value, lifetimes)) => {
                let req = FillRequest {
                    keys: entry,
                    token,
                    value,
                    lifetimes,
                };
                match crate::spans::in_span!(
                    c.call(Some(&self.metrics), c.store.fill(&[req])),
                    "cache.fill",
                    cache.r#type = self.kind.name()
                )
                .await
                {
                    Ok(v) if v.first() == Some(&FillOutcome::Stored) => {}
                    Ok(_) => self.metrics.fills_rejected.increment(1),
                    // The lease expires by itself.
                    Err(_) => {}
                }
            }
            None => self.release(entry, token).await,
        }
        Ok(result)
    }

    async fn release(&self, entry: &EntryKeys, token: &str) {
        let c = &self.cache.inner;
        let _ = c.call(None, c.store.release(&[(entry, token)])).await;
    }

    fn plain(&self, v: S::Value, status: Status) -> Result<Fetched<S::Value>, Error> {
        let json =
            serde_json::to_vec(&v).map_err(|e| Error::from(CodecError::Encode(e.to_string())))?;
        Ok(Fetched::found(v, Bytes::from(json), status, now_ms()))
    }

    /// Loads from the source without touching the cache, within the type's
    /// hard load timeout if it has one.
    pub(crate) async fn load_only(
        &self,
        id: &str,
        status: Status,
    ) -> Result<Fetched<S::Value>, Error> {
        let loaded = match self.policy.load_hard_timeout {
            Some(limit) => match tokio::time::timeout(limit, self.timed_load(id)).await {
                Ok(r) => r,
                Err(_) => {
                    self.metrics.timed_out("hard");
                    return Err(Error::LoadTimeout(limit));
                }
            },
            None => self.timed_load(id).await,
        };
        match loaded {
            Ok(Some(v)) => self.plain(v, status),
            Ok(None) => Ok(Fetched::absent(status)),
            Err(e) => Err(Error::source_error(e)),
        }
    }
}

impl Cache {
    /// A cache-aside reader of `kind` through `source`.
    ///
    /// # Panics
    ///
    /// If the kind's static names are not `[a-z0-9_]+` (a programming error).
    #[must_use]
    pub fn aside<S: Source>(&self, kind: Kind, source: S) -> CacheAside<S> {
        CacheAside::new(self.clone(), kind, source)
    }
}
