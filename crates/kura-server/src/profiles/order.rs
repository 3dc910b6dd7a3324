//! The per-profile write lock that orders `behind` writes and direct
//! writes of one profile.
//!
//! A direct write (`invalidate`, `through`) or a delete holds the lock
//! from its wait for queued writes until its cache step is done; a
//! `behind` accept holds it around the accept (and any write through
//! instead). So an accept comes either before the direct write's check,
//! which then sees its pending copy and waits for its flush, or after the
//! direct write's cache step, and is re-based on the committed row. Without
//! it the check is check-then-act: an accept landing between the check and
//! the commit takes the direct write's version number from the old cached
//! value, and its pending copy hides the direct write until the flush
//! conflicts.
//!
//! # Why in the cache store
//!
//! The lock is a key with a TTL in the store the queue lives in (`SET NX
//! PX` on Redis, [`kura::Store::lock`]), so it holds across every instance
//! that shares the queue, not only within one process; the memory store's
//! queue is per process and so is its lock. A database lock would not do:
//! a `behind` write does not touch the database, and making it do so
//! would put the database back on the path write-behind takes it off.
//!
//! # When the lock cannot be had
//!
//! - The store cannot be reached (or the cache's circuit breaker is open):
//!   a direct write goes ahead without it (as
//!   its wait for queued writes does); no `behind` write can be accepted
//!   meanwhile either. A queued write it overtakes is caught by the
//!   flush's version guard and dead-lettered as a conflict
//!   ([`crate::db::Guarded`]).
//! - Its renewal fails (the store went away mid-write) or its holder
//!   stalls past [`LOCK_TTL`]: it expires, and the same guard is the
//!   backstop. A release that is lost (the store failed over) keeps other
//!   writers waiting until the TTL, not failing.
//! - Another writer holds it for longer than [`LOCK_WAIT`]: 503 with
//!   `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use kura::Kind;
use uuid::Uuid;

use super::{ProfileService, ServiceError};

/// How long the lock lives unless its holder renews it. Its holder renews
/// it every [`RENEW_EVERY`] for as long as it writes (a direct write's
/// wait for queued writes alone may take 5 s), so the TTL only decides how
/// long a lock whose release was lost (a Redis failover, a crash) keeps
/// other writers of the profile waiting: less than [`LOCK_WAIT`], so they
/// wait, not fail.
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(3);

/// How often a holder renews its lock.
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// How long a writer waits for another writer of the profile.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Bound on one lock or unlock call (the store's own timeout may be
/// longer on a blocking connection).
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// A held write lock of one profile; released by [`WriteLock::release`],
/// or, if dropped unreleased, by a task of its own.
pub(crate) struct WriteLock {
    store: Arc<dyn kura::store::CacheStore>,
    key: String,
    token: String,
    released: bool,
    renew: tokio::task::JoinHandle<()>,
}

impl WriteLock {
    /// Releases the lock (only if this holder still has it).
    pub(crate) async fn release(mut self) {
        self.released = true;
        self.renew.abort();
        unlock(&self.store, &self.key, &self.token).await;
    }
}

/// Renews the lock until aborted, or until it is found lost.
async fn renew(store: Arc<dyn kura::store::CacheStore>, key: String, token: String) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match tokio::time::timeout(CALL_TIMEOUT, store.extend_lock(&key, &token, LOCK_TTL)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                tracing::warn!(key, "profile write lock lost before its write ended");
                return;
            }
            Ok(Err(e)) => tracing::warn!(key, error = %e, "profile write lock not renewed"),
            Err(_) => tracing::warn!(key, "profile write lock renewal timed out"),
        }
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.renew.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, key, token) = (
                self.store.clone(),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.token),
            );
            rt.spawn(async move { unlock(&store, &key, &token).await });
        }
    }
}

async fn unlock(store: &Arc<dyn kura::store::CacheStore>, key: &str, token: &str) {
    match tokio::time::timeout(CALL_TIMEOUT, store.unlock(key, token)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(key, error = %e, "profile write lock not released: it expires")
        }
        Err(_) => tracing::warn!(key, "profile write lock release timed out: it expires"),
    }
}

impl ProfileService {
    /// Takes the write lock of `user_id`, waiting up to [`LOCK_WAIT`] for
    /// another writer of the profile. `None` when the store cannot be
    /// reached (see the module docs).
    ///
    /// # Errors
    ///
    /// [`ServiceError::QueueFull`] (503) when another writer held it for
    /// the whole wait.
    pub(crate) async fn lock_profile(
        &self,
        user_id: Uuid,
    ) -> Result<Option<WriteLock>, ServiceError> {
        lock_entity(&self.cache, crate::registry::PROFILE, user_id).await
    }
}

/// Takes the write lock of `kind` for `user_id` (`<ns>:~lock:write:<kind>:<id>`),
/// as [`ProfileService::lock_profile`] does for profiles: the same rules for
/// every type written both `behind` and directly.
///
/// # Errors
///
/// [`ServiceError::QueueFull`] (503) when another writer held it for the
/// whole wait.
pub(crate) async fn lock_entity(
    cache: &kura::QueuedCache,
    kind: Kind,
    user_id: Uuid,
) -> Result<Option<WriteLock>, ServiceError> {
    {
        if cache.breaker_state() == kura::BreakerState::Open {
            // The cache already knows the store is down: don't pay a
            // timeout per write to learn it again.
            return Ok(None);
        }
        let store = cache.store().clone();
        let key = cache.keys().internal(&format!(
            "lock:write:{}:{}",
            kind.name(),
            user_id.hyphenated()
        ));
        let token = format!("{:032x}", rand::random::<u128>());
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut pause = Duration::from_millis(1);
        loop {
            match tokio::time::timeout(CALL_TIMEOUT, store.lock(&key, &token, LOCK_TTL)).await {
                Ok(Ok(true)) => {
                    let renew = tokio::spawn(renew(store.clone(), key.clone(), token.clone()));
                    return Ok(Some(WriteLock {
                        store,
                        key,
                        token,
                        released: false,
                        renew,
                    }));
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%user_id, error = %e, "profile write lock unavailable: writing without it");
                    return Ok(None);
                }
                Err(_) => {
                    tracing::warn!(%user_id, "profile write lock timed out: writing without it");
                    return Ok(None);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(%user_id, waited = ?LOCK_WAIT, "another write of the profile held its lock: 503");
                return Err(ServiceError::QueueFull {
                    retry_after: Duration::from_secs(1),
                    detail: format!(
                        "another write of this {} is in progress; retry later",
                        kind.name()
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}
