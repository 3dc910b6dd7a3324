//! The write-behind flushers `kura serve` runs (`--wb-flushers`) and
//! `kura flush` runs, as tasks until [`Flushers::stop`].

use std::time::Duration;

use kura::Source;
use kura::strategy::write_behind::FlushReport;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::open_cache;
use crate::config::Config;
use crate::profiles::ProfileService;

/// Flushers running as tasks until [`Flushers::stop`].
#[derive(Debug)]
pub struct Flushers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<FlushReport>>,
}

impl Flushers {
    /// Starts `n` flushers of `service`'s queue. On Redis each gets a cache
    /// of its own opened from `config` (see [`ProfileService::flusher_on`]);
    /// on the embedded memory store they share the service's.
    #[must_use]
    pub fn start(service: &ProfileService, n: usize, config: &Config) -> Flushers {
        let (stop, _) = watch::channel(false);
        let tasks = (0..n)
            .map(|_| {
                let flusher = match config.redis_url.is_some().then(|| open_cache(config)) {
                    Some(Ok((cache, _))) => service.flusher_on(&cache),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "flusher cache: using the service's");
                        service.flusher()
                    }
                    None => service.flusher(),
                };
                let mut stopped = stop.subscribe();
                tokio::spawn(flusher.run(async move {
                    // A dropped sender stops the flushers too.
                    let _ = stopped.wait_for(|s| *s).await;
                }))
            })
            .collect();
        if n > 0 {
            tracing::info!(flushers = n, "write-behind flushers started");
        }
        Flushers { stop, tasks }
    }

    /// Runs one more flusher (another queue's) with the others, stopped
    /// with them.
    pub fn spawn<S: Source, K: kura::Sink<Value = S::Value>>(
        &mut self,
        flusher: kura::Flusher<S, K>,
    ) {
        let mut stopped = self.stop.subscribe();
        self.tasks.push(tokio::spawn(flusher.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
    }

    /// How many flushers run.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether none runs.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Asks every flusher to stop after the batch in hand and waits up to
    /// `grace` for them; a flusher still running then is aborted, which is
    /// safe: its transaction is rolled back or committed whole, and what it
    /// had not acknowledged is taken over by the next flusher (a replay of
    /// a committed batch changes nothing).
    pub async fn stop(self, grace: Duration) -> FlushReport {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        let mut total = FlushReport::default();
        for mut t in self.tasks {
            match tokio::time::timeout_at(deadline, &mut t).await {
                Ok(Ok(r)) => total += r,
                Ok(Err(e)) => tracing::error!(error = %e, "write-behind flusher failed"),
                Err(_) => {
                    tracing::warn!(
                        ?grace,
                        "write-behind flusher still busy after the grace period: stopped; its entries stay queued"
                    );
                    t.abort();
                }
            }
        }
        total
    }
}
