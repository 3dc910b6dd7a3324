//! The Redis store's entry protocol ([`Store`]): one Lua script per entry
//! step, batches pipelined.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::error::StoreError;
use crate::key::{EntryKeys, KeyPattern};
use crate::store::{
    AcquireRequest, Acquired, FillOutcome, FillRequest, Store, StoreResult, UpdateOutcome,
    UpdateRequest,
};

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str, refresh: Option<Duration>) -> StoreResult<Option<Bytes>> {
        let wrong_type = |e: StoreError| match e.kind() {
            crate::error::StoreErrorKind::WrongType => StoreError::wrong_type(key),
            _ => e,
        };
        let mut cmd = match refresh {
            Some(ttl) => {
                if let Some(stale) = self.stale_companion(key) {
                    // One script, still one round trip: the value's TTL
                    // and the stale copy's end move together.
                    let mut pipe = redis::pipe();
                    pipe.invoke_script(GET_REFRESH.key(key).key(stale).arg(millis(ttl)));
                    let v = self.run(&pipe).await.map_err(wrong_type)?;
                    return Ok(v.into_iter().next().and_then(as_bytes));
                }
                let mut c = redis::cmd("GETEX");
                c.arg(key).arg("PX").arg(millis(ttl));
                c
            }
            None => redis::cmd("GET"),
        };
        if refresh.is_none() {
            cmd.arg(key);
        }
        let v: Option<Vec<u8>> = self
            .inner
            .conn
            .query(&cmd)
            .await
            .map_err(|e| wrong_type(StoreError::from(e)))?;
        Ok(v.map(Bytes::from))
    }

    async fn get_many(&self, keys: &[&str]) -> StoreResult<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // On Cluster, MGET is split by slot and put back together in order.
        let vals: Vec<Option<Vec<u8>>> = self.query(redis::cmd("MGET").arg(keys)).await?;
        Ok(vals.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn acquire(&self, reqs: &[AcquireRequest<'_>]) -> StoreResult<Vec<Acquired>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in reqs {
            entry_invocation(&mut pipe, &ACQUIRE, r.keys, |inv| {
                inv.arg(r.token)
                    .arg(millis(r.lease_ttl))
                    .arg(millis(r.value_ttl));
            });
        }
        self.run(&pipe)
            .await?
            .into_iter()
            .map(|v| {
                let Value::Array(mut parts) = v else {
                    return Err(unexpected(&v));
                };
                let code = parts.first().map(as_int).transpose()?.unwrap_or(0);
                let second = if parts.len() > 1 {
                    as_bytes(parts.swap_remove(1))
                } else {
                    None
                };
                match code {
                    1 => second
                        .map(Acquired::Value)
                        .ok_or_else(|| unexpected(&Value::Int(1))),
                    2 => Ok(Acquired::Absent),
                    3 => Ok(Acquired::Leased { stale: second }),
                    4 => Ok(Acquired::Busy { stale: second }),
                    _ => Err(unexpected(&Value::Int(code))),
                }
            })
            .collect()
    }

    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        self.fill_as(reqs, false).await
    }

    async fn refill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        self.fill_as(reqs, true).await
    }

    async fn refresh_lease(
        &self,
        keys: &EntryKeys,
        token: &str,
        ttl: Duration,
        seen_expires_ms: u64,
    ) -> StoreResult<bool> {
        let mut pipe = redis::pipe();
        entry_invocation(&mut pipe, &REFRESH_LEASE, keys, |inv| {
            inv.arg(token)
                .arg(millis(ttl))
                .arg(seen_expires_ms.to_string());
        });
        let v = self.run(&pipe).await?;
        Ok(v.first().map(as_int).transpose()?.unwrap_or(0) == 1)
    }

    async fn release(&self, entries: &[(&EntryKeys, &str)]) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (keys, token) in entries {
            pipe.invoke_script(RELEASE.key(&keys.lease).arg(*token));
        }
        self.run(&pipe).await.map(drop)
    }

    async fn update(&self, reqs: &[UpdateRequest<'_>]) -> StoreResult<Vec<UpdateOutcome>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in reqs {
            entry_invocation(&mut pipe, &UPDATE, r.keys, |inv| {
                inv.arg(&r.bytes[..])
                    .arg(r.version.to_string())
                    .arg(millis(r.lifetimes.ttl))
                    .arg(r.lifetimes.stale_ttl.as_millis() as u64);
            });
        }
        self.run(&pipe)
            .await?
            .iter()
            .map(|v| match as_int(v)? {
                1 => Ok(UpdateOutcome::Stored),
                0 => Ok(UpdateOutcome::NotCached),
                2 => Ok(UpdateOutcome::NotNewer),
                _ => Err(unexpected(v)),
            })
            .collect()
    }

    async fn invalidate(&self, entries: &[&EntryKeys]) -> StoreResult<u64> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for keys in entries {
            entry_invocation(&mut pipe, &INVALIDATE, keys, |_| {});
        }
        let mut n = 0;
        for v in self.run(&pipe).await? {
            n += as_int(&v)? as u64;
        }
        Ok(n)
    }

    async fn invalidate_older(&self, entries: &[(&EntryKeys, Option<u64>)]) -> StoreResult<u64> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for (keys, version) in entries {
            entry_invocation(&mut pipe, &INVALIDATE_OLDER, keys, |inv| {
                inv.arg(version.map_or_else(String::new, |v| v.to_string()));
            });
        }
        let mut n = 0;
        for v in self.run(&pipe).await? {
            if as_int(&v)? == 1 {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn invalidate_matching(&self, pattern: &KeyPattern) -> StoreResult<u64> {
        let mut deleted = 0;
        let mut scan = self.scan(&pattern.scan_match()).await?;
        while let Some(keys) = self.scan_next(&mut scan).await? {
            let mut seen = HashSet::new();
            let entries: Vec<EntryKeys> = keys
                .iter()
                .filter_map(|k| pattern.entry_of(k))
                .filter(|e| seen.insert(e.value.clone()))
                .collect();
            let refs: Vec<&EntryKeys> = entries.iter().collect();
            // The true count: how many values the deletes found, not how
            // many keys the scan listed.
            deleted += self.invalidate(&refs).await?;
        }
        Ok(deleted)
    }

    async fn sweep(&self, pattern: &KeyPattern, epoch: u64) -> StoreResult<u64> {
        let mut removed = 0;
        let epoch = epoch.to_string();
        let mut scan = self.scan(&pattern.scan_match()).await?;
        while let Some(keys) = self.scan_next(&mut scan).await? {
            let mut seen = HashSet::new();
            let entries: Vec<EntryKeys> = keys
                .iter()
                .filter_map(|k| pattern.entry_of(k))
                .filter(|e| seen.insert(e.value.clone()))
                .collect();
            if entries.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for keys in &entries {
                entry_invocation(&mut pipe, &SWEEP, keys, |inv| {
                    inv.arg(&epoch);
                });
            }
            for v in self.run(&pipe).await? {
                removed += as_int(&v)? as u64;
            }
        }
        Ok(removed)
    }

    async fn count_matching(&self, _pattern: &KeyPattern) -> StoreResult<Option<u64>> {
        // Counting a namespace's keys would walk the whole keyspace (SCAN):
        // not done for a clear, which must stay one step.
        Ok(None)
    }

    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(DISCARD.key(key).arg(&seen[..]));
        self.run(&pipe).await.map(drop)
    }

    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()> {
        self.query::<()>(
            redis::cmd("SET")
                .arg(key)
                .arg(&bytes[..])
                .arg("PX")
                .arg(millis(ttl)),
        )
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.query::<()>(&redis::cmd("PING")).await
    }

    fn needs_hash_tags(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    fn bounds_own_latency(&self) -> bool {
        // One server: every command is bounded by the response timeout and
        // a reconnect by one connect timeout. Cluster redirections and
        // Sentinel look-ups are not, so those keep the cache's timer.
        self.inner.conn.topology() == "redis"
    }

    fn describe(&self) -> &'static str {
        self.inner.conn.topology()
    }
}
