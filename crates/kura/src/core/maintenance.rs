//! The background task of a [`Cache`](super::Cache).

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::CacheInner;

/// Flushes counters and retries pending invalidations until the cache is
/// dropped.
pub(super) async fn maintenance(cache: Weak<CacheInner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = cache.upgrade() else { return };
        let started = Instant::now();
        if inner.has_pending.load(Ordering::Acquire) && inner.breaker.allow() {
            // Not waited for: counters keep being flushed during a long
            // replay.
            drop(inner.start_replay());
        }
        let _ = inner.flush_counters().await;
        tracing::trace!(elapsed = ?started.elapsed(), "cache maintenance");
    }
}
