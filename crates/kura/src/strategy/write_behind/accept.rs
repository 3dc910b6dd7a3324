//! The accept of a write-behind write: read through the cache, patch,
//! compare-and-set the value, its pending copy and the queue entry in one
//! store step, retried when another write got in first; refused on a store
//! that may evict what has no TTL.

use super::*;

impl<S: Source> WriteBehind<S> {
    /// Accepts a write: reads `id` through the cache, applies `patch` to
    /// make the next version, and stores it with its queue entry in one
    /// atomic step. `patch` must return a value with a higher version (the
    /// usual `version + 1`); it may be called again with a newer current
    /// value if another write to the key got in first.
    ///
    /// # Errors
    ///
    /// [`BehindError::NotFound`] for an unknown id, [`BehindError::Full`]
    /// under back-pressure, [`BehindError::Unavailable`] when the cache
    /// server cannot be reached (write through instead),
    /// [`BehindError::Evicting`] on a server that may evict queued writes,
    /// and the others as documented on [`BehindError`].
    pub async fn accept(
        &self,
        id: &str,
        mut patch: impl FnMut(&S::Value) -> S::Value,
    ) -> Result<Accepted<S::Value>, BehindError> {
        let c = self.cache();
        let kind = self.aside.kind();
        let entry = c.keys.entry(&kind, id)?;
        self.check_eviction().await?;
        let policy = c.policy.get(kind.name());
        for _ in 0..self.limits.cas_attempts.max(1) {
            let current = self.aside.get(id).await.map_err(BehindError::Read)?;
            match current.status() {
                // Without the cache there is nowhere durable to put the write.
                Status::Bypass => return Err(BehindError::Unavailable(StoreError::unavailable())),
                Status::Stale => {
                    return Err(BehindError::Read(Error::source_error(
                        "the source is unavailable (only a stale copy is cached)",
                    )));
                }
                _ => {}
            }
            let Some(current) = current.into_value() else {
                return Err(BehindError::NotFound);
            };
            let next = patch(&current);
            if next.version() <= current.version() {
                return Err(BehindError::Invalid(format!(
                    "the patch must raise the version (was {}, got {})",
                    current.version(),
                    next.version()
                )));
            }
            let lifetimes = c.lifetimes(&entry.value, &policy);
            let epoch = c.load_epoch().await;
            let enc = codec::envelope::seal(
                &next,
                Some(lifetimes.ttl),
                policy.eager_refresh.is_some(),
                epoch,
                c.max_value_bytes,
            )
            .map_err(|e: CodecError| BehindError::Invalid(e.to_string()))?
            .encoded;
            let req = AcceptRequest {
                keys: &entry,
                queue: &self.queue,
                id,
                expected_version: current.version(),
                bytes: enc.envelope,
                version: next.version(),
                lifetimes,
                max_depth: self.limits.max_depth,
                max_age: self.limits.max_age,
                min_replicas: self.limits.min_replicas,
                replica_timeout: self.limits.replica_timeout,
            };
            let r = c.call(None, self.store.accept(&req)).await;
            // Accepted or not, this process's near cache copy is gone: the
            // value key was written, or a conflict showed the copy old.
            c.near_evict(&entry.value);
            match r {
                Ok(AcceptOutcome::Accepted {
                    replicated: Some(n),
                    ..
                }) if n < self.limits.min_replicas => {
                    metrics::counter!("cache_wb_unreplicated_total", "cache_type" => self.label())
                        .increment(1);
                    return Err(BehindError::NotReplicated { replicas: n });
                }
                Ok(AcceptOutcome::Accepted { entry_id, .. }) => {
                    metrics::counter!("cache_wb_accepted_total", "cache_type" => self.label())
                        .increment(1);
                    return Ok(Accepted {
                        value: next,
                        json: enc.json,
                        entry_id,
                    });
                }
                Ok(AcceptOutcome::Conflict { .. }) => {
                    metrics::counter!("cache_wb_conflicts_total", "cache_type" => self.label())
                        .increment(1);
                }
                // Nothing cached to compare the version with: the next round
                // reads the row again from the database (caching it), so
                // the patch is re-based on what the database has.
                Ok(AcceptOutcome::Uncached) => {
                    metrics::counter!("cache_wb_uncached_total", "cache_type" => self.label())
                        .increment(1);
                }
                Ok(AcceptOutcome::Full { depth, oldest_age }) => {
                    metrics::counter!("cache_wb_refused_total", "cache_type" => self.label())
                        .increment(1);
                    return Err(BehindError::Full { depth, oldest_age });
                }
                Err(e) => return Err(BehindError::Unavailable(e)),
            }
        }
        Err(BehindError::Contended)
    }

    /// Refuses writes on a server that may evict keys without a TTL, unless
    /// allowed. The answer is kept for [`EVICTION_RECHECK`]; a server that
    /// will not tell (`CONFIG` disabled) is taken not to evict.
    async fn check_eviction(&self) -> Result<(), BehindError> {
        if self.limits.allow_eviction {
            return Ok(());
        }
        let known = self
            .eviction
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < EVICTION_RECHECK)
            .map(|(_, p)| p.clone());
        let policy = match known {
            Some(p) => p,
            None => {
                let c = self.cache();
                let p = match c.call(None, self.store.evicts_keys_without_ttl()).await {
                    Ok(p) => p,
                    Err(e) if e.is_outage() => return Err(BehindError::Unavailable(e)),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the cache server's eviction policy");
                        None
                    }
                };
                *self
                    .eviction
                    .last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((Instant::now(), p.clone()));
                p
            }
        };
        match policy {
            Some(policy) => {
                metrics::counter!("cache_wb_refused_evicting_total", "cache_type" => self.label())
                    .increment(1);
                Err(BehindError::Evicting { policy })
            }
            None => Ok(()),
        }
    }
}
