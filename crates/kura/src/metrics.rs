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
//! | `cache_refreshes_total` | counter (eager refreshes started by this process: `stored`, `refused` (lease lost, older, cleared), `failed` (load error or row gone), `busy` (another holds the lease)) | `cache_type`, `outcome` |
//! | `cache_load_timeouts_total` | counter (loads past a timeout: `soft` answered stale, `hard` answered an error or stale) | `cache_type`, `timeout` |
//! | `cache_cleared_total` | counter (values found cleared by [`crate::Cache::clear`] or a tag, and removed) | `cache_type` |
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
//! | `cache_feed_regressions_total` | counter (watermarks found below the position) | |
//! | `cache_feed_kind_clears_total` | counter (types cleared by one change event: a TRUNCATE, a bulk transaction, an unreadable WAL row) | `cache_type` |
//! | `cache_feed_bad_rows_total` | counter (log rows read without their version: their entity invalidated unconditionally; counted by the [`crate::feed::ChangeSource`]) | |
//! | `cache_l1_hits_total`, `cache_l1_misses_total` | counter (near cache lookups) | `cache_type` |
//! | `cache_l1_evictions_total` | counter (entries dropped: `size` bound, `invalidated` by a push) | `cache_type` (size), `reason` |
//! | `cache_l1_invalidations_total` | counter (invalidation pushes received, per key) | |
//! | `cache_l1_flushes_total` | counter (whole near cache dropped) | `reason` (`connected`, `disconnected`, `ping failed`, `topology changed`, `server_flush`, …) |
//! | `cache_l1_invalidation_delay_seconds` | histogram (a write of this process to the push that reports it) | |
//! | `cache_l1_entries`, `cache_l1_bytes` | gauge (set by the service at each scrape) | `cache_type` |
//! | `cache_rate_limit_checks_total` | counter (requests counted against a rate limit) | `class`, `outcome` (`allowed`, `limited`) |
//! | `cache_rate_limit_local_total` | counter (decisions this process made alone, the store unreachable) | `class` |
//!
//! The write-behind series (`cache_wb_*`) are listed on
//! [`crate::strategy::write_behind`]. [`describe`] gives every series its
//! help text (the `# HELP` line of a Prometheus scrape).
//!
//! Handles are registered once per strategy handle, so recording costs an
//! atomic add, not a registry lookup. Install the recorder (for example
//! `metrics-exporter-prometheus`) before building strategy handles.
//!
//! The seed incremented `metrics:cache:hits` / `metrics:cache:misses` with one
//! `INCR` per read. kura counts in-process and adds the totals with one
//! pipelined `INCRBY` per second, so the counters other tools read stay
//! current without costing the hit path a round trip. Like the seed's, the
//! two counters have no TTL: they are running totals (the one exception to
//! the store's "every key has a TTL" rule, see [`crate::store`]).

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Histogram};
use serde::{Deserialize, Serialize};

/// Describes every series the library emits to the installed recorder, so
/// that exporters can show help text (Prometheus: `# HELP`). Call it once
/// after installing the recorder; a series added to the library gets its
/// line here.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    // Reads and loads, per `cache_type`.
    describe_counter!("cache_hits_total", "Reads answered from the cache.");
    describe_counter!(
        "cache_misses_total",
        "Reads that went to the source (database)."
    );
    describe_counter!(
        "cache_stale_served_total",
        "Reads answered with a stale copy because the source failed."
    );
    describe_counter!(
        "cache_bypass_total",
        "Reads that skipped the cache because it was unavailable (breaker open or error)."
    );
    describe_counter!("cache_loads_total", "Loads from the source after a miss.");
    describe_counter!(
        "cache_load_errors_total",
        "Loads from the source that failed."
    );
    describe_counter!(
        "cache_fills_rejected_total",
        "Loaded values not cached because a newer write or invalidation got in first."
    );
    describe_counter!(
        "cache_refreshes_total",
        "Eager refreshes started by this process, by outcome."
    );
    describe_counter!(
        "cache_load_timeouts_total",
        "Loads past the type's soft or hard load timeout (finished in the background)."
    );
    describe_counter!(
        "cache_cleared_total",
        "Cached values found cleared (by type or tag) and removed on read."
    );
    describe_counter!(
        "cache_redis_errors_total",
        "Cache store operations that failed or timed out."
    );
    describe_counter!(
        "cache_invalidations_total",
        "Invalidations requested after writes."
    );
    describe_histogram!(
        "cache_get_duration_seconds",
        Unit::Seconds,
        "Time of a cached read, hit or miss, including the load on a miss."
    );
    describe_histogram!(
        "cache_load_duration_seconds",
        Unit::Seconds,
        "Time of a load from the source."
    );
    // The circuit breaker and deferred invalidations.
    describe_gauge!(
        "cache_breaker_state",
        "Circuit breaker of the cache store: 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        "cache_breaker_opened_total",
        "Times the circuit breaker opened."
    );
    describe_gauge!(
        "cache_pending_invalidations",
        "Invalidations kept in this process until the cache store is reachable again."
    );
    // Write-behind, per `cache_type`.
    describe_counter!(
        "cache_wb_accepted_total",
        "Write-behind writes accepted into the queue."
    );
    describe_counter!(
        "cache_wb_flushed_total",
        "Write-behind rows written to the database."
    );
    describe_counter!(
        "cache_wb_coalesced_total",
        "Queue entries folded into a newer write of the same key."
    );
    describe_counter!(
        "cache_wb_retried_total",
        "Write-behind batches retried because the database was unavailable."
    );
    // The invalidation feed.
    describe_gauge!(
        "cache_feed_lag_seconds",
        Unit::Seconds,
        "Age of the oldest invalidation-log row not yet applied to the cache (0 when caught up)."
    );
    describe_gauge!(
        "cache_feed_backlog",
        "Invalidation-log rows at or past the fleet position."
    );
    describe_counter!(
        "cache_feed_applied_total",
        "Committed changes from the invalidation log applied to the cache."
    );
    describe_gauge!(
        "cache_feed_relay_active",
        "1 while this instance holds the feed relay lease."
    );
    describe_counter!(
        "cache_feed_overflow_clears_total",
        "Types cleared whole because the invalidation-log backlog passed its bound while the cache was unreachable."
    );
    describe_counter!(
        "cache_feed_regressions_total",
        "Times the database's watermark was found below the fleet position (fed types cleared, position set back)."
    );
    describe_counter!(
        "cache_feed_bad_rows_total",
        "Invalidation-log rows whose version could not be read: their entity was invalidated unconditionally."
    );
    describe_counter!(
        "cache_feed_kind_clears_total",
        "Types cleared whole by one change event (a TRUNCATE, a bulk transaction, a WAL row whose id could not be read)."
    );
    describe_counter!("cache_l1_hits_total", "Reads answered from the near cache.");
    describe_counter!(
        "cache_l1_misses_total",
        "Near cache lookups that went on to the store."
    );
    describe_counter!(
        "cache_l1_evictions_total",
        "Near cache entries dropped (reason: size bound, or invalidated by a push)."
    );
    describe_counter!(
        "cache_l1_invalidations_total",
        "Invalidation pushes received from the store, one per key."
    );
    describe_counter!(
        "cache_l1_flushes_total",
        "Whole near caches dropped (the invalidation stream was lost, began again, or the topology moved)."
    );
    describe_histogram!(
        "cache_l1_invalidation_delay_seconds",
        Unit::Seconds,
        "From a write of this process to the invalidation push that reports it."
    );
    describe_counter!(
        "cache_rate_limit_checks_total",
        "Requests counted against a rate limit (outcome: allowed or limited)."
    );
    describe_counter!(
        "cache_rate_limit_local_total",
        "Rate-limit decisions made by this process alone because the store was unreachable."
    );
    describe_gauge!("cache_l1_entries", "Entries held by the near cache.");
    describe_gauge!(
        "cache_l1_bytes",
        Unit::Bytes,
        "Bytes held by the near cache: JSON, id and a fixed overhead per entry."
    );
    describe_counter!(
        "cache_wb_requeued_total",
        "Write-behind writes the database refused, put back at the end of the queue for a retry after a back-off."
    );
    describe_counter!(
        "cache_wb_dead_letters_trimmed_total",
        "Oldest dead letters dropped to keep the dead-letter stream within its bound."
    );
    describe_counter!(
        "cache_wb_dead_lettered_total",
        "Write-behind writes moved to the dead-letter stream."
    );
    describe_counter!(
        "cache_wb_conflicts_total",
        "Write-behind accepts retried because the version changed under them."
    );
    describe_counter!(
        "cache_wb_refused_total",
        "Write-behind writes refused because the queue was past a limit."
    );
    describe_counter!(
        "cache_wb_unreplicated_total",
        "Write-behind writes not confirmed by enough replicas in time."
    );
    describe_gauge!(
        "cache_wb_queue_depth",
        "Write-behind writes queued, not yet in the database."
    );
    describe_gauge!(
        "cache_wb_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest queued write-behind write."
    );
    describe_gauge!(
        "cache_wb_dead_letters",
        "Entries in the write-behind dead-letter stream."
    );
    describe_gauge!(
        "cache_wb_limit_depth",
        "Queue depth past which write-behind writes are refused (0: no limit)."
    );
    describe_gauge!(
        "cache_wb_limit_age_seconds",
        Unit::Seconds,
        "Oldest-entry age past which write-behind writes are refused (0: no limit)."
    );
}

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
    pub(crate) cleared: Counter,
    kind: &'static str,
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
            cleared: metrics::counter!("cache_cleared_total", &l),
            kind,
        }
    }

    /// One eager refresh that ended with `outcome`.
    pub(crate) fn refreshed(&self, outcome: &'static str) {
        metrics::counter!("cache_refreshes_total", "cache_type" => self.kind, "outcome" => outcome)
            .increment(1);
    }

    /// One load past a timeout (`soft` or `hard`).
    pub(crate) fn timed_out(&self, timeout: &'static str) {
        metrics::counter!("cache_load_timeouts_total", "cache_type" => self.kind, "timeout" => timeout)
            .increment(1);
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
