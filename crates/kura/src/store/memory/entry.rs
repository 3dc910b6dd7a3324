//! The memory store's entry protocol ([`Store`]): each step under its
//! entry's shard lock.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::key::{EntryKeys, KeyPattern};
use crate::store::{
    AcquireRequest, Acquired, FillOutcome, FillRequest, Store, StoreResult, UpdateOutcome,
    UpdateRequest, version_newer,
};

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str, refresh: Option<Duration>) -> StoreResult<Option<Bytes>> {
        let now = self.now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        let found = shard.peek(key, now, tick, |slot| {
            let v = slot.value.as_mut()?;
            if let Some(ttl) = refresh {
                let until = timed((), now, ttl).until;
                // The stale copy's end moves as much as the value's, as in
                // get_refresh.lua: it still outlives the value by max_stale.
                if let Some(st) = slot.stale.as_mut() {
                    st.until = until + st.until.saturating_duration_since(v.until);
                }
                v.until = until;
            }
            Some(v.v.clone())
        });
        if let Some(v) = found {
            return Ok(v);
        }
        Ok(match shard.plain.get(key) {
            Some(Plain::Value(t)) if t.live(now) => Some(t.v.clone()),
            Some(Plain::Counter(c)) => Some(Bytes::from(c.to_string())),
            _ => None,
        })
    }

    async fn get_many(&self, keys: &[&str]) -> StoreResult<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k, None).await?);
        }
        Ok(out)
    }

    async fn acquire(&self, reqs: &[AcquireRequest<'_>]) -> StoreResult<Vec<Acquired>> {
        Ok(reqs
            .iter()
            .map(|r| {
                self.step(r.keys, |slot, now| {
                    if let Some(v) = &slot.value {
                        return Acquired::Value(v.v.clone());
                    }
                    if let Some(p) = slot.pending.clone() {
                        slot.value = Some(timed(p.clone(), now, r.value_ttl));
                        return Acquired::Value(p);
                    }
                    if slot.absent.is_some() {
                        return Acquired::Absent;
                    }
                    let stale = slot.stale.as_ref().map(|t| t.v.clone());
                    match &mut slot.lease {
                        Some(l) if lease_token(&l.v) != r.token => Acquired::Busy { stale },
                        // Re-entrant: the lease keeps the floor a committed
                        // change may have set.
                        Some(l) => {
                            l.until = now + r.lease_ttl;
                            Acquired::Leased { stale }
                        }
                        None => {
                            slot.lease = Some(timed(r.token.into(), now, r.lease_ttl));
                            Acquired::Leased { stale }
                        }
                    }
                })
            })
            .collect())
    }

    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        Ok(self.fill_as(reqs, false))
    }

    async fn refill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        Ok(self.fill_as(reqs, true))
    }

    async fn refresh_lease(
        &self,
        keys: &EntryKeys,
        token: &str,
        ttl: Duration,
        seen_expires_ms: u64,
    ) -> StoreResult<bool> {
        Ok(self.step(keys, |slot, now| {
            let same = slot
                .value
                .as_ref()
                .is_some_and(|v| crate::codec::peek_meta(&v.v).expires_ms == seen_expires_ms);
            if !same || slot.lease.is_some() {
                return false;
            }
            slot.lease = Some(timed(token.into(), now, ttl));
            true
        }))
    }

    async fn release(&self, entries: &[(&EntryKeys, &str)]) -> StoreResult<()> {
        for (keys, token) in entries {
            self.step(keys, |slot, _| {
                if slot
                    .lease
                    .as_ref()
                    .is_some_and(|l| lease_token(&l.v) == *token)
                {
                    slot.lease = None;
                }
            });
        }
        Ok(())
    }

    async fn update(&self, reqs: &[UpdateRequest<'_>]) -> StoreResult<Vec<UpdateOutcome>> {
        Ok(reqs
            .iter()
            .map(|r| {
                self.step(r.keys, |slot, now| {
                    slot.lease = None;
                    slot.absent = None;
                    let Some(cur) = &slot.value else {
                        slot.stale = None;
                        return UpdateOutcome::NotCached;
                    };
                    if !version_newer(r.version, peek_version(&cur.v)) {
                        return UpdateOutcome::NotNewer;
                    }
                    slot.value = Some(timed(r.bytes.clone(), now, r.lifetimes.ttl));
                    slot.stale = (!r.lifetimes.stale_ttl.is_zero())
                        .then(|| timed(r.bytes.clone(), now, r.lifetimes.stale_ttl));
                    UpdateOutcome::Stored
                })
            })
            .collect())
    }

    async fn invalidate(&self, entries: &[&EntryKeys]) -> StoreResult<u64> {
        let mut n = 0;
        for keys in entries {
            n += self.step(keys, |slot, _| u64::from(slot.invalidate()));
        }
        Ok(n)
    }

    async fn invalidate_older(&self, entries: &[(&EntryKeys, Option<u64>)]) -> StoreResult<u64> {
        let mut n = 0;
        for (keys, version) in entries {
            n += self.step(keys, |slot, _| {
                let cached = slot.value.as_ref().map(|t| peek_version(&t.v));
                match (version, cached) {
                    // As the script: a value without a version counts as older.
                    (Some(v), Some(c)) if !version_newer(*v, c) => 0,
                    (Some(v), _) => {
                        // As the script: a load in flight keeps its lease,
                        // with the change's version as the floor of its fill.
                        let lease = slot.lease.take().map(|mut l| {
                            if lease_floor(&l.v).is_none_or(|f| f < *v) {
                                l.v = format!("{}\n{v}", lease_token(&l.v)).into();
                            }
                            l
                        });
                        let had = slot.invalidate();
                        slot.lease = lease;
                        u64::from(had)
                    }
                    (None, _) => u64::from(slot.invalidate()),
                }
            });
        }
        Ok(n)
    }

    async fn invalidate_matching(&self, pattern: &KeyPattern) -> StoreResult<u64> {
        let now = self.now();
        let mut n = 0;
        for i in 0..self.inner.shards.len() {
            let mut shard = self.shard_at(i);
            // Backwards: a removal moves the last slot into the gap, and
            // that one has been seen already.
            for i in (0..shard.slots.len()).rev() {
                if pattern.matches_value_key(shard.slots.get(i).0) {
                    n += u64::from(shard.slots.change(i, now, Slot::invalidate));
                }
            }
        }
        Ok(n)
    }

    async fn sweep(&self, pattern: &KeyPattern, epoch: u64) -> StoreResult<u64> {
        let now = self.now();
        let mut n = 0;
        for i in 0..self.inner.shards.len() {
            let mut shard = self.shard_at(i);
            // Backwards, as in `invalidate_matching`.
            for i in (0..shard.slots.len()).rev() {
                if !pattern.matches_value_key(shard.slots.get(i).0) {
                    continue;
                }
                let removed = shard.slots.change(i, now, |slot| {
                    let old = slot.pending.is_none()
                        && slot
                            .value
                            .as_ref()
                            .is_some_and(|v| crate::codec::peek_meta(&v.v).epoch < epoch);
                    if old {
                        slot.value = None;
                        slot.stale = None;
                    }
                    old
                });
                n += u64::from(removed);
            }
        }
        Ok(n)
    }

    async fn count_matching(&self, pattern: &KeyPattern) -> StoreResult<Option<u64>> {
        let now = self.now();
        let mut n = 0;
        for i in 0..self.inner.shards.len() {
            let shard = self.shard_at(i);
            n += shard
                .slots
                .iter()
                .filter(|(k, slot)| {
                    pattern.matches_value_key(k) && slot.value.as_ref().is_some_and(|v| v.live(now))
                })
                .count() as u64;
        }
        Ok(Some(n))
    }

    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()> {
        let now = self.now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.with_slot(key, now, tick, |slot| {
            if slot.value.as_ref().is_some_and(|t| t.v == *seen) {
                slot.value = None;
            }
        });
        Ok(())
    }

    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()> {
        // A plain value lives in a slot like a cached one, so `get` and
        // `discard` see it the same way.
        let now = self.now();
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.sweep(now);
        shard.with_slot(key, now, tick, |slot| {
            slot.value = Some(timed(bytes, now, ttl));
        });
        self.evict(&mut shard, key);
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    fn bounds_own_latency(&self) -> bool {
        true
    }

    fn describe(&self) -> &'static str {
        "memory"
    }
}
