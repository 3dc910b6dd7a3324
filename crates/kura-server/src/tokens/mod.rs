//! Token revocation (the seed's blacklist) and sessions, each cache
//! decision made by the `kura` library.
//!
//! | operation | database | cache (library call) |
//! |---|---|---|
//! | check a request's token | `SELECT` on a miss | [`CacheAside::get`](kura::CacheAside::get) of `blacklist:jti-<jti>` and `blacklist:sid-<sid>` (near-cached, "not revoked" included) |
//! | revoke a token or session | `INSERT … ON CONFLICT` into `revocations` | [`WriteThrough::invalidate`](kura::WriteThrough::invalidate) after commit |
//! | first request of a session | `INSERT … WHERE NOT EXISTS (revocation)` | [`CacheAside::get`](kura::CacheAside::get) of `session:<sid>`, [`WriteThrough::invalidate`](kura::WriteThrough::invalidate) after the insert |
//! | later requests of a session | none: `last_seen` is coalesced ([`kura::coalesce`]) and written behind once a second | L1 hit |
//!
//! # Guarantee
//!
//! Once a revoke call has answered, the revocation is in the database and
//! its cache entry (and "not revoked" marker) is gone: this instance
//! refuses the token at once, another instance as soon as the marker's
//! removal reaches its near cache (Redis sends that push before it answers
//! the removal) — or at once, when its near cache is not serving (stream
//! silent for over a second, Redis down: the checks read Redis, then the
//! database). A revocation lasts until the token's `exp` plus the 30 s of
//! clock-skew leeway verification allows ([`LEEWAY_SECS`]): a token still
//! admitted can be revoked; nothing is stored for a token past that. The `revocations` table is fed to the
//! cache by the invalidation feed, so a revocation written while Redis was
//! unreachable, or straight into the database, reaches every cache too.
//!
//! When the revoking instance cannot reach Redis, the revocation is
//! recorded and its invalidation kept pending (replayed once Redis answers);
//! this instance refuses the token at once. Other instances learn it from
//! the invalidation feed (its lag) when the feed carries revocations; without
//! the feed nothing would tell them, so the call answers 503
//! ([`RevokeError::NotApplied`]) instead of claiming a revocation others
//! do not see yet.
//!
//! # Not guaranteed
//!
//! - A token without `jti` cannot be revoked on its own (only its session,
//!   when it has a `sid`).
//! - `last_seen` is as of the last flush (up to a second old, and up to a
//!   second of it is lost if the process dies).
//! - With both Redis and the database unreachable, a request's token cannot
//!   be checked: it is refused (503), never let through unchecked.

//!
//! | file | what |
//! |---|---|
//! | `service.rs` | [`Tokens`]: the checks (the [`crate::auth::Admission`] of every request), revocations, sessions |
//! | `repo.rs` | the `revocations` and `sessions` tables |
//! | `routes.rs` | `POST /api/v1/auth/revoke`, the session routes |

pub mod repo;
pub mod routes;
mod service;

pub use crate::auth::LEEWAY_SECS;
pub use service::{
    RevocationSource, RevokeError, Revoked, SESSION_REVOCATION_MIN, SessionSource,
    TOUCH_FLUSH_EVERY, TokenStats, Tokens, key_id,
};
