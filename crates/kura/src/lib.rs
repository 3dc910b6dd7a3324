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
//! Imports point downwards only (`tests/layering.rs` fails on a cycle
//! between these modules):
//!
//! ```text
//! warming   invalidation   ratelimit   feed/{relay/, source/}   coalesce
//!    │            │            │          │
//! strategy/{cache_aside/, write_through, write_behind/}
//!    │
//! core/{handle, inner, builder, queued, lease, clears, replay, counters, maintenance, owned}
//!    │
//! consistency/{epochs, journal, stamps}      near/{mod, tracker}
//!    │                                          │
//! store/{mod, caps, queue, redis/ (+ scripts/*.lua), memory/}
//!    │
//! key/   codec/   policy/   tags   source   error   breaker   metrics   spans
//! ```
//!
//! - [`key`]: key naming (`cache:<type>:<id>[:<sub>]`), [`Kind`] (a name
//!   and a key shape: the library knows no application type), id
//!   validation, glob escaping.
//! - [`codec`]: the JSON envelope (`_v` version and `cached_at`), the size
//!   limit, and the envelope step every fill takes (`codec/envelope.rs`).
//! - [`policy`]: the per-type TTL table ([`TtlPolicy`], empty but for its
//!   default), jitter, adaptive TTL (`policy/adaptive.rs`), TTL from an
//!   expiry; each type's [`TypePolicy`] also holds its eager refresh rule
//!   and load timeouts ([`freshness`], `policy/freshness.rs`).
//! - [`tags`]: clear by type and invalidation by tag in O(1) (the stamps
//!   hash, [`Cache::clear`], [`Cache::invalidate_tag`]).
//! - [`source`]: the system of record ([`Source`]) and row versions ([`Versioned`]).
//! - [`store`]: the seam to the cache server, split by capability: the
//!   entry protocol every store has ([`Store`], `store/mod.rs`), the
//!   capability traits (`store/caps.rs`: stamps, feed positions, rate,
//!   counters, leases, tracking; [`CacheStore`] is all of them), and the
//!   write-behind queue ([`QueueStore`], `store/queue.rs`). The Redis store
//!   (`store/redis/`) and the in-process one (`store/memory/`) are split the
//!   same way (entry protocol, capabilities, queue) and pass one
//!   conformance suite. A [`StoreError`] has a kind ([`StoreErrorKind`])
//!   and its source.
//! - `consistency/`: what keeps a fill from landing
//!   over a newer write: the write epochs (`epochs.rs`), the invalidations
//!   that could not reach the store (`journal.rs`) and this process's copy
//!   of the stamps (`stamps.rs`).
//! - `core/`: [`Cache`] (`handle.rs`) and the shared core every strategy
//!   works through (`inner.rs`: the one way to a store step, with the
//!   circuit breaker and the operation timeout); [`CacheBuilder`];
//!   [`QueuedCache`] (`queued.rs`), a cache whose store has the queue, the
//!   only one that hands out [`WriteBehind`] writers (checked at compile
//!   time: [`Cache::builder`] over a [`Store`] builds a [`Cache`],
//!   [`Cache::queued`] over a [`QueueStore`] a [`QueuedCache`]); the fleet
//!   lease with its heartbeat ([`lease`], used by warming, the feed relay
//!   and write ordering); clears, the journal's replay, counters, the
//!   background task, and values the cache owns ([`Cache::put`],
//!   [`Cache::peek`]). The core imports no strategy.
//! - [`strategy`]: [`CacheAside`] split by step (`read`, `flight` — the
//!   fleet lease and the in-process single-flight —, `resolve`, `batch` —
//!   the lease-load-fill of a batch, shared by `get_many` and warming —,
//!   `refresh`), [`WriteThrough`] and [`WriteBehind`] (`accept`, the
//!   [`Flusher`], and `ordering`: the turn of a write of one entity,
//!   [`WriteBehind::turn`]).
//! - [`invalidation`]: by key, by entity, by pattern; clear and tags.
//! - [`warming`]: background, batched, once per fleet.
//! - [`metrics`](mod@metrics): counters and histograms, the seed's Redis counters, [`Stats`].
//! - [`near`]: the near cache, an in-process L1 per type above the store
//!   ([`CacheBuilder::near_cache`]), kept consistent by the store's
//!   invalidation stream (`store/redis/tracking.rs`: Redis `CLIENT
//!   TRACKING ... BCAST` on connections of its own); `tracker.rs` holds the
//!   fill tickets, the flush generation and the stream's liveness.
//! - [`ratelimit`]: rate limits per class and subject, GCRA in one store
//!   step, per process while the store is unreachable.
//! - [`coalesce`]: the latest value per key kept in process and written
//!   in batches (a session's `last_seen`): one write per flush, not per
//!   request; what is pending is lost with the process.
//! - [`feed`]: invalidation from the database's commits: the
//!   [`ChangeSource`] a service implements over its driver (the trigger
//!   log's SQL for PostgreSQL and SQLite is [`feed::source::trigger_log`];
//!   a logical replication stream is decoded by [`feed::source::pgoutput`]
//!   and assembled by commit position by [`feed::source::wal`]),
//!   and the [`Relay`] applying it (`relay/step.rs` holds the safety rules:
//!   watermark, position, overflow, regression).
//!
//! # Guarantees
//!
//! | strategy | guarantee |
//! |---|---|
//! | cache-aside read | a hit is one round trip; a cold key is loaded once per fleet (lease + in-process single-flight); a fill that an invalidation or update overtook is rejected |
//! | write-through `invalidate` | after it returns, no reader gets the pre-commit value from the cache (or, with Redis down, from this process once it is back), nor joins a load in this process that began before it |
//! | write-through `update` | the cache holds the committed version, a newer one, or nothing; never an older one |
//! | invalidation | deletes value, lease and stale copy; patterns by `SCAN COUNT 100`, never `KEYS` |
//! | write-behind | every acknowledged write reaches the database (version-guarded, coalesced, batched) or the dead-letter stream; until then every read sees it |
//! | warming | never overwrites a cached value, never caches a row older than a concurrent write; one instance per fleet at a time |
//! | invalidation feed | every committed change to a table with the feed's triggers, by any writer, invalidates the entity (voiding loads in flight) at least once, in commit order per entity, while one relay reaches the database and Redis; a relay killed mid-batch or cut off skips nothing; many relays never move the position back; duplicates are harmless (version rule) |
//! | near cache (L1) | an L1 hit costs no round trip and no decode; a change to the key by anyone evicts it from every instance's L1 when the push arrives; a fill that raced an invalidation is dropped (a ticket per fill); a write through this process evicts before it returns; a lost, reconnected or moved stream flushes L1 |
//! | near cache: negative entries | "not found" is kept in L1 as well, only from a load this caller started (its lease request was sent after the fill ticket), and evicted by any change of the entry's marker (`<ns>:~n:<type>:` is tracked beside the values) |
//! | eager refresh ([`freshness`]) | a hot value is reloaded before it expires, in the background, by one process of the fleet at a time (a refresh lease over the value the reader saw); readers keep the cached value meanwhile; a refill is refused like any fill when a write voided its lease |
//! | load timeouts | past the soft timeout a caller gets the stale copy, past the hard one [`Error::LoadTimeout`]; the load goes on and fills the cache |
//! | clear / tag ([`tags`]) | one store step whatever the number of values; after it returns this process serves no value of the type (or tag) loaded before it, and no fill of a load that began before it lands; other processes stop when the stamps' push reaches them |
//! | values with an end ([`Versioned::expires_at`]) | an entry lives at most until the value's end; a value past it is served but never cached |
//! | near cache: not guaranteed | that another instance stops serving the old value at the instant of a write: it does when the push reaches it, or after `max_silence` (1 s) without a confirmed stream; stores without a stream (the memory store) get no near cache |
//! | eager refresh / clear: not guaranteed | a reload before expiry of a key read less than about once per `δβ` near its end; that another process stops serving cleared values at the instant the clear returns (it does when the push arrives, or reads the stamps on every check while its stream is not live); cached "not found" markers are not cleared (they expire within `absent_ttl`); cleared entries keep their memory until their TTL |
//! | invalidation feed: not guaranteed | writes to tables without the triggers (or with triggers disabled; with the WAL source: tables outside the publication); a value served from Redis between its return after an outage and the relay's catching up (measured 0.7 s); a database restored from a backup (clear the cache); promptness while a long transaction anywhere in the PostgreSQL cluster holds the watermark back (lag, not loss); copies kept above the store unless they use the relay's `on_applied` hook |
//!
//! # Failure modes
//!
//! | failure | behaviour |
//! |---|---|
//! | Redis down, slow or partitioned | every store call is bounded by the operation timeout; after a few failures the circuit opens and reads go straight to the source ([`Status::Bypass`]); a probe closes it again |
//! | invalidation while Redis is unreachable | kept in-process (each entry or pattern once) and replayed in the background, each replay bounded (60 s by default) and started at most once per flush interval after a failure; until then this process reads the keys it covers (every key of the type, for a pattern) from the source, and all other keys from the cache as usual |
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
//! let profiles = cache.aside(Kind::new("profile"), Db);
//! assert_eq!(profiles.get("u1").await?.status(), Status::Miss);
//! assert_eq!(profiles.get("u1").await?.status(), Status::Hit);
//! cache.write_through(Kind::new("profile")).invalidate("u1").await?;
//! assert_eq!(profiles.get("u1").await?.status(), Status::Miss);
//! # Ok(()) }
//! ```
//!
//! Write-behind needs a store with the queue capability, so the cache is
//! built with [`Cache::queued`]:
//!
//! ```
//! # use kura::{Cache, Kind, Source, Versioned, store::MemoryStore};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Clone, Serialize, Deserialize)]
//! # struct Profile { user_id: String, name: String, version: u64 }
//! # impl Versioned for Profile { fn version(&self) -> u64 { self.version } }
//! # struct Db;
//! # impl Source for Db {
//! #     type Value = Profile;
//! #     type Error = std::io::Error;
//! #     async fn load(&self, id: &str) -> Result<Option<Profile>, std::io::Error> {
//! #         Ok(Some(Profile { user_id: id.into(), name: "山田".into(), version: 1 }))
//! #     }
//! # }
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = Cache::queued(MemoryStore::new()).build()?; // a QueuedCache
//! let writes = cache.behind(Kind::new("profile"), Db);
//! let accepted = writes
//!     .accept("u1", |cur| Profile { name: "花子".into(), version: cur.version + 1, ..cur.clone() })
//!     .await?;
//! assert_eq!(accepted.value.version, 2);
//! // Every other strategy works on it as on a Cache (Deref).
//! cache.write_through(Kind::new("profile")).invalidate("u2").await?;
//! # Ok(()) }
//! ```
//!
//! More in `examples/`: one runnable program per strategy.

pub mod breaker;
pub mod coalesce;
pub mod codec;
mod consistency;
mod core;
pub mod error;
pub mod feed;
pub mod invalidation;
pub mod key;
pub mod metrics;
pub mod near;
pub mod policy;
pub mod ratelimit;
pub mod source;
mod spans;
pub mod store;
pub mod strategy;
pub mod tags;
pub mod warming;

pub use self::core::lease;
pub use breaker::{BreakerConfig, BreakerState};
pub use core::{Cache, CacheBuilder, QueuedCache};
pub use error::{BoxError, Error, StoreError, StoreErrorKind};
pub use feed::{ChangeSource, FeedEvent, Relay};
pub use invalidation::Invalidated;
pub use key::{KeyError, Kind};
pub use metrics::Stats;
pub use policy::{Adaptive, TtlPolicy, TypePolicy, freshness};
pub use source::{CacheValue, Source, Versioned};
pub use store::{CacheStore, QueueStore, Store};
pub use strategy::{
    Applied, Batch, BehindError, BehindLimits, CacheAside, Fetched, FetchedJson, Flusher, Sink,
    Status, TurnError, WriteBehind, WriteOutcome, WriteThrough, WriteTurn,
};
pub use warming::{WarmItem, WarmProgress, WarmReport, Warmer};
