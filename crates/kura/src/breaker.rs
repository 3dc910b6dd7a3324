//! Circuit breaker: stop asking a cache server that is down.
//!
//! After `failures` consecutive outage errors (timeouts, refused or reset
//! connections) the breaker opens: every operation skips the store at once
//! and reads go to the source. After `cooldown`, one caller is let through
//! as a probe; its success closes the breaker, its failure re-opens it. A
//! probe that never reports back (its request was cancelled) is replaced by
//! another after one more cooldown, so the breaker cannot stay half-open.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before a probe.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 3,
            cooldown: Duration::from_millis(500),
        }
    }
}

impl BreakerConfig {
    /// Custom settings.
    #[must_use]
    pub const fn new(failures: u32, cooldown: Duration) -> Self {
        Self { failures, cooldown }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// The store is used.
    Closed,
    /// The store is skipped.
    Open,
    /// One probe is in flight.
    HalfOpen,
}

impl BreakerState {
    /// The value of the `cache_breaker_state` gauge.
    #[must_use]
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

#[derive(Debug)]
pub(crate) struct Breaker {
    cfg: BreakerConfig,
    state: AtomicU8,
    failures: AtomicU32,
    /// Milliseconds since `epoch` when the state last changed to open or
    /// half-open.
    since: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            since: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// Whether the caller may use the store now. When the cooldown has
    /// passed, exactly one caller gets `true` (the probe).
    pub(crate) fn allow(&self) -> bool {
        let s = self.state.load(Ordering::Acquire);
        if s == CLOSED {
            return true;
        }
        let since = self.since.load(Ordering::Acquire);
        let now = self.now_ms();
        if now.saturating_sub(since) < self.cfg.cooldown.as_millis() as u64 {
            return false;
        }
        // Claim the probe: whoever moves `since` forward first wins.
        if self
            .since
            .compare_exchange(since, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.state.store(HALF_OPEN, Ordering::Release);
            metrics::gauge!("cache_breaker_state").set(BreakerState::HalfOpen.as_gauge());
            true
        } else {
            false
        }
    }

    /// Records a successful store operation.
    pub(crate) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.state.load(Ordering::Acquire) != CLOSED {
            self.state.store(CLOSED, Ordering::Release);
            metrics::gauge!("cache_breaker_state").set(BreakerState::Closed.as_gauge());
            tracing::info!("cache store answers again: circuit closed");
        }
    }

    /// Records an outage error.
    pub(crate) fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let s = self.state.load(Ordering::Acquire);
        if s == HALF_OPEN || (s == CLOSED && n >= self.cfg.failures) {
            self.since.store(self.now_ms(), Ordering::Release);
            self.state.store(OPEN, Ordering::Release);
            metrics::gauge!("cache_breaker_state").set(BreakerState::Open.as_gauge());
            metrics::counter!("cache_breaker_opened_total").increment(1);
            if s == CLOSED {
                tracing::warn!(
                    failures = n,
                    "cache store failing: circuit open, reads go to the source"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_and_probes_once() {
        let b = Breaker::new(BreakerConfig::new(3, Duration::from_millis(30)));
        assert!(b.allow());
        b.failure();
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "one probe after the cooldown");
        assert!(!b.allow(), "only one probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
    }

    #[test]
    fn a_lost_probe_is_replaced() {
        let b = Breaker::new(BreakerConfig::new(1, Duration::from_millis(20)));
        b.failure();
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.allow());
        // The probe never reports; after another cooldown a new one goes.
        assert!(!b.allow());
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.allow());
    }

    #[test]
    fn success_resets_the_count() {
        let b = Breaker::new(BreakerConfig::new(2, Duration::from_secs(10)));
        b.failure();
        b.success();
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
