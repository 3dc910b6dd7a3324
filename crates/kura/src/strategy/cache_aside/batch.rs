//! The batch path of cache-aside reads, shared by
//! [`CacheAside::get_many`](super::CacheAside::get_many) and the warmer:
//! one `MGET`, one pipelined lease request for the misses, one
//! [`Source::load_many`], one pipelined fill, and the leases a cancelled
//! batch still held given back ([`HeldLeases`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Batch, Fetched, ReaderState, Status};
use crate::codec;
use crate::core::{Cache, CacheInner};
use crate::error::{Error, StoreError};
use crate::key::EntryKeys;
use crate::source::{Source, Versioned};
use crate::store::{AcquireRequest, Acquired, FillOutcome, FillRequest, FillValue};

impl<S: Source> ReaderState<S> {
    /// See [`CacheAside::get_many`](super::CacheAside::get_many).
    pub(super) async fn get_many<I: AsRef<str>>(
        &self,
        ids: &[I],
    ) -> Result<Batch<S::Value>, Error> {
        let c = &self.cache.inner;
        let mut seen = std::collections::HashSet::new();
        let mut order: Vec<&str> = Vec::with_capacity(ids.len());
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            let id = id.as_ref();
            let key = c.keys.value_key(&self.kind, id)?;
            if seen.insert(id) {
                order.push(id);
                keys.push(key);
            }
        }
        let mut results: Vec<Option<Fetched<S::Value>>> = vec![None; order.len()];
        let policy = self.policy();
        let mut cached = vec![None; order.len()];
        let mut use_cache = policy.enabled();
        if use_cache {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            match c.call(Some(&self.metrics), c.store.get_many(&refs)).await {
                Ok(v) if v.len() == order.len() => cached = v,
                _ => use_cache = false,
            }
        }
        // Keys with an invalidation pending are read from the source until
        // the replay applied it.
        let distrusted: Vec<bool> = keys.iter().map(|k| c.distrusts(&self.kind, k)).collect();
        let mut missing = Vec::new();
        for (i, slot) in cached.into_iter().enumerate() {
            if distrusted[i] {
                missing.push(i);
                continue;
            }
            match slot.map(|b| (codec::decode(&b), b)) {
                Some((Ok(d), b)) => match c.admits(&self.kind, &b).await {
                    Some(true) => results[i] = Some(Fetched::decoded(d, Status::Hit)),
                    Some(false) => {
                        self.metrics.cleared.increment(1);
                        c.discard(&keys[i], &b).await;
                        missing.push(i);
                    }
                    None => missing.push(i),
                },
                Some((Err(_), b)) => {
                    c.discard(&keys[i], &b).await;
                    missing.push(i);
                }
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            let ids: Vec<&str> = missing.iter().map(|&i| order[i]).collect();
            let cacheable: Vec<bool> = missing
                .iter()
                .map(|&i| use_cache && !distrusted[i])
                .collect();
            let slots = self
                .lease_load_fill(&ids, &cacheable, BatchMode::Read)
                .await?;
            for (&i, slot) in missing.iter().zip(slots) {
                results[i] = slot.fetched;
            }
        }
        let entries: Vec<(String, Fetched<S::Value>)> = order
            .into_iter()
            .zip(results)
            .map(|(id, f)| {
                (
                    id.to_owned(),
                    f.unwrap_or_else(|| Fetched::absent(Status::Miss)),
                )
            })
            .collect();
        let hits = entries
            .iter()
            .filter(|(_, f)| matches!(f.status, Status::Hit | Status::Stale))
            .count();
        Ok(Batch {
            misses: entries.len() - hits,
            hits,
            entries,
        })
    }

    /// What one lease request of a batch found, put in its place: a lease
    /// to load under, a hit, or (for a read) an id to load without one.
    #[allow(clippy::too_many_arguments)]
    fn take_acquired(
        &self,
        j: usize,
        a: Acquired,
        mode: BatchMode,
        held: &mut HeldLeases,
        slots: &mut [Slot<S::Value>],
        stale: &mut [Option<Bytes>],
        to_load: &mut Vec<usize>,
    ) {
        match a {
            Acquired::Leased { stale: s } => {
                held.took(j);
                stale[j] = s;
                to_load.push(j);
            }
            _ if mode == BatchMode::Warm => {}
            // As in a single read: a value the lease request finds after a
            // cleared one was removed is a fill since or a pending
            // write-behind write put back, served as it is.
            Acquired::Value(b) => match codec::decode(&b) {
                Ok(d) => slots[j].fetched = Some(Fetched::decoded(d, Status::Hit)),
                Err(_) => to_load.push(j),
            },
            Acquired::Absent => slots[j].fetched = Some(Fetched::absent(Status::Hit)),
            Acquired::Busy { stale: s } => {
                stale[j] = s;
                to_load.push(j);
            }
        }
    }

    /// The lease-load-fill sequence of a batch of misses, shared by
    /// [`get_many`](CacheAside::get_many) and the warmer: one pipelined lease
    /// request for the `cacheable` ids, one [`Source::load_many`], one
    /// pipelined fill of the leased ones and one release of the leases that
    /// had nothing to fill. Every lease taken is filled or released however
    /// the call ends: a caller cancelled half-way hands the rest to a task
    /// of its own ([`HeldLeases`]).
    ///
    /// The ids must be valid (checked by the caller). Ids not `cacheable`
    /// are loaded without a lease and answered [`Status::Bypass`].
    ///
    /// # Errors
    ///
    /// [`BatchMode::Read`]: [`Error::Source`] when the source fails and some
    /// id to load has no stale copy; [`Error::Codec`] for a value that cannot
    /// be serialized. [`BatchMode::Warm`]: also [`Error::Unavailable`] when
    /// the lease request or the fill fails, and any source failure.
    pub(crate) async fn lease_load_fill(
        &self,
        ids: &[&str],
        cacheable: &[bool],
        mode: BatchMode,
    ) -> Result<Vec<Slot<S::Value>>, Error> {
        debug_assert_eq!(ids.len(), cacheable.len());
        let c = &self.cache.inner;
        let policy = self.policy();
        let n = ids.len();
        let entries: Arc<[EntryKeys]> = ids
            .iter()
            .map(|id| c.keys.entry_unchecked(&self.kind, id))
            .collect();
        let mut held = HeldLeases::new(self.cache.clone(), CacheInner::token(), entries.clone());
        let token = held.token.clone();
        let mut slots: Vec<Slot<S::Value>> = (0..n).map(|_| Slot::default()).collect();
        let mut stale: Vec<Option<Bytes>> = vec![None; n];
        // Loaded values are answered `Miss` for ids the cache was asked
        // about, `Bypass` for the others.
        let mut asked = cacheable.to_vec();
        let mut to_load = Vec::new();
        let want: Vec<usize> = (0..n).filter(|&j| cacheable[j]).collect();
        // Before the leases are asked for (see `resolve`).
        let epoch = c.load_epoch().await;
        let lease_requests = |js: &[usize]| -> Vec<AcquireRequest<'_>> {
            js.iter()
                .map(|&j| AcquireRequest {
                    keys: &entries[j],
                    token: &token,
                    lease_ttl: c.lease_ttl,
                    value_ttl: policy.ttl,
                })
                .collect()
        };
        let acquired = if want.is_empty() {
            None
        } else {
            let reqs = lease_requests(&want);
            match c.call(Some(&self.metrics), c.store.acquire(&reqs)).await {
                Ok(v) if v.len() == want.len() => Some(v),
                Ok(_) if mode == BatchMode::Warm => {
                    return Err(Error::Unavailable(StoreError::server(
                        "lease replies do not match the requests",
                    )));
                }
                Err(e) if mode == BatchMode::Warm => return Err(Error::Unavailable(e)),
                _ => None,
            }
        };
        match acquired {
            Some(acq) => {
                // Values found cleared (see `crate::tags`) are removed and
                // asked for once more, so warming and batches reload them.
                let mut again = Vec::new();
                for (&j, a) in want.iter().zip(acq) {
                    if let Acquired::Value(b) = &a {
                        if c.admits(&self.kind, b).await == Some(false) {
                            self.metrics.cleared.increment(1);
                            c.discard(&entries[j].value, b).await;
                            again.push(j);
                            continue;
                        }
                    }
                    self.take_acquired(j, a, mode, &mut held, &mut slots, &mut stale, &mut to_load);
                }
                if !again.is_empty() {
                    let reqs = lease_requests(&again);
                    match c.call(Some(&self.metrics), c.store.acquire(&reqs)).await {
                        Ok(v) if v.len() == again.len() => {
                            for (&j, a) in again.iter().zip(v) {
                                self.take_acquired(
                                    j,
                                    a,
                                    mode,
                                    &mut held,
                                    &mut slots,
                                    &mut stale,
                                    &mut to_load,
                                );
                            }
                        }
                        _ if mode == BatchMode::Warm => {}
                        _ => to_load.extend(again.iter().copied()),
                    }
                }
                to_load.extend((0..n).filter(|&j| !cacheable[j]));
                to_load.sort_unstable();
            }
            None => {
                asked = vec![false; n];
                to_load.extend(0..n);
            }
        }
        if to_load.is_empty() {
            return Ok(slots);
        }
        let load_ids: Vec<String> = to_load.iter().map(|&j| ids[j].to_owned()).collect();
        self.metrics.loads.increment(load_ids.len() as u64);
        let t = Instant::now();
        let loaded = self.source.load_many(&load_ids).await;
        self.metrics.load_seconds.record(t.elapsed());
        let mut found: HashMap<String, S::Value> = match loaded {
            Ok(rows) => rows.into_iter().collect(),
            Err(e) => {
                self.metrics.load_errors.increment(1);
                held.release_all().await;
                let err = Error::source_error(e);
                if mode == BatchMode::Warm {
                    return Err(err);
                }
                for &j in &to_load {
                    match self.usable_stale(stale[j].take()).await {
                        Some(d) => slots[j].fetched = Some(Fetched::decoded(d, Status::Stale)),
                        None => return Err(err),
                    }
                }
                return Ok(slots);
            }
        };
        let mut fills = Vec::new();
        let mut filled = Vec::new();
        let mut give_back = Vec::new();
        for &j in &to_load {
            let status = if asked[j] {
                Status::Miss
            } else {
                Status::Bypass
            };
            let leased = held.holds(j);
            match found.remove(ids[j]) {
                Some(v) => {
                    let version = v.version();
                    match self.envelope(&v, &entries[j].value, epoch) {
                        Ok((enc, lifetimes)) => {
                            match lifetimes {
                                Some(lifetimes) if leased => {
                                    fills.push(FillRequest {
                                        keys: &entries[j],
                                        token: &token,
                                        value: FillValue::Value {
                                            bytes: enc.envelope,
                                            version,
                                        },
                                        lifetimes,
                                    });
                                    filled.push(j);
                                }
                                // Past its end: not cached, the lease given
                                // back.
                                None if leased => give_back.push(j),
                                _ => {}
                            }
                            slots[j].fetched =
                                Some(Fetched::found(v, enc.json, status, enc.cached_at_ms));
                        }
                        Err(e) => {
                            tracing::warn!(key = entries[j].value, error = %e, "value not cached");
                            if leased {
                                give_back.push(j);
                            }
                            if mode == BatchMode::Read {
                                slots[j].fetched = Some(self.plain(v, status)?);
                            }
                        }
                    }
                }
                // Gone (or never there): "not found" is remembered by a
                // read, not by warming.
                None => {
                    if leased {
                        if mode == BatchMode::Warm || policy.absent_ttl.is_zero() {
                            give_back.push(j);
                        } else {
                            fills.push(FillRequest {
                                keys: &entries[j],
                                token: &token,
                                value: FillValue::Absent,
                                lifetimes: crate::store::Lifetimes {
                                    ttl: policy.absent_ttl,
                                    stale_ttl: Duration::ZERO,
                                },
                            });
                            filled.push(j);
                        }
                    }
                    if mode == BatchMode::Read {
                        slots[j].fetched = Some(Fetched::absent(status));
                    }
                }
            }
        }
        held.release(&give_back).await;
        if !fills.is_empty() {
            let r = c.call(Some(&self.metrics), c.store.fill(&fills)).await;
            // Filled or not, these leases are settled: a fill that failed to
            // answer may still have landed, and otherwise the lease expires.
            held.settled(&filled);
            match r {
                Ok(outcomes) => {
                    for (&j, o) in filled.iter().zip(&outcomes) {
                        slots[j].stored = *o == FillOutcome::Stored;
                    }
                    let rejected = outcomes
                        .iter()
                        .filter(|o| **o != FillOutcome::Stored)
                        .count();
                    self.metrics.fills_rejected.increment(rejected as u64);
                }
                Err(e) if mode == BatchMode::Warm => return Err(Error::Unavailable(e)),
                Err(_) => {}
            }
        }
        Ok(slots)
    }
}

/// How [`ReaderState::lease_load_fill`] treats the ids it did not lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchMode {
    /// A read: every id gets an answer. Cached values are taken as they are;
    /// ids another caller is loading (and undecodable values) are loaded
    /// without caching; a failed lease request loads every id without
    /// caching; "not found" is remembered for the type's `absent_ttl`; a
    /// source failure falls back on the stale copies.
    Read,
    /// Warming: only leased ids are loaded and filled, the others are
    /// skipped; any store or source failure fails the batch.
    Warm,
}

/// What [`ReaderState::lease_load_fill`] did for one id.
#[derive(Debug)]
pub(crate) struct Slot<V> {
    /// The answer (always there for [`BatchMode::Read`]; `None` for an id
    /// warming skipped).
    pub(crate) fetched: Option<Fetched<V>>,
    /// Whether this call's fill stored a value or "not found" marker.
    pub(crate) stored: bool,
}

impl<V> Default for Slot<V> {
    fn default() -> Self {
        Self {
            fetched: None,
            stored: false,
        }
    }
}

/// The leases a batch holds and has neither filled nor released yet. If it
/// is dropped with some still held (its caller was cancelled between the
/// lease request and the fill), a task of its own releases them, so other
/// readers take the lease at once instead of polling until it expires.
struct HeldLeases {
    cache: Cache,
    token: String,
    entries: Arc<[EntryKeys]>,
    held: Vec<bool>,
}

impl HeldLeases {
    fn new(cache: Cache, token: String, entries: Arc<[EntryKeys]>) -> Self {
        let held = vec![false; entries.len()];
        Self {
            cache,
            token,
            entries,
            held,
        }
    }

    fn took(&mut self, j: usize) {
        self.held[j] = true;
    }

    fn holds(&self, j: usize) -> bool {
        self.held[j]
    }

    /// The leases of `js` were filled (or the fill was sent).
    fn settled(&mut self, js: &[usize]) {
        for &j in js {
            self.held[j] = false;
        }
    }

    /// Releases the leases of `js`; forgets them only once the release
    /// answered, so a cancellation during it still releases on drop.
    async fn release(&mut self, js: &[usize]) {
        let js: Vec<usize> = js.iter().copied().filter(|&j| self.held[j]).collect();
        if js.is_empty() {
            return;
        }
        let c = &self.cache.inner;
        let refs: Vec<(&EntryKeys, &str)> = js
            .iter()
            .map(|&j| (&self.entries[j], self.token.as_str()))
            .collect();
        let _ = c.call(None, c.store.release(&refs)).await;
        self.settled(&js);
    }

    async fn release_all(&mut self) {
        let js: Vec<usize> = (0..self.held.len()).filter(|&j| self.held[j]).collect();
        self.release(&js).await;
    }
}

impl Drop for HeldLeases {
    fn drop(&mut self) {
        let left: Vec<usize> = (0..self.held.len()).filter(|&j| self.held[j]).collect();
        if left.is_empty() {
            return;
        }
        // Outside a runtime nothing can run the release: the leases then
        // expire by themselves.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cache = self.cache.clone();
        let token = std::mem::take(&mut self.token);
        let entries = self.entries.clone();
        rt.spawn(async move {
            let c = &cache.inner;
            let refs: Vec<(&EntryKeys, &str)> =
                left.iter().map(|&j| (&entries[j], token.as_str())).collect();
            if let Err(e) = c.call(None, c.store.release(&refs)).await {
                tracing::debug!(error = %e, n = refs.len(), "leases of a cancelled batch left to expire");
            }
        });
    }
}
