//! The Redis store's write-behind queue ([`QueueStore`]): a stream per
//! type, accepted with the entry in one script (two steps on a Cluster).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{Pipeline, Value};

use super::*;
use crate::key::{EntryKeys, KeyPattern};
use crate::store::{
    AcceptOutcome, AcceptRequest, DeadLetter, Durability, QueueEntry, QueueKeys, QueueStats,
    QueueStore, Retry, Settled, Store, StoreResult,
};

async fn ensure_group(conn: &Conn, queue: &QueueKeys) -> StoreResult<()> {
    // From id 0: entries accepted before the first flusher started are
    // delivered too (acknowledged ones were deleted).
    let r: redis::RedisResult<()> = conn
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&queue.stream)
                .arg(&queue.group)
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    match r {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
        _ => Ok(()),
    }
}

fn push_ack<'a>(
    pipe: &mut Pipeline,
    queue: &QueueKeys,
    ids: impl Iterator<Item = &'a String> + Clone,
) {
    if ids.clone().next().is_none() {
        return;
    }
    pipe.cmd("XACK").arg(&queue.stream).arg(&queue.group);
    for id in ids.clone() {
        pipe.arg(id);
    }
    pipe.cmd("XDEL").arg(&queue.stream);
    for id in ids {
        pipe.arg(id);
    }
}

fn entry_of(e: StreamId) -> Option<QueueEntry> {
    let text = |k: &str| match e.map.get(k)? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    Some(QueueEntry {
        id: text("id")?,
        version: text("v")?.parse().ok()?,
        attempts: text("a").and_then(|a| a.parse().ok()).unwrap_or(0),
        not_before_ms: text("at").and_then(|a| a.parse().ok()).unwrap_or(0),
        entry_id: e.id.clone(),
    })
}

/// Builds an accept's entry-slot step (everything but the queue entry);
/// `full` when the queue is past a limit (reported after the version
/// check).
fn accept_entry_invocation(pipe: &mut Pipeline, req: &AcceptRequest<'_>, full: bool) {
    entry_invocation(pipe, &ACCEPT_ENTRY, req.keys, |inv| {
        inv.arg(req.expected_version.to_string())
            .arg(&req.bytes[..])
            .arg(millis(req.lifetimes.ttl))
            .arg(req.lifetimes.stale_ttl.as_millis() as u64)
            .arg(if full { "1" } else { "0" });
    });
}

/// The dead-letter `XADD` of a letter, for Cluster (elsewhere it is part
/// of `settle_ack.lua`).
fn push_dead_letter(
    pipe: &mut Pipeline,
    queue: &QueueKeys,
    d: &Settled<'_>,
    error: &str,
    value: &[u8],
) {
    pipe.cmd("XADD")
        .arg(&queue.dead)
        .arg("*")
        .arg("key")
        .arg(&d.keys.value)
        .arg("id")
        .arg(d.id)
        .arg("v")
        .arg(d.version)
        .arg("error")
        .arg(error)
        .arg("value")
        .arg(value);
}

/// Appends `WAIT` when the accept asks for replicas.
fn push_wait(pipe: &mut Pipeline, req: &AcceptRequest<'_>) {
    if req.min_replicas > 0 {
        pipe.cmd("WAIT")
            .arg(req.min_replicas)
            .arg(req.replica_timeout.as_millis().max(1) as u64);
    }
}

/// The replica count `WAIT` answered, when it was sent.
fn wait_result(v: Option<Value>, req: &AcceptRequest<'_>) -> StoreResult<Option<u32>> {
    if req.min_replicas == 0 {
        return Ok(None);
    }
    match v {
        Some(Value::Int(n)) => Ok(Some(n.max(0) as u32)),
        Some(other) => Err(unexpected(&other)),
        None => Err(unexpected(&Value::Nil)),
    }
}

#[async_trait]
impl QueueStore for RedisStore {
    async fn accept(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome> {
        if self.inner.conn.is_cluster() {
            return self.accept_cluster(req).await;
        }
        let mut pipe = redis::pipe();
        let mut inv = ACCEPT.prepare_invoke();
        for k in req.keys.as_array() {
            inv.key(k);
        }
        inv.key(&req.queue.stream)
            .arg(req.expected_version.to_string())
            .arg(&req.bytes[..])
            .arg(req.version.to_string())
            .arg(millis(req.lifetimes.ttl))
            .arg(req.lifetimes.stale_ttl.as_millis() as u64)
            .arg(req.id)
            .arg(req.max_depth)
            .arg(req.max_age.as_millis() as u64);
        pipe.invoke_script(&inv);
        push_wait(&mut pipe, req);
        let mut results = self.run(&pipe).await?.into_iter();
        let v = results.next().unwrap_or(Value::Nil);
        let replicated = wait_result(results.next(), req)?;
        let Value::Array(parts) = &v else {
            return Err(unexpected(&v));
        };
        let num = |i: usize| {
            text_at(parts, i)
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match parts.first().map(as_int).transpose()? {
            Some(1) => Ok(AcceptOutcome::Accepted {
                entry_id: text_at(parts, 1).ok_or_else(|| unexpected(&v))?,
                replicated,
            }),
            Some(2) => Ok(AcceptOutcome::Conflict { current: num(1) }),
            Some(3) => Ok(AcceptOutcome::Full {
                depth: num(1),
                oldest_age: Duration::from_millis(num(2)),
            }),
            Some(4) => Ok(AcceptOutcome::Uncached),
            _ => Err(unexpected(&v)),
        }
    }

    fn accepts_atomically(&self) -> bool {
        !self.inner.conn.is_cluster()
    }

    async fn requeue_pending(&self, pattern: &KeyPattern, queue: &QueueKeys) -> StoreResult<u64> {
        let mut requeued = 0;
        // Pending copies have a prefix of their own: the scan returns them
        // only, not every key of the type.
        let mut scan = self.scan(&pattern.pending_scan_match()).await?;
        while let Some(keys) = self.scan_next(&mut scan).await? {
            let entries: Vec<(String, EntryKeys)> = keys
                .into_iter()
                .filter_map(|k| {
                    pattern
                        .entry_of(&k)
                        .filter(|e| e.pending == k)
                        .map(|e| (k, e))
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            let refs: Vec<&EntryKeys> = entries.iter().map(|(_, e)| e).collect();
            let copies = self.pending_copies(&refs).await?;
            let mut pipe = redis::pipe();
            for ((_, e), copy) in entries.iter().zip(copies) {
                let (Some(copy), Some(id)) = (copy, pattern.id_of(&e.value)) else {
                    continue;
                };
                let version = crate::codec::peek_version(&copy).unwrap_or(0);
                pipe.cmd("XADD")
                    .arg(&queue.stream)
                    .arg("*")
                    .arg("id")
                    .arg(id)
                    .arg("v")
                    .arg(version);
                requeued += 1;
            }
            if !pipe.is_empty() {
                self.run(&pipe).await?;
            }
        }
        Ok(requeued)
    }

    async fn pending_copies(&self, entries: &[&EntryKeys]) -> StoreResult<Vec<Option<Bytes>>> {
        let keys: Vec<&str> = entries.iter().map(|e| e.pending.as_str()).collect();
        self.get_many(&keys).await
    }

    async fn queue_read(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> StoreResult<Vec<QueueEntry>> {
        let block = block.min(MAX_BLOCK);
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg(&queue.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        // BLOCK 0 would wait forever: a zero wait is no BLOCK at all.
        if block >= Duration::from_millis(1) {
            c.arg("BLOCK").arg(block.as_millis() as u64);
        }
        c.arg("STREAMS").arg(&queue.stream).arg(">");
        let conn = &self.inner.conn;
        let reply: Option<StreamReadReply> = match conn.query_blocking(&c).await {
            Err(e) if e.code() == Some("NOGROUP") => {
                ensure_group(conn, queue).await?;
                conn.query_blocking(&c).await?
            }
            other => other?,
        };
        Ok(reply
            .map(|r| {
                r.keys
                    .into_iter()
                    .flat_map(|k| k.ids)
                    .filter_map(entry_of)
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn queue_claim(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<QueueEntry>> {
        let at = (queue.stream.clone(), queue.group.clone());
        let cursors = &self.inner.claim_cursors;
        let cursor_of = || {
            cursors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&at)
                .cloned()
                .unwrap_or_else(|| "0-0".to_owned())
        };
        let mut cursor = cursor_of();
        let mut out = Vec::new();
        // Each call looks at no more than 10 × COUNT pending entries: go on
        // from where the last one stopped, within this claim and across
        // claims, so idle entries behind many busy ones are reached too.
        for _ in 0..CLAIM_ROUNDS {
            let reply: redis::RedisResult<StreamAutoClaimReply> = self
                .inner
                .conn
                .query(
                    redis::cmd("XAUTOCLAIM")
                        .arg(&queue.stream)
                        .arg(&queue.group)
                        .arg(consumer)
                        .arg(min_idle.as_millis() as u64)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(count - out.len()),
                )
                .await;
            let r = match reply {
                Ok(r) => r,
                Err(e) if e.code() == Some("NOGROUP") => {
                    ensure_group(&self.inner.conn, queue).await?;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            out.extend(r.claimed.into_iter().filter_map(entry_of));
            let wrapped = r.next_stream_id == "0-0";
            cursor = r.next_stream_id;
            if wrapped || out.len() >= count {
                break;
            }
        }
        cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(at, cursor);
        Ok(out)
    }

    async fn queue_ack(&self, queue: &QueueKeys, done: &[Settled<'_>]) -> StoreResult<()> {
        if done.is_empty() {
            return Ok(());
        }
        if self.inner.conn.is_cluster() {
            return self.settle_then_ack(queue, done, "applied").await;
        }
        let mut pipe = redis::pipe();
        for d in done {
            settle_ack_invocation(&mut pipe, queue, d, "applied", None);
        }
        self.run(&pipe).await.map(drop)
    }

    async fn queue_dead_letter(
        &self,
        queue: &QueueKeys,
        letters: &[(Settled<'_>, &str, Bytes)],
        max_len: u64,
    ) -> StoreResult<u64> {
        if letters.is_empty() {
            return Ok(0);
        }
        if self.inner.conn.is_cluster() {
            // The dead-letter stream, the entries and the queue are in
            // three slots: the letter is written first (a crash after it
            // at worst writes it again), then each write is dropped, then
            // acknowledged.
            let mut pipe = redis::pipe();
            for (d, error, value) in letters {
                push_dead_letter(&mut pipe, queue, d, error, value);
            }
            self.run(&pipe).await?;
            let trimmed = self.trim_dead(queue, max_len).await?;
            let done: Vec<Settled<'_>> = letters.iter().map(|(d, ..)| d.clone()).collect();
            self.settle_then_ack(queue, &done, "dropped").await?;
            return Ok(trimmed);
        }
        let mut pipe = redis::pipe();
        for (d, error, value) in letters {
            settle_ack_invocation(
                &mut pipe,
                queue,
                d,
                "dropped",
                Some((error, value, max_len)),
            );
        }
        let mut trimmed = 0;
        for v in self.run(&pipe).await? {
            trimmed += as_int(&v)?.max(0) as u64;
        }
        Ok(trimmed)
    }

    async fn queue_retry(
        &self,
        queue: &QueueKeys,
        retries: &[Retry<'_>],
    ) -> StoreResult<Vec<String>> {
        if retries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in retries {
            let mut inv = RETRY.prepare_invoke();
            inv.key(&queue.stream)
                .arg(&queue.group)
                .arg(r.id)
                .arg(r.version.to_string())
                .arg(r.attempts)
                .arg(r.not_before_ms);
            for id in r.entry_ids {
                inv.arg(id);
            }
            pipe.invoke_script(&inv);
        }
        self.run_on_one_node(&pipe)
            .await?
            .into_iter()
            .map(|v| match &v {
                Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| unexpected(&v)),
                Value::SimpleString(t) => Ok(t.clone()),
                other => Err(unexpected(other)),
            })
            .collect()
    }

    async fn queue_stats(&self, queue: &QueueKeys) -> StoreResult<QueueStats> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&queue.stream);
        pipe.cmd("XRANGE")
            .arg(&queue.stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("XPENDING").arg(&queue.stream).arg(&queue.group);
        pipe.cmd("XLEN").arg(&queue.dead);
        let r = self.inner.conn.exec(&pipe).await?;
        let first_ms = match r.get(1) {
            Some(Ok(Value::Array(items))) => items.first().and_then(|e| match e {
                Value::Array(parts) => match parts.first() {
                    Some(Value::BulkString(id)) => std::str::from_utf8(id)
                        .ok()?
                        .split('-')
                        .next()?
                        .parse::<u64>()
                        .ok(),
                    _ => None,
                },
                _ => None,
            }),
            _ => None,
        };
        // XPENDING without a group (NOGROUP) means nothing was delivered yet.
        let in_flight = match r.get(2) {
            Some(Ok(Value::Array(parts))) => parts.first().map_or(0, |v| match v {
                Value::Int(n) => *n as u64,
                _ => 0,
            }),
            _ => 0,
        };
        // Entry ids carry the server's clock; compare with the same clock.
        let (secs, micros): (u64, u64) = self.query(&redis::cmd("TIME")).await?;
        let now_ms = secs * 1000 + micros / 1000;
        Ok(QueueStats {
            depth: int_result(r.first()),
            oldest_age_ms: first_ms.map_or(0, |ms| now_ms.saturating_sub(ms)),
            in_flight,
            dead_letters: int_result(r.get(3)),
        })
    }

    async fn dead_letters(&self, queue: &QueueKeys, count: usize) -> StoreResult<Vec<DeadLetter>> {
        let r: StreamRangeReply = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(&queue.dead)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        Ok(r.ids
            .into_iter()
            .map(|e| {
                let field = |k: &str| -> String {
                    match e.map.get(k) {
                        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                        Some(Value::SimpleString(s)) => s.clone(),
                        Some(Value::Int(n)) => n.to_string(),
                        _ => String::new(),
                    }
                };
                DeadLetter {
                    id: field("id"),
                    version: field("v").parse().unwrap_or(0),
                    error: field("error"),
                    value: field("value"),
                    entry_id: e.id,
                }
            })
            .collect())
    }

    async fn evicts_keys_without_ttl(&self) -> StoreResult<Option<String>> {
        let policy: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
            .await?;
        Ok(policy.get(1).filter(|p| p.starts_with("allkeys-")).cloned())
    }

    async fn durability(&self) -> StoreResult<Durability> {
        let aof: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("appendonly"))
            .await?;
        if aof.get(1).map(String::as_str) != Some("yes") {
            return Ok(Durability::Volatile);
        }
        let fsync: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("appendfsync"))
            .await?;
        Ok(Durability::Logged {
            fsync: fsync.get(1).cloned().unwrap_or_default(),
        })
    }
}

impl RedisStore {
    /// Cluster accept: the entry's keys and the queue live in different
    /// slots, so the step is split. The queue's limits are checked first,
    /// then the entry is compare-and-set (value, stale and pending copies),
    /// then the queue entry is appended. A crash between the last two
    /// leaves a pending copy with no queue entry; flushers re-queue such
    /// copies ([`QueueStore::requeue_pending`]), so the write still lands.
    async fn accept_cluster(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome> {
        let mut full = None;
        if req.max_depth > 0 || !req.max_age.is_zero() {
            let stats = self.queue_stats(req.queue).await?;
            if (req.max_depth > 0 && stats.depth >= req.max_depth)
                || (!req.max_age.is_zero()
                    && stats.depth > 0
                    && stats.oldest_age_ms >= req.max_age.as_millis() as u64)
            {
                full = Some(AcceptOutcome::Full {
                    depth: stats.depth,
                    oldest_age: Duration::from_millis(stats.oldest_age_ms),
                });
            }
        }
        let mut pipe = redis::pipe();
        // The script checks the version first and reports the queue full
        // only for a write that matched, as the one-server script does.
        accept_entry_invocation(&mut pipe, req, full.is_some());
        // WAIT has no key: it goes with the script to the entry's primary,
        // which holds the pending copy that must survive a failover (a
        // queue entry lost with the stream's primary is re-queued from it).
        push_wait(&mut pipe, req);
        let mut results = self.run_on_one_node(&pipe).await?.into_iter();
        let v = results.next().unwrap_or(Value::Nil);
        let replicated = wait_result(results.next(), req)?;
        let Value::Array(parts) = &v else {
            return Err(unexpected(&v));
        };
        match parts.first().map(as_int).transpose()? {
            Some(1) => {}
            Some(2) => {
                return Ok(AcceptOutcome::Conflict {
                    current: text_at(parts, 1).and_then(|t| t.parse().ok()).unwrap_or(0),
                });
            }
            Some(3) => return full.ok_or_else(|| unexpected(&v)),
            Some(4) => return Ok(AcceptOutcome::Uncached),
            _ => return Err(unexpected(&v)),
        }
        let entry_id: String = self
            .query(
                redis::cmd("XADD")
                    .arg(&req.queue.stream)
                    .arg("*")
                    .arg("id")
                    .arg(req.id)
                    .arg("v")
                    .arg(req.version),
            )
            .await?;
        Ok(AcceptOutcome::Accepted {
            entry_id,
            replicated,
        })
    }
}

impl RedisStore {
    /// Cluster: settles each entity's pending copy, then acknowledges the
    /// queue entries of those whose settle step ran; an entity whose step
    /// failed keeps its entries queued, to be delivered again.
    async fn settle_then_ack(
        &self,
        queue: &QueueKeys,
        done: &[Settled<'_>],
        mode: &str,
    ) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        for d in done {
            entry_invocation(&mut pipe, &SETTLE, d.keys, |inv| {
                inv.arg(d.version.to_string()).arg(mode);
            });
        }
        let results = self.run_results(&pipe, false).await?;
        let mut first_error = None;
        let mut settled = Vec::new();
        for (d, r) in done.iter().zip(results) {
            match r {
                Ok(_) => settled.push(d),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let mut ack = redis::pipe();
        push_ack(
            &mut ack,
            queue,
            settled.iter().flat_map(|d| d.entry_ids.iter()),
        );
        if !ack.is_empty() {
            self.run(&ack).await?;
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Cluster: bounds the dead-letter stream; returns how many it trimmed.
    async fn trim_dead(&self, queue: &QueueKeys, max_len: u64) -> StoreResult<u64> {
        if max_len == 0 {
            return Ok(0);
        }
        let n: u64 = self
            .query(
                redis::cmd("XTRIM")
                    .arg(&queue.dead)
                    .arg("MAXLEN")
                    .arg(max_len),
            )
            .await?;
        Ok(n)
    }
}

/// Builds the one-server step that settles an entity and acknowledges its
/// queue entries (`settle_ack.lua`); a dead letter carries its error, value
/// and the dead-letter stream's bound.
fn settle_ack_invocation(
    pipe: &mut Pipeline,
    queue: &QueueKeys,
    d: &Settled<'_>,
    mode: &str,
    letter: Option<(&str, &Bytes, u64)>,
) {
    let mut inv = SETTLE_ACK.prepare_invoke();
    for k in d.keys.as_array() {
        inv.key(k);
    }
    inv.key(&queue.stream)
        .key(&queue.dead)
        .arg(d.version.to_string())
        .arg(mode)
        .arg(&queue.group)
        .arg(d.entry_ids.len());
    for id in d.entry_ids {
        inv.arg(id);
    }
    if let Some((error, value, max_len)) = letter {
        inv.arg(&d.keys.value)
            .arg(d.id)
            .arg(error)
            .arg(&value[..])
            .arg(max_len);
    }
    pipe.invoke_script(&inv);
}
