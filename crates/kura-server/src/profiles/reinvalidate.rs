//! Profiles whose failed write may still commit, invalidated again once
//! their row is free.
//!
//! A failed write's statement may have committed although its answer was
//! lost, and may even still be running, holding the row; a reader may load
//! the old row meanwhile and cache it. So after the immediate invalidation
//! the profile is queued here and invalidated once more when
//! `SELECT … FOR UPDATE` gets the row.
//!
//! The work is bounded however many writes fail (a database that drops
//! connections fails every write in flight):
//!
//! - one entry per user, coalesced (a second failure of the same profile
//!   joins the first; "every type" wins over "the profile only");
//! - at most [`CAPACITY`] users waiting; past it a failure keeps only its
//!   immediate invalidation (logged, `kura_unsure_dropped_total`);
//! - [`WORKERS`] tasks at most, each waiting on one row at a time, so at
//!   most that many database connections are held for this; they exist
//!   only while there is work, and end when the set is empty;
//! - each row is tried up to [`MAX_TRIES`] times, [`TRY_WAIT`] each, a
//!   second apart, then given up with a warning (its cached value may be
//!   stale until its TTL).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::ProfileService;

/// Tasks waiting for rows at once (and so database connections held).
pub const WORKERS: usize = 2;
/// Users waiting at most.
pub const CAPACITY: usize = 10_000;
/// Tries per row.
pub const MAX_TRIES: u32 = 30;
/// How long one try waits for the row.
pub const TRY_WAIT: Duration = Duration::from_secs(30);
/// Pause before a row is tried again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Every cached type of the user, not only the profile.
    entity: bool,
    tries: u32,
    not_before: Instant,
}

#[derive(Debug, Default)]
struct State {
    order: VecDeque<Uuid>,
    entries: HashMap<Uuid, Entry>,
    workers: usize,
}

/// The set of users to invalidate again; shared by the clones of a
/// [`ProfileService`].
#[derive(Debug, Default)]
pub(crate) struct Reinvalidate {
    state: Mutex<State>,
}

impl Reinvalidate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Users waiting.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Adds `user_id` (merged with an entry it has); whether a worker
    /// should be started.
    /// Sets `kura_unsure_invalidations` from the current count.
    pub(crate) fn publish_gauge(&self) {
        metrics::gauge!("kura_unsure_invalidations").set(self.lock().entries.len() as f64);
    }

    fn add(&self, user_id: Uuid, e: Entry) -> Result<bool, ()> {
        let mut s = self.lock();
        if let Some(cur) = s.entries.get_mut(&user_id) {
            cur.entity |= e.entity;
            cur.tries = cur.tries.min(e.tries);
            cur.not_before = cur.not_before.min(e.not_before);
            return Ok(false);
        }
        if s.entries.len() >= CAPACITY {
            return Err(());
        }
        s.entries.insert(user_id, e);
        s.order.push_back(user_id);
        metrics::gauge!("kura_unsure_invalidations").set(s.entries.len() as f64);
        if s.workers < WORKERS {
            s.workers += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// The next user to try and when, or `None` (and this worker ends)
    /// when the set is empty.
    fn next(&self) -> Option<(Uuid, Entry)> {
        let mut s = self.lock();
        while let Some(u) = s.order.pop_front() {
            if let Some(e) = s.entries.remove(&u) {
                metrics::gauge!("kura_unsure_invalidations").set(s.entries.len() as f64);
                return Some((u, e));
            }
        }
        s.workers -= 1;
        None
    }
}

impl ProfileService {
    /// After a write that failed: the user's cache entries (`entity`:
    /// every type, else the profile) are invalidated now, and again once
    /// the row is free (see [`reinvalidate`](self)). An extra invalidation costs
    /// one miss at most.
    pub(super) async fn reinvalidate_later(&self, user_id: Uuid, entity: bool) {
        self.invalidate_now(user_id, entity).await;
        self.queue_reinvalidation(
            user_id,
            Entry {
                entity,
                tries: 0,
                not_before: Instant::now(),
            },
        );
    }

    fn queue_reinvalidation(&self, user_id: Uuid, e: Entry) {
        match self.reinvalidate.add(user_id, e) {
            Ok(true) => {
                let this = self.clone();
                tokio::spawn(async move { this.reinvalidation_worker().await });
            }
            Ok(false) => {}
            Err(()) => {
                metrics::counter!("kura_unsure_dropped_total").increment(1);
                tracing::warn!(
                    %user_id,
                    "too many failed writes waiting for their rows: this one is invalidated once only; its cached value may be stale until its TTL"
                );
            }
        }
    }

    async fn reinvalidation_worker(&self) {
        while let Some((user_id, e)) = self.reinvalidate.next() {
            tokio::time::sleep_until(e.not_before).await;
            let waited = tokio::time::timeout(TRY_WAIT, self.db.wait_for_row(user_id)).await;
            match waited {
                Ok(Ok(())) => {
                    self.invalidate_now(user_id, e.entity).await;
                    continue;
                }
                Ok(Err(err)) => tracing::debug!(%user_id, error = %err, "row not reachable yet"),
                Err(_) => tracing::debug!(%user_id, "row still locked"),
            }
            if e.tries + 1 >= MAX_TRIES {
                tracing::warn!(
                    %user_id,
                    "a failed write's row stayed out of reach: its cached value may be stale until its TTL"
                );
                continue;
            }
            self.queue_reinvalidation(
                user_id,
                Entry {
                    tries: e.tries + 1,
                    not_before: Instant::now() + RETRY_PAUSE,
                    ..e
                },
            );
        }
    }

    /// Users whose failed write is waiting for its row to be invalidated
    /// again (see [`reinvalidate`](self)).
    #[must_use]
    pub fn reinvalidations_pending(&self) -> usize {
        self.reinvalidate.len()
    }
}
