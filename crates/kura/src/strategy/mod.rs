//! The strategies, one module each, same shape: a handle made from a
//! [`Cache`](crate::Cache) for one data type.
//!
//! | strategy | guarantee |
//! |---|---|
//! | [`CacheAside`] | one load per cold key per fleet; no fill after an invalidation that overtook it |
//! | [`WriteThrough`] | after a commit, the cache holds the new version or nothing; never an older one |
//! | [`WriteBehind`] | every acknowledged write reaches the database or the dead-letter stream; reads see it until then |

pub mod cache_aside;
pub mod write_behind;
pub mod write_through;

pub use cache_aside::{Batch, CacheAside, Fetched, FetchedJson, Status};
pub use write_behind::{
    Accepted, Applied, BehindError, BehindLimits, FlushReport, Flusher, Sink, TurnError,
    WriteBehind, WriteTurn,
};
pub use write_through::{WriteOutcome, WriteThrough};
