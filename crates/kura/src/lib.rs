//! kura (蔵, "storehouse"): cache strategies for services that keep their
//! data in a SQL database and cache it in Redis.
//!
//! kura implements the cache-aside read, write-through update and
//! invalidation, TTL policy, invalidation API, warming and hit-rate metrics
//! of a typical Redis caching design, without its races: one load per cold
//! key across a fleet, no stale value put back after a write, no older
//! version replacing a newer one, and no request failed by a Redis outage.
//!
//! # Layout
//!
//! Imports point downwards only:
//!
//! ```text
//! strategy/{cache_aside, write_through, write_behind}   invalidation   warming   feed/{relay, sql}
//!        │                                    │             │              │
//!        └──────────────── cache (Cache: breaker, timeouts, pending invalidations, counters)
//!                              │
//!     key   codec   ttl   metrics   source        store/{redis, memory} (+ scripts/*.lua)
//! ```
//!
//! - [`key`]: key naming (`cache:<type>:<id>[:<sub>]`), id validation, glob escaping.
//! - [`codec`]: the JSON envelope (`_v` version and `cached_at`), size limit.
//! - [`ttl`]: the per-type TTL table, jitter, adaptive TTL, TTL from an expiry.
//! - [`source`]: the system of record ([`Source`]) and row versions ([`Versioned`]).
//! - [`store`]: the seam to the cache server ([`Store`]) and its Redis and
//!   in-process implementations, which pass one conformance suite.
//! - [`Cache`]: the shared core every strategy handle works through.
//! - [`strategy`]: [`CacheAside`], [`WriteThrough`] and [`WriteBehind`] (with its [`Flusher`]).
//! - [`invalidation`]: by key, by entity, by pattern.
//! - [`warming`]: background, batched, once per fleet.
//! - [`metrics`](mod@metrics): counters and histograms, the seed's Redis counters, [`Stats`].
//! - [`feed`]: invalidation from the database's commits: the trigger SQL
//!   for PostgreSQL and SQLite ([`feed::sql`]), the [`FeedLog`] a service
//!   implements over its driver, and the [`Relay`] applying the log.
//!
//! # Guarantees
//!
//! | strategy | guarantee |
//! |---|---|
//! | cache-aside read | a hit is one round trip; a cold key is loaded once per fleet (lease + in-process single-flight); a fill that an invalidation or update overtook is rejected |
//! | write-through `invalidate` | after it returns, no reader gets the pre-commit value from the cache (or, with Redis down, from this process once it is back) |
//! | write-through `update` | the cache holds the committed version, a newer one, or nothing; never an older one |
//! | invalidation | deletes value, lease and stale copy; patterns by `SCAN COUNT 100`, never `KEYS` |
//! | write-behind | every acknowledged write reaches the database (version-guarded, coalesced, batched) or the dead-letter stream; until then every read sees it |
//! | warming | never overwrites a cached value, never caches a row older than a concurrent write; one instance per fleet at a time |
//! | invalidation feed | every committed change to a table with the feed's triggers, by any writer, invalidates the entity (voiding loads in flight) at least once, in commit order per entity, while one relay reaches the database and Redis; a relay killed mid-batch or cut off skips nothing; many relays never move the position back; duplicates are harmless (version rule) |
//! | invalidation feed: not guaranteed | writes to tables without the triggers (or with triggers disabled); a database restored from a backup (clear the cache); promptness while a long transaction anywhere in the PostgreSQL cluster holds the watermark back (lag, not loss); copies kept above the store unless they use the relay's `on_applied` hook |
//!
//! # Failure modes
//!
//! | failure | behaviour |
//! |---|---|
//! | Redis down, slow or partitioned | every store call is bounded by the operation timeout; after a few failures the circuit opens and reads go straight to the source ([`Status::Bypass`]); a probe closes it again |
//! | invalidation while Redis is unreachable | kept in-process and applied before this process uses the cache again; with the invalidation feed, the database's log also carries it to the cache through any relay, whatever happens to this process |
//! | Redis unreachable for long, with writes (feed) | the log's backlog stays bounded: past the bound the relay records an overflow and the affected types are cleared once Redis is back |
//! | source fails | a stale copy (if the type keeps one) is served as [`Status::Stale`]; otherwise [`Error::Source`] |
//! | bad bytes at a key (garbage, wrong type, truncated JSON) | treated as a miss, removed and reloaded |
//! | value over the size limit | served, not cached |
//!
//! # Examples
//!
//! ```
//! use kura::{Cache, Kind, Source, Status, Versioned, store::MemoryStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Profile { user_id: String, name: String, version: u64 }
//! impl Versioned for Profile { fn version(&self) -> u64 { self.version } }
//!
//! struct Db;
//! impl Source for Db {
//!     type Value = Profile;
//!     type Error = std::io::Error;
//!     async fn load(&self, id: &str) -> Result<Option<Profile>, std::io::Error> {
//!         Ok(Some(Profile { user_id: id.into(), name: "山田".into(), version: 1 }))
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), kura::Error> {
//! let cache = Cache::builder(MemoryStore::new()).build()?;
//! let profiles = cache.aside(Kind::PROFILE, Db);
//! assert_eq!(profiles.get("u1").await?.status(), Status::Miss);
//! assert_eq!(profiles.get("u1").await?.status(), Status::Hit);
//! cache.write_through(Kind::PROFILE).invalidate("u1").await?;
//! assert_eq!(profiles.get("u1").await?.status(), Status::Miss);
//! # Ok(()) }
//! ```
//!
//! More in `examples/`: one runnable program per strategy.

pub mod breaker;
mod cache;
pub mod codec;
pub mod error;
pub mod feed;
pub mod invalidation;
pub mod key;
pub mod metrics;
pub mod source;
pub mod store;
pub mod strategy;
pub mod ttl;
pub mod warming;

pub use breaker::{BreakerConfig, BreakerState};
pub use cache::{Cache, CacheBuilder};
pub use error::{BoxError, Error, StoreError};
pub use feed::{FeedEvent, FeedLog, Relay};
pub use invalidation::Invalidated;
pub use key::{KeyError, Kind};
pub use metrics::Stats;
pub use source::{CacheValue, Source, Versioned};
pub use store::Store;
pub use strategy::{
    Applied, Batch, BehindError, BehindLimits, CacheAside, Fetched, FetchedJson, Flusher, Sink,
    Status, WriteBehind, WriteOutcome, WriteThrough,
};
pub use ttl::{Adaptive, TtlPolicy, TypePolicy};
pub use warming::{WarmItem, WarmProgress, WarmReport, Warmer};
