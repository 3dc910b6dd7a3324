//! What a read answers: [`Status`], [`Fetched`] (a typed value),
//! [`FetchedJson`] (its JSON, unparsed on a hit), [`Batch`] (many), and
//! `Answer`, what the read path needs of either.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{self, CodecError};
use crate::near::{Layer, NearEntry};

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
    pub(super) value: Option<Arc<T>>,
    pub(super) json: Option<Bytes>,
    pub(super) status: Status,
    pub(super) l1: bool,
    /// Unix ms; 0 unknown.
    pub(super) cached_at_ms: i64,
}

/// A `cached_at` in Unix milliseconds as a time (`None` for 0, unknown).
fn time_of(ms: i64) -> Option<std::time::SystemTime> {
    let ms = u64::try_from(ms).ok().filter(|&m| m > 0)?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Now, in Unix milliseconds.
pub(super) fn now_ms() -> i64 {
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

    pub(super) fn absent(status: Status) -> Self {
        Self {
            value: None,
            json: None,
            status,
            l1: false,
            cached_at_ms: 0,
        }
    }

    pub(super) fn decoded(d: codec::Decoded<T>, status: Status) -> Self {
        Self::found(d.value, d.json, status, d.cached_at_ms)
    }

    pub(super) fn found(value: T, json: Bytes, status: Status, cached_at_ms: i64) -> Self {
        Self {
            value: Some(Arc::new(value)),
            json: Some(json),
            status,
            l1: false,
            cached_at_ms,
        }
    }
}

pub(super) fn layer(status: Status, l1: bool) -> Option<Layer> {
    (status == Status::Hit).then_some(if l1 { Layer::L1 } else { Layer::L2 })
}

/// The result of [`CacheAside::get_json`](crate::CacheAside::get_json): the value's JSON, unparsed on a
/// hit.
#[derive(Debug, Clone)]
pub struct FetchedJson {
    pub(super) json: Option<Bytes>,
    pub(super) status: Status,
    pub(super) l1: bool,
    pub(super) cached_at_ms: i64,
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
pub(super) trait Answer<T>: Sized {
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

/// The result of [`CacheAside::get_many`](crate::CacheAside::get_many).
#[derive(Debug, Clone)]
pub struct Batch<T> {
    /// One result per distinct requested id, in request order.
    pub entries: Vec<(String, Fetched<T>)>,
    /// How many ids were answered from the cache.
    pub hits: usize,
    /// How many ids were loaded from the source.
    pub misses: usize,
}
