//! Invalidation from the database's commits: every committed change reaches
//! the cache, whoever wrote it.
//!
//! The database writes its own invalidation log, by triggers, in the same
//! transaction as each change ([`sql`]); a [`Relay`] reads the log in commit
//! order and applies it to the cache ([`Store::invalidate_older`]). The
//! writer's own post-commit invalidation stays as the fast path for
//! read-your-writes; the feed is what makes the cache right whoever wrote
//! (psql, a migration, another service, a kura process that died or was cut
//! off from Redis before it could invalidate).
//!
//! # Changes from the design both sides build to
//!
//! - [`FeedLog`] has four more methods for the overflow state, which must
//!   outlive a relay and be readable while Redis is down:
//!   [`FeedLog::overflowed`], [`FeedLog::mark_overflow`],
//!   [`FeedLog::clear_overflow`] and [`FeedLog::prune_overflowed`]. Each
//!   overflowed kind carries a *cut* (a watermark): a relay cut off from
//!   Redis deletes unapplied rows only below the cut, and the relay that
//!   clears the kind forgets the overflow only if the cut did not move since
//!   it read it. Without the cut, a relay cut off from Redis could delete
//!   rows that a reachable relay was about to apply, after that relay's
//!   clear had started (a late-committing transaction), and they would be
//!   lost.
//! - Two more methods keep a mirror of the fleet position in the database,
//!   for relays cut off from Redis: [`FeedLog::save_position`] and
//!   [`FeedLog::saved_position`] (table `kura_feed_position`, one row).
//! - [`log_table_sql`] also creates `kura_feed_state (kind TEXT PRIMARY KEY,
//!   cut XID8 (SQLite: INTEGER), overflowed_at)` and `kura_feed_position
//!   (id BOOLEAN PRIMARY KEY CHECK (id), position XID8 (SQLite: INTEGER),
//!   updated_at)`.
//! - [`TriggerSpec::install_sql`] / [`TriggerSpec::remove_sql`] return one
//!   script (`String`); `install_statements` / `remove_statements` give the
//!   statements one by one. [`TriggerSpec::new`] takes the table and kind
//!   (columns default to `id` and `version`), and is followed by
//!   `.id_column(..)?` / `.version_column(..)?`.
//! - The position key is `<ns>:~feed:position` and the fleet lease
//!   `<ns>:~feed:relay` ([`crate::key::KeyBuilder::internal`]), moved by
//!   [`Store::advance`].
//! - [`FeedStatus::position`] is an `Option<u64>` (none held yet).
//!   [`Relay::step`] returns a [`StepReport`].
//! - SQLite's watermark is the last `seq` handed out plus one
//!   (`sqlite_sequence`), not `max(seq) + 1`, which goes back when
//!   retention deletes the newest rows.
//! - On SQLite the UPDATE trigger bumps the version by the id column, not
//!   `rowid` (so `WITHOUT ROWID` tables work too), and the bump raises a
//!   version an UPDATE set lower, not only an unchanged one (both backends).
//!
//! # How the position never skips a transaction
//!
//! A log row's `seq` is taken at INSERT, not at COMMIT: a transaction
//! holding `seq = 5` can commit after one holding `seq = 6` was read, and a
//! reader going by `WHERE seq > $position` skips 5 for ever. The relay reads
//! by a watermark instead ([`FeedLog::watermark`]):
//!
//! - PostgreSQL: `W = pg_snapshot_xmin(pg_current_snapshot())`. Every
//!   transaction with a `txid` below `W` has finished, so the visible rows
//!   with `txid < W` are final. A step applies the rows with
//!   `position <= txid < W`, in `(txid, seq)` order, then moves the
//!   position to `W`. Rows of transactions still running wait for a later
//!   step.
//! - SQLite: commits are serialized, so `seq` order is commit order; the
//!   position is the next `seq` to apply and `W` the last `seq` handed out
//!   plus one (`sqlite_sequence`, which `AUTOINCREMENT` never lowers).
//!
//! # Why a fleet of relays is safe
//!
//! The position lives in Redis and only moves forward ([`Store::advance`]:
//! set only if greater, atomically). Each relay applies everything in
//! `[position it read, W)` before it moves the position to `W`, so
//! everything below the position held has been applied, whoever moved it
//! there. A relay that dies or is cut off mid-batch never moved the
//! position: the next step (of any relay) applies the batch again. Two
//! relays applying the same rows, or an old batch after a newer one, are
//! harmless: [`Store::invalidate_older`] keeps a cached value of the same or
//! a newer version. A fleet lease (`<ns>:~feed:relay`, [`Store::lock`])
//! keeps normally one relay stepping; it saves work, and safety does not
//! depend on it.
//!
//! # Guarantees
//!
//! | what | guarantee |
//! |---|---|
//! | a committed change to a fed table, by any writer | invalidates the entity's cached value (and voids loads in flight) at least once, in commit order per entity, while at least one relay reaches both the database and Redis |
//! | a writer that dies or is cut off from Redis after its commit | nothing rests on its memory: the log row was committed with the change |
//! | a relay killed mid-batch | the position had not moved: the batch is applied again |
//! | many relays | every entry applied; the position never moves backwards |
//! | a duplicate or late event | harmless: a same-or-newer cached version is kept |
//! | a load in flight when its entity's event is applied | fills only if it read the event's version or a newer one (the lease keeps the version as a floor), so the load the writer's own invalidation started is not lost |
//! | a write-heavy PostgreSQL | a relay that keeps finding rows polls every 10 ms and says so ([`FeedLog::polling`]); the triggers skip their `NOTIFY`, whose commit-time lock would serialize the writers |
//! | Redis down for long, backlog past the bound | the affected kinds are cleared when Redis is back, then relaying resumes; the log stays bounded |
//! | the log | rows older than the retention window and below the position are deleted in bounded batches |
//!
//! Not guaranteed:
//!
//! - writes to a table without the triggers (or with them disabled:
//!   `session_replication_role = replica`, `ALTER TABLE ... DISABLE
//!   TRIGGER`, a bulk `COPY` into another table swapped in);
//! - a database restored from a backup or a point in time: its log and
//!   versions go back, the position in Redis does not, and rows of the
//!   restored past are never replayed. Clear the cache after a restore;
//! - a wake-up for a transaction that ran its statements while a busy
//!   relay polled and committed after it went idle: it waits for the next
//!   poll;
//! - cheap writes: the log row is an INSERT in every writing transaction
//!   (measured in `docs/bench/FEED.md`);
//! - promptness while a transaction runs long anywhere in the PostgreSQL
//!   cluster: it holds the watermark back, which is lag (the
//!   `cache_feed_lag_seconds` metric), never loss;
//! - a value that other processes keep outside the [`Store`] (a near cache
//!   above it) is dropped only if it registers [`RelayBuilder::on_applied`];
//! - the order of two rows whose ids were re-created: a row deleted and
//!   inserted again must not start at a version lower than the cached one
//!   of its previous life (the delete event invalidates in order, but a
//!   duplicate delivered later sees only versions);
//! - the in-process pending-invalidation journal of [`crate::Cache`] still
//!   covers sources without a log; with a log, correctness across processes
//!   rests on the log and the relay, and the journal only shortens the
//!   window for read-your-writes.
//!
//! # Triggers or logical replication
//!
//! PostgreSQL's logical replication (`pgoutput` over a replication slot)
//! would give the same commit-ordered stream without a trigger's cost on
//! every write (one more INSERT per changed row, in the writer's
//! transaction) and without a log table to prune. It was not chosen: its
//! Rust clients are young; a slot must be created with replication rights
//! and retains WAL for as long as no consumer reads it (a relay fleet down
//! for a day fills the disk, where the log table is pruned by age); it needs
//! `wal_level = logical`, which managed databases do not always allow; and
//! it exists only on PostgreSQL, where triggers give one design for
//! PostgreSQL and SQLite. The trigger costs write throughput (measured by
//! the benchmark) and nothing on the read path.

use std::future::Future;
use std::time::Duration;

pub mod relay;
pub mod sql;

pub use relay::{FeedError, FeedStatus, Observed, Relay, RelayBuilder, RelayHealth, StepReport};
pub use sql::{Backend, SqlError, TriggerSpec, log_table_sql};

#[cfg(doc)]
use crate::Store;

/// One row of the invalidation log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedEvent {
    /// The log row's sequence number (insert order, not commit order).
    pub seq: i64,
    /// The cache kind's name ([`crate::Kind::name`]).
    pub kind: String,
    /// The entity id (the id of the cache key).
    pub id: String,
    /// The row's version after the change; `None` for a delete.
    pub version: Option<u64>,
    /// When the change was written (Unix milliseconds; PostgreSQL's
    /// `clock_timestamp()` in the writing transaction).
    pub committed_at_ms: i64,
}

/// The database side of the feed: reads the invalidation log by position
/// and keeps it bounded. kura-server implements it over sqlx; the library
/// has no database driver.
///
/// A position is a `u64` that orders commits: on PostgreSQL the writing
/// transaction's `txid` (`xid8`), on SQLite the row's `seq`. Everything
/// below [`FeedLog::watermark`] is final: no row with a lower position can
/// still appear.
///
/// # Concurrent calls
///
/// Several relays (in several processes) call one log at once; every method
/// must be safe to run concurrently with writers and with itself.
pub trait FeedLog: Send + Sync + 'static {
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
    /// `(position, seq)`. Called after [`FeedLog::watermark`] returned `to`,
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

    /// Deletes up to `limit` rows with a position below `below` written
    /// before `before_ms` (Unix milliseconds); returns how many.
    fn prune(
        &self,
        below: u64,
        before_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Waits for a wake-up (PostgreSQL: a `NOTIFY` on
    /// [`sql::CHANNEL`]) or `timeout`, whichever comes first. A missed
    /// wake-up loses nothing: the relay polls.
    fn wait(&self, timeout: Duration) -> impl Future<Output = ()> + Send;

    /// The kinds whose backlog overflowed, each with its cut: the position
    /// below which its unapplied rows may have been deleted
    /// (`kura_feed_state`). They are to be cleared from the cache once it is
    /// reachable.
    fn overflowed(&self) -> impl Future<Output = Result<Vec<(String, u64)>, Self::Error>> + Send;

    /// Records an overflow of `kinds` with cut `cut` (a watermark): inserts
    /// the kind, or raises its cut to `cut` if higher (`INSERT ... ON
    /// CONFLICT (kind) DO UPDATE SET cut = GREATEST(cut, EXCLUDED.cut)`).
    fn mark_overflow(
        &self,
        kinds: &[String],
        cut: u64,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Forgets the overflow of each kind whose cut is still at most the one
    /// given (`DELETE ... WHERE kind = $1 AND cut <= $2`): a cut raised
    /// since it was read means more rows were deleted unapplied, and the
    /// kind must be cleared again.
    fn clear_overflow(
        &self,
        kinds: &[(String, u64)],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes up to `limit` rows of overflowed kinds with a position below
    /// their kind's cut, applied or not, any age (one statement that reads
    /// the cut itself, so a cut forgotten meanwhile deletes nothing);
    /// returns how many.
    fn prune_overflowed(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Records the fleet position in the database too (a mirror of the one
    /// in Redis, written at most once per poll interval by a relay that
    /// moved it): a relay cut off from Redis counts its backlog from it,
    /// so one instance partitioned from Redis while the rest of the fleet
    /// relays does not declare an overflow. Only a hint: a stale value makes
    /// an overflow sooner or later, never a skipped row.
    fn save_position(&self, position: u64) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The position last recorded by [`FeedLog::save_position`].
    fn saved_position(&self) -> impl Future<Output = Result<Option<u64>, Self::Error>> + Send;

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
}

/// A shared log is a log: one [`FeedLog`] can serve a relay and a status
/// endpoint (or several relays of one process).
impl<L: FeedLog> FeedLog for std::sync::Arc<L> {
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

    fn prune(
        &self,
        below: u64,
        before_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send {
        (**self).prune(below, before_ms, limit)
    }

    fn wait(&self, timeout: Duration) -> impl Future<Output = ()> + Send {
        (**self).wait(timeout)
    }

    fn polling(&self, window: Duration) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        (**self).polling(window)
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
