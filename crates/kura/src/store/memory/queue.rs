//! The memory store's write-behind queue ([`QueueStore`]): one in-process
//! queue per stream, with delivery, claims, acknowledgements and dead
//! letters as a Redis stream has them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::key::{EntryKeys, KeyPattern};
use crate::store::{
    AcceptOutcome, AcceptRequest, DeadLetter, Durability, QueueEntry, QueueKeys, QueueStats,
    QueueStore, Retry, Settled, StoreResult,
};

type EntryId = (u64, u64);

fn id_string((ms, seq): EntryId) -> String {
    format!("{ms}-{seq}")
}

fn parse_id(s: &str) -> Option<EntryId> {
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a queue entry holds (the fields of a Redis stream entry).
#[derive(Debug, Clone)]
struct Queued {
    id: String,
    version: u64,
    attempts: u32,
    not_before_ms: u64,
}

impl Queued {
    fn entry(&self, at: EntryId) -> QueueEntry {
        QueueEntry {
            entry_id: id_string(at),
            id: self.id.clone(),
            version: self.version,
            attempts: self.attempts,
            not_before_ms: self.not_before_ms,
        }
    }
}

/// A stream with one consumer group, as the write-behind queue uses it.
#[derive(Debug, Default)]
pub(super) struct MemQueue {
    last: EntryId,
    entries: BTreeMap<EntryId, Queued>,
    /// The group's last delivered id.
    delivered: EntryId,
    /// Delivered, not acknowledged: consumer and delivery time.
    in_flight: BTreeMap<EntryId, (String, Instant)>,
    dead: std::collections::VecDeque<DeadLetter>,
}

impl MemQueue {
    /// The next entry id: milliseconds, then a sequence within one.
    fn next_id(&mut self) -> EntryId {
        let ms = epoch_ms();
        let next = if ms > self.last.0 {
            (ms, 0)
        } else {
            (self.last.0, self.last.1 + 1)
        };
        self.last = next;
        next
    }

    fn push(&mut self, q: Queued) -> String {
        let at = self.next_id();
        self.entries.insert(at, q);
        id_string(at)
    }

    fn oldest_age_ms(&self) -> u64 {
        self.entries
            .keys()
            .next()
            .map_or(0, |(ms, _)| epoch_ms().saturating_sub(*ms))
    }

    fn remove(&mut self, ids: &[String]) {
        for id in ids.iter().filter_map(|s| parse_id(s)) {
            self.entries.remove(&id);
            self.in_flight.remove(&id);
        }
    }
}

#[async_trait]
impl QueueStore for MemoryStore {
    async fn accept(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome> {
        let queues = &self.inner.queues;
        let out = self.step(req.keys, |slot, now| {
            // The version first, then the queue's limits (as accept.lua).
            let cur = slot.pending.as_ref().or(slot.value.as_ref().map(|t| &t.v));
            let Some(cur) = cur else {
                return AcceptOutcome::Uncached;
            };
            let cv = peek_version(cur).unwrap_or(0);
            if cv != req.expected_version {
                return AcceptOutcome::Conflict { current: cv };
            }
            let mut qs = lock(queues);
            let q = qs.entry(req.queue.stream.clone()).or_default();
            let depth = q.entries.len() as u64;
            let age = q.oldest_age_ms();
            if (req.max_depth > 0 && depth >= req.max_depth)
                || (!req.max_age.is_zero() && depth > 0 && age >= req.max_age.as_millis() as u64)
            {
                return AcceptOutcome::Full {
                    depth,
                    oldest_age: Duration::from_millis(age),
                };
            }
            slot.lease = None;
            slot.absent = None;
            slot.value = Some(timed(req.bytes.clone(), now, req.lifetimes.ttl));
            slot.stale = (!req.lifetimes.stale_ttl.is_zero())
                .then(|| timed(req.bytes.clone(), now, req.lifetimes.stale_ttl));
            slot.pending = Some(req.bytes.clone());
            AcceptOutcome::Accepted {
                entry_id: q.push(Queued {
                    id: req.id.to_owned(),
                    version: req.version,
                    attempts: 0,
                    not_before_ms: 0,
                }),
                // An in-process store has no replicas to confirm anything.
                replicated: (req.min_replicas > 0).then_some(0),
            }
        });
        if matches!(out, AcceptOutcome::Accepted { .. }) {
            self.inner.queued.notify_waiters();
        }
        Ok(out)
    }

    async fn pending_copies(&self, entries: &[&EntryKeys]) -> StoreResult<Vec<Option<Bytes>>> {
        let now = self.now();
        let tick = self.tick(now);
        Ok(entries
            .iter()
            .map(|e| {
                let mut shard = self.shard(&e.value);
                shard
                    .peek(&e.value, now, tick, |slot| slot.pending.clone())
                    .flatten()
            })
            .collect())
    }

    async fn queue_read(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> StoreResult<Vec<QueueEntry>> {
        let deadline = Instant::now() + block;
        loop {
            // Register interest before looking, so an accept between the
            // look and the wait is not missed.
            let notified = self.inner.queued.notified();
            {
                let mut qs = lock(&self.inner.queues);
                let q = qs.entry(queue.stream.clone()).or_default();
                let from = q.delivered;
                let got: Vec<(EntryId, Queued)> = q
                    .entries
                    .range((std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded))
                    .take(count)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                if let Some((last, _)) = got.last() {
                    q.delivered = *last;
                    let now = Instant::now();
                    for (k, _) in &got {
                        q.in_flight.insert(*k, (consumer.to_owned(), now));
                    }
                    return Ok(got.into_iter().map(|(k, e)| e.entry(k)).collect());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    async fn queue_claim(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<QueueEntry>> {
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        let now = Instant::now();
        let idle: Vec<EntryId> = q
            .in_flight
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= min_idle)
            .map(|(k, _)| *k)
            .take(count)
            .collect();
        let mut out = Vec::new();
        for k in idle {
            match q.entries.get(&k) {
                Some(e) => {
                    out.push(e.entry(k));
                    q.in_flight.insert(k, (consumer.to_owned(), now));
                }
                None => {
                    q.in_flight.remove(&k);
                }
            }
        }
        Ok(out)
    }

    async fn queue_ack(&self, queue: &QueueKeys, done: &[Settled<'_>]) -> StoreResult<()> {
        for d in done {
            self.step(d.keys, |slot, _| {
                if slot.pending.as_ref().and_then(|p| peek_version(p)) == Some(d.version) {
                    slot.pending = None;
                }
            });
        }
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        for d in done {
            q.remove(d.entry_ids);
        }
        Ok(())
    }

    async fn queue_dead_letter(
        &self,
        queue: &QueueKeys,
        letters: &[(Settled<'_>, &str, Bytes)],
        max_len: u64,
    ) -> StoreResult<u64> {
        for (d, ..) in letters {
            self.step(d.keys, |slot, _| {
                if slot.pending.as_ref().and_then(|p| peek_version(p)) == Some(d.version) {
                    slot.pending = None;
                    slot.value = None;
                    slot.stale = None;
                    slot.lease = None;
                }
            });
        }
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        let mut trimmed = 0;
        for (d, error, value) in letters {
            // Dead letters live apart from the queue itself; they take the
            // next id of its clock, as XADD on the dead-letter stream would.
            let entry_id = id_string(q.next_id());
            q.dead.push_back(DeadLetter {
                entry_id,
                id: d.id.to_owned(),
                version: d.version,
                error: (*error).to_owned(),
                value: String::from_utf8_lossy(value).into_owned(),
            });
            q.remove(d.entry_ids);
            while max_len > 0 && q.dead.len() as u64 > max_len {
                q.dead.pop_front();
                trimmed += 1;
            }
        }
        Ok(trimmed)
    }

    async fn queue_retry(
        &self,
        queue: &QueueKeys,
        retries: &[Retry<'_>],
    ) -> StoreResult<Vec<String>> {
        let mut qs = lock(&self.inner.queues);
        let q = qs.entry(queue.stream.clone()).or_default();
        let ids = retries
            .iter()
            .map(|r| {
                q.remove(r.entry_ids);
                q.push(Queued {
                    id: r.id.to_owned(),
                    version: r.version,
                    attempts: r.attempts,
                    not_before_ms: r.not_before_ms,
                })
            })
            .collect();
        drop(qs);
        self.inner.queued.notify_waiters();
        Ok(ids)
    }

    async fn queue_stats(&self, queue: &QueueKeys) -> StoreResult<QueueStats> {
        let qs = lock(&self.inner.queues);
        Ok(qs
            .get(&queue.stream)
            .map_or_else(QueueStats::default, |q| QueueStats {
                depth: q.entries.len() as u64,
                oldest_age_ms: q.oldest_age_ms(),
                in_flight: q.in_flight.len() as u64,
                dead_letters: q.dead.len() as u64,
            }))
    }

    async fn dead_letters(&self, queue: &QueueKeys, count: usize) -> StoreResult<Vec<DeadLetter>> {
        let qs = lock(&self.inner.queues);
        Ok(qs
            .get(&queue.stream)
            .map(|q| q.dead.iter().rev().take(count).cloned().collect())
            .unwrap_or_default())
    }

    async fn requeue_pending(&self, _pattern: &KeyPattern, _queue: &QueueKeys) -> StoreResult<u64> {
        // Accept stores the pending copy and the queue entry in one step, so
        // no pending copy is ever without its queue entry.
        Ok(0)
    }

    async fn durability(&self) -> StoreResult<Durability> {
        Ok(Durability::Volatile)
    }

    async fn evicts_keys_without_ttl(&self) -> StoreResult<Option<String>> {
        // Eviction never drops a pending copy or a queue.
        Ok(None)
    }
}
