//! Write ordering: the turn of a write of one entity among the others, for
//! a type written both behind and directly.
//!
//! A direct write (write-through, invalidate) or a delete takes its turn
//! ([`WriteBehind::direct_turn`]) before its commit and keeps it until its
//! cache step is done: it holds the entity's write lock, after waiting for
//! the entity's queued writes to reach the database. An accept takes its turn
//! ([`WriteBehind::turn`]) around the accept. So an accept comes either before
//! the direct write's check, which then sees its pending copy and waits for
//! its flush, or after the direct write's cache step, and is re-based on the
//! committed row. Without it the check is check-then-act: an accept landing
//! between the check and the commit would take the direct write's version
//! number from the old cached value, and its pending copy would hide the
//! direct write until the flush conflicts.
//!
//! # Why in the cache store
//!
//! The lock is a fleet lease ([`crate::lease::FleetLease`],
//! `<ns>:~lock:write:<type>:<id>`) in the store the queue lives in, so it
//! holds across every instance that shares the queue; a heartbeat keeps it
//! however long the write takes. A database lock would not do: a `behind`
//! write does not touch the database, and making it do so would put the
//! database back on the path write-behind takes it off.
//!
//! # When the lock cannot be had
//!
//! - The store cannot be reached (or the circuit breaker is open): the
//!   write goes ahead without it ([`WriteTurn::is_locked`] is false); no
//!   accept can be made meanwhile either. A queued write it overtakes is
//!   caught by the flush's version guard and dead-lettered as a conflict.
//! - The holder stalls past the lease's lifetime or its heartbeat fails:
//!   the lease expires and the same guard is the backstop. A release that is
//!   lost (a failover) keeps other writers waiting until the lifetime ends,
//!   not failing.
//! - Another writer holds it for longer than [`TURN_WAIT`]:
//!   [`TurnError::Busy`]; queued writes still waiting after [`QUEUED_WAIT`]:
//!   [`TurnError::Queued`]. Both mean "retry later" (503 with
//!   `Retry-After` in the service).

use std::time::Duration;

use super::WriteBehind;
use crate::core::lease::{FleetLease, Held};
use crate::source::Source;

/// How long the write lock lives after each heartbeat (every quarter of
/// it): how long a lock whose release was lost keeps other writers of the
/// entity waiting. Less than [`TURN_WAIT`], so they wait, not fail.
pub const TURN_LOCK_TTL: Duration = Duration::from_secs(3);

/// How long a writer waits for another writer of the entity.
pub const TURN_WAIT: Duration = Duration::from_secs(5);

/// How long a direct write waits for the entity's queued writes to reach
/// the database.
pub const QUEUED_WAIT: Duration = Duration::from_secs(5);

/// A writer's turn: the entity's write lock, held (and kept by a heartbeat)
/// until [`WriteTurn::release`] or drop.
#[derive(Debug)]
#[must_use = "the turn ends when it is dropped"]
pub struct WriteTurn {
    held: Option<Held>,
}

impl WriteTurn {
    /// Whether the lock is held (false when the store could not be asked:
    /// the write goes ahead without it).
    #[must_use]
    pub fn is_locked(&self) -> bool {
        self.held.is_some()
    }

    /// Ends the turn: gives the lock back.
    pub async fn release(self) {
        if let Some(h) = self.held {
            h.release().await;
        }
    }
}

/// Why a writer could not take its turn: retry later.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TurnError {
    /// Another writer of the entity held the lock for the whole
    /// [`TURN_WAIT`].
    #[error("another write of this {kind} is in progress; retry later")]
    Busy {
        /// The type.
        kind: &'static str,
    },
    /// The entity's queued writes were still waiting for the database
    /// after [`QUEUED_WAIT`].
    #[error("the {kind} has writes waiting for the database; retry later")]
    Queued {
        /// The type.
        kind: &'static str,
    },
}

impl<S: Source> WriteBehind<S> {
    /// The turn of an accept of `id` (see the module docs): the entity's
    /// write lock, waited for up to [`TURN_WAIT`].
    ///
    /// # Errors
    ///
    /// [`TurnError::Busy`] when another writer held it the whole wait.
    pub async fn turn(&self, id: &str) -> Result<WriteTurn, TurnError> {
        let kind = self.reader().kind();
        if self.reader().cache().breaker_state() == crate::breaker::BreakerState::Open {
            // The cache already knows the store is down: don't pay a
            // timeout per write to learn it again.
            return Ok(WriteTurn { held: None });
        }
        let lease = FleetLease::new(
            self.reader().cache(),
            &format!("lock:write:{}:{id}", kind.name()),
            "writer",
            TURN_LOCK_TTL,
        );
        let deadline = tokio::time::Instant::now() + TURN_WAIT;
        let mut pause = Duration::from_millis(1);
        loop {
            match lease.hold().await {
                Some(Some(held)) => return Ok(WriteTurn { held: Some(held) }),
                Some(None) => {}
                None => {
                    tracing::warn!(
                        kind = kind.name(),
                        id,
                        "write lock unavailable: writing without it"
                    );
                    return Ok(WriteTurn { held: None });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(kind = kind.name(), id, waited = ?TURN_WAIT, "another write held the entity's lock");
                return Err(TurnError::Busy { kind: kind.name() });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// The turn of a direct write or a delete of `id` (see the module
    /// docs): the entity's write lock, then no queued write of it left
    /// (waited for up to [`QUEUED_WAIT`]; when the store cannot be asked
    /// there is nothing to wait for).
    ///
    /// # Errors
    ///
    /// [`TurnError::Busy`] as [`WriteBehind::turn`]; [`TurnError::Queued`]
    /// as [`WriteBehind::wait_queued`] (the lock is given back).
    pub async fn direct_turn(&self, id: &str) -> Result<WriteTurn, TurnError> {
        let turn = self.turn(id).await?;
        match self.wait_queued(id).await {
            Ok(()) => Ok(turn),
            Err(e) => {
                turn.release().await;
                Err(e)
            }
        }
    }

    /// Waits until `id` has no queued write left, up to [`QUEUED_WAIT`]:
    /// the second half of [`WriteBehind::direct_turn`], for a writer that
    /// already holds its turn (an accept that turned into a direct write).
    /// When the store cannot be asked there is nothing to wait for.
    ///
    /// # Errors
    ///
    /// [`TurnError::Queued`] when queued writes were still waiting after
    /// the wait.
    pub async fn wait_queued(&self, id: &str) -> Result<(), TurnError> {
        let deadline = tokio::time::Instant::now() + QUEUED_WAIT;
        loop {
            match self.is_pending(id).await {
                Ok(false) | Err(_) => return Ok(()),
                Ok(true) if tokio::time::Instant::now() >= deadline => {
                    let kind = self.reader().kind().name();
                    tracing::warn!(kind, id, waited = ?QUEUED_WAIT, "queued writes still not in the database");
                    return Err(TurnError::Queued { kind });
                }
                Ok(true) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}
