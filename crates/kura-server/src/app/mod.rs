//! The composition root: opens the service's parts (the database,
//! migrated; the cache store; the TTL policy) and builds and starts
//! everything else ([`root`]). No other module starts a long-lived task.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`App`]: the database and cache opened; [`open_cache`], [`ttl_policy`] |
//! | `root.rs` | [`serve`], [`serve_app`], [`Server`]: every part built, every task started and stopped |
//! | `router.rs` | the routes of every feature, the layers, the OpenAPI document |
//! | `state.rs` | the router's state, handed to each handler by part |
//! | `flushers.rs` | the write-behind flusher tasks |

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kura::near::NearConfig;
use kura::store::{MemoryStore, RedisStore};
use kura::{Adaptive, Cache, QueueStore, QueuedCache, TtlPolicy};

use crate::config::Config;
use crate::db::Db;
use crate::profiles::ProfileService;
use crate::registry;

pub mod flushers;
pub mod root;
pub mod router;
pub mod state;

pub use root::{Server, serve, serve_app};

/// The opened parts of the service.
#[derive(Debug, Clone)]
pub struct App {
    /// The service layer (database + cache).
    pub service: ProfileService,
    /// Whether the cache is the embedded in-process store.
    pub memory_store: bool,
    /// The invalidation feed this instance runs.
    pub feed: crate::ops::feed::Plan,
}

/// The TTL table: the registry's, with the profile's stale window and the
/// configured overrides.
#[must_use]
pub fn ttl_policy(config: &Config) -> TtlPolicy {
    let mut policy = registry::ttl_policy();
    let mut profile = policy.get(registry::PROFILE.name());
    profile.max_stale = config.max_stale;
    policy.set(registry::PROFILE.name(), profile);
    for o in &config.ttl {
        let mut p = policy.get(&o.kind);
        p.ttl = o.ttl;
        if let Some(rule) = p.adaptive {
            // Keep the seed's proportion: a hot key lives twice as long.
            p.adaptive = Some(Adaptive::new(rule.reads, rule.window, o.ttl * 2));
        }
        policy.set(&o.kind, p);
    }
    config.freshness.apply(&mut policy);
    policy
}

/// The cache over Redis (`redis_url`) or the memory store. Builds inside a
/// Tokio runtime (it starts the library's maintenance task).
///
/// # Errors
///
/// A malformed Redis URL or namespace. An unreachable Redis is not an
/// error: the store connects lazily and the database answers meanwhile.
pub fn open_cache(config: &Config) -> anyhow::Result<(QueuedCache, bool)> {
    build_cache(config, false)
}

/// [`open_cache`] for serving requests: the types with a near-cache default
/// in the registry (the token kinds, checked on every request) get their
/// near caches unless `--near-cache` sizes them. Commands
/// and flushers use [`open_cache`]: they check no tokens, and a near cache
/// would hold a tracking connection for nothing.
///
/// # Errors
///
/// As [`open_cache`].
pub fn open_serving_cache(config: &Config) -> anyhow::Result<(QueuedCache, bool)> {
    build_cache(config, true)
}

fn build_cache(config: &Config, serving: bool) -> anyhow::Result<(QueuedCache, bool)> {
    let (store, memory): (Arc<dyn QueueStore>, bool) = match &config.redis_url {
        Some(url) => (
            Arc::new(
                RedisStore::builder(url.as_str())
                    .response_timeout(config.redis_timeout)
                    .connect_timeout(config.redis_timeout.max(Duration::from_millis(500)))
                    .build()
                    .context("redis url")?,
            ),
            false,
        ),
        None => (
            Arc::new(MemoryStore::new().with_max_bytes(config.memory_max_bytes)),
            true,
        ),
    };
    let mut builder = Cache::queued_shared(store)
        .namespace(config.namespace.as_str())
        .ttl_policy(ttl_policy(config))
        .op_timeout(config.redis_timeout);
    let near = |entries| {
        NearConfig::entries(entries)
            .max_bytes(config.near_cache_max_bytes)
            .max_lifetime(config.near_cache_ttl)
    };
    // Types with a near-cache default (the token kinds, checked on every
    // request) are near-cached unless configured otherwise, so that a check
    // costs no round trip.
    if serving {
        for t in registry::TYPES {
            if let Some(entries) = t.near_default {
                builder = builder.near_cache(t.kind, near(entries));
            }
        }
    }
    for n in &config.near_cache {
        if let Some(kind) = registry::kind_named(&n.kind) {
            builder = builder.near_cache(kind, near(n.entries));
        }
    }
    let cache = builder.build().context("cache configuration")?;
    Ok((cache, memory))
}

impl App {
    /// Connects to and migrates the database, opens the cache and builds
    /// the service. Installs the Prometheus recorder first, so the
    /// library's metric handles land in it.
    ///
    /// # Errors
    ///
    /// When the database cannot be reached or migrated, or the cache
    /// configuration is invalid.
    pub async fn open(config: &Config) -> anyhow::Result<App> {
        crate::telemetry::prometheus();
        let db = Db::connect(config.database_url.as_deref(), config.pool)
            .await
            .context("connecting to the database")?;
        let plan = crate::ops::feed::plan(&db, &config.feed).await?;
        let (feed, done) =
            crate::ops::feed::prepare(&db, plan, &config.feed, &config.namespace, false).await?;
        if !done.is_empty() {
            tracing::info!(steps = ?done, "database migrated");
        }
        let (cache, memory_store) = open_serving_cache(config)?;
        let service =
            ProfileService::new(db, cache, config.write_strategy).with_write_behind(&config.wb);
        Ok(App {
            service,
            memory_store,
            feed,
        })
    }
}
