//! Write-behind operations: the start-up check of how durable the queue
//! is, and the queue status (`kura wb status`, `/metrics`). The flushers
//! `kura serve` runs (`--wb-flushers`) and `kura flush` runs are started by
//! [`crate::app::flushers`].
//!
//! # Durability of the queue
//!
//! An accepted `behind` write lives in Redis (the cached value, a pending
//! copy and a stream entry) until a flusher has committed it. It survives a
//! restart of Redis only if Redis logs writes to its append-only file:
//!
//! | Redis setting | a Redis crash or restart loses |
//! |---|---|
//! | `appendonly yes`, `appendfsync always` | nothing acknowledged |
//! | `appendonly yes`, `appendfsync everysec` | up to one second of accepted writes (on a power failure or kernel crash; a killed Redis process loses nothing) |
//! | `appendonly no` (RDB snapshots only, or none) | everything queued since the last snapshot |
//!
//! Two more settings decide whether acknowledged writes survive:
//!
//! - `maxmemory-policy`: an `allkeys-*` policy may evict keys without a TTL,
//!   that is the pending copies and the queue stream themselves. On such a
//!   Redis `behind` writes are written through instead, unless
//!   `--wb-allow-eviction` accepts the risk.
//! - Replication is asynchronous: with `--wb-min-replicas 0` a failover to a
//!   replica loses the writes the old primary had acknowledged and not yet
//!   sent to it (usually well under a second's worth); with 1, a write is
//!   acknowledged only once a replica has it.
//!
//! `kura serve` checks all this at start when `behind` is the default
//! strategy or it runs flushers, and so does `kura flush`: it logs a
//! warning on a Redis without AOF or with an evicting policy (and on the
//! embedded memory store, whose queue lives only as long as the process),
//! and says what a failover can lose.

use kura::store::{DeadLetter, Durability};
use kura::strategy::write_behind::FlushReport;
use kura::{Source, WriteBehind};
use serde::Serialize;

/// One line describing a flush report.
#[must_use]
pub fn describe(r: &FlushReport) -> String {
    format!(
        "{} queued writes read: {} rows written, {} coalesced into newer writes, {} already in the database, {} dead-lettered, {} refused and queued again; {} batch retries",
        r.entries, r.flushed, r.coalesced, r.superseded, r.dead_lettered, r.requeued, r.retried
    )
}

/// The warning for a queue of this durability, if it deserves one.
#[must_use]
pub fn durability_warning(d: &Durability, memory_store: bool) -> Option<String> {
    if memory_store {
        return Some(
            "write-behind queue in the embedded memory store: queued writes not yet in the \
             database are lost when this process stops; set REDIS_URL to a Redis with AOF \
             (appendonly yes) to keep them"
                .to_owned(),
        );
    }
    match d {
        Durability::Logged { fsync } if fsync == "no" => Some(
            "Redis logs writes with appendfsync no: a crash of the machine can lose up to ~30 s \
             of queued write-behind writes; use appendfsync always (nothing lost) or everysec \
             (up to 1 s)"
                .to_owned(),
        ),
        Durability::Logged { .. } => None,
        _ => Some(
            "Redis has no append-only file (appendonly no): write-behind writes still queued \
             when Redis restarts are lost. Enable AOF: `appendonly yes` with `appendfsync \
             always` (nothing acknowledged is lost) or `appendfsync everysec` (up to 1 s), in \
             redis.conf or with CONFIG SET appendonly yes + CONFIG REWRITE"
                .to_owned(),
        ),
    }
}

/// The warning for a Redis that may evict keys without a TTL.
#[must_use]
pub fn eviction_warning(policy: &str, allowed: bool) -> String {
    let what = if allowed {
        "behind writes are taken anyway (--wb-allow-eviction): an evicted pending copy or \
         queue loses acknowledged writes"
    } else {
        "behind writes are written through instead; set maxmemory-policy to noeviction or a \
         volatile-* policy, or accept the risk with --wb-allow-eviction"
    };
    format!(
        "Redis runs with maxmemory-policy {policy}: under memory pressure it may evict keys \
         without a TTL, which are the write-behind pending copies and queue; {what}"
    )
}

/// What a failover can lose with `min_replicas` confirmations per write.
#[must_use]
pub fn failover_note(min_replicas: u32) -> String {
    if min_replicas == 0 {
        "write-behind writes are acknowledged once the Redis primary has them \
         (--wb-min-replicas 0): replication is asynchronous, so a failover to a replica loses \
         the writes it had not received yet (usually under a second's worth); \
         --wb-min-replicas 1 acknowledges a write only once a replica has it"
            .to_owned()
    } else {
        format!(
            "write-behind writes are acknowledged once {min_replicas} Redis replica(s) have \
             them (--wb-min-replicas): a failover to one of them loses none"
        )
    }
}

/// Checks how durable the queue is and logs a warning if queued writes
/// would not survive a restart of the store or could be evicted; on Redis
/// also says what a failover can lose. Returns the warnings, joined.
pub async fn check_durability<S: Source>(
    wb: &WriteBehind<S>,
    memory_store: bool,
) -> Option<String> {
    let mut warnings: Vec<String> = Vec::new();
    if !memory_store {
        let limits = wb.configured_limits();
        match wb.eviction_policy().await {
            Ok(Some(policy)) => warnings.push(eviction_warning(&policy, limits.allow_eviction)),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read Redis's maxmemory-policy; make sure it is noeviction or volatile-*"
            ),
        }
        let note = failover_note(limits.min_replicas);
        if limits.min_replicas == 0 {
            tracing::warn!("{note}");
        } else {
            tracing::info!("{note}");
        }
    }
    let warning = if memory_store {
        durability_warning(&Durability::Volatile, true)
    } else {
        match wb.durability().await {
            Ok(d) => {
                if let Durability::Logged { fsync } = &d {
                    tracing::info!(appendfsync = fsync, "write-behind queue: Redis AOF is on");
                }
                durability_warning(&d, false)
            }
            Err(e) => Some(format!(
                "cannot tell whether Redis keeps the write-behind queue across a restart \
                 ({e}); make sure it runs with appendonly yes"
            )),
        }
    };
    if let Some(w) = &warning {
        tracing::warn!("{w}");
    }
    for w in &warnings {
        tracing::error!("{w}");
    }
    warnings.extend(warning);
    (!warnings.is_empty()).then(|| warnings.join("; "))
}

/// A dead letter as `kura wb status` shows it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct DeadLetterView {
    /// The dead-letter stream entry id.
    pub entry_id: String,
    /// The user id.
    pub id: String,
    /// The version that was not applied.
    pub version: u64,
    /// Why.
    pub error: String,
    /// The profile that was not applied (JSON).
    pub value: String,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            entry_id: d.entry_id,
            id: d.id,
            version: d.version,
            error: d.error,
            value: d.value,
        }
    }
}

/// The state of the profiles' write-behind queue.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct QueueStatus {
    /// Writes not yet acknowledged by a flusher.
    pub depth: u64,
    /// Age of the oldest of them in milliseconds (the flush lag).
    pub oldest_age_ms: u64,
    /// Writes a flusher has taken and not yet acknowledged.
    pub in_flight: u64,
    /// Writes in the dead-letter stream.
    pub dead_letters: u64,
    /// The newest dead letters, newest first.
    pub recent_dead_letters: Vec<DeadLetterView>,
}

/// Reads the queue state (and refreshes the depth and lag gauges).
///
/// # Errors
///
/// [`kura::Error::Unavailable`] when the cache server cannot be asked.
pub async fn queue_status<S: Source>(
    wb: &WriteBehind<S>,
    recent: usize,
) -> Result<QueueStatus, kura::Error> {
    let s = wb.status().await?;
    let letters = if recent > 0 && s.dead_letters > 0 {
        wb.dead_letters(recent).await?
    } else {
        Vec::new()
    };
    Ok(QueueStatus {
        depth: s.depth,
        oldest_age_ms: s.oldest_age_ms,
        in_flight: s.in_flight,
        dead_letters: s.dead_letters,
        recent_dead_letters: letters.into_iter().map(Into::into).collect(),
    })
}
