//! Where committed changes come from: the [`ChangeSource`] trait the relay
//! reads, and its implementations' shared parts.
//!
//! - `trigger_log.rs`: the trigger log (PostgreSQL and SQLite): the SQL of
//!   the log table and of the fed tables' triggers.
//! - `pgoutput.rs`: a decoder of PostgreSQL's logical replication messages.
//! - `wal/`: a replication stream assembled into positioned events
//!   ([`wal::WalChanges`]), for a source over a replication slot.

use std::future::Future;
use std::time::Duration;

use super::FeedEvent;

#[cfg(doc)]
use super::Relay;
#[cfg(doc)]
use crate::Store;

pub mod pgoutput;
pub mod trigger_log;
pub mod wal;

/// Where the database's committed changes come from, as the [`Relay`]
/// reads them: by position, in commit order, with a watermark below which
/// every change is final. The trigger log ([`trigger_log`]) is one such
/// source; a source needs no database driver in the library (kura-server
/// implements it over sqlx).
///
/// The relay's safety rules (apply everything below the watermark before
/// the fleet position moves past it; never move the position back except
/// after a regression and a clear; the version rule of
/// [`Store::invalidate_older`]) are written once, in the relay, for every
/// source. A source only answers what it holds.
///
/// # Outages
///
/// The last six methods are how a source stays bounded while no relay
/// reaches the cache: the trigger log records an overflow of the fed
/// kinds, deletes their unapplied rows below a cut, and mirrors the fleet
/// position in the database. A source that keeps every change until the
/// fleet confirms it (a replication slot) has no overflow: their defaults
/// say so (nothing overflowed, nothing to delete, no mirror).
///
/// A position is a `u64` that orders commits: on PostgreSQL the writing
/// transaction's `txid` (`xid8`), on SQLite the row's `seq`. Everything
/// below [`ChangeSource::watermark`] is final: no row with a lower position can
/// still appear.
///
/// # Concurrent calls
///
/// Several relays (in several processes) call one log at once; every method
/// must be safe to run concurrently with writers and with itself.
pub trait ChangeSource: Send + Sync + 'static {
    /// The log's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Everything below it is final (PostgreSQL: the snapshot's xmin,
    /// `pg_snapshot_xmin(pg_current_snapshot())`; SQLite: the last `seq`
    /// handed out plus one, `SELECT seq + 1 FROM sqlite_sequence WHERE name
    /// = 'kura_invalidation_log'` (1 when absent), not `max(seq) + 1`,
    /// which goes back when retention deletes the newest rows).
    fn watermark(&self) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Rows with a position in `[from, to)`, after `after` (the last
    /// `(position, seq)` of the previous page), at most `limit`, ordered by
    /// `(position, seq)`. Called after [`ChangeSource::watermark`] returned `to`,
    /// in a later snapshot.
    fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, FeedEvent)>, Self::Error>> + Send;

    /// The lowest position still in the log (`None`: empty).
    fn oldest(&self) -> impl Future<Output = Result<Option<u64>, Self::Error>> + Send;

    /// How many rows have a position at or past `from`.
    fn backlog(&self, from: u64) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Lets go of up to `limit` changes with a position below `below` (the
    /// fleet applied them) written before `before_ms` (Unix milliseconds):
    /// the trigger log deletes those rows; returns how many.
    fn release(
        &self,
        below: u64,
        before_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Waits for a wake-up (PostgreSQL: a `NOTIFY` on
    /// [`trigger_log::CHANNEL`]) or `timeout`, whichever comes first. A missed
    /// wake-up loses nothing: the relay polls.
    fn wait(&self, timeout: Duration) -> impl Future<Output = ()> + Send;

    /// The kinds whose backlog overflowed, each with its cut: the position
    /// below which its unapplied rows may have been deleted
    /// (`kura_feed_state`). They are to be cleared from the cache once it is
    /// reachable.
    fn overflowed(&self) -> impl Future<Output = Result<Vec<(String, u64)>, Self::Error>> + Send {
        std::future::ready(Ok(Vec::new()))
    }

    /// Records an overflow of `kinds` with cut `cut` (a watermark): inserts
    /// the kind, or raises its cut to `cut` if higher (`INSERT ... ON
    /// CONFLICT (kind) DO UPDATE SET cut = GREATEST(cut, EXCLUDED.cut)`).
    fn mark_overflow(
        &self,
        kinds: &[String],
        cut: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = (kinds, cut);
        std::future::ready(Ok(()))
    }

    /// Forgets the overflow of each kind whose cut is still at most the one
    /// given (`DELETE ... WHERE kind = $1 AND cut <= $2`): a cut raised
    /// since it was read means more rows were deleted unapplied, and the
    /// kind must be cleared again.
    fn clear_overflow(
        &self,
        kinds: &[(String, u64)],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = kinds;
        std::future::ready(Ok(()))
    }

    /// Deletes up to `limit` rows of overflowed kinds with a position below
    /// their kind's cut, applied or not, any age (one statement that reads
    /// the cut itself, so a cut forgotten meanwhile deletes nothing);
    /// returns how many.
    fn prune_overflowed(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send {
        let _ = limit;
        std::future::ready(Ok(0))
    }

    /// Records the fleet position in the database too (a mirror of the one
    /// in Redis, written at most once per poll interval by a relay that
    /// moved it): a relay cut off from Redis counts its backlog from it,
    /// so one instance partitioned from Redis while the rest of the fleet
    /// relays does not declare an overflow. Only a hint: a stale value makes
    /// an overflow sooner or later, never a skipped row.
    fn save_position(&self, position: u64) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = position;
        std::future::ready(Ok(()))
    }

    /// The position last recorded by [`ChangeSource::save_position`].
    fn saved_position(&self) -> impl Future<Output = Result<Option<u64>, Self::Error>> + Send {
        std::future::ready(Ok(None))
    }

    /// Tells writers that a relay steps at a short interval for the next
    /// `window`, so that their wake-ups are not needed meanwhile
    /// (PostgreSQL: `kura_feed_relay.polling_until`, which the `NOTIFY`
    /// trigger reads; a `NOTIFY` takes a database-wide lock at commit, and
    /// skipping it is what keeps a write-heavy database from serializing
    /// its commits). The relay calls it while it keeps finding rows, at most
    /// twice per window, and polls at the short interval only when it
    /// answers `true`. A log without wake-ups keeps the default, which does
    /// nothing and answers `false`.
    fn polling(&self, window: Duration) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        let _ = window;
        std::future::ready(Ok(false))
    }

    /// Tells the source whether this instance relays (holds the fleet
    /// lease) before each step of [`Relay::run`]: a source that one
    /// consumer at a time may read (a replication slot) opens its stream
    /// when leading and lets it go when not. The default does nothing.
    fn lead(&self, leading: bool) -> impl Future<Output = ()> + Send {
        let _ = leading;
        std::future::ready(())
    }

    /// Whether a watermark below the position held means the database lost
    /// transactions the fleet applied (the trigger log: a failover or a
    /// restore; the relay clears and rewinds). A replication stream answers
    /// `false`: its watermark starts at the slot's confirmed position, which
    /// may lag the fleet's, and it reports a lost or missing slot through
    /// [`ChangeSource::overflowed`] instead.
    fn regressions(&self) -> bool {
        true
    }
}

/// A shared source is a source: one [`ChangeSource`] can serve a relay and a
/// status endpoint (or several relays of one process).
impl<L: ChangeSource> ChangeSource for std::sync::Arc<L> {
    type Error = L::Error;

    fn watermark(&self) -> impl Future<Output = Result<u64, Self::Error>> + Send {
        (**self).watermark()
    }

    fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(u64, FeedEvent)>, Self::Error>> + Send {
        (**self).read(from, to, after, limit)
    }

    fn oldest(&self) -> impl Future<Output = Result<Option<u64>, Self::Error>> + Send {
        (**self).oldest()
    }

    fn backlog(&self, from: u64) -> impl Future<Output = Result<u64, Self::Error>> + Send {
        (**self).backlog(from)
    }

    fn release(
        &self,
        below: u64,
        before_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send {
        (**self).release(below, before_ms, limit)
    }

    fn wait(&self, timeout: Duration) -> impl Future<Output = ()> + Send {
        (**self).wait(timeout)
    }

    fn polling(&self, window: Duration) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        (**self).polling(window)
    }

    fn lead(&self, leading: bool) -> impl Future<Output = ()> + Send {
        (**self).lead(leading)
    }

    fn regressions(&self) -> bool {
        (**self).regressions()
    }

    fn overflowed(&self) -> impl Future<Output = Result<Vec<(String, u64)>, Self::Error>> + Send {
        (**self).overflowed()
    }

    fn mark_overflow(
        &self,
        kinds: &[String],
        cut: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        (**self).mark_overflow(kinds, cut)
    }

    fn clear_overflow(
        &self,
        kinds: &[(String, u64)],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        (**self).clear_overflow(kinds)
    }

    fn prune_overflowed(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send {
        (**self).prune_overflowed(limit)
    }

    fn save_position(&self, position: u64) -> impl Future<Output = Result<(), Self::Error>> + Send {
        (**self).save_position(position)
    }

    fn saved_position(&self) -> impl Future<Output = Result<Option<u64>, Self::Error>> + Send {
        (**self).saved_position()
    }
}
