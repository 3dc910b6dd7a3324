//! What keeps a cached value from being older than the database: state the
//! core's steps consult, kept apart from the handle that uses it.
//!
//! - `epochs.rs`: the write epochs. Every write bumps its key's epoch
//!   before it returns; a read joins a load in flight only while the
//!   epoch it started under is current, so no read that starts after a
//!   write is handed a load that began before it.
//! - `journal.rs`: invalidations that could not reach the store, kept
//!   in-process (each key or pattern once, with a generation) until the
//!   replay (`core/replay.rs`) applies them; the keys they cover are read
//!   from the source meanwhile.
//! - `stamps.rs`: this process's copy of the namespace's clear and tag
//!   stamps ([`crate::tags`]), and when it can be trusted without a read.
//!
//! The lease every load holds, and the fence a committed change puts on it,
//! are store steps ([`crate::store::Store::acquire`],
//! [`crate::store::Store::invalidate_older`]); the fleet lease of
//! background work is [`crate::lease`].

pub(crate) mod epochs;
pub(crate) mod journal;
pub(crate) mod stamps;
