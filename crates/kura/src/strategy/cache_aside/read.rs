//! The read path of one key: the near cache (L1), then one round trip to
//! the store (the value, checked against the clear stamps and the journal
//! of pending invalidations, with the adaptive rule's refresh), then the
//! single flight of a miss.

use std::time::Instant;

use bytes::Bytes;

use super::fetched::Answer;
use super::{CacheAside, Fetched, FetchedJson, Status};
use crate::codec::{self, CodecError};
use crate::error::Error;
use crate::near::Near;
use crate::source::Source;

impl<S: Source> CacheAside<S> {
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
    pub(super) async fn read<R: Answer<S::Value>>(
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

    pub(super) async fn read_inner<R: Answer<S::Value>>(
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
    pub(super) fn answer_l1<R: Answer<S::Value>>(&self, n: &Near<S::Value>, id: &str) -> Option<R> {
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
}
