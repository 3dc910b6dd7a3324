//! The cross-process part of a miss: the lease (or a wait for another
//! holder's fill, or the stale copy), the load under the lease (bounded by
//! the soft and hard load timeouts), the fill that lands only while the
//! lease is held, and the reads that go to the source alone (store down).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fetched::now_ms;
use super::{Fetched, ReaderState, Status};
use crate::codec::{self, CodecError};
use crate::core::CacheInner;
use crate::error::Error;
use crate::key::EntryKeys;
use crate::policy::TypePolicy;
use crate::source::{Source, Versioned};
use crate::store::{AcquireRequest, Acquired, FillOutcome, FillRequest, FillValue};

impl<S: Source> ReaderState<S> {
    pub(super) fn count(&self, status: Status) {
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

    pub(super) fn policy(&self) -> TypePolicy {
        self.policy
    }

    /// The cross-process part of a miss: lease, load, fill; or wait for the
    /// lease holder's fill.
    pub(super) async fn resolve(self: &Arc<Self>, id: &str) -> Result<Fetched<S::Value>, Error> {
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
    pub(super) async fn usable_stale(
        &self,
        stale: Option<Bytes>,
    ) -> Option<codec::Decoded<S::Value>> {
        let bytes = stale?;
        let d = codec::decode(&bytes).ok()?;
        (self.cache.inner.admits(&self.kind, &bytes).await == Some(true)).then_some(d)
    }

    pub(super) async fn timed_load(&self, id: &str) -> Result<Option<S::Value>, S::Error> {
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
    pub(super) async fn load_and_fill(
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
    pub(super) fn envelope(
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
    pub(super) async fn load_then_fill(
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

    pub(super) async fn release(&self, entry: &EntryKeys, token: &str) {
        let c = &self.cache.inner;
        let _ = c.call(None, c.store.release(&[(entry, token)])).await;
    }

    pub(super) fn plain(&self, v: S::Value, status: Status) -> Result<Fetched<S::Value>, Error> {
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
