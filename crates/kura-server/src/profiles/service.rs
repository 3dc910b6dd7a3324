//! [`ProfileService`]: reads, direct writes, deletes, invalidation and
//! warming of profiles.

use std::time::Duration;

use chrono::Utc;
use kura::{Batch, Cache, CacheAside, Fetched, QueuedCache, Stats, WarmProgress, WriteThrough};
use uuid::Uuid;

use super::model::{NewProfile, Profile, ProfilePatch};
use super::reinvalidate::Reinvalidate;
use crate::config::WriteStrategy;
use crate::db::{Db, DbError};
use crate::registry::user_key_id;
use crate::to_completion::ToCompletion;

/// A service failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// No such profile.
    #[error("profile not found")]
    NotFound,
    /// The user already has a profile.
    #[error("profile already exists")]
    AlreadyExists,
    /// The request is well-formed but a value is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The cache layer failed where the database cannot stand in (admin
    /// operations that need the cache server).
    #[error(transparent)]
    Cache(kura::Error),
    /// The write cannot be taken now: the write-behind queue is past its
    /// limits and the write could not be written through instead, the
    /// profile's queued writes did not reach the database in time, or too
    /// few Redis replicas confirmed a `behind` write.
    #[error("{detail}")]
    QueueFull {
        /// When to try again.
        retry_after: Duration,
        /// What to tell the client: plain words, no figures (queue depth,
        /// age and replica settings are logged and in the metrics).
        detail: String,
    },
    /// Too many concurrent writes to one profile.
    #[error("too many concurrent writes to this profile")]
    Contended,
    /// An unexpected write-behind failure.
    #[error("write-behind failed: {0}")]
    WriteBehind(String),
}

impl From<kura::TurnError> for ServiceError {
    fn from(e: kura::TurnError) -> Self {
        ServiceError::QueueFull {
            retry_after: Duration::from_secs(1),
            detail: e.to_string(),
        }
    }
}

impl From<kura::Error> for ServiceError {
    fn from(e: kura::Error) -> Self {
        ServiceError::Cache(e)
    }
}

/// The outcome of a warming run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Warmed {
    /// Profiles put in the cache.
    pub cached: u64,
    /// The full counts.
    pub progress: WarmProgress,
    /// Another instance was warming: nothing was done.
    pub locked_out: bool,
}

/// What an entity invalidation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removed {
    /// Cached values deleted.
    pub deleted: u64,
    /// Redis was unreachable: the invalidation is pending in this process.
    pub deferred: bool,
}

/// Profile reads and writes through the cache.
#[derive(Debug, Clone)]
pub struct ProfileService {
    pub(super) db: Db,
    pub(super) cache: QueuedCache,
    pub(super) profiles: CacheAside<Db>,
    pub(super) writes: WriteThrough,
    pub(super) strategy: WriteStrategy,
    pub(super) behind: kura::WriteBehind<Db>,
    pub(super) wb: crate::config::WbConfig,
    pub(super) reinvalidate: std::sync::Arc<Reinvalidate>,
}

impl ProfileService {
    /// A service over `db` and `cache`. Build it after the metrics recorder
    /// is installed: the library registers its metric handles here.
    #[must_use]
    pub fn new(db: Db, cache: QueuedCache, strategy: WriteStrategy) -> Self {
        let profiles = cache.aside(crate::registry::PROFILE, db.clone());
        let writes = cache.write_through(crate::registry::PROFILE);
        let behind = cache.write_behind(&profiles);
        Self {
            db,
            cache,
            profiles,
            writes,
            strategy,
            behind,
            wb: crate::config::WbConfig::default(),
            reinvalidate: std::sync::Arc::default(),
        }
    }

    /// The database.
    #[must_use]
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The cache, with its write-behind queue.
    #[must_use]
    pub fn queued_cache(&self) -> &QueuedCache {
        &self.cache
    }

    /// The cache.
    #[must_use]
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Sets the state gauges (cache breaker, pending and reinvalidation
    /// invalidations) from the current state, for a scrape.
    pub fn publish_gauges(&self) {
        self.cache.publish_gauges();
        self.reinvalidate.publish_gauge();
    }

    /// What the profiles' near cache holds, if it is on.
    #[must_use]
    pub fn near_stats(&self) -> Option<kura::near::NearStats> {
        self.profiles.near_stats()
    }

    /// The default write strategy.
    #[must_use]
    pub fn strategy(&self) -> WriteStrategy {
        self.strategy
    }

    /// Reads a profile through the cache.
    ///
    /// # Errors
    ///
    /// [`ServiceError::Cache`] with [`kura::Error::Source`] when the database
    /// fails and nothing usable is cached.
    pub async fn get(&self, user_id: &Uuid) -> Result<Fetched<Profile>, ServiceError> {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        Ok(self.profiles.get(user_key_id(user_id, &mut buf)).await?)
    }

    /// Reads many profiles: one multi-get, one query for the misses, one
    /// pipelined fill.
    ///
    /// # Errors
    ///
    /// As [`ProfileService::get`].
    pub async fn get_many(&self, user_ids: &[Uuid]) -> Result<Batch<Profile>, ServiceError> {
        let ids: Vec<String> = user_ids
            .iter()
            .map(|u| u.hyphenated().to_string())
            .collect();
        Ok(self.profiles.get_many(&ids).await?)
    }

    /// Creates a profile, then invalidates its key so that a cached "not
    /// found" goes.
    ///
    /// # Errors
    ///
    /// [`ServiceError::Invalid`], [`ServiceError::AlreadyExists`],
    /// [`ServiceError::Database`].
    pub async fn create(&self, new: &NewProfile) -> Result<Profile, ServiceError> {
        new.validate().map_err(ServiceError::Invalid)?;
        let (this, new) = (self.clone(), new.clone());
        ToCompletion::new(async move {
            let inserted = this.db.insert(&new).await;
            if inserted.is_err() {
                this.reinvalidate_later(new.user_id, false).await;
            }
            let profile = inserted?.ok_or(ServiceError::AlreadyExists)?;
            this.after_commit(WriteStrategy::Invalidate, &profile).await;
            Ok(profile)
        })
        .await
    }

    /// Updates a profile with `strategy` (or the configured one) and returns
    /// the committed row.
    ///
    /// # Errors
    ///
    /// [`ServiceError::Invalid`], [`ServiceError::NotFound`],
    /// [`ServiceError::Database`]; [`ServiceError::QueueFull`] when queued
    /// write-behind writes of the profile did not reach the database in
    /// time; for `behind`, as [`ProfileService::update_behind`].
    pub async fn update(
        &self,
        user_id: Uuid,
        patch: &ProfilePatch,
        strategy: Option<WriteStrategy>,
    ) -> Result<Profile, ServiceError> {
        let strategy = strategy.unwrap_or(self.strategy);
        if strategy == WriteStrategy::Behind {
            return self.update_behind(user_id, patch).await.map(|w| w.profile);
        }
        patch.validate().map_err(ServiceError::Invalid)?;
        if patch.is_empty() {
            // Nothing to write: answer with the row as it stands.
            return self.db.fetch(user_id).await?.ok_or(ServiceError::NotFound);
        }
        // A queued write-behind write of the profile would be flushed over
        // this one: let it reach the database first, under the profile's
        // write turn.
        let turn = self
            .behind
            .direct_turn(&user_id.hyphenated().to_string())
            .await?;
        self.direct_update(user_id, patch, strategy, Some(turn))
            .await
    }

    /// A direct update in the profile's write turn (`None`: the caller
    /// holds it), which ends once the cache step is done. In the turn no
    /// `behind` write can be queued (see
    /// [`kura::strategy::write_behind::ordering`]).
    pub(super) async fn direct_update(
        &self,
        user_id: Uuid,
        patch: &ProfilePatch,
        strategy: WriteStrategy,
        turn: Option<kura::WriteTurn>,
    ) -> Result<Profile, ServiceError> {
        let (this, patch) = (self.clone(), patch.clone());
        ToCompletion::new(async move {
            let updated = this.db.update(user_id, &patch).await;
            if updated.is_err() {
                this.reinvalidate_later(user_id, false).await;
            }
            let r = match updated {
                Ok(Some(profile)) => {
                    this.after_commit(strategy, &profile).await;
                    Ok(profile)
                }
                Ok(None) => Err(ServiceError::NotFound),
                Err(e) => Err(e.into()),
            };
            if let Some(t) = turn {
                t.release().await;
            }
            r
        })
        .await
    }

    pub(super) async fn invalidate_now(&self, user_id: Uuid, entity: bool) {
        let r = if entity {
            self.invalidate_user(user_id).await.map(drop)
        } else {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            self.writes
                .invalidate(user_key_id(&user_id, &mut buf))
                .await
                .map(drop)
                .map_err(ServiceError::from)
        };
        if let Err(e) = r {
            tracing::error!(%user_id, error = %e, "invalidation after a failed write failed");
        }
    }

    /// The cache step after a commit. The library never fails it for a
    /// cache outage (it defers the invalidation), so only a key error could
    /// surface, and a parsed UUID is always a valid key.
    pub(super) async fn after_commit(&self, strategy: WriteStrategy, profile: &Profile) {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = user_key_id(&profile.user_id, &mut buf);
        let r = match strategy {
            WriteStrategy::Through => self.writes.update(id, profile).await,
            _ => self.writes.invalidate(id).await,
        };
        match r {
            Ok(outcome) => tracing::debug!(user_id = id, ?outcome, "cache after commit"),
            Err(e) => tracing::error!(user_id = id, error = %e, "cache step after commit failed"),
        }
    }

    /// Deletes a profile and every cached entry of the user, once the
    /// profile's queued write-behind writes are in the database.
    ///
    /// # Errors
    ///
    /// [`ServiceError::NotFound`], [`ServiceError::Database`];
    /// [`ServiceError::QueueFull`] when queued writes of the profile did not
    /// reach the database in time.
    pub async fn delete(&self, user_id: Uuid) -> Result<(), ServiceError> {
        let turn = self
            .behind
            .direct_turn(&user_id.hyphenated().to_string())
            .await?;
        let this = self.clone();
        ToCompletion::new(async move {
            let deleted = this.db.delete(user_id).await;
            if deleted.is_err() {
                this.reinvalidate_later(user_id, true).await;
            }
            let r = match deleted {
                Ok(true) => this.invalidate_user(user_id).await.map(drop),
                Ok(false) => Err(ServiceError::NotFound),
                Err(e) => Err(e.into()),
            };
            turn.release().await;
            r
        })
        .await
    }

    /// Removes every cached entry of a user (profile, settings,
    /// preferences).
    ///
    /// # Errors
    ///
    /// [`ServiceError::Cache`] only for an id that cannot be a key.
    pub async fn invalidate_user(&self, user_id: Uuid) -> Result<Removed, ServiceError> {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let r = self
            .cache
            .invalidate_entity(
                user_key_id(&user_id, &mut buf),
                &crate::registry::user_kinds(),
            )
            .await?;
        Ok(Removed {
            deleted: r.deleted,
            deferred: r.deferred,
        })
    }

    /// Stops every cached profile being served, in one step whatever their
    /// number ([`kura::Cache::clear`]), then removes their keys from the
    /// cache ([`kura::Cache::sweep`]): with `wait`, before returning, with
    /// how many it removed; otherwise in the background (`None`). A sweep
    /// that fails leaves the rest to expire by TTL (`None`, logged): the
    /// clear itself already stopped them being served.
    ///
    /// # Errors
    ///
    /// [`ServiceError::Cache`] when the cache server cannot be reached
    /// (the clear is then pending: this instance reads profiles from the
    /// database until it is applied).
    pub async fn invalidate_all_profiles(
        &self,
        wait: bool,
    ) -> Result<(kura::tags::Cleared, Option<u64>), ServiceError> {
        let cleared = self.cache.clear(crate::registry::PROFILE).await?;
        let sweep = {
            let (cache, epoch) = (Cache::clone(&self.cache), cleared.epoch);
            async move {
                match cache.sweep(crate::registry::PROFILE, epoch).await {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::warn!(error = %e, "sweep of cleared profiles stopped; the rest expire by TTL");
                        None
                    }
                }
            }
        };
        if wait {
            Ok((cleared, sweep.await))
        } else {
            tokio::spawn(sweep);
            Ok((cleared, None))
        }
    }

    /// Stops every cached value carrying `tag` being served. Profiles have
    /// no organisation field to tag by: they carry only their kind's tag,
    /// `kind:profile`, as every cached value does ([`kura::tags`]).
    ///
    /// # Errors
    ///
    /// [`ServiceError::Cache`] for a malformed tag, or when the cache
    /// server cannot be reached.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<kura::tags::Cleared, ServiceError> {
        Ok(self.cache.invalidate_tag(tag).await?)
    }

    /// Removes the cached entries matching a key glob such as
    /// `cache:profile:*` (profile, settings or preferences keys).
    ///
    /// # Errors
    ///
    /// [`ServiceError::Cache`] for a glob naming no user type, or when the
    /// cache server cannot be reached.
    pub async fn invalidate_glob(&self, glob: &str) -> Result<u64, ServiceError> {
        Ok(self
            .cache
            .invalidate_glob(glob, &crate::registry::user_kinds())
            .await?)
    }

    /// Warms the cache with the profiles of users who logged in within
    /// `since_days`, at most `limit`, most recent first.
    ///
    /// # Errors
    ///
    /// [`ServiceError::Database`] when the users cannot be listed;
    /// [`ServiceError::Cache`] when the cache server cannot be reached.
    pub async fn warm(
        &self,
        limit: u64,
        since_days: u32,
        on_progress: Option<Box<dyn Fn(WarmProgress, u64) + Send + Sync>>,
    ) -> Result<Warmed, ServiceError> {
        let since = Utc::now() - Duration::from_secs(u64::from(since_days) * 86_400);
        let ids = self.db.active_user_ids(since, limit).await?;
        let total = ids.len() as u64;
        let mut warmer = self.profiles.warmer().batch_size(200).concurrency(4);
        if let Some(f) = on_progress {
            warmer = warmer.on_progress(move |p| f(p, total));
        }
        let ids = futures::stream::iter(ids.into_iter().map(|u| u.hyphenated().to_string()));
        let report = warmer.run(ids).await?;
        Ok(Warmed {
            cached: report.progress.cached,
            progress: report.progress,
            locked_out: report.locked_out,
        })
    }

    /// Fleet-wide hit and miss counts.
    pub async fn stats(&self) -> Stats {
        self.cache.stats().await
    }
}
