//! The core every strategy handle works through ([`Cache`]), and its
//! parts:
//!
//! - `handle.rs`: [`Cache`], the public handle (cheap to clone).
//! - `inner.rs`: `CacheInner`, what the handles share, and
//!   `CacheInner::call`, the one way to a store step (circuit breaker,
//!   operation timeout, a kick to the replay of pending invalidations).
//! - `builder.rs`: [`CacheBuilder`], the options.
//! - `queued.rs`: [`QueuedCache`], a cache whose store also has the
//!   write-behind queue ([`crate::store::QueueStore`]).
//! - `replay.rs`: the replay of the journal of pending invalidations
//!   ([`crate::consistency`]).
//! - `clears.rs`: the stamps check of a read, the epoch a load records and
//!   the bump of a clear ([`crate::tags`]).
//! - `counters.rs`: hit/miss counts and the fleet's shared counters.
//! - `maintenance.rs`: the background task (counter flushes, replays).
//! - `owned.rs`: values the cache owns ([`Cache::put`], [`Cache::peek`]).
//! - `lease.rs`: the fleet lease ([`lease::FleetLease`]) of background work
//!   (the feed relay, warming) and of write ordering.
//!
//! The strategies (`crate::strategy`) and the invalidation API
//! (`crate::invalidation`) add their methods to [`Cache`] from their own
//! modules: this module imports none of them.

use std::sync::Mutex;

mod builder;
mod clears;
mod counters;
mod handle;
mod inner;
pub mod lease;
mod maintenance;
mod owned;
mod queued;
mod replay;

pub use self::builder::CacheBuilder;
pub use self::handle::Cache;
pub(crate) use self::inner::{CacheInner, NearCaches};
pub use self::queued::QueuedCache;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
