//! The [`Flusher`]: reads the queue, coalesces writes of one key, applies
//! batches to the database through a [`Sink`] with a version guard, and
//! settles what the database took (acknowledged, or retried, or dead
//! letters).

use super::*;

/// The longest back-off of a refused row.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Milliseconds since the Unix epoch (retry times travel with the queue
/// entry, so every flusher honours them).
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a flusher did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Queue entries read (new and reclaimed).
    pub entries: u64,
    /// Rows written to the database.
    pub flushed: u64,
    /// Rows the database already had (replays).
    pub superseded: u64,
    /// Entries folded into a newer write of the same key.
    pub coalesced: u64,
    /// Batch retries after the database was unavailable.
    pub retried: u64,
    /// Rows the database refused, put back at the end of the queue for a
    /// later attempt.
    pub requeued: u64,
    /// Rows moved to the dead-letter stream.
    pub dead_lettered: u64,
}

/// Sums reports, e.g. of several flushers or of repeated
/// [`Flusher::flush_once`] calls.
impl std::ops::AddAssign for FlushReport {
    fn add_assign(&mut self, o: FlushReport) {
        self.entries += o.entries;
        self.flushed += o.flushed;
        self.superseded += o.superseded;
        self.coalesced += o.coalesced;
        self.retried += o.retried;
        self.requeued += o.requeued;
        self.dead_lettered += o.dead_lettered;
    }
}

/// Applies a write-behind queue to the database; made by
/// [`WriteBehind::flusher`]. Run several (in one process or many) to share
/// the load.
#[must_use]
pub struct Flusher<S: Source, K: Sink<Value = S::Value>> {
    pub(super) wb: WriteBehind<S>,
    pub(super) sink: Arc<K>,
    pub(super) consumer: String,
    pub(super) batch_size: usize,
    pub(super) linger: Duration,
    pub(super) block: Duration,
    pub(super) claim_idle: Duration,
    pub(super) max_attempts: u32,
    pub(super) retry_backoff: Duration,
    /// Entries delivered to this flusher that wait for their retry time
    /// (still pending for it in the queue).
    pub(super) held: Vec<QueueEntry>,
    /// How often pending copies are re-queued on stores whose accept is
    /// not atomic.
    pub(super) sweep_every: Duration,
    pub(super) last_sweep: Option<Instant>,
}

impl<S: Source, K: Sink<Value = S::Value>> std::fmt::Debug for Flusher<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("consumer", &self.consumer)
            .field("batch_size", &self.batch_size)
            .field("claim_idle", &self.claim_idle)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl<S: Source, K: Sink<Value = S::Value>> Flusher<S, K> {
    /// The consumer name (unique per flusher by default).
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// Most entries per database transaction (default 256).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How long to wait for more entries once one arrived (default 20 ms).
    pub fn linger(mut self, d: Duration) -> Self {
        self.linger = d;
        self
    }

    /// How long a read waits for entries when the queue is empty (default
    /// 1 s; also the longest a shutdown waits for an idle flusher).
    pub fn block(mut self, d: Duration) -> Self {
        self.block = d;
        self
    }

    /// After how long an unacknowledged entry of another flusher is taken
    /// over (default 30 s). Longer than the slowest batch.
    pub fn claim_idle(mut self, d: Duration) -> Self {
        self.claim_idle = d;
        self
    }

    /// How often, on a store whose accept is not one atomic step (Redis
    /// Cluster), pending copies are re-queued in case a crash separated a
    /// copy from its queue entry (default 60 s).
    pub fn sweep_every(mut self, d: Duration) -> Self {
        self.sweep_every = d;
        self
    }

    /// Rejections of one write before it is dead-lettered (default 5).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The wait before the first retry of a row the database refused
    /// (default 1 s), doubled at each further refusal. It is kept below
    /// half the claim idle time and half the queue's age limit (and 30 s),
    /// so a waiting row is neither taken over by another flusher nor, being
    /// back at the end of the queue, ever the reason the queue is refused.
    pub fn retry_backoff(mut self, d: Duration) -> Self {
        self.retry_backoff = d;
        self
    }

    /// The back-off after the `attempt`-th refusal.
    fn backoff(&self, attempt: u32) -> Duration {
        let mut cap = MAX_RETRY_BACKOFF.min(self.claim_idle / 2);
        let max_age = self.wb.limits.max_age;
        if !max_age.is_zero() {
            cap = cap.min(max_age / 2);
        }
        self.retry_backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(cap)
    }

    /// Splits entries read from the queue into those due now (`into`) and
    /// those to hold until their retry time.
    fn sort_in(&mut self, got: Vec<QueueEntry>, into: &mut Vec<QueueEntry>) {
        let now = epoch_ms();
        let cap = self.backoff(u32::MAX).as_millis() as u64;
        for mut e in got {
            if self.held.iter().any(|h| h.entry_id == e.entry_id)
                || into.iter().any(|h| h.entry_id == e.entry_id)
            {
                continue;
            }
            if e.not_before_ms > now {
                // A clock far ahead on the flusher that set it must not
                // park the row for longer than a back-off.
                e.not_before_ms = e.not_before_ms.min(now + cap);
                self.held.push(e);
            } else {
                into.push(e);
            }
        }
    }

    /// Held entries whose retry time has come.
    fn take_due(&mut self) -> Vec<QueueEntry> {
        let now = epoch_ms();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|e| e.not_before_ms <= now);
        self.held = wait;
        due
    }

    /// How long until the first held entry is due.
    fn next_due(&self) -> Option<Duration> {
        let now = epoch_ms();
        self.held
            .iter()
            .map(|e| Duration::from_millis(e.not_before_ms.saturating_sub(now)))
            .min()
    }

    /// Runs until `shutdown` completes, then finishes the batch in hand
    /// (never half-applies one) and returns. Entries not yet applied stay
    /// queued for the next flusher.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> FlushReport {
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.store(true, Ordering::Release);
            }
        };
        let work = async {
            let mut total = FlushReport::default();
            let mut last_claim: Option<Instant> = None;
            let mut backoff = Duration::from_millis(100);
            while !stop.load(Ordering::Acquire) {
                let claim = last_claim.is_none_or(|t| t.elapsed() >= self.claim_idle / 2);
                if claim {
                    last_claim = Some(Instant::now());
                }
                match self.step(claim, &stop).await {
                    Ok(r) => {
                        total += r;
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "write-behind flush step failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            total
        };
        tokio::pin!(watcher);
        tokio::pin!(work);
        let mut watching = true;
        loop {
            tokio::select! {
                r = &mut work => return r,
                () = &mut watcher, if watching => watching = false,
            }
        }
    }

    /// Reads one batch (reclaiming idle entries first when `claim`), applies
    /// it and acknowledges it. Useful for tests and one-shot drains.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the cache server cannot be reached.
    pub async fn flush_once(&mut self, claim: bool) -> Result<FlushReport, Error> {
        self.step(claim, &AtomicBool::new(false)).await
    }

    async fn step(&mut self, claim: bool, stop: &AtomicBool) -> Result<FlushReport, Error> {
        let kind = self.wb.aside.kind().name();
        let _ = kind;
        crate::spans::in_span!(
            self.step_inner(claim, stop),
            "cache.flush",
            cache.r#type = kind
        )
        .await
    }

    async fn step_inner(&mut self, claim: bool, stop: &AtomicBool) -> Result<FlushReport, Error> {
        let wb = self.wb.clone();
        let c = wb.cache();
        let store = &wb.store;
        let q = &wb.queue;
        if !store.accepts_atomically()
            && self
                .last_sweep
                .is_none_or(|t| t.elapsed() >= self.sweep_every)
        {
            self.last_sweep = Some(Instant::now());
            let pattern = c.keys.pattern(&wb.aside.kind(), "*")?;
            match c
                .call_within(
                    Duration::from_secs(120),
                    None,
                    store.requeue_pending(&pattern, q),
                )
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(n, "pending write-behind copies re-queued"),
                Err(e) => tracing::warn!(error = %e, "could not re-queue pending copies"),
            }
        }
        let mut entries = self.take_due();
        if claim {
            let claimed = c
                .call(
                    None,
                    store.queue_claim(q, &self.consumer, self.claim_idle, self.batch_size),
                )
                .await
                .map_err(Error::Unavailable)?;
            if !claimed.is_empty() {
                tracing::info!(
                    n = claimed.len(),
                    "reclaimed write-behind entries of a stalled flusher"
                );
            }
            self.sort_in(claimed, &mut entries);
        }
        if entries.len() < self.batch_size {
            let block = if entries.is_empty() {
                // Wake up for the first held retry.
                self.next_due().map_or(self.block, |d| d.min(self.block))
            } else {
                Duration::ZERO
            };
            // A blocking read is bounded by the block time, not the
            // operation timeout.
            let more = c
                .call_within(
                    block + c.op_timeout * 4,
                    None,
                    store.queue_read(q, &self.consumer, self.batch_size - entries.len(), block),
                )
                .await
                .map_err(Error::Unavailable)?;
            self.sort_in(more, &mut entries);
        }
        // Batch by time as well as size: let a trickle fill the batch.
        let until = Instant::now() + self.linger;
        while !entries.is_empty() && entries.len() < self.batch_size && Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            let more = c
                .call_within(
                    left + c.op_timeout * 4,
                    None,
                    store.queue_read(q, &self.consumer, self.batch_size - entries.len(), left),
                )
                .await
                .map_err(Error::Unavailable)?;
            if more.is_empty() {
                break;
            }
            self.sort_in(more, &mut entries);
        }
        if entries.is_empty() {
            if let Ok(s) = c.call(None, store.queue_stats(q)).await {
                wb.publish(&s);
            }
            return Ok(FlushReport::default());
        }
        let r = self.apply(entries, stop).await?;
        if let Ok(s) = c.call(None, store.queue_stats(q)).await {
            wb.publish(&s);
        }
        Ok(r)
    }

    async fn apply(
        &mut self,
        entries: Vec<QueueEntry>,
        stop: &AtomicBool,
    ) -> Result<FlushReport, Error> {
        let c = self.wb.cache();
        let kind = self.wb.aside.kind();
        let label = kind.name();
        let mut report = FlushReport {
            entries: entries.len() as u64,
            ..FlushReport::default()
        };
        // Coalesce: one row per entity, whatever number of entries.
        let mut by_id: Vec<(String, EntryKeys, Vec<String>)> = Vec::new();
        // Refusals so far of each (entity, version) in the batch.
        let mut attempts: HashMap<(String, u64), u32> = HashMap::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for e in entries {
            let n = attempts.entry((e.id.clone(), e.version)).or_insert(0);
            *n = (*n).max(e.attempts);
            match index.get(&e.id) {
                Some(&i) => {
                    by_id[i].2.push(e.entry_id);
                    report.coalesced += 1;
                }
                None => {
                    // Ids in the queue were validated when accepted.
                    let keys = c.keys.entry_unchecked(&kind, &e.id);
                    index.insert(e.id.clone(), by_id.len());
                    by_id.push((e.id, keys, vec![e.entry_id]));
                }
            }
        }
        let entry_refs: Vec<&EntryKeys> = by_id.iter().map(|(_, k, _)| k).collect();
        let copies = c
            .call(None, self.wb.store.pending_copies(&entry_refs))
            .await
            .map_err(Error::Unavailable)?;
        // Rows to write, and entries whose pending copy is already gone (a
        // replay after the database got them): acknowledge only.
        let mut rows: Vec<(String, S::Value)> = Vec::new();
        let mut row_meta: Vec<(usize, u64, Bytes)> = Vec::new();
        let mut settled: Vec<(usize, u64)> = Vec::new();
        let mut dead: Vec<(usize, u64, String, Bytes)> = Vec::new();
        let mut retries: Vec<(usize, u64, u32)> = Vec::new();
        for (i, copy) in copies.into_iter().enumerate() {
            match copy {
                None => settled.push((i, 0)),
                Some(bytes) => match codec::decode::<S::Value>(&bytes) {
                    Ok(d) => {
                        rows.push((by_id[i].0.clone(), d.value));
                        row_meta.push((i, d.version, bytes));
                    }
                    Err(e) => dead.push((
                        i,
                        codec::peek_version(&bytes).unwrap_or(0),
                        format!("pending copy does not decode: {e}"),
                        bytes,
                    )),
                },
            }
        }
        if !rows.is_empty() {
            let mut backoff = Duration::from_millis(100);
            let results = loop {
                match self.sink.apply(&rows).await {
                    Ok(r) if r.len() == rows.len() => break r,
                    Ok(r) => {
                        return Err(Error::source_error(format!(
                            "sink returned {} results for {} rows",
                            r.len(),
                            rows.len()
                        )));
                    }
                    Err(e) => {
                        report.retried += 1;
                        metrics::counter!("cache_wb_retried_total", "cache_type" => label)
                            .increment(1);
                        tracing::warn!(error = %e, rows = rows.len(), "database unavailable for write-behind batch; retrying");
                        if stop.load(Ordering::Acquire) {
                            // Leave the batch queued for the next flusher.
                            return Ok(report);
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            for ((i, version, bytes), result) in row_meta.into_iter().zip(results) {
                match result {
                    Applied::Written => {
                        report.flushed += 1;
                        settled.push((i, version));
                    }
                    Applied::Superseded => {
                        report.superseded += 1;
                        settled.push((i, version));
                    }
                    Applied::Rejected(why) => {
                        let n = attempts
                            .get(&(by_id[i].0.clone(), version))
                            .copied()
                            .unwrap_or(0)
                            + 1;
                        if n >= self.max_attempts {
                            dead.push((i, version, why, bytes));
                        } else {
                            tracing::warn!(
                                id = by_id[i].0,
                                attempt = n,
                                error = why,
                                "write-behind row rejected; will retry"
                            );
                            retries.push((i, version, n));
                        }
                    }
                }
            }
        }
        let acks: Vec<Settled<'_>> = settled
            .iter()
            .map(|&(i, version)| Settled {
                id: &by_id[i].0,
                keys: &by_id[i].1,
                version,
                entry_ids: &by_id[i].2,
            })
            .collect();
        c.call(None, self.wb.store.queue_ack(&self.wb.queue, &acks))
            .await
            .map_err(Error::Unavailable)?;
        if !retries.is_empty() {
            let now = epoch_ms();
            let again: Vec<Retry<'_>> = retries
                .iter()
                .map(|&(i, version, n)| Retry {
                    id: &by_id[i].0,
                    version,
                    attempts: n,
                    not_before_ms: now + self.backoff(n).as_millis() as u64,
                    entry_ids: &by_id[i].2,
                })
                .collect();
            c.call(None, self.wb.store.queue_retry(&self.wb.queue, &again))
                .await
                .map_err(Error::Unavailable)?;
            report.requeued += retries.len() as u64;
        }
        if !dead.is_empty() {
            let letters: Vec<(Settled<'_>, &str, Bytes)> = dead
                .iter()
                .map(|(i, version, why, bytes)| {
                    tracing::error!(
                        id = by_id[*i].0,
                        version,
                        error = why.as_str(),
                        "write-behind write dead-lettered"
                    );
                    (
                        Settled {
                            id: &by_id[*i].0,
                            keys: &by_id[*i].1,
                            version: *version,
                            entry_ids: &by_id[*i].2,
                        },
                        why.as_str(),
                        bytes.clone(),
                    )
                })
                .collect();
            let trimmed = c
                .call(
                    None,
                    self.wb.store.queue_dead_letter(
                        &self.wb.queue,
                        &letters,
                        self.wb.limits.dead_letter_max,
                    ),
                )
                .await
                .map_err(Error::Unavailable)?;
            report.dead_lettered += dead.len() as u64;
            if trimmed > 0 {
                tracing::warn!(
                    trimmed,
                    max = self.wb.limits.dead_letter_max,
                    "oldest write-behind dead letters trimmed"
                );
                metrics::counter!("cache_wb_dead_letters_trimmed_total", "cache_type" => label)
                    .increment(trimmed);
            }
        }
        metrics::counter!("cache_wb_flushed_total", "cache_type" => label)
            .increment(report.flushed);
        metrics::counter!("cache_wb_coalesced_total", "cache_type" => label)
            .increment(report.coalesced);
        metrics::counter!("cache_wb_dead_lettered_total", "cache_type" => label)
            .increment(report.dead_lettered);
        metrics::counter!("cache_wb_requeued_total", "cache_type" => label)
            .increment(report.requeued);
        Ok(report)
    }
}
