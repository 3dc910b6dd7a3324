//! The single flight: concurrent reads of one cold key in one process share
//! one load, which runs as a task of its own (a cancelled caller cancels
//! neither the load nor the fill); a read joins a load only while the key's
//! write epoch it started under is current.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::{CacheAside, Fetched, Status};
use crate::consistency::epochs::Epoch;
use crate::error::Error;
use crate::source::Source;

pub(super) type Flight<T> = Shared<BoxFuture<'static, Result<Fetched<T>, Error>>>;

/// A load in flight, as the single-flight map keeps it.
pub(super) struct InFlight<T> {
    /// Tells this flight from a later one of the same key.
    seq: u64,
    /// The key's write epoch when the flight started: a caller joins only
    /// while it is current, so no caller that starts after a write returned
    /// is handed a load that began before it.
    epoch: Epoch,
    result: Flight<T>,
}

pub(super) type Flights<T> = Mutex<HashMap<String, InFlight<T>>>;

/// Removes a finished flight from the map when dropped, unless a later
/// flight of the key has taken its place.
struct Leave<'a, T>(&'a Flights<T>, String, u64);

impl<T> Drop for Leave<'_, T> {
    fn drop(&mut self) {
        let mut flights = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if flights.get(&self.1).is_some_and(|f| f.seq == self.2) {
            flights.remove(&self.1);
        }
    }
}

impl<S: Source> CacheAside<S> {
    /// Joins or starts the one load of `key` in this process.
    pub(super) async fn flight(
        &self,
        id: &str,
        key: String,
        use_cache: bool,
    ) -> Result<Fetched<S::Value>, Error> {
        self.flight_from(id, key, use_cache).await.map(|(f, _)| f)
    }

    /// As [`flight`](Self::flight), saying whether this caller started the
    /// load (`true`) or joined one already running.
    pub(super) async fn flight_from(
        &self,
        id: &str,
        key: String,
        use_cache: bool,
    ) -> Result<(Fetched<S::Value>, bool), Error> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut started = false;
        let epochs = &self.inner.cache.inner.epochs;
        let fut = {
            let mut flights = self
                .inner
                .flights
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Read under the map's lock, so a flight started here records
            // an epoch no older than what a caller checking later compares.
            let epoch = epochs.of(&key);
            match flights.get(&key) {
                Some(f) if f.epoch == epoch => f.result.clone(),
                // None, or one that began before a write returned: its
                // callers keep it, new ones get a load of their own.
                _ => {
                    started = true;
                    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                    let a = self.inner.clone();
                    let id = id.to_owned();
                    let k = key.clone();
                    // The load runs as a task of its own: a caller that gives
                    // up (request timeout, client gone) does not strand it
                    // holding a lease and a database connection, and the
                    // others still get its result.
                    let task = tokio::spawn(async move {
                        // Leaves the map however the load ends, a panic
                        // included.
                        let _leave = Leave(&a.flights, k, seq);
                        if use_cache {
                            a.resolve(&id).await
                        } else {
                            a.load_only(&id, Status::Bypass).await
                        }
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Error::source_error(format!("the load task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    flights.insert(
                        key,
                        InFlight {
                            seq,
                            epoch,
                            result: f.clone(),
                        },
                    );
                    f
                }
            }
        };
        fut.await.map(|f| (f, started))
    }
}
