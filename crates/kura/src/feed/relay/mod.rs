//! The relay: applies the invalidation log to the cache, in commit order.
//!
//! One [`Relay::step`] reads the position (Redis), the watermark (the
//! database), applies every log row in `[position, watermark)` page by page
//! with [`Store::invalidate_older`], calls the `on_applied` hook, then moves
//! the position to the watermark ([`PositionStore::advance`](crate::store::PositionStore::advance)) and prunes what is
//! past the retention window. [`Relay::run`] steps whenever the database
//! wakes it (`NOTIFY`) or the poll interval passes, while it holds the fleet
//! lease. Why this is safe with any number of relays, and what is not
//! guaranteed: see [`crate::feed`].
//!
//! # Redis unreachable
//!
//! A step that cannot reach the store changes nothing in Redis and moves
//! nothing. It counts the backlog from the last position it knows (its own,
//! or the mirror in the database, [`ChangeSource::saved_position`]); past
//! [`RelayBuilder::max_backlog`], it records an overflow of every kind it
//! maps ([`ChangeSource::mark_overflow`], with the watermark as cut) and deletes
//! their rows below the cut, applied or not ([`ChangeSource::prune_overflowed`]):
//! replaying entity by entity would take longer than clearing. It marks
//! again (raising the cut) only while its backlog is over the bound, so a
//! relay cut off from Redis does not keep a reachable one clearing. Once
//! the store is reachable again, the next step clears those kinds in one
//! store step each ([`crate::Cache::clear`]'s O(1) clear), moves the
//! position to the watermark taken before the clear, and forgets the
//! overflow (logged, counted); the cleared values' memory is freed by a
//! sweep in the background ([`crate::Cache::sweep`]).
//!
//! # The database behind the position
//!
//! A watermark below the position held means the database lost
//! transactions the fleet had applied (a failover to a standby that had not
//! received them, a restore): rows committed there below the position would
//! never be read, and values cached from the lost transactions could be
//! newer than the database. The relay then clears every kind it maps, sets
//! the position back to the watermark ([`PositionStore::rewind`](crate::store::PositionStore::rewind)) and goes on
//! (logged, `cache_feed_regressions_total`).
//!
//! # The fleet lease
//!
//! [`Relay::run`] steps while it holds the fleet lease `<ns>:~feed:relay`
//! ([`crate::lease::FleetLease`], 2 s lifetime by default, extended by a
//! heartbeat every quarter of it); the others try to take it every quarter
//! of its lifetime (and on every wake-up), so a holder that dies or is cut
//! off from Redis is replaced within about 2.5 s.
//!
//! # Metrics
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `cache_feed_lag_seconds` | gauge: age of the oldest row not yet applied (0 when caught up) | |
//! | `cache_feed_backlog` | gauge: rows at or past the position | |
//! | `cache_feed_applied_total` | counter: log rows applied | `cache_type` |
//! | `cache_feed_relay_active` | gauge: 1 while this instance holds the fleet lease | |
//! | `cache_feed_overflow_clears_total` | counter: kinds cleared after an overflow | `cache_type` |
//! | `cache_feed_kind_clears_total` | counter: kinds cleared by an event of the whole kind (a `TRUNCATE`, a bulk transaction, an unreadable row) | `cache_type` |
//! | `cache_feed_regressions_total` | counter: watermarks found below the position (kinds cleared, position set back) | |

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{ChangeSource, FeedEvent};
use crate::core::Cache;
use crate::core::lease::{FleetLease, Held};
use crate::error::{Error, StoreError};
use crate::key::{EntryKeys, Kind};

mod status;
mod step;

pub use self::status::{FeedStatus, Observed, RelayHealth};

#[cfg(doc)]
use crate::Store;

type AppliedHook = Arc<dyn Fn(&[FeedEvent]) + Send + Sync>;
type ClearedHook = Arc<dyn Fn(&[Kind]) + Send + Sync>;

/// What can stop a relay step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError<E> {
    /// The database (the [`ChangeSource`]) failed: nothing was applied past the
    /// position, which did not move.
    #[error("invalidation log: {0}")]
    Log(#[source] E),
    /// The cache store failed (unreachable, timed out): the position did
    /// not move; the backlog bookkeeping of an outage was done.
    #[error("cache store: {0}")]
    Store(#[from] StoreError),
}

/// What one [`Relay::step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepReport {
    /// Log rows read (every kind).
    pub read: u64,
    /// Rows applied (of mapped kinds, with ids that can be keys).
    pub applied: u64,
    /// Cached values they dropped.
    pub invalidated: u64,
    /// The position held after the step.
    pub position: u64,
    /// The watermark the step read up to.
    pub watermark: u64,
    /// Rows deleted by retention.
    pub pruned: u64,
    /// Kinds cleared after an overflow.
    pub cleared: Vec<String>,
    /// Rows are committed past the watermark, held back by an older
    /// transaction still open: [`Relay::run`] steps again soon instead of
    /// waiting for a wake-up (their own `NOTIFY` has been spent already).
    pub waiting: bool,
}

/// The relay's settings, as the builder sets them.
#[derive(Debug, Clone, Copy)]
struct Settings {
    poll: Duration,
    retention: Duration,
    max_backlog: u64,
    batch: usize,
    prune_batch: usize,
    lease_ttl: Duration,
}

/// Builds a [`Relay`].
#[must_use]
pub struct RelayBuilder<L> {
    cache: Cache,
    log: L,
    kinds: HashMap<String, Kind>,
    settings: Settings,
    instance: String,
    on_applied: Option<AppliedHook>,
    on_cleared: Option<ClearedHook>,
}

impl<L> std::fmt::Debug for RelayBuilder<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .field("poll", &self.settings.poll)
            .field("retention", &self.settings.retention)
            .field("max_backlog", &self.settings.max_backlog)
            .finish_non_exhaustive()
    }
}

impl<L: ChangeSource> RelayBuilder<L> {
    /// Adds a kind the log's rows name (by [`Kind::name`]). Rows of kinds
    /// not added are skipped (they advance the position like the others).
    pub fn kind(mut self, kind: Kind) -> Self {
        self.kinds.insert(kind.name().to_owned(), kind);
        self
    }

    /// Adds several kinds.
    pub fn kinds(mut self, kinds: impl IntoIterator<Item = Kind>) -> Self {
        for k in kinds {
            self = self.kind(k);
        }
        self
    }

    /// How long [`Relay::run`] waits for a wake-up before it polls
    /// (default 1 s; 100 ms suits SQLite, which has no `NOTIFY`).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.settings.poll = d;
        self
    }

    /// How long applied rows are kept (default 1 h).
    pub fn retention(mut self, d: Duration) -> Self {
        self.settings.retention = d;
        self
    }

    /// Rows at or past the position beyond which a relay that cannot reach
    /// the store gives up replaying them one by one (default 100,000).
    pub fn max_backlog(mut self, rows: u64) -> Self {
        self.settings.max_backlog = rows;
        self
    }

    /// Rows read and applied per page (default 1,000).
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.settings.batch = rows.max(1);
        self
    }

    /// Rows deleted per pruning statement (default 5,000; at most four per
    /// step).
    pub fn prune_batch(mut self, rows: usize) -> Self {
        self.settings.prune_batch = rows.max(1);
        self
    }

    /// Lifetime of the fleet lease, extended by its holder's heartbeat every
    /// quarter of it (default 2 s): about how long a relay that died, or was
    /// cut off from Redis, holds up the others.
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.settings.lease_ttl = d;
        self
    }

    /// The name this instance shows as lease holder (default: `$HOSTNAME`
    /// or `kura`, with the process id).
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = name.into();
        self
    }

    /// Called with every page of applied rows, after the store applied
    /// them: layers above the store that keep copies (a near cache) drop
    /// theirs. Keep it quick; it runs on the relay's task.
    pub fn on_applied(mut self, f: impl Fn(&[FeedEvent]) + Send + Sync + 'static) -> Self {
        self.on_applied = Some(Arc::new(f));
        self
    }

    /// Called with the kinds cleared after an overflow.
    pub fn on_cleared(mut self, f: impl Fn(&[Kind]) + Send + Sync + 'static) -> Self {
        self.on_cleared = Some(Arc::new(f));
        self
    }

    /// The relay.
    pub fn build(self) -> Relay<L> {
        let keys = self.cache.keys();
        let lease = FleetLease::new(
            &self.cache,
            "feed:relay",
            &self.instance,
            self.settings.lease_ttl,
        );
        Relay {
            inner: Arc::new(Inner {
                position_key: keys.internal("feed:position"),
                observed_key: keys.internal("feed:observed"),
                lease,
                cache: self.cache,
                log: self.log,
                kinds: self.kinds,
                settings: self.settings,
                on_applied: self.on_applied,
                on_cleared: self.on_cleared,
                local: Mutex::new(Local::default()),
            }),
        }
    }
}

/// Applies a database's invalidation log to a [`Cache`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo<L: kura::feed::ChangeSource>(cache: kura::Cache, log: L) {
/// use std::time::Duration;
/// use kura::Kind;
/// use kura::feed::Relay;
///
/// let relay = Relay::builder(&cache, log)
///     .kind(Kind::new("profile"))
///     .poll_interval(Duration::from_secs(1))
///     .build();
/// relay.run(std::future::pending()).await;
/// # }
/// ```
///
/// # Concurrent calls
///
/// Clones share one relay. Any number of relays, in any number of
/// processes, may step at once: each applies `[position, watermark)` and
/// only then moves the position forward (never backwards); applying a row
/// twice is harmless.
pub struct Relay<L> {
    inner: Arc<Inner<L>>,
}

impl<L> Clone for Relay<L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<L> std::fmt::Debug for Relay<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("instance", &self.inner.lease.token())
            .field("kinds", &self.inner.kinds.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Inner<L> {
    cache: Cache,
    log: L,
    kinds: HashMap<String, Kind>,
    settings: Settings,
    position_key: String,
    /// Where the relaying instance publishes its last [`Observed`].
    observed_key: String,
    lease: FleetLease,
    on_applied: Option<AppliedHook>,
    on_cleared: Option<ClearedHook>,
    local: Mutex<Local>,
}

/// What this relay remembers between steps (never across an `.await`).
#[derive(Debug, Default)]
struct Local {
    /// The last position this relay saw held.
    position: Option<u64>,
    /// When the position was last mirrored to the database.
    saved_at: Option<Instant>,
    /// When backlog and lag were last measured.
    observed_at: Option<Instant>,
    /// Whether the last step reached the store (for logging transitions).
    offline: bool,
}

/// How soon [`Relay::run`] steps again while committed rows wait behind
/// the watermark.
const RECHECK: Duration = Duration::from_millis(20);

/// Two steps that find rows at most this far apart make a relay busy.
const BUSY_AFTER: Duration = Duration::from_millis(100);

/// How long a busy relay tells writers it polls ([`ChangeSource::polling`]);
/// it says so again after half of it while it stays busy.
const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// How often a busy relay steps, in place of the writers' wake-ups.
const BUSY_POLL: Duration = Duration::from_millis(10);

/// How long a busy relay goes on polling after the window it announced:
/// transactions that skipped their wake-up near the window's end commit a
/// little later.
const BUSY_MARGIN: Duration = Duration::from_millis(100);

/// Whether [`Relay::run`] polls in place of wake-ups (kept by its loop).
#[derive(Debug, Default)]
struct Busy {
    /// When a step last found rows.
    rows_at: Option<Instant>,
    /// When the window was last announced.
    announced_at: Option<Instant>,
    /// Until when to poll at [`BUSY_POLL`].
    until: Option<Instant>,
}

/// Pruning statements per step at most: pruning never holds up relaying.
const PRUNE_ROUNDS: usize = 4;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The instance of a fleet lease holder's token (`<instance>#<random>`):
/// what status and health show, never the token itself.
fn instance_of(holder: &str) -> &str {
    holder.rsplit_once('#').map_or(holder, |(name, _)| name)
}

fn parse_position(b: &Bytes) -> Option<u64> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}

impl<L: ChangeSource> Relay<L> {
    /// A relay over `cache` and `log`; add the kinds it maps.
    pub fn builder(cache: &Cache, log: L) -> RelayBuilder<L> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "kura".to_owned());
        RelayBuilder {
            cache: cache.clone(),
            log,
            kinds: HashMap::new(),
            settings: Settings {
                poll: Duration::from_secs(1),
                retention: Duration::from_secs(3600),
                max_backlog: 100_000,
                batch: 1000,
                prune_batch: 5000,
                lease_ttl: Duration::from_secs(2),
            },
            instance: format!("{host}-{}", std::process::id()),
            on_applied: None,
            on_cleared: None,
        }
    }

    /// The log.
    #[must_use]
    pub fn log(&self) -> &L {
        &self.inner.log
    }

    /// This instance's lease token (`<instance>#<random>`).
    #[must_use]
    pub fn token(&self) -> &str {
        self.inner.lease.token()
    }

    /// Called after a step that read rows. A second such step within
    /// [`BUSY_AFTER`] makes the relay busy: it tells writers it polls
    /// ([`ChangeSource::polling`], at most twice per [`BUSY_WINDOW`]) and steps
    /// every [`BUSY_POLL`] until that window, plus [`BUSY_MARGIN`], is
    /// over. The window's end is counted from the answer, after the
    /// database set it.
    async fn keep_busy(&self, busy: &mut Busy) {
        let now = Instant::now();
        let sustained = busy.rows_at.is_some_and(|t| now - t <= BUSY_AFTER);
        busy.rows_at = Some(now);
        if !sustained || busy.announced_at.is_some_and(|t| now - t < BUSY_WINDOW / 2) {
            return;
        }
        match self.inner.log.polling(BUSY_WINDOW).await {
            Ok(false) => {}
            Ok(true) => {
                let answered = Instant::now();
                busy.announced_at = Some(answered);
                busy.until = Some(answered + BUSY_WINDOW + BUSY_MARGIN);
            }
            Err(e) => tracing::debug!(error = %e, "invalidation feed: cannot announce polling"),
        }
    }

    /// Relays until `shutdown` completes: steps whenever the log wakes it
    /// or the poll interval passes, while this instance holds the fleet
    /// lease. An instance that cannot reach the store steps anyway (it then
    /// only keeps the backlog bounded). Releases the lease on the way out.
    ///
    /// While steps keep finding rows, the relay polls every 10 ms and tells
    /// writers so ([`ChangeSource::polling`]): their triggers then skip the
    /// wake-up, whose commit-time lock would serialize a write-heavy
    /// database. A transaction that ran its statements inside that window
    /// and commits after the relay stopped polling waits for the next poll.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let inner = &*self.inner;
        tokio::pin!(shutdown);
        let mut held: Option<Held> = None;
        let mut busy = Busy::default();
        // Standbys try for the lease this often (and on every wake-up).
        let standby = (inner.settings.lease_ttl / 4).max(Duration::from_millis(10));
        tracing::info!(instance = %inner.lease.token(), kinds = ?inner.kinds.keys().collect::<Vec<_>>(), "invalidation feed relay started");
        loop {
            if held.as_ref().is_some_and(|h| !h.is_held()) {
                held = None;
                tracing::info!(instance = %inner.lease.token(), "invalidation feed: fleet lease lost");
            }
            // `None`: the store did not answer, so this relay cannot know
            // who relays; it steps anyway (only the backlog bookkeeping of
            // an outage then happens).
            let reachable = if held.is_some() {
                Some(true)
            } else {
                match inner.lease.hold().await {
                    Some(Some(h)) => {
                        tracing::info!(instance = %inner.lease.token(), "invalidation feed: fleet lease taken");
                        held = Some(h);
                        Some(true)
                    }
                    Some(None) => Some(false),
                    None => None,
                }
            };
            let leader = held.is_some();
            if !leader {
                busy = Busy::default();
            }
            inner.log.lead(leader).await;
            metrics::gauge!("cache_feed_relay_active").set(if leader { 1.0 } else { 0.0 });
            let mut again = false;
            if leader || reachable.is_none() {
                match self.step().await {
                    Ok(r) => {
                        again = r.waiting;
                        if r.read > 0 && leader {
                            self.keep_busy(&mut busy).await;
                        }
                        if r.read > 0 || !r.cleared.is_empty() {
                            tracing::debug!(
                                read = r.read,
                                applied = r.applied,
                                invalidated = r.invalidated,
                                position = r.position,
                                waiting = r.waiting,
                                "invalidation feed step"
                            );
                        }
                    }
                    Err(FeedError::Store(e)) => {
                        tracing::debug!(error = %e, "invalidation feed step: store");
                    }
                    Err(FeedError::Log(e)) => {
                        tracing::warn!(error = %e, "invalidation feed step: database");
                    }
                }
            }
            let wait = if again {
                inner.settings.poll.min(RECHECK)
            } else if busy.until.is_some_and(|t| t > Instant::now()) {
                inner.settings.poll.min(BUSY_POLL)
            } else if leader {
                inner.settings.poll
            } else {
                inner.settings.poll.min(standby)
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = inner.log.wait(wait) => {}
            }
        }
        inner.log.lead(false).await;
        if let Some(h) = held {
            h.release().await;
        }
        metrics::gauge!("cache_feed_relay_active").set(0.0);
        tracing::info!(instance = %inner.lease.token(), "invalidation feed relay stopped");
    }
}
