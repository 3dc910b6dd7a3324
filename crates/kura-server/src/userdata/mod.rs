//! Settings and preferences: a JSON object per user, read through the
//! cache and written with the profile's strategies.
//!
//! | operation | database | cache (library call) |
//! |---|---|---|
//! | read | `SELECT` on a miss | [`CacheAside::get`](kura::CacheAside::get) (kinds `settings`, `preferences`; TTL 1800 s) |
//! | write, `invalidate` | `INSERT … ON CONFLICT DO UPDATE … version + 1 RETURNING` | [`WriteThrough::invalidate`](kura::WriteThrough::invalidate) after commit |
//! | write, `through` | same | [`WriteThrough::update`](kura::WriteThrough::update) after commit |
//! | write, `behind` | later, by a flusher (`… WHERE version < $new`, [`DocSink`]) | [`WriteBehind::accept`](kura::WriteBehind::accept) (queue `<ns>:~wb:settings`, `…:preferences`) |
//! | profile deleted | both rows deleted with the profile | [`kura::Cache::invalidate_entity`] (profile, settings, preferences) |
//!
//! Both tables are fed to the cache by the invalidation feed, so a write
//! made straight in the database invalidates too.
//!
//! # Mixing `behind` with direct writes
//!
//! As for profiles ([`crate::profiles`]): per user and kind, a write turn
//! ([`kura::strategy::write_behind::ordering`]) orders `behind` accepts and direct writes, and a
//! direct write (and a profile delete) first waits until the document has
//! no queued write left (5 s at most, else 503). A `behind` write of a
//! document that does not exist yet is written directly (`X-Write:
//! invalidate`); one that cannot be queued (Redis unreachable, the queue
//! full with `--wb-on-full through`) is written through (`X-Write:
//! through`).
//!
//! | file | what |
//! |---|---|
//! | `service.rs` | [`UserData`]: reads and the three write strategies |
//! | `repo.rs` | the `settings` and `preferences` tables, the write-behind sink |
//! | `routes.rs` | the HTTP routes |

pub mod repo;
pub mod routes;
mod service;

pub use repo::{DocKind, DocSink, UserDoc};
pub use service::{DocError, DocSource, MAX_DOC_BYTES, MAX_DOC_DEPTH, UserData, validate};
