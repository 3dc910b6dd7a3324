//! `behind` writes: accepted into the cache with a write-behind queue entry
//! ([`kura::WriteBehind::accept`]) and applied to the database later by
//! [`kura::Flusher`]s through [`Db`]'s [`kura::Sink`].
//!
//! | the accept | the answer |
//! |---|---|
//! | accepted | 200, the accepted profile, `X-Write: behind` |
//! | no such user | 404, nothing queued |
//! | queue past a limit, `--wb-on-full through` | written through, `X-Write: through`; 503 + `Retry-After` if the profile still has queued writes |
//! | queue past a limit, `--wb-on-full reject` | 503 + `Retry-After` |
//! | Redis unreachable or timed out | written through, `X-Write: through` |
//! | the version kept changing (many writers of one profile) | retried, then 409 |
//! | the database is needed to read the profile and is down | 503 |
//!
//! # Mixing with the other strategies
//!
//! An `invalidate` or `through` write, and a delete, first wait (a few
//! seconds at most, else 503) until the profile has no queued write left:
//! a queued write flushed after a direct one would overwrite it (or
//! conflict with it), and its pending copy would keep serving a deleted
//! profile.
//!
//! The wait and the write are ordered with `behind` writes by the
//! profile's write turn ([`kura::strategy::write_behind::ordering`]: a
//! lease in the cache store, so it holds across instances): a direct write holds it from its wait to its cache
//! step, an accept holds it around the accept, so every `behind` write of
//! a profile is applied either before a direct write (which waits for its
//! flush) or on top of it. A queued write that direct writes overtook all
//! the same (the store was unreachable for the direct write, the lock
//! expired under a stalled writer, or something outside kura wrote the
//! row) is never applied over them nor acknowledged silently: the flush
//! finds the row at or past its version and dead-letters it as a conflict
//! after `--wb-max-attempts` (see [`crate::db::sink`]).
//!
//! # Writing through instead
//!
//! A write that cannot be queued is written to the database directly, as
//! the value the accept tried: the newest cached profile (queued writes
//! included) with the patch, at the next version, written only over an
//! older row ([`Db::write_if_newer`]). So when an accept timed out but did
//! land in Redis, the flusher later finds the same version with the same
//! fields (a replay, not a conflict); and a queued write older than it
//! cannot overwrite it. When the queue is full, a profile that still has
//! queued writes is not written through but refused (503): its cached
//! copies would keep serving the queued version over the newer row until
//! the flusher reached them.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use kura::{BehindError, Flusher, WriteBehind};
use uuid::Uuid;

use super::model::{Profile, ProfilePatch};
use super::sink::Guarded;
use super::{ProfileService, ServiceError};
use crate::config::{OnFull, WbConfig, WriteStrategy};
use crate::db::Db;
use crate::to_completion::ToCompletion;

/// Accept rounds (each already retried by the library's compare-and-set)
/// before a contended write answers 409.
const CONTENDED_ROUNDS: u32 = 3;

/// How long a client is asked to wait when the queue is full.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The answer when a profile's queued writes keep a write waiting.
const QUEUED: &str = "the profile has writes waiting for the database; retry later";

/// The write-behind metrics the library emits for profiles, registered at
/// zero so that `/metrics` shows them before the first event.
const WB_COUNTERS: [&str; 7] = [
    "cache_wb_accepted_total",
    "cache_wb_flushed_total",
    "cache_wb_coalesced_total",
    "cache_wb_retried_total",
    "cache_wb_requeued_total",
    "cache_wb_dead_lettered_total",
    "cache_wb_dead_letters_trimmed_total",
];
const WB_GAUGES: [&str; 3] = [
    "cache_wb_queue_depth",
    "cache_wb_oldest_age_seconds",
    "cache_wb_dead_letters",
];

/// How a write was applied (the `X-Write` response header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WritePath {
    /// Committed, then the cached profile invalidated.
    Invalidate,
    /// Committed, then the cached profile updated.
    Through,
    /// Queued for the database; the cache holds it.
    Behind,
}

impl WritePath {
    /// `invalidate`, `through` or `behind`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WritePath::Invalidate => "invalidate",
            WritePath::Through => "through",
            WritePath::Behind => "behind",
        }
    }
}

/// An acknowledged write.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Written {
    /// The profile as it now stands.
    pub profile: Profile,
    /// Its JSON when the cache already made it.
    pub json: Option<Bytes>,
    /// How it was applied.
    pub path: WritePath,
}

impl Written {
    fn direct(profile: Profile, path: WritePath) -> Self {
        Written {
            profile,
            json: None,
            path,
        }
    }
}

/// The next version of `cur`: the patch applied, the version bumped, the
/// update time now, in microseconds (what both databases keep, so that the
/// flushed row equals the accepted value).
fn next_version(cur: &Profile, patch: &ProfilePatch) -> Profile {
    let mut p = cur.with_patch(patch);
    p.version = cur.version + 1;
    let now = Utc::now();
    p.updated_at = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    p
}

impl ProfileService {
    /// Sets the write-behind queue limits and flusher settings, and
    /// registers the write-behind metrics.
    #[must_use]
    pub fn with_write_behind(mut self, wb: &WbConfig) -> Self {
        self.behind = self.behind.limits(wb.limits());
        self.wb = wb.clone();
        let kind = crate::registry::PROFILE.name();
        for name in WB_COUNTERS {
            metrics::counter!(name, "cache_type" => kind).increment(0);
        }
        for name in WB_GAUGES {
            metrics::gauge!(name, "cache_type" => kind).increment(0.0);
        }
        self
    }

    /// The profiles' write-behind queue.
    #[must_use]
    pub fn write_behind(&self) -> &WriteBehind<Db> {
        &self.behind
    }

    /// The write-behind settings.
    #[must_use]
    pub fn wb_config(&self) -> &WbConfig {
        &self.wb
    }

    /// A flusher of the profiles' queue into this service's database, with
    /// the configured batch, linger, claim-idle and attempt settings.
    pub fn flusher(&self) -> Flusher<Db, Db> {
        self.configure(self.behind.flusher(self.db.clone()))
    }

    /// A flusher like [`ProfileService::flusher`] that reads the queue
    /// through `cache` (the same store and namespace, other connections).
    ///
    /// A flusher waits for entries with a blocking read, and a store has
    /// one connection for those: a second flusher on it would queue its
    /// reads behind the first one's wait, time out, and leave the entries
    /// Redis had handed it to be reclaimed only after the claim-idle time.
    /// So each flusher of a process gets a cache of its own.
    pub fn flusher_on(&self, cache: &kura::QueuedCache) -> Flusher<Db, Db> {
        let wb = cache
            .behind(crate::registry::PROFILE, self.db.clone())
            .limits(self.wb.limits());
        self.configure(wb.flusher(self.db.clone()))
    }

    fn configure(&self, f: Flusher<Db, Db>) -> Flusher<Db, Db> {
        f.batch_size(self.wb.batch)
            .linger(self.wb.linger)
            .claim_idle(self.wb.claim_idle)
            .max_attempts(self.wb.max_attempts)
    }

    /// Updates a profile with `strategy` (or the configured one) and says
    /// how it was applied.
    ///
    /// # Errors
    ///
    /// As [`ProfileService::update`] and [`ProfileService::update_behind`].
    pub async fn write(
        &self,
        user_id: Uuid,
        patch: &ProfilePatch,
        strategy: Option<WriteStrategy>,
    ) -> Result<Written, ServiceError> {
        let strategy = strategy.unwrap_or(self.strategy);
        let path = match strategy {
            WriteStrategy::Behind => return self.update_behind(user_id, patch).await,
            WriteStrategy::Through => WritePath::Through,
            _ => WritePath::Invalidate,
        };
        let profile = self.update(user_id, patch, Some(strategy)).await?;
        Ok(Written::direct(profile, path))
    }

    /// A write-behind update: reads the profile through the cache (queued
    /// writes included), applies `patch`, bumps the version and queues the
    /// result in one atomic step; a flusher writes it to the database
    /// later. Until then every read sees it.
    ///
    /// # Errors
    ///
    /// [`ServiceError::Invalid`]; [`ServiceError::NotFound`] (nothing
    /// queued); [`ServiceError::QueueFull`] under back-pressure;
    /// [`ServiceError::Contended`]; [`ServiceError::Database`] or
    /// [`ServiceError::Cache`] when the database is needed and fails.
    ///
    /// # Concurrent calls
    ///
    /// Concurrent writes to one profile, from any number of instances, are
    /// serialized by a compare-and-set on the version: each is applied on
    /// top of the other, none is lost.
    ///
    /// The future is boxed: a write that cannot be queued is written
    /// through by [`ProfileService::update`], which sends `behind` writes
    /// here.
    pub fn update_behind(
        &self,
        user_id: Uuid,
        patch: &ProfilePatch,
    ) -> BoxFuture<'static, Result<Written, ServiceError>> {
        let (this, patch) = (self.clone(), patch.clone());
        Box::pin(async move {
            patch.validate().map_err(ServiceError::Invalid)?;
            if patch.is_empty() {
                // Nothing to write: the profile as it stands, queued
                // writes included.
                let f = this.get(&user_id).await?;
                return f
                    .into_value()
                    .map(|p| Written::direct(p, WritePath::Behind))
                    .ok_or(ServiceError::NotFound);
            }
            // Once an accept is sent it may land; a write through after it
            // must not be abandoned half-way with the request.
            ToCompletion::new(async move { this.behind_inner(user_id, &patch).await }).await
        })
    }

    /// The accept (and any write through instead) under the profile's
    /// write turn, so that it is ordered with direct writes.
    async fn behind_inner(
        &self,
        user_id: Uuid,
        patch: &ProfilePatch,
    ) -> Result<Written, ServiceError> {
        let turn = self.behind.turn(&user_id.hyphenated().to_string()).await?;
        let r = self.behind_locked(user_id, patch).await;
        turn.release().await;
        r
    }

    async fn behind_locked(
        &self,
        user_id: Uuid,
        patch: &ProfilePatch,
    ) -> Result<Written, ServiceError> {
        let id = user_id.hyphenated().to_string();
        for round in 1..=CONTENDED_ROUNDS {
            let mut tried: Option<Profile> = None;
            let r = self
                .behind
                .accept(&id, |cur| {
                    let next = next_version(cur, patch);
                    tried = Some(next.clone());
                    next
                })
                .await;
            match r {
                Ok(a) => {
                    return Ok(Written {
                        profile: a.value,
                        json: Some(a.json),
                        path: WritePath::Behind,
                    });
                }
                Err(BehindError::NotFound) => return Err(ServiceError::NotFound),
                Err(BehindError::Full { depth, oldest_age }) => {
                    return self
                        .when_full(user_id, &id, patch, tried, depth, oldest_age)
                        .await;
                }
                Err(BehindError::Unavailable(e)) => {
                    tracing::warn!(user_id = id, error = %e, "write-behind unavailable: writing through");
                    return self
                        .write_through_instead(user_id, &id, patch, tried, "unavailable")
                        .await;
                }
                // Redis may evict queued writes (the start-up check said so
                // loudly): nothing was accepted, the write goes through.
                Err(BehindError::Evicting { .. }) => {
                    return self
                        .write_through_instead(user_id, &id, patch, tried, "evicting")
                        .await;
                }
                Err(BehindError::Read(e)) => return Err(e.into()),
                Err(BehindError::Invalid(m)) => return Err(ServiceError::Invalid(m)),
                Err(BehindError::Key(k)) => return Err(kura::Error::Key(k).into()),
                Err(BehindError::NotReplicated { replicas }) => {
                    tracing::warn!(
                        user_id = id,
                        replicas,
                        required = self.wb.min_replicas,
                        timeout = ?self.wb.replica_timeout,
                        "behind write not confirmed by enough Redis replicas in time: 503"
                    );
                    return Err(ServiceError::QueueFull {
                        retry_after: RETRY_AFTER,
                        detail: "the write was not confirmed in time; it is queued and may still \
                                 be applied, so retrying is safe"
                            .to_owned(),
                    });
                }
                Err(BehindError::Contended) => {
                    let ms = rand::random_range(1..=10) * u64::from(round);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(ServiceError::WriteBehind(e.to_string())),
            }
        }
        Err(ServiceError::Contended)
    }

    async fn when_full(
        &self,
        user_id: Uuid,
        id: &str,
        patch: &ProfilePatch,
        tried: Option<Profile>,
        depth: u64,
        oldest_age: Duration,
    ) -> Result<Written, ServiceError> {
        // The figures go to the log (and the queue gauges), not to the
        // client.
        let full = |detail: &'static str, why: &str| {
            tracing::warn!(
                user_id = id,
                depth,
                oldest_age = ?oldest_age,
                why,
                "write-behind queue past its limits: 503"
            );
            ServiceError::QueueFull {
                retry_after: RETRY_AFTER,
                detail: detail.to_owned(),
            }
        };
        const FULL: &str = "the write queue is full; retry later";
        if self.wb.on_full == OnFull::Reject {
            return Err(full(FULL, "--wb-on-full reject"));
        }
        match self.behind.is_pending(id).await {
            Ok(false) => {
                self.write_through_instead(user_id, id, patch, tried, "full")
                    .await
            }
            Ok(true) => Err(full(QUEUED, "the profile has queued writes")),
            Err(e) => {
                tracing::warn!(user_id = id, error = %e, "cannot tell whether the profile has queued writes");
                Err(full(FULL, "queued writes unknown"))
            }
        }
    }

    /// Writes through when the write cannot be queued: the value the
    /// accept tried, if it got that far (see the module docs), else a
    /// plain `through` update.
    async fn write_through_instead(
        &self,
        user_id: Uuid,
        id: &str,
        patch: &ProfilePatch,
        tried: Option<Profile>,
        reason: &'static str,
    ) -> Result<Written, ServiceError> {
        metrics::counter!("kura_wb_write_through_total", "reason" => reason).increment(1);
        if let Some(next) = tried {
            match self.db.write_if_newer(&next).await? {
                Guarded::Written | Guarded::Replayed => {
                    self.after_commit(WriteStrategy::Through, &next).await;
                    return Ok(Written::direct(next, WritePath::Through));
                }
                Guarded::Missing => return Err(ServiceError::NotFound),
                other => {
                    // The cache was behind the database (another path
                    // wrote it): patch the row as it is.
                    tracing::debug!(user_id = id, ?other, "write through on the database row");
                }
            }
        }
        // The profile's write turn is held by the caller; a queued write
        // would be flushed over this one.
        self.behind.wait_queued(id).await?;
        let profile = self
            .direct_update(user_id, patch, WriteStrategy::Through, None)
            .await?;
        Ok(Written::direct(profile, WritePath::Through))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_version_bumps_and_keeps_microseconds() {
        let t = Utc::now();
        let cur = Profile {
            id: Uuid::nil(),
            user_id: Uuid::nil(),
            first_name: Some("a".into()),
            last_name: Some("b".into()),
            name: None,
            email: None,
            phone: None,
            address: None,
            created_at: t,
            updated_at: t,
            version: 4,
        };
        let patch: ProfilePatch =
            serde_json::from_str(r#"{"first_name":"x","last_name":null}"#).unwrap();
        let n = next_version(&cur, &patch);
        assert_eq!(n.version, 5);
        assert_eq!(n.first_name.as_deref(), Some("x"));
        assert_eq!(n.last_name, None);
        assert_eq!(n.updated_at.timestamp_subsec_nanos() % 1000, 0);
    }
}
