//! The relay: applies the invalidation log to the cache, in commit order.
//!
//! One [`Relay::step`] reads the position (Redis), the watermark (the
//! database), applies every log row in `[position, watermark)` page by page
//! with [`Store::invalidate_older`], calls the `on_applied` hook, then moves
//! the position to the watermark ([`Store::advance`]) and prunes what is
//! past the retention window. [`Relay::run`] steps whenever the database
//! wakes it (`NOTIFY`) or the poll interval passes, while it holds the fleet
//! lease. Why this is safe with any number of relays, and what is not
//! guaranteed: see [`crate::feed`].
//!
//! # Redis unreachable
//!
//! A step that cannot reach the store changes nothing in Redis and moves
//! nothing. It counts the backlog from the last position it knows (its own,
//! or the mirror in the database, [`FeedLog::saved_position`]); past
//! [`RelayBuilder::max_backlog`], it records an overflow of every kind it
//! maps ([`FeedLog::mark_overflow`], with the watermark as cut) and deletes
//! their rows below the cut, applied or not ([`FeedLog::prune_overflowed`]):
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
//! the position back to the watermark ([`Store::rewind`]) and goes on
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
//! | `cache_feed_regressions_total` | counter: watermarks found below the position (kinds cleared, position set back) | |

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{FeedEvent, FeedLog};
use crate::core::Cache;
use crate::core::lease::{FleetLease, Held};
use crate::error::{Error, StoreError};
use crate::key::{EntryKeys, Kind};

#[cfg(doc)]
use crate::Store;

type AppliedHook = Arc<dyn Fn(&[FeedEvent]) + Send + Sync>;
type ClearedHook = Arc<dyn Fn(&[Kind]) + Send + Sync>;

/// What can stop a relay step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError<E> {
    /// The database (the [`FeedLog`]) failed: nothing was applied past the
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

/// The state of the feed, for `kura feed status` and health checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct FeedStatus {
    /// The fleet position (`None`: none held yet, or unknown while the
    /// store is unreachable and none is mirrored in the database).
    pub position: Option<u64>,
    /// The database's watermark now.
    pub watermark: u64,
    /// Rows at or past the position.
    pub backlog: u64,
    /// Age of the oldest row not yet applied, in milliseconds (0 when
    /// caught up).
    pub lag_ms: u64,
    /// The instance holding the fleet lease (its name, not its token), if
    /// any.
    pub relaying: Option<String>,
    /// Kinds with a recorded overflow, to be cleared.
    pub overflowed: Vec<String>,
    /// Whether the store answered.
    pub store_reachable: bool,
}

/// The backlog and lag as the relaying instance last measured them, and
/// when (published in the store at most once per poll interval, for health
/// checks that must not query the database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Observed {
    /// Rows at or past the position.
    pub backlog: u64,
    /// Age of the oldest row not yet applied, in milliseconds.
    pub lag_ms: u64,
    /// When it was measured, Unix milliseconds.
    pub at_ms: i64,
}

/// The feed as [`Relay::health`] reads it from the store alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RelayHealth {
    /// The last measurement of the relaying instance; `None` when none was
    /// published within the last ten poll intervals (no instance relays,
    /// or none reaches both the database and the store).
    pub observed: Option<Observed>,
    /// The instance holding the fleet lease (its name, not its token).
    pub relaying: Option<String>,
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

impl<L: FeedLog> RelayBuilder<L> {
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
/// # async fn demo<L: kura::feed::FeedLog>(cache: kura::Cache, log: L) {
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

/// How long a busy relay tells writers it polls ([`FeedLog::polling`]);
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

impl<L: FeedLog> Relay<L> {
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

    /// One pass: clears overflowed kinds if any, applies every row in
    /// `[position, watermark)`, moves the position, prunes. Ignores the
    /// fleet lease (that is [`Relay::run`]'s business).
    ///
    /// # Errors
    ///
    /// [`FeedError::Log`] when the database fails, [`FeedError::Store`]
    /// when the store does (after the overflow bookkeeping of an outage).
    /// Either way the position has not moved past anything unapplied, and
    /// the next step goes on from where this one could not.
    pub async fn step(&self) -> Result<StepReport, FeedError<L::Error>> {
        let overflowed = self.inner.log.overflowed().await.map_err(FeedError::Log)?;
        match self.relay(&overflowed).await {
            Err(FeedError::Store(e)) if e.is_outage() => {
                let was = std::mem::replace(&mut lock(&self.inner.local).offline, true);
                if !was {
                    tracing::warn!(error = %e, "invalidation feed: cache store unreachable, position held");
                }
                self.offline(&overflowed).await?;
                Err(FeedError::Store(e))
            }
            r => {
                if r.is_ok() {
                    let was = std::mem::replace(&mut lock(&self.inner.local).offline, false);
                    if was {
                        tracing::info!("invalidation feed: cache store reachable again");
                    }
                }
                r
            }
        }
    }

    async fn store<T>(
        &self,
        timeout: Duration,
        op: impl Future<Output = crate::store::StoreResult<T>>,
    ) -> Result<T, FeedError<L::Error>> {
        Ok(self
            .inner
            .cache
            .inner
            .call_within(timeout, None, op)
            .await?)
    }

    fn batch_timeout(&self) -> Duration {
        (self.inner.cache.inner.op_timeout * 8).max(Duration::from_secs(2))
    }

    async fn relay(&self, overflowed: &[(String, u64)]) -> Result<StepReport, FeedError<L::Error>> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let op = inner.cache.inner.op_timeout;
        let mut report = StepReport::default();
        // Kinds whose rows may have been deleted unapplied: cleared before
        // anything else, from a watermark taken before the clear (every row
        // below it committed before the clear began, so the clear covers it).
        let mine: Vec<(String, u64)> = overflowed
            .iter()
            .filter(|(k, _)| inner.kinds.contains_key(k))
            .cloned()
            .collect();
        if !mine.is_empty() {
            let before = inner.log.watermark().await.map_err(FeedError::Log)?;
            let kinds: Vec<Kind> = mine.iter().map(|(name, _)| inner.kinds[name]).collect();
            self.clear(&kinds).await?;
            for kind in &kinds {
                metrics::counter!("cache_feed_overflow_clears_total", "cache_type" => kind.name())
                    .increment(1);
                tracing::warn!(
                    cache_type = kind.name(),
                    "invalidation feed: backlog overflowed while the cache was unreachable; type cleared"
                );
            }
            // Every row below `before` of the cleared kinds is covered by
            // the clear. Rows of kinds not cleared (another relay marked
            // fewer kinds) are not: then the position stays and the rows
            // are replayed, harmlessly for the cleared kinds.
            if mine.len() == inner.kinds.len() {
                let held = self
                    .store(op, store.advance(&inner.position_key, before))
                    .await?;
                lock(&inner.local).position = Some(held);
            }
            inner
                .log
                .clear_overflow(&mine)
                .await
                .map_err(FeedError::Log)?;
            report.cleared = mine.into_iter().map(|(k, _)| k).collect();
        }

        let held = self.store(op, store.get(&inner.position_key, None)).await?;
        let local = lock(&inner.local).position;
        let (from, oldest) = match held.as_ref().and_then(parse_position) {
            Some(p) => (p, false),
            // No position in the store (first start, or a store restarted
            // without persistence, whose cache is empty too): what this
            // relay applied, else the oldest row still in the log.
            None => match local {
                Some(p) => (p, false),
                None => (
                    inner
                        .log
                        .oldest()
                        .await
                        .map_err(FeedError::Log)?
                        .unwrap_or(0),
                    true,
                ),
            },
        };
        let to = inner.log.watermark().await.map_err(FeedError::Log)?;
        if let Some(held) = held.as_ref().and_then(parse_position) {
            if to < held {
                return self.regressed(held, to, report).await;
            }
        }
        // The oldest row read is no bound for what is still to come: a
        // transaction below it may be open (its rows are not visible yet),
        // so a start from the log never begins above the watermark.
        let from = if oldest { from.min(to) } else { from };
        report.watermark = to;
        report.position = from;
        if to > from {
            self.apply_range(from, to, &mut report).await?;
            let held = self
                .store(op, store.advance(&inner.position_key, to))
                .await?;
            report.position = held;
        } else if held.is_none() {
            report.position = self
                .store(op, store.advance(&inner.position_key, from))
                .await?;
        }
        let position = report.position;
        let (save, observe) = {
            let mut l = lock(&inner.local);
            l.position = Some(l.position.map_or(position, |p| p.max(position)));
            let due = |at: Option<Instant>| at.is_none_or(|t| t.elapsed() >= inner.settings.poll);
            let save = due(l.saved_at);
            let observe = due(l.observed_at);
            if save {
                l.saved_at = Some(Instant::now());
            }
            if observe {
                l.observed_at = Some(Instant::now());
            }
            (save, observe)
        };
        if save {
            inner
                .log
                .save_position(position)
                .await
                .map_err(FeedError::Log)?;
        }
        report.waiting = !inner
            .log
            .read(position, u64::MAX, None, 1)
            .await
            .map_err(FeedError::Log)?
            .is_empty();
        report.pruned = self.prune(position).await?;
        if observe {
            let (backlog, lag_ms) = self.observe(position).await?;
            self.publish(backlog, lag_ms).await;
        }
        Ok(report)
    }

    /// Clears `kinds` (one store step each), tells the `on_cleared` hook,
    /// and sweeps their old values out of the store in the background.
    async fn clear(&self, kinds: &[Kind]) -> Result<(), FeedError<L::Error>> {
        let inner = &*self.inner;
        for kind in kinds {
            let epoch = inner
                .cache
                .inner
                .bump(&crate::tags::kind_field(kind.name()))
                .await
                .map_err(|e| match e {
                    Error::Unavailable(e) => FeedError::Store(e),
                    other => FeedError::Store(StoreError::server(other.to_string())),
                })?;
            let (cache, kind) = (inner.cache.clone(), *kind);
            tokio::spawn(async move {
                match cache.sweep(kind, epoch).await {
                    Ok(n) => tracing::info!(
                        cache_type = kind.name(),
                        removed = n,
                        "cleared values swept"
                    ),
                    Err(e) => {
                        tracing::warn!(cache_type = kind.name(), error = %e, "sweep of cleared values stopped; the rest expires by TTL")
                    }
                }
            });
        }
        if let Some(hook) = &inner.on_cleared {
            hook(kinds);
        }
        Ok(())
    }

    /// The watermark `to` is below the position `held`: the database lost
    /// transactions the fleet applied. Clears every kind, then sets the
    /// position back to the watermark (unless another relay moved it).
    async fn regressed(
        &self,
        held: u64,
        to: u64,
        mut report: StepReport,
    ) -> Result<StepReport, FeedError<L::Error>> {
        let inner = &*self.inner;
        let kinds: Vec<Kind> = inner.kinds.values().copied().collect();
        tracing::warn!(
            position = held,
            watermark = to,
            "invalidation feed: the database's watermark is below the position held \
             (a failover to a standby without the newest transactions, or a restore); \
             clearing the fed types and relaying from the watermark"
        );
        metrics::counter!("cache_feed_regressions_total").increment(1);
        self.clear(&kinds).await?;
        let op = inner.cache.inner.op_timeout;
        let store = inner.cache.store();
        self.store(op, store.rewind(&inner.position_key, held, to))
            .await?;
        lock(&inner.local).position = Some(to);
        report.cleared = kinds.iter().map(|k| k.name().to_owned()).collect();
        report.watermark = to;
        report.position = to;
        Ok(report)
    }

    /// Applies every row in `[from, to)`, page by page.
    async fn apply_range(
        &self,
        from: u64,
        to: u64,
        report: &mut StepReport,
    ) -> Result<(), FeedError<L::Error>> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let keys = inner.cache.keys();
        let mut after = None;
        loop {
            let page = inner
                .log
                .read(from, to, after, inner.settings.batch)
                .await
                .map_err(FeedError::Log)?;
            let Some((last_pos, last)) = page.last() else {
                break;
            };
            after = Some((*last_pos, last.seq));
            let full = page.len() >= inner.settings.batch;
            report.read += page.len() as u64;
            let mut entries: Vec<(EntryKeys, Option<u64>)> = Vec::with_capacity(page.len());
            let mut events = Vec::with_capacity(page.len());
            for (_, ev) in page {
                let Some(kind) = inner.kinds.get(&ev.kind) else {
                    tracing::trace!(
                        kind = ev.kind,
                        "invalidation feed: row of a kind not relayed"
                    );
                    continue;
                };
                match keys.entry(kind, &ev.id) {
                    Ok(e) => entries.push((e, ev.version)),
                    Err(err) => {
                        // An id that cannot be a key was never cached.
                        tracing::debug!(kind = ev.kind, id = ev.id, error = %err, "invalidation feed: id skipped");
                        continue;
                    }
                }
                events.push(ev);
            }
            if !entries.is_empty() {
                let refs: Vec<(&EntryKeys, Option<u64>)> =
                    entries.iter().map(|(e, v)| (e, *v)).collect();
                report.invalidated += self
                    .store(self.batch_timeout(), store.invalidate_older(&refs))
                    .await?;
                report.applied += events.len() as u64;
                for ev in &events {
                    if let Some(kind) = inner.kinds.get(&ev.kind) {
                        metrics::counter!("cache_feed_applied_total", "cache_type" => kind.name())
                            .increment(1);
                    }
                }
                if let Some(hook) = &inner.on_applied {
                    hook(&events);
                }
                if let Some(ev) = events.last() {
                    let lag = (now_ms() - ev.committed_at_ms).max(0) as f64 / 1000.0;
                    metrics::gauge!("cache_feed_lag_seconds").set(lag);
                }
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// Deletes applied rows past the retention window, in bounded batches.
    async fn prune(&self, below: u64) -> Result<u64, FeedError<L::Error>> {
        let inner = &*self.inner;
        let before = now_ms() - inner.settings.retention.as_millis() as i64;
        let mut pruned = 0;
        for _ in 0..PRUNE_ROUNDS {
            let n = inner
                .log
                .prune(below, before, inner.settings.prune_batch)
                .await
                .map_err(FeedError::Log)?;
            pruned += n;
            if n < inner.settings.prune_batch as u64 {
                break;
            }
        }
        if pruned > 0 {
            tracing::debug!(rows = pruned, "invalidation feed: log pruned");
        }
        Ok(pruned)
    }

    /// Measures backlog and lag from `position` (the gauges).
    async fn observe(&self, position: u64) -> Result<(u64, u64), FeedError<L::Error>> {
        let log = &self.inner.log;
        let backlog = log.backlog(position).await.map_err(FeedError::Log)?;
        let lag_ms = if backlog == 0 {
            0
        } else {
            log.read(position, u64::MAX, None, 1)
                .await
                .map_err(FeedError::Log)?
                .first()
                .map_or(0, |(_, ev)| (now_ms() - ev.committed_at_ms).max(0) as u64)
        };
        metrics::gauge!("cache_feed_backlog").set(backlog as f64);
        metrics::gauge!("cache_feed_lag_seconds").set(lag_ms as f64 / 1000.0);
        Ok((backlog, lag_ms))
    }

    /// Publishes a measurement for [`Relay::health`] (lost with the store:
    /// health then says the lag is unknown).
    async fn publish(&self, backlog: u64, lag_ms: u64) {
        let inner = &*self.inner;
        let text = format!("{backlog} {lag_ms} {}", now_ms());
        let ttl = (inner.settings.poll * 10).max(Duration::from_secs(10));
        let store = inner.cache.store();
        let _ = self
            .store(
                inner.cache.inner.op_timeout,
                store.set(&inner.observed_key, Bytes::from(text), ttl),
            )
            .await;
    }

    /// The feed as the store knows it: the relaying instance's last
    /// measurement and its name. One store round trip, no database
    /// statement: what a health check asks at any rate.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store does not answer.
    pub async fn health(&self) -> Result<RelayHealth, StoreError> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let got = self
            .store(
                inner.cache.inner.op_timeout,
                store.get_many(&[&inner.observed_key, inner.lease.key()]),
            )
            .await
            .map_err(|e| match e {
                FeedError::Store(e) => e,
                FeedError::Log(_) => StoreError::unavailable(),
            })?;
        let text = |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        let observed = got.first().and_then(text).and_then(|t| {
            let mut parts = t.split(' ');
            Some(Observed {
                backlog: parts.next()?.parse().ok()?,
                lag_ms: parts.next()?.parse().ok()?,
                at_ms: parts.next()?.parse().ok()?,
            })
        });
        let relaying = got
            .get(1)
            .and_then(text)
            .map(|h| instance_of(&h).to_owned());
        Ok(RelayHealth { observed, relaying })
    }

    /// The bookkeeping of a step that could not reach the store.
    async fn offline(&self, overflowed: &[(String, u64)]) -> Result<(), FeedError<L::Error>> {
        let inner = &*self.inner;
        let log = &inner.log;
        let local = lock(&inner.local).position;
        let saved = log.saved_position().await.map_err(FeedError::Log)?;
        let from = match local.max(saved) {
            Some(p) => p,
            None => match log.oldest().await.map_err(FeedError::Log)? {
                Some(p) => p,
                None => return Ok(()),
            },
        };
        let backlog = log.backlog(from).await.map_err(FeedError::Log)?;
        metrics::gauge!("cache_feed_backlog").set(backlog as f64);
        let marked = overflowed.iter().any(|(k, _)| inner.kinds.contains_key(k));
        let over = backlog > inner.settings.max_backlog;
        if !over && !marked {
            return Ok(());
        }
        // Marked again (the cut raised) only while over the bound: each
        // raise makes a reachable relay clear the kinds once more, so a
        // relay cut off from Redis must not raise it at every step.
        if over {
            // The cut is a watermark: every row below it has committed now,
            // so a clear that begins after this (which reads the mark
            // first) covers every row deleted below it.
            let cut = log.watermark().await.map_err(FeedError::Log)?;
            let kinds: Vec<String> = inner.kinds.keys().cloned().collect();
            log.mark_overflow(&kinds, cut)
                .await
                .map_err(FeedError::Log)?;
            if !marked {
                tracing::warn!(
                    backlog,
                    bound = inner.settings.max_backlog,
                    kinds = ?kinds,
                    "invalidation feed: backlog past its bound while the cache is unreachable; \
                     the types will be cleared once it is back"
                );
            }
        }
        let mut pruned = 0;
        for _ in 0..PRUNE_ROUNDS {
            let n = log
                .prune_overflowed(inner.settings.prune_batch)
                .await
                .map_err(FeedError::Log)?;
            pruned += n;
            if n < inner.settings.prune_batch as u64 {
                break;
            }
        }
        if pruned > 0 {
            tracing::debug!(rows = pruned, "invalidation feed: overflowed rows pruned");
        }
        Ok(())
    }

    /// The state of the feed. Works while the store is unreachable (the
    /// position then comes from the database's mirror).
    ///
    /// # Errors
    ///
    /// [`FeedError::Log`] when the database fails.
    pub async fn status(&self) -> Result<FeedStatus, FeedError<L::Error>> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let op = inner.cache.inner.op_timeout;
        let log = &inner.log;
        let watermark = log.watermark().await.map_err(FeedError::Log)?;
        let overflowed = log
            .overflowed()
            .await
            .map_err(FeedError::Log)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let got = tokio::time::timeout(op * 4, async {
            let pos = store.get(&inner.position_key, None).await?;
            let holder = store.get(inner.lease.key(), None).await?;
            Ok::<_, StoreError>((pos, holder))
        })
        .await
        .unwrap_or(Err(StoreError::timeout()));
        let (position, relaying, store_reachable) = match got {
            Ok((pos, holder)) => (
                pos.as_ref().and_then(parse_position),
                holder.map(|h| instance_of(&String::from_utf8_lossy(&h)).to_owned()),
                true,
            ),
            Err(_) => (
                log.saved_position().await.map_err(FeedError::Log)?,
                None,
                false,
            ),
        };
        let (backlog, lag_ms) = self.observe(position.unwrap_or(0)).await?;
        Ok(FeedStatus {
            position,
            watermark,
            backlog,
            lag_ms,
            relaying,
            overflowed,
            store_reachable,
        })
    }

    /// Called after a step that read rows. A second such step within
    /// [`BUSY_AFTER`] makes the relay busy: it tells writers it polls
    /// ([`FeedLog::polling`], at most twice per [`BUSY_WINDOW`]) and steps
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
    /// writers so ([`FeedLog::polling`]): their triggers then skip the
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
        if let Some(h) = held {
            h.release().await;
        }
        metrics::gauge!("cache_feed_relay_active").set(0.0);
        tracing::info!(instance = %inner.lease.token(), "invalidation feed relay stopped");
    }
}
