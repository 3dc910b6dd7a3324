//! Hit/miss counting: this process's counts and the fleet's shared
//! counters, flushed by the maintenance task.

use crate::metrics::Stats;
use crate::store::StoreResult;

use super::{Cache, CacheInner};

impl Cache {
    /// Hits and misses of the whole fleet: this process's counts are added to
    /// the shared counters first, then the counters are read. Falls back to
    /// this process's counts when the store is unavailable.
    pub async fn stats(&self) -> Stats {
        let _ = self.inner.flush_counters().await;
        let keys: Vec<&str> = self.inner.counter_keys.iter().map(String::as_str).collect();
        match self
            .inner
            .call(None, self.inner.store.counters(&keys))
            .await
        {
            Ok(v) if v.len() == 2 => Stats::new(v[0].max(0) as u64, v[1].max(0) as u64),
            _ => self.inner.counters.local(),
        }
    }

    /// Hits and misses of this process since it started.
    #[must_use]
    pub fn local_stats(&self) -> Stats {
        self.inner.counters.local()
    }

    /// Adds this process's pending hit/miss counts to the shared counters
    /// now instead of at the next flush interval.
    ///
    /// # Errors
    ///
    /// The store's error; the counts are kept for the next attempt.
    pub async fn flush_metrics(&self) -> StoreResult<()> {
        self.inner.flush_counters().await
    }
}

impl CacheInner {
    pub(crate) async fn flush_counters(&self) -> StoreResult<()> {
        let (h, m) = self.counters.take();
        if h == 0 && m == 0 {
            return Ok(());
        }
        let [hk, mk] = &self.counter_keys;
        let r = self
            .call(None, self.store.incr(&[(hk, h as i64), (mk, m as i64)]))
            .await;
        if r.is_err() {
            self.counters.restore(h, m);
        }
        r
    }
}
