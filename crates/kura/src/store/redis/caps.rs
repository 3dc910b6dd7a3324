//! The Redis store's capabilities besides the entry protocol: stamps,
//! positions, rate limits, counters, locks and client tracking.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::*;
use crate::store::{
    CounterStore, LockStore, PositionStore, RateDecision, RateStore, StampStore, StoreResult,
    Tracking, TrackingSink, TrackingStore,
};

#[async_trait]
impl StampStore for RedisStore {
    async fn stamps(&self, key: &str) -> StoreResult<Vec<(String, u64)>> {
        let fields: Vec<(String, String)> = self.query(redis::cmd("HGETALL").arg(key)).await?;
        Ok(fields
            .into_iter()
            .filter_map(|(f, v)| Some((f, v.parse().ok()?)))
            .collect())
    }

    async fn bump_stamp(&self, key: &str, field: &str, held: u64) -> StoreResult<u64> {
        let v = self
            .run_one(BUMP_STAMP.key(key).arg(field).arg(held))
            .await?;
        Ok(as_int(&v)?.max(0) as u64)
    }

    fn stamps_version(&self) -> Option<u64> {
        // Shared with other processes: changes are learnt from the stream.
        None
    }
}

#[async_trait]
impl PositionStore for RedisStore {
    async fn advance(&self, key: &str, value: u64) -> StoreResult<u64> {
        let v = self
            .run_one(ADVANCE.key(key).arg(value.to_string()))
            .await?;
        text_at(std::slice::from_ref(&v), 0)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| unexpected(&v))
    }

    async fn rewind(&self, key: &str, from: u64, to: u64) -> StoreResult<bool> {
        let v = self
            .run_one(REWIND.key(key).arg(from.to_string()).arg(to.to_string()))
            .await?;
        Ok(as_int(&v)? == 1)
    }
}

#[async_trait]
impl RateStore for RedisStore {
    async fn rate(&self, key: &str, limit: u32, period: Duration) -> StoreResult<RateDecision> {
        let (step, period) = crate::store::rate_steps(limit, period);
        let v = self.run_one(GCRA.key(key).arg(step).arg(period)).await?;
        let Value::Array(parts) = &v else {
            return Err(unexpected(&v));
        };
        let n = |i: usize| {
            parts
                .get(i)
                .map(as_int)
                .transpose()
                .map(|x| x.unwrap_or(0).max(0) as u64)
        };
        Ok(RateDecision {
            allowed: n(0)? == 1,
            remaining: u32::try_from(n(1)?).unwrap_or(u32::MAX),
            reset: Duration::from_micros(n(2)?),
            retry_after: Duration::from_micros(n(3)?),
        })
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn incr(&self, counters: &[(&str, i64)]) -> StoreResult<()> {
        if counters.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (k, by) in counters {
            pipe.cmd("INCRBY").arg(*k).arg(*by);
        }
        self.run(&pipe).await.map(drop)
    }

    async fn counters(&self, keys: &[&str]) -> StoreResult<Vec<i64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let vals: Vec<Option<i64>> = self.query(redis::cmd("MGET").arg(keys)).await?;
        Ok(vals.into_iter().map(Option::unwrap_or_default).collect())
    }
}

#[async_trait]
impl LockStore for RedisStore {
    async fn lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let r: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl)),
            )
            .await?;
        Ok(r.is_some())
    }

    async fn extend_lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(EXTEND_LOCK.key(key).arg(token).arg(millis(ttl)));
        let v = self.run(&pipe).await?;
        Ok(v.first().map(as_int).transpose()?.unwrap_or(0) == 1)
    }

    async fn unlock(&self, key: &str, token: &str) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(RELEASE.key(key).arg(token));
        self.run(&pipe).await.map(drop)
    }
}

impl TrackingStore for RedisStore {
    fn track(
        &self,
        prefixes: Vec<String>,
        sink: std::sync::Weak<dyn TrackingSink>,
    ) -> Option<Tracking> {
        super::tracking::spawn(self.inner.conn.clone(), self.inner.timeouts, prefixes, sink)
    }
}
