//! [`Cache`], the handle every strategy works through: cheap to clone,
//! one per store and namespace.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{CacheInner, lock};
use crate::breaker::BreakerState;
use crate::error::StoreError;
use crate::key::KeyBuilder;
use crate::policy::TtlPolicy;
use crate::store::{CacheStore, StoreResult};

/// A cache over one store and namespace; cheap to clone, shared by all the
/// strategy handles made from it.
///
/// # Concurrent calls
///
/// `Cache` and the handles made from it are `Send + Sync` and meant to be
/// shared by every task of a process. Store calls run concurrently over one
/// connection; no lock is held across an `.await`.
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<CacheInner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store.describe())
            .field("namespace", &self.inner.keys.namespace())
            .field("breaker", &self.inner.breaker.state())
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.inner.store
    }

    /// The key builder.
    #[must_use]
    pub fn keys(&self) -> &KeyBuilder {
        &self.inner.keys
    }

    /// The TTL policy.
    #[must_use]
    pub fn ttl_policy(&self) -> &TtlPolicy {
        &self.inner.policy
    }

    /// The circuit breaker's state.
    #[must_use]
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Sets the cache's state gauges (`cache_breaker_state`,
    /// `cache_pending_invalidations`) from its current state. They also move
    /// on every change; a scrape calls this so they exist before the first.
    pub fn publish_gauges(&self) {
        metrics::gauge!("cache_breaker_state").set(self.breaker_state().as_gauge());
        metrics::gauge!("cache_pending_invalidations").set(self.pending_invalidations() as f64);
    }

    /// Invalidations waiting for the store to come back (entries plus
    /// distrusted patterns).
    #[must_use]
    pub fn pending_invalidations(&self) -> usize {
        lock(&self.inner.pending).len()
    }

    /// Checks the store answers within the operation timeout. A success also
    /// closes an open breaker and, with invalidations pending, starts their
    /// replay and waits for it at most one more operation timeout (the
    /// replay goes on in the background if it takes longer).
    ///
    /// # Errors
    ///
    /// The store's error or [`StoreErrorKind::Timeout`](crate::error::StoreErrorKind::Timeout), from the ping alone: a
    /// replay that fails or is still running does not fail it.
    pub async fn ping(&self) -> StoreResult<()> {
        let r = tokio::time::timeout(self.inner.op_timeout, self.inner.store.ping())
            .await
            .unwrap_or(Err(StoreError::timeout()));
        match &r {
            Ok(()) => {
                self.inner.breaker.success();
                if self.inner.has_pending.load(Ordering::Acquire) {
                    if let Some(replay) = self.inner.start_replay() {
                        let _ = tokio::time::timeout(self.inner.op_timeout, replay).await;
                    }
                }
            }
            Err(_) => self.inner.breaker.failure(),
        }
        r
    }
}
