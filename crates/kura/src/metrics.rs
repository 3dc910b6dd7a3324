//! Hit-rate metrics: per-type counters and histograms through the `metrics`
//! facade, the seed's Redis counters kept up to date in aggregate, and a
//! snapshot API.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `cache_hits_total` | counter | `cache_type` |
//! | `cache_misses_total` | counter | `cache_type` |
//! | `cache_stale_served_total` | counter | `cache_type` |
//! | `cache_bypass_total` | counter | `cache_type` |
//! | `cache_loads_total` | counter | `cache_type` |
//! | `cache_load_errors_total` | counter | `cache_type` |
//! | `cache_fills_rejected_total` | counter | `cache_type` |
//! | `cache_redis_errors_total` | counter | `cache_type` |
//! | `cache_invalidations_total` | counter | `cache_type` |
//! | `cache_get_duration_seconds` | histogram | `cache_type` |
//! | `cache_load_duration_seconds` | histogram | `cache_type` |
//! | `cache_breaker_state` | gauge (0 closed, 1 open, 2 half-open) | |
//! | `cache_breaker_opened_total` | counter | |
//! | `cache_pending_invalidations` | gauge | |
//! | `cache_feed_lag_seconds` | gauge (age of the oldest log row not yet applied) | |
//! | `cache_feed_backlog` | gauge (log rows at or past the position) | |
//! | `cache_feed_applied_total` | counter | `cache_type` |
//! | `cache_feed_relay_active` | gauge (1 while this instance holds the feed lease) | |
//! | `cache_feed_overflow_clears_total` | counter | `cache_type` |
//!
//! Handles are registered once per strategy handle, so recording costs an
//! atomic add, not a registry lookup. Install the recorder (for example
//! `metrics-exporter-prometheus`) before building strategy handles.
//!
//! The seed incremented `metrics:cache:hits` / `metrics:cache:misses` with one
//! `INCR` per read. kura counts in-process and adds the totals with one
//! pipelined `INCRBY` per second, so the counters other tools read stay
//! current without costing the hit path a round trip.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Histogram};
use serde::{Deserialize, Serialize};

/// Handles of one data type.
#[derive(Debug, Clone)]
pub(crate) struct KindMetrics {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) stale: Counter,
    pub(crate) bypass: Counter,
    pub(crate) loads: Counter,
    pub(crate) load_errors: Counter,
    pub(crate) fills_rejected: Counter,
    pub(crate) redis_errors: Counter,
    pub(crate) invalidations: Counter,
    pub(crate) get_seconds: Histogram,
    pub(crate) load_seconds: Histogram,
}

impl KindMetrics {
    pub(crate) fn new(kind: &'static str) -> Self {
        let l = [("cache_type", kind)];
        Self {
            hits: metrics::counter!("cache_hits_total", &l),
            misses: metrics::counter!("cache_misses_total", &l),
            stale: metrics::counter!("cache_stale_served_total", &l),
            bypass: metrics::counter!("cache_bypass_total", &l),
            loads: metrics::counter!("cache_loads_total", &l),
            load_errors: metrics::counter!("cache_load_errors_total", &l),
            fills_rejected: metrics::counter!("cache_fills_rejected_total", &l),
            redis_errors: metrics::counter!("cache_redis_errors_total", &l),
            invalidations: metrics::counter!("cache_invalidations_total", &l),
            get_seconds: metrics::histogram!("cache_get_duration_seconds", &l),
            load_seconds: metrics::histogram!("cache_load_duration_seconds", &l),
        }
    }
}

/// Hit and miss totals in the seed's shape.
///
/// `hit_rate` is a percentage rounded to two decimals (`87.5` for 7 hits in
/// 8 reads), 0 when nothing was read.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that went to the source.
    pub misses: u64,
    /// `hits + misses`.
    pub total: u64,
    /// `hits / total` in percent, two decimals.
    pub hit_rate: f64,
}

impl Stats {
    /// Stats from totals.
    #[must_use]
    pub fn new(hits: u64, misses: u64) -> Self {
        let total = hits + misses;
        let hit_rate = if total == 0 {
            0.0
        } else {
            (hits as f64 * 10000.0 / total as f64).round() / 100.0
        };
        Self {
            hits,
            misses,
            total,
            hit_rate,
        }
    }
}

/// In-process totals and the part not yet added to the Redis counters.
#[derive(Debug, Default)]
pub(crate) struct LocalCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    unflushed_hits: AtomicU64,
    unflushed_misses: AtomicU64,
}

impl LocalCounters {
    pub(crate) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.unflushed_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.unflushed_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Totals since this process started.
    pub(crate) fn local(&self) -> Stats {
        Stats::new(
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Takes the deltas to add to the shared counters.
    pub(crate) fn take(&self) -> (u64, u64) {
        (
            self.unflushed_hits.swap(0, Ordering::AcqRel),
            self.unflushed_misses.swap(0, Ordering::AcqRel),
        )
    }

    /// Puts deltas back after a failed flush, so none are lost.
    pub(crate) fn restore(&self, hits: u64, misses: u64) {
        self.unflushed_hits.fetch_add(hits, Ordering::AcqRel);
        self.unflushed_misses.fetch_add(misses, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_rate_is_a_rounded_percentage() {
        assert_eq!(Stats::new(0, 0).hit_rate, 0.0);
        assert_eq!(Stats::new(7, 1).hit_rate, 87.5);
        assert_eq!(Stats::new(2, 1).hit_rate, 66.67);
        assert_eq!(Stats::new(1, 0).total, 1);
    }

    #[test]
    fn deltas_survive_a_failed_flush() {
        let c = LocalCounters::default();
        c.hit();
        c.hit();
        c.miss();
        let (h, m) = c.take();
        assert_eq!((h, m), (2, 1));
        assert_eq!(c.take(), (0, 0));
        c.restore(h, m);
        c.hit();
        assert_eq!(c.take(), (3, 1));
        assert_eq!(c.local().total, 4);
    }
}
