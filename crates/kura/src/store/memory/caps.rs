//! The memory store's capabilities besides the entry protocol: stamps,
//! positions, rate limits, counters and locks, each under a lock of its
//! own; no invalidation stream (no other process shares the store).

use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::error::StoreError;
use crate::store::{
    CounterStore, LockStore, PositionStore, RateDecision, RateStore, StampStore, StoreResult,
    Tracking, TrackingSink, TrackingStore,
};

#[async_trait]
impl StampStore for MemoryStore {
    async fn stamps(&self, key: &str) -> StoreResult<Vec<(String, u64)>> {
        Ok(lock(&self.inner.stamps)
            .get(key)
            .map(|h| h.iter().map(|(f, v)| (f.clone(), *v)).collect())
            .unwrap_or_default())
    }

    async fn bump_stamp(&self, key: &str, field: &str, held: u64) -> StoreResult<u64> {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut all = lock(&self.inner.stamps);
        let h = all.entry(key.to_owned()).or_default();
        let cur = h.get(crate::tags::EPOCH_FIELD).copied().unwrap_or(0);
        let e = now_us.max(cur + 1).max(held + 1);
        h.insert(crate::tags::EPOCH_FIELD.to_owned(), e);
        h.insert(field.to_owned(), e);
        h.entry(crate::tags::ID_FIELD.to_owned()).or_insert(e);
        self.inner
            .stamps_version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(e)
    }

    fn stamps_version(&self) -> Option<u64> {
        Some(
            self.inner
                .stamps_version
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }
}

#[async_trait]
impl PositionStore for MemoryStore {
    async fn advance(&self, key: &str, value: u64) -> StoreResult<u64> {
        // Kept as a counter, so `get` reads it as a decimal as on Redis.
        let new = i64::try_from(value).map_err(|_| StoreError::server("position past i64::MAX"))?;
        let mut shard = self.shard(key);
        let e = shard.plain.entry(key.into()).or_insert(Plain::Counter(new));
        let held = match e {
            Plain::Counter(c) if *c >= new => *c,
            other => {
                *other = Plain::Counter(new);
                new
            }
        };
        Ok(held as u64)
    }

    async fn rewind(&self, key: &str, from: u64, to: u64) -> StoreResult<bool> {
        let to = i64::try_from(to).map_err(|_| StoreError::server("position past i64::MAX"))?;
        let mut shard = self.shard(key);
        match shard.plain.get_mut(key) {
            Some(Plain::Counter(c)) if u64::try_from(*c).ok() == Some(from) => {
                *c = to;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[async_trait]
impl RateStore for MemoryStore {
    async fn rate(&self, key: &str, limit: u32, period: Duration) -> StoreResult<RateDecision> {
        // As the script, on this store's clock: the arrival time is kept as
        // a plain value (µs since the store started) that expires when the
        // limit is whole again, so the byte bound covers it too.
        let now = self.now();
        let now_us = now.duration_since(self.inner.started).as_micros() as u64;
        let tick = self.tick(now);
        let mut shard = self.shard(key);
        shard.sweep(now);
        let decision = shard.with_slot(key, now, tick, |slot| {
            let tat = slot
                .value
                .as_ref()
                .filter(|t| t.live(now))
                .and_then(|t| std::str::from_utf8(&t.v).ok()?.parse().ok());
            let (d, after) = crate::store::gcra(tat, now_us, limit, period);
            if let Some(after) = after {
                slot.value = Some(timed(
                    Bytes::from(after.to_string()),
                    now,
                    Duration::from_micros(after - now_us) + Duration::from_millis(1),
                ));
            }
            d
        });
        self.evict(&mut shard, key);
        Ok(decision)
    }
}

#[async_trait]
impl CounterStore for MemoryStore {
    async fn incr(&self, counters: &[(&str, i64)]) -> StoreResult<()> {
        for (k, by) in counters {
            let mut shard = self.shard(k);
            let e = shard.plain.entry((*k).into()).or_insert(Plain::Counter(0));
            match e {
                Plain::Counter(c) => *c += by,
                other => *other = Plain::Counter(*by),
            }
        }
        Ok(())
    }

    async fn counters(&self, keys: &[&str]) -> StoreResult<Vec<i64>> {
        Ok(keys
            .iter()
            .map(|k| match self.shard(k).plain.get(*k) {
                Some(Plain::Counter(c)) => *c,
                _ => 0,
            })
            .collect())
    }
}

#[async_trait]
impl LockStore for MemoryStore {
    async fn lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let now = self.now();
        let mut shard = self.shard(key);
        let held = matches!(shard.plain.get(key), Some(Plain::Value(t)) if t.live(now));
        if held {
            return Ok(false);
        }
        shard.plain.insert(
            key.into(),
            Plain::Value(timed(Bytes::copy_from_slice(token.as_bytes()), now, ttl)),
        );
        Ok(true)
    }

    async fn extend_lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let now = self.now();
        let mut shard = self.shard(key);
        match shard.plain.get_mut(key) {
            Some(Plain::Value(t)) if t.live(now) && t.v == token.as_bytes() => {
                t.until = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn unlock(&self, key: &str, token: &str) -> StoreResult<()> {
        let mut shard = self.shard(key);
        if matches!(shard.plain.get(key), Some(Plain::Value(t)) if t.v == token.as_bytes()) {
            shard.plain.remove(key);
        }
        Ok(())
    }
}

impl TrackingStore for MemoryStore {
    /// None: the store lives in this process, and every change to it goes
    /// through this process's cache, which evicts its own copies (the
    /// stamps copy checks [`StampStore::stamps_version`] instead).
    fn track(&self, _prefixes: Vec<String>, _sink: Weak<dyn TrackingSink>) -> Option<Tracking> {
        None
    }
}
