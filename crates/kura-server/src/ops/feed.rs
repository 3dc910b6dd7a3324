//! The invalidation feed in the service: which source it reads ([`plan`],
//! [`prepare`]), the relay `kura serve` runs, its status (`kura feed
//! status`) and its part of `/healthz`.
//!
//! Two sources of committed changes, one relay ([`kura::feed::Relay`] over
//! [`FeedSource`]):
//!
//! - **the WAL** (`wal`, and `auto` on a server with `wal_level =
//!   logical`): PostgreSQL hands every committed change of the published
//!   tables to the instance holding the relay lease, through the slot
//!   `kura_<namespace>` ([`WalSource`]); writers pay nothing more, and the
//!   fed tables carry no trigger;
//! - **the trigger log** (`log`, SQLite, and `auto` elsewhere): triggers
//!   write every committed change to the invalidation log in the writer's
//!   transaction ([`Db::install_feed`]), and the relay reads it
//!   ([`SqlFeedLog`]).
//!
//! So a change reaches the cache whoever made it (psql, a migration,
//! another service) and whatever became of the kura process that made it
//! (killed, or cut off from Redis, before its own invalidation landed).
//!
//! | what | rests on |
//! |---|---|
//! | read-your-writes in the writing instance | its post-commit invalidation or write-through (the fast path, as before) |
//! | every other reader, every writer, across crashes and partitions | the WAL (kept by the slot until the fleet confirms it) or the log (same transaction as the change), and one relay of the fleet that reaches the database and Redis |
//! | no relay reaches Redis for long | the log: the backlog bound (the affected types are cleared once Redis is back); the WAL: the slot keeps it, up to `max_slot_wal_keep_size`, past which PostgreSQL invalidates the slot and the relay clears the fed types and makes it again |
//!
//! With a log, the in-process pending-invalidation journal of
//! [`kura::Cache`] is no longer what correctness across processes rests on:
//! it only shortens the window for this instance's own reads. Without one
//! (`--invalidation-feed off` everywhere), it still is, and it dies with
//! the process.
//!
//! Every instance runs a relay by default; the fleet lease lets one of
//! them step at a time, and any may take over (see [`kura::feed`] for why
//! several at once are still safe).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kura::Cache;
use kura::feed::{FeedStatus, Relay};
use serde::Serialize;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, FeedConfig, FeedMode};
use crate::db::Db;
use crate::db::feed::wal::wal_ready;
use crate::db::feed::{FeedSource, SqlFeedLog, WalSource, WalTarget, wal_names, wal_tables};

/// How long a status read (health check, `kura feed status`) may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The relay of a running service.
///
/// # Concurrent calls
///
/// [`Feed::status`] may be called from any number of requests while the
/// relay runs; [`Feed::stop`] ends it once (later calls return at once).
#[derive(Debug)]
pub struct Feed {
    relay: Relay<FeedSource>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Which feed an instance runs, decided at start ([`plan`], [`prepare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// No relay in this instance.
    Off,
    /// The trigger log.
    Log,
    /// PostgreSQL's WAL.
    Wal,
}

/// What `config`'s `--invalidation-feed` means on `db`: `auto` is `wal`
/// on a PostgreSQL server with logical decoding, else `log` (warned, with
/// what to change); `wal` on a server without it, or on SQLite, is refused.
///
/// # Errors
///
/// `--invalidation-feed wal` where it cannot run (the message says what to
/// change), or the database failing.
pub async fn plan(db: &Db, config: &FeedConfig) -> anyhow::Result<Plan> {
    match config.mode {
        FeedMode::Off => Ok(Plan::Off),
        FeedMode::Log => Ok(Plan::Log),
        mode => {
            let explicit = mode == FeedMode::Wal;
            if db.backend() != "postgres" {
                anyhow::ensure!(
                    !explicit,
                    "--invalidation-feed wal needs PostgreSQL; SQLite keeps the trigger log \
                     (--invalidation-feed log)"
                );
                return Ok(Plan::Log);
            }
            match wal_ready(db).await.context("reading wal_level")? {
                Ok(()) => Ok(Plan::Wal),
                Err(why) => {
                    anyhow::ensure!(!explicit, "--invalidation-feed wal: {why}");
                    tracing::warn!("invalidation feed: the trigger log, not the WAL: {why}");
                    Ok(Plan::Log)
                }
            }
        }
    }
}

/// Migrates `db` for `plan`: the schema, then the trigger log (`log`,
/// `off`: other instances may relay) or the WAL feed's publication and
/// slot (`wal`, [`Db::install_wal_feed`], no trigger; the slot only with
/// `make_slot`, as `kura migrate` does). A WAL feed that
/// cannot be prepared (no replication privilege, a table that cannot be
/// fed) is refused when `--invalidation-feed wal` was given, and falls
/// back to the log under `auto`. Returns the plan that holds and what was
/// done, for the log.
///
/// # Errors
///
/// When the database cannot be migrated.
pub async fn prepare(
    db: &Db,
    plan: Plan,
    config: &FeedConfig,
    namespace: &str,
    make_slot: bool,
) -> anyhow::Result<(Plan, Vec<String>)> {
    if plan == Plan::Wal {
        db.migrate_schema()
            .await
            .context("migrating the database")?;
        match db.install_wal_feed(&wal_names(namespace), make_slot).await {
            Ok(done) => {
                let mut said = Vec::new();
                if done.publication {
                    said.push(format!("publication {} made", wal_names(namespace)));
                }
                if done.slot {
                    said.push(format!("replication slot {} made", wal_names(namespace)));
                }
                if done.triggers_removed {
                    said.push("log triggers removed".to_owned());
                }
                return Ok((Plan::Wal, said));
            }
            Err(e) if config.mode == FeedMode::Wal => {
                return Err(anyhow::Error::new(e).context("--invalidation-feed wal"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "invalidation feed: the WAL feed cannot be prepared; the trigger log instead");
            }
        }
    }
    let m = db.migrate().await.context("migrating the database")?;
    let mut said = Vec::new();
    if m.applied > 0 {
        said.push(format!("{} schema migrations applied", m.applied));
    }
    if !m.feed_installed.is_empty() {
        said.push(format!(
            "log triggers installed on {}",
            m.feed_installed.join(", ")
        ));
    }
    Ok((
        if plan == Plan::Off {
            Plan::Off
        } else {
            Plan::Log
        },
        said,
    ))
}

/// Builds the relay of `db` over `cache` with `config`'s settings, reading
/// the trigger log.
#[must_use]
pub fn relay(db: &Db, cache: &Cache, config: &FeedConfig) -> Relay<FeedSource> {
    relay_over(
        FeedSource::Log(SqlFeedLog::new(db.clone()).listen(config.listen)),
        db,
        cache,
        config,
    )
}

/// Builds the relay of `source`.
#[must_use]
pub fn relay_over(
    source: FeedSource,
    db: &Db,
    cache: &Cache,
    config: &FeedConfig,
) -> Relay<FeedSource> {
    let poll = match source {
        // The stream wakes the relay; polling only bounds a missed wake-up.
        FeedSource::Wal(_) => config.poll.unwrap_or(Duration::from_millis(250)),
        FeedSource::Log(_) => config.poll_for(db.backend()),
    };
    Relay::builder(cache, source)
        .kinds(crate::registry::fed_kinds())
        .poll_interval(poll)
        .retention(config.retention)
        .max_backlog(config.max_backlog)
        .build()
}

/// The WAL source of `db` for namespace `namespace`.
///
/// # Errors
///
/// When the database URL cannot be used for replication.
pub fn wal_source(
    db: &Db,
    url: &str,
    namespace: &str,
    config: &FeedConfig,
) -> anyhow::Result<FeedSource> {
    Ok(FeedSource::Wal(WalSource::new(
        db.clone(),
        WalTarget::from_url(url)?,
        &wal_names(namespace),
        wal_tables(),
        config.bulk_clear,
    )))
}

impl Feed {
    /// The relay of this instance for `plan` ([`prepare`]'s); `None` when
    /// off, or when the database has no trigger log (logged). It runs once
    /// the composition root spawns [`Feed::running`] and hands its task
    /// back ([`Feed::set_task`]).
    ///
    /// # Errors
    ///
    /// When the database cannot be asked whether it has the log.
    pub async fn open(
        db: &Db,
        cache: &Cache,
        config: &Config,
        plan: Plan,
    ) -> anyhow::Result<Option<Feed>> {
        let relay = match plan {
            Plan::Off => {
                tracing::info!(
                    "invalidation feed off (--invalidation-feed off): this instance does not relay"
                );
                return Ok(None);
            }
            Plan::Wal => {
                let url = config.database_url.as_deref().unwrap_or_default();
                relay_over(
                    wal_source(db, url, &config.namespace, &config.feed)?,
                    db,
                    cache,
                    &config.feed,
                )
            }
            Plan::Log => {
                let log = SqlFeedLog::new(db.clone());
                if !log
                    .exists()
                    .await
                    .context("looking for the invalidation log")?
                {
                    tracing::warn!(
                        "the database has no invalidation log (run `kura migrate`): not relaying"
                    );
                    return Ok(None);
                }
                relay(db, cache, &config.feed)
            }
        };
        let (stop, _) = watch::channel(false);
        tracing::info!(
            source = relay.log().mode(),
            retention = ?config.feed.retention,
            max_backlog = config.feed.max_backlog,
            "invalidation feed relay running"
        );
        Ok(Some(Feed {
            relay,
            stop,
            task: Mutex::new(None),
        }))
    }

    /// The relay's run, until [`Feed::stop`]: the future to spawn.
    pub fn running(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let r = self.relay.clone();
        let mut stopped = self.stop.subscribe();
        async move {
            r.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        }
    }

    /// Hands over the task running [`Feed::running`], for [`Feed::stop`]
    /// to wait on.
    pub async fn set_task(&self, task: JoinHandle<()>) {
        *self.task.lock().await = Some(task);
    }

    /// The feed's state now (position, watermark, backlog, lag, lease
    /// holder).
    ///
    /// # Errors
    ///
    /// When the database fails or does not answer within 2 s.
    pub async fn status(&self) -> anyhow::Result<FeedStatus> {
        status_of(&self.relay).await
    }

    /// Stops the relay after its step in hand and releases the fleet lease.
    pub async fn stop(&self, grace: Duration) {
        let _ = self.stop.send(true);
        let task = self.task.lock().await.take();
        if let Some(mut task) = task {
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                tracing::warn!(
                    "invalidation feed relay still stepping after the grace period: stopped"
                );
                task.abort();
            }
        }
    }
}

/// A relay's state, read within `STATUS_TIMEOUT`.
///
/// # Errors
///
/// When the database fails or does not answer in time.
pub async fn status_of(relay: &Relay<FeedSource>) -> anyhow::Result<FeedStatus> {
    tokio::time::timeout(STATUS_TIMEOUT, relay.status())
        .await
        .context("the database did not answer")?
        .context("reading the invalidation feed state")
}

/// The feed part of `GET /healthz`: read from Redis only (what the
/// relaying instance last measured, [`kura::feed::Relay::health`]), never
/// from the database.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FeedHealth {
    /// `on` (this instance runs a relay), `off`, or `error` (its state
    /// could not be read).
    pub state: &'static str,
    /// Where the relay reads changes: `wal` or `log`; `null` when off.
    pub source: Option<&'static str>,
    /// Age of the oldest log entry not applied yet, in milliseconds (0
    /// when caught up), as the relaying instance last measured it (at most
    /// a poll interval ago); `null` when off or unknown (no instance
    /// relays, or none reaches both the database and Redis).
    pub lag_ms: Option<u64>,
    /// Log entries not applied yet, measured with `lag_ms`; `null` when off
    /// or unknown.
    pub backlog: Option<u64>,
    /// The instance holding the fleet lease, if any (its name, never the
    /// lease token).
    pub relaying: Option<String>,
}

impl FeedHealth {
    /// The health of `feed` (`None`: not relaying in this instance).
    pub async fn of(feed: Option<&Arc<Feed>>) -> FeedHealth {
        let off = FeedHealth {
            state: "off",
            source: None,
            lag_ms: None,
            backlog: None,
            relaying: None,
        };
        let Some(feed) = feed else {
            return off;
        };
        match feed.relay.health().await {
            Ok(h) => FeedHealth {
                state: "on",
                source: Some(feed.relay.log().mode()),
                lag_ms: h.observed.map(|o| o.lag_ms),
                backlog: h.observed.map(|o| o.backlog),
                relaying: h.relaying,
            },
            Err(e) => {
                tracing::warn!(error = %e, "health: invalidation feed state");
                FeedHealth {
                    state: "error",
                    source: Some(feed.relay.log().mode()),
                    ..off
                }
            }
        }
    }
}
