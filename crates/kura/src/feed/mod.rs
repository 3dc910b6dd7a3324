//! Invalidation from the database's commits: every committed change reaches
//! the cache, whoever wrote it.
//!
//! The database writes its own invalidation log, by triggers, in the same
//! transaction as each change ([`source::trigger_log`]); a [`Relay`] reads the log in commit
//! order and applies it to the cache ([`crate::Store::invalidate_older`]). The
//! writer's own post-commit invalidation stays as the fast path for
//! read-your-writes; the feed is what makes the cache right whoever wrote
//! (psql, a migration, another service, a kura process that died or was cut
//! off from Redis before it could invalidate).
//!
//! # Layout
//!
//! - `source/mod.rs`: [`ChangeSource`], what the relay reads (positions,
//!   a watermark, pages of changes in commit order; and how a source stays
//!   bounded while the cache is unreachable).
//! - `source/pgoutput.rs`, `source/wal/`: the WAL's changes, decoded and
//!   assembled by commit position ([`source::wal::WalChanges`]).
//! - `source/trigger_log.rs`: the trigger log's SQL for PostgreSQL and
//!   SQLite ([`TriggerSpec`], [`log_table_sql`]): the log table, the
//!   overflow state (`kura_feed_state`, each overflowed kind with its
//!   *cut*), the position mirror (`kura_feed_position`) and the relay's
//!   polling flag (`kura_feed_relay`).
//! - `relay/mod.rs`: the [`Relay`], its builder and its loop under the
//!   fleet lease (`<ns>:~feed:relay`); `relay/step.rs` one step (apply,
//!   move the position, prune, the bookkeeping of an outage, a regression);
//!   `relay/status.rs` what `kura feed status` and health checks read.
//!
//! The position key is `<ns>:~feed:position`, moved by
//! [`crate::store::PositionStore::advance`]. A cut is a watermark: a relay
//! cut off from Redis deletes unapplied rows only below it, and the relay
//! that clears an overflowed kind forgets the overflow only if the cut did
//! not move since it read it; without it, a relay cut off from Redis could
//! delete rows that a reachable relay was about to apply (a late commit),
//! and they would be lost.

//! # How the position never skips a transaction
//!
//! A log row's `seq` is taken at INSERT, not at COMMIT: a transaction
//! holding `seq = 5` can commit after one holding `seq = 6` was read, and a
//! reader going by `WHERE seq > $position` skips 5 for ever. The relay reads
//! by a watermark instead ([`ChangeSource::watermark`]):
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
//! The position lives in Redis and only moves forward ([`PositionStore::advance`](crate::store::PositionStore::advance):
//! set only if greater, atomically). Each relay applies everything in
//! `[position it read, W)` before it moves the position to `W`, so
//! everything below the position held has been applied, whoever moved it
//! there. A relay that dies or is cut off mid-batch never moved the
//! position: the next step (of any relay) applies the batch again. Two
//! relays applying the same rows, or an old batch after a newer one, are
//! harmless: [`crate::Store::invalidate_older`] keeps a cached value of the same or
//! a newer version. A fleet lease (`<ns>:~feed:relay`, [`LockStore::lock`](crate::store::LockStore::lock))
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
//! | a write-heavy PostgreSQL | a relay that keeps finding rows polls every 10 ms and says so ([`ChangeSource::polling`]); the triggers skip their `NOTIFY`, whose commit-time lock would serialize the writers |
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
//! Two sources implement [`ChangeSource`]: the trigger log
//! ([`source::trigger_log`]: PostgreSQL and SQLite; every writing
//! transaction pays one more INSERT per changed row) and PostgreSQL's WAL
//! ([`source::wal`] assembles a `pgoutput` stream decoded by
//! [`source::pgoutput`]; the connection to the slot is the server's). The
//! WAL costs a writer nothing beyond the WAL it writes anyway and needs no
//! trigger in the user's tables, but needs `wal_level = logical`, and its
//! slot keeps WAL for as long as no relay confirms it (bound it with
//! `max_slot_wal_keep_size`; a slot PostgreSQL invalidated is reported as an
//! overflow of every kind, which the relay clears). Its events carry no
//! version and are ordered by commit LSN (the rule: [`source::wal`]), and a
//! TRUNCATE or a bulk transaction is one event of the whole kind
//! ([`FeedEvent::clear`]). The relay's safety rules are the same for both.

pub mod relay;
pub mod source;

pub use relay::{FeedError, FeedStatus, Observed, Relay, RelayBuilder, RelayHealth, StepReport};
pub use source::ChangeSource;
pub use source::trigger_log::{Backend, SqlError, TriggerSpec, log_table_sql};

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
    /// `clock_timestamp()` in the writing transaction, or the commit time
    /// the WAL reports).
    pub committed_at_ms: i64,
    /// The whole kind changed (a `TRUNCATE`, a bulk transaction, a row whose
    /// id could not be read): the relay clears the kind; `id` is empty.
    #[serde(default)]
    pub clear: bool,
}
