//! One step of the relay: clear what overflowed, apply every change in
//! `[position, watermark)` page by page, move the fleet position, let the
//! source go of what is applied; the bookkeeping of a step that cannot
//! reach the cache, and a watermark found below the position.

use super::*;

impl<L: ChangeSource> Relay<L> {
    /// One pass: clears overflowed kinds if any, applies every row in
    /// `[position, watermark)`, moves the position, prunes. Ignores the
    /// fleet lease (that is [`Relay::run`]'s business).
    ///
    /// # Errors
    ///
    /// [`FeedError::Log`] when the database fails, [`FeedError::Store`]
    /// when the store does (after the overflow bookkeeping of an outage).
    /// Either way the position has not moved past anything unapplied, and
    /// the next step goes on from where this one could not.
    pub async fn step(&self) -> Result<StepReport, FeedError<L::Error>> {
        let overflowed = self.inner.log.overflowed().await.map_err(FeedError::Log)?;
        match self.relay(&overflowed).await {
            Err(FeedError::Store(e)) if e.is_outage() => {
                let was = std::mem::replace(&mut lock(&self.inner.local).offline, true);
                if !was {
                    tracing::warn!(error = %e, "invalidation feed: cache store unreachable, position held");
                }
                self.offline(&overflowed).await?;
                Err(FeedError::Store(e))
            }
            r => {
                if r.is_ok() {
                    let was = std::mem::replace(&mut lock(&self.inner.local).offline, false);
                    if was {
                        tracing::info!("invalidation feed: cache store reachable again");
                    }
                }
                r
            }
        }
    }

    pub(super) async fn store<T>(
        &self,
        timeout: Duration,
        op: impl Future<Output = crate::store::StoreResult<T>>,
    ) -> Result<T, FeedError<L::Error>> {
        Ok(self
            .inner
            .cache
            .inner
            .call_within(timeout, None, op)
            .await?)
    }

    fn batch_timeout(&self) -> Duration {
        (self.inner.cache.inner.op_timeout * 8).max(Duration::from_secs(2))
    }

    async fn relay(&self, overflowed: &[(String, u64)]) -> Result<StepReport, FeedError<L::Error>> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let op = inner.cache.inner.op_timeout;
        let mut report = StepReport::default();
        // Kinds whose rows may have been deleted unapplied: cleared before
        // anything else, from a watermark taken before the clear (every row
        // below it committed before the clear began, so the clear covers it).
        let mine: Vec<(String, u64)> = overflowed
            .iter()
            .filter(|(k, _)| inner.kinds.contains_key(k))
            .cloned()
            .collect();
        if !mine.is_empty() {
            let before = inner.log.watermark().await.map_err(FeedError::Log)?;
            let kinds: Vec<Kind> = mine.iter().map(|(name, _)| inner.kinds[name]).collect();
            self.clear(&kinds).await?;
            for kind in &kinds {
                metrics::counter!("cache_feed_overflow_clears_total", "cache_type" => kind.name())
                    .increment(1);
                tracing::warn!(
                    cache_type = kind.name(),
                    "invalidation feed: backlog overflowed while the cache was unreachable; type cleared"
                );
            }
            // Every row below `before` of the cleared kinds is covered by
            // the clear. Rows of kinds not cleared (another relay marked
            // fewer kinds) are not: then the position stays and the rows
            // are replayed, harmlessly for the cleared kinds.
            if mine.len() == inner.kinds.len() {
                let held = self
                    .store(op, store.advance(&inner.position_key, before))
                    .await?;
                lock(&inner.local).position = Some(held);
            }
            inner
                .log
                .clear_overflow(&mine)
                .await
                .map_err(FeedError::Log)?;
            report.cleared = mine.into_iter().map(|(k, _)| k).collect();
        }

        let held = self.store(op, store.get(&inner.position_key, None)).await?;
        let local = lock(&inner.local).position;
        let (from, oldest) = match held.as_ref().and_then(parse_position) {
            Some(p) => (p, false),
            // No position in the store (first start, or a store restarted
            // without persistence, whose cache is empty too): what this
            // relay applied, else the oldest row still in the log.
            None => match local {
                Some(p) => (p, false),
                None => (
                    inner
                        .log
                        .oldest()
                        .await
                        .map_err(FeedError::Log)?
                        .unwrap_or(0),
                    true,
                ),
            },
        };
        let to = inner.log.watermark().await.map_err(FeedError::Log)?;
        if let Some(held) = held.as_ref().and_then(parse_position) {
            if to < held {
                if inner.log.regressions() {
                    return self.regressed(held, to, report).await;
                }
                // A stream that has not caught up with the fleet yet.
                report.watermark = to;
                report.position = held;
                lock(&inner.local).position = Some(held);
                return Ok(report);
            }
        }
        // The oldest row read is no bound for what is still to come: a
        // transaction below it may be open (its rows are not visible yet),
        // so a start from the log never begins above the watermark.
        let from = if oldest { from.min(to) } else { from };
        report.watermark = to;
        report.position = from;
        if to > from {
            self.apply_range(from, to, &mut report).await?;
            let held = self
                .store(op, store.advance(&inner.position_key, to))
                .await?;
            report.position = held;
        } else if held.is_none() {
            report.position = self
                .store(op, store.advance(&inner.position_key, from))
                .await?;
        }
        let position = report.position;
        let (save, observe) = {
            let mut l = lock(&inner.local);
            l.position = Some(l.position.map_or(position, |p| p.max(position)));
            let due = |at: Option<Instant>| at.is_none_or(|t| t.elapsed() >= inner.settings.poll);
            let save = due(l.saved_at);
            let observe = due(l.observed_at);
            if save {
                l.saved_at = Some(Instant::now());
            }
            if observe {
                l.observed_at = Some(Instant::now());
            }
            (save, observe)
        };
        if save {
            inner
                .log
                .save_position(position)
                .await
                .map_err(FeedError::Log)?;
        }
        report.waiting = !inner
            .log
            .read(position, u64::MAX, None, 1)
            .await
            .map_err(FeedError::Log)?
            .is_empty();
        report.pruned = self.prune(position).await?;
        if observe {
            let (backlog, lag_ms) = self.observe(position).await?;
            self.publish(backlog, lag_ms).await;
        }
        Ok(report)
    }

    /// Clears `kinds` (one store step each), tells the `on_cleared` hook,
    /// and sweeps their old values out of the store in the background.
    async fn clear(&self, kinds: &[Kind]) -> Result<(), FeedError<L::Error>> {
        let inner = &*self.inner;
        for kind in kinds {
            let epoch = inner
                .cache
                .inner
                .bump(&crate::tags::kind_field(kind.name()))
                .await
                .map_err(|e| match e {
                    Error::Unavailable(e) => FeedError::Store(e),
                    other => FeedError::Store(StoreError::server(other.to_string())),
                })?;
            let (cache, kind) = (inner.cache.clone(), *kind);
            tokio::spawn(async move {
                match cache.sweep(kind, epoch).await {
                    Ok(n) => tracing::info!(
                        cache_type = kind.name(),
                        removed = n,
                        "cleared values swept"
                    ),
                    Err(e) => {
                        tracing::warn!(cache_type = kind.name(), error = %e, "sweep of cleared values stopped; the rest expires by TTL")
                    }
                }
            });
        }
        if let Some(hook) = &inner.on_cleared {
            hook(kinds);
        }
        Ok(())
    }

    /// The watermark `to` is below the position `held`: the database lost
    /// transactions the fleet applied. Clears every kind, then sets the
    /// position back to the watermark (unless another relay moved it).
    async fn regressed(
        &self,
        held: u64,
        to: u64,
        mut report: StepReport,
    ) -> Result<StepReport, FeedError<L::Error>> {
        let inner = &*self.inner;
        let kinds: Vec<Kind> = inner.kinds.values().copied().collect();
        tracing::warn!(
            position = held,
            watermark = to,
            "invalidation feed: the database's watermark is below the position held \
             (a failover to a standby without the newest transactions, or a restore); \
             clearing the fed types and relaying from the watermark"
        );
        metrics::counter!("cache_feed_regressions_total").increment(1);
        self.clear(&kinds).await?;
        let op = inner.cache.inner.op_timeout;
        let store = inner.cache.store();
        self.store(op, store.rewind(&inner.position_key, held, to))
            .await?;
        lock(&inner.local).position = Some(to);
        report.cleared = kinds.iter().map(|k| k.name().to_owned()).collect();
        report.watermark = to;
        report.position = to;
        Ok(report)
    }

    /// Applies every row in `[from, to)`, page by page.
    async fn apply_range(
        &self,
        from: u64,
        to: u64,
        report: &mut StepReport,
    ) -> Result<(), FeedError<L::Error>> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let keys = inner.cache.keys();
        let mut after = None;
        loop {
            let page = inner
                .log
                .read(from, to, after, inner.settings.batch)
                .await
                .map_err(FeedError::Log)?;
            let Some((last_pos, last)) = page.last() else {
                break;
            };
            after = Some((*last_pos, last.seq));
            let full = page.len() >= inner.settings.batch;
            report.read += page.len() as u64;
            let mut entries: Vec<(EntryKeys, Option<u64>)> = Vec::with_capacity(page.len());
            let mut events = Vec::with_capacity(page.len());
            let mut clears: Vec<Kind> = Vec::new();
            for (_, ev) in page {
                let Some(kind) = inner.kinds.get(&ev.kind) else {
                    tracing::trace!(
                        kind = ev.kind,
                        "invalidation feed: row of a kind not relayed"
                    );
                    continue;
                };
                if ev.clear {
                    if !clears.contains(kind) {
                        clears.push(*kind);
                    }
                    events.push(ev);
                    continue;
                }
                match keys.entry(kind, &ev.id) {
                    Ok(e) => entries.push((e, ev.version)),
                    Err(err) => {
                        // An id that cannot be a key was never cached.
                        tracing::debug!(kind = ev.kind, id = ev.id, error = %err, "invalidation feed: id skipped");
                        continue;
                    }
                }
                events.push(ev);
            }
            if !clears.is_empty() {
                // A TRUNCATE or a bulk transaction: the kind's O(1) clear
                // (which voids its loads in flight), before the position
                // moves past it.
                self.clear(&clears).await?;
                for kind in &clears {
                    metrics::counter!("cache_feed_kind_clears_total", "cache_type" => kind.name())
                        .increment(1);
                }
                report
                    .cleared
                    .extend(clears.iter().map(|k| k.name().to_owned()));
            }
            if !entries.is_empty() || !clears.is_empty() {
                let refs: Vec<(&EntryKeys, Option<u64>)> =
                    entries.iter().map(|(e, v)| (e, *v)).collect();
                report.invalidated += self
                    .store(self.batch_timeout(), store.invalidate_older(&refs))
                    .await?;
                report.applied += events.len() as u64;
                for ev in &events {
                    if let Some(kind) = inner.kinds.get(&ev.kind) {
                        metrics::counter!("cache_feed_applied_total", "cache_type" => kind.name())
                            .increment(1);
                    }
                }
                if let Some(hook) = &inner.on_applied {
                    hook(&events);
                }
                if let Some(ev) = events.last() {
                    let lag = (now_ms() - ev.committed_at_ms).max(0) as f64 / 1000.0;
                    metrics::gauge!("cache_feed_lag_seconds").set(lag);
                }
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// Deletes applied rows past the retention window, in bounded batches.
    async fn prune(&self, below: u64) -> Result<u64, FeedError<L::Error>> {
        let inner = &*self.inner;
        let before = now_ms() - inner.settings.retention.as_millis() as i64;
        let mut pruned = 0;
        for _ in 0..PRUNE_ROUNDS {
            let n = inner
                .log
                .release(below, before, inner.settings.prune_batch)
                .await
                .map_err(FeedError::Log)?;
            pruned += n;
            if n < inner.settings.prune_batch as u64 {
                break;
            }
        }
        if pruned > 0 {
            tracing::debug!(rows = pruned, "invalidation feed: log pruned");
        }
        Ok(pruned)
    }

    /// Measures backlog and lag from `position` (the gauges).
    pub(super) async fn observe(&self, position: u64) -> Result<(u64, u64), FeedError<L::Error>> {
        let log = &self.inner.log;
        let backlog = log.backlog(position).await.map_err(FeedError::Log)?;
        let lag_ms = if backlog == 0 {
            0
        } else {
            log.read(position, u64::MAX, None, 1)
                .await
                .map_err(FeedError::Log)?
                .first()
                .map_or(0, |(_, ev)| (now_ms() - ev.committed_at_ms).max(0) as u64)
        };
        metrics::gauge!("cache_feed_backlog").set(backlog as f64);
        metrics::gauge!("cache_feed_lag_seconds").set(lag_ms as f64 / 1000.0);
        Ok((backlog, lag_ms))
    }

    /// Publishes a measurement for [`Relay::health`] (lost with the store:
    /// health then says the lag is unknown).
    async fn publish(&self, backlog: u64, lag_ms: u64) {
        let inner = &*self.inner;
        let text = format!("{backlog} {lag_ms} {}", now_ms());
        let ttl = (inner.settings.poll * 10).max(Duration::from_secs(10));
        let store = inner.cache.store();
        let _ = self
            .store(
                inner.cache.inner.op_timeout,
                store.set(&inner.observed_key, Bytes::from(text), ttl),
            )
            .await;
    }

    /// The bookkeeping of a step that could not reach the store.
    async fn offline(&self, overflowed: &[(String, u64)]) -> Result<(), FeedError<L::Error>> {
        let inner = &*self.inner;
        let log = &inner.log;
        let local = lock(&inner.local).position;
        let saved = log.saved_position().await.map_err(FeedError::Log)?;
        let from = match local.max(saved) {
            Some(p) => p,
            None => match log.oldest().await.map_err(FeedError::Log)? {
                Some(p) => p,
                None => return Ok(()),
            },
        };
        let backlog = log.backlog(from).await.map_err(FeedError::Log)?;
        metrics::gauge!("cache_feed_backlog").set(backlog as f64);
        let marked = overflowed.iter().any(|(k, _)| inner.kinds.contains_key(k));
        let over = backlog > inner.settings.max_backlog;
        if !over && !marked {
            return Ok(());
        }
        // Marked again (the cut raised) only while over the bound: each
        // raise makes a reachable relay clear the kinds once more, so a
        // relay cut off from Redis must not raise it at every step.
        if over {
            // The cut is a watermark: every row below it has committed now,
            // so a clear that begins after this (which reads the mark
            // first) covers every row deleted below it.
            let cut = log.watermark().await.map_err(FeedError::Log)?;
            let kinds: Vec<String> = inner.kinds.keys().cloned().collect();
            log.mark_overflow(&kinds, cut)
                .await
                .map_err(FeedError::Log)?;
            if !marked {
                tracing::warn!(
                    backlog,
                    bound = inner.settings.max_backlog,
                    kinds = ?kinds,
                    "invalidation feed: backlog past its bound while the cache is unreachable; \
                     the types will be cleared once it is back"
                );
            }
        }
        let mut pruned = 0;
        for _ in 0..PRUNE_ROUNDS {
            let n = log
                .prune_overflowed(inner.settings.prune_batch)
                .await
                .map_err(FeedError::Log)?;
            pruned += n;
            if n < inner.settings.prune_batch as u64 {
                break;
            }
        }
        if pruned > 0 {
            tracing::debug!(rows = pruned, "invalidation feed: overflowed rows pruned");
        }
        Ok(())
    }
}
