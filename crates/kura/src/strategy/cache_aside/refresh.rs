//! Eager refresh of cache-aside reads (see [`crate::policy::freshness`]): the
//! XFetch roll on a hit, and the background reload under a refresh lease.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::ReaderState;
use crate::core::CacheInner;
use crate::policy::freshness::EagerRefresh;
use crate::source::{Source, Versioned};
use crate::store::{FillOutcome, FillRequest, FillValue};

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl<S: Source> ReaderState<S> {
    /// A hit of `id`, whose entry expires at `expires_ms` (0: not known):
    /// rolls XFetch and, when due, starts a background reload unless this
    /// process already has one of the key in flight.
    pub(super) fn consider_refresh(
        self: &Arc<Self>,
        rule: EagerRefresh,
        id: &str,
        expires_ms: u64,
    ) {
        if expires_ms == 0 {
            return;
        }
        let remaining = Duration::from_millis(expires_ms.saturating_sub(now_ms()));
        // δ: what a refresh takes, lease to refill (a load alone until one
        // was measured).
        let delta = self
            .refresh_time
            .measured()
            .unwrap_or_default()
            .max(self.load_time.estimate());
        if !rule.roll(remaining, delta) {
            return;
        }
        {
            let mut r = self
                .refreshing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !r.insert(id.to_owned()) {
                return;
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        let id = id.to_owned();
        rt.spawn(async move {
            let started = std::time::Instant::now();
            let outcome = me.refresh(&id, expires_ms).await;
            if outcome == "stored" {
                me.refresh_time.record(started.elapsed());
            }
            me.metrics.refreshed(outcome);
            me.refreshing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        });
    }

    /// One background reload of `id`, unless the value read (expiring at
    /// `seen_expires_ms`) was replaced meanwhile: refresh lease, load,
    /// refill. Returns the outcome's metric label.
    pub(super) async fn refresh(&self, id: &str, seen_expires_ms: u64) -> &'static str {
        let c = &self.cache.inner;
        let entry = c.keys.entry_unchecked(&self.kind, id);
        let token = CacheInner::token();
        let epoch = c.load_epoch().await;
        match c
            .call(
                None,
                c.store
                    .refresh_lease(&entry, &token, c.lease_ttl, seen_expires_ms),
            )
            .await
        {
            Ok(true) => {}
            // Another process (or a miss's load) has it, or the value went.
            Ok(false) => return "busy",
            Err(_) => return "failed",
        }
        let v = match self.timed_load(id).await {
            Ok(Some(v)) => v,
            // Gone, or the source failed: the cached value lives out its
            // TTL as without the rule.
            Ok(None) | Err(_) => {
                self.release(&entry, &token).await;
                return "failed";
            }
        };
        let (enc, lifetimes) = match self.envelope(&v, &entry.value, epoch) {
            Ok((enc, Some(l))) => (enc, l),
            _ => {
                self.release(&entry, &token).await;
                return "refused";
            }
        };
        let req = FillRequest {
            keys: &entry,
            token: &token,
            value: FillValue::Value {
                bytes: enc.envelope,
                version: v.version(),
            },
            lifetimes,
        };
        let r = c.call(Some(&self.metrics), c.store.refill(&[req])).await;
        // This process's L1 takes the new value at its next read.
        c.near_evict(&entry.value);
        match r {
            Ok(v) if v.first() == Some(&FillOutcome::Stored) => "stored",
            Ok(_) => {
                self.metrics.fills_rejected.increment(1);
                "refused"
            }
            Err(_) => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use crate::policy::freshness::EagerRefresh;
    use crate::store::MemoryStore;
    use crate::{Cache, Kind, Source, Status, TtlPolicy, TypePolicy, Versioned};

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct V {
        v: u64,
    }

    impl Versioned for V {
        fn version(&self) -> u64 {
            self.v
        }
    }

    struct Src(Arc<AtomicU64>);

    impl Source for Src {
        type Value = V;
        type Error = std::io::Error;
        async fn load(&self, _id: &str) -> Result<Option<V>, std::io::Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(Some(V { v: 1 }))
        }
    }

    /// A long run of eager refreshes of 20 keys with a 100 ms TTL: each key
    /// is reloaded about once per TTL, readers almost never miss, and when
    /// the reads stop no refresh is left marked in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn soak_refreshes_leave_nothing_in_flight() {
        let policy = TtlPolicy::default().with_jitter(0.0).with_type(
            "profile",
            TypePolicy::new(Duration::from_millis(100))
                .eager_refresh(EagerRefresh::new(4.0).unwrap()),
        );
        let cache = Cache::builder(MemoryStore::new())
            .ttl_policy(policy)
            .build()
            .unwrap();
        let loads = Arc::new(AtomicU64::new(0));
        let p = cache.aside(Kind::new("profile"), Src(loads.clone()));
        let ids: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        let until = Instant::now() + Duration::from_secs(4);
        let (mut reads, mut misses) = (0u64, 0u64);
        while Instant::now() < until {
            for id in &ids {
                reads += 1;
                if p.get(id).await.unwrap().status() != Status::Hit {
                    misses += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            p.parts()
                .refreshing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_empty(),
            "refreshes left marked in flight"
        );
        let n = loads.load(Ordering::SeqCst);
        assert!(
            n >= 20 * 20,
            "each key reloaded about once per TTL: {n} loads"
        );
        // XFetch reloads δβ·ln(λδβ) early (here some 20 ms of 100): more
        // often than once per TTL, far less than once per read.
        assert!(
            n <= 20 * 100,
            "at most about twice per TTL: {n} loads of {reads} reads"
        );
        assert!(
            misses <= 20 + reads / 200,
            "{misses} misses of {reads} reads"
        );
    }
}
