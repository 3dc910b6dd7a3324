//! The service layer: profile reads and writes, each cache decision made by
//! the `kura` library.
//!
//! | operation | database | cache (library call) |
//! |---|---|---|
//! | read | `SELECT` on a miss | [`CacheAside::get`](kura::CacheAside::get) |
//! | batch read | one `WHERE user_id = ANY($1)` for the misses | [`CacheAside::get_many`](kura::CacheAside::get_many) |
//! | create | `INSERT … ON CONFLICT DO NOTHING` | [`WriteThrough::invalidate`](kura::WriteThrough::invalidate) (drops a cached "not found") |
//! | update, `invalidate` | `UPDATE … version = version + 1 … RETURNING` | [`WriteThrough::invalidate`](kura::WriteThrough::invalidate) after commit |
//! | update, `through` | same | [`WriteThrough::update`](kura::WriteThrough::update) after commit |
//! | delete | `DELETE` | [`Cache::invalidate_entity`](kura::Cache::invalidate_entity) (profile, settings, preferences) |
//! | warm | users active in the last days | [`kura::Warmer`] |
//!
//! Cache failures never fail a read or a write: the library answers from the
//! database and keeps failed invalidations until Redis is back.
//!
//! Writes run to completion even when their request is cancelled (request
//! timeout, client gone): see [`crate::to_completion`]. Writes of one profile that mix
//! `behind` with direct writes or deletes are ordered by a per-profile
//! write turn in the cache store
//! ([`kura::strategy::write_behind::ordering`]).

//!
//! | file | what |
//! |---|---|
//! | `model.rs` | the profile, its create and patch bodies |
//! | `service.rs` | [`ProfileService`]: reads, direct writes, deletes, invalidation, warming |
//! | `behind.rs` | `behind` writes, and writing through when they cannot be queued |
//! | `reinvalidate.rs` | invalidations retried after a write whose outcome is unknown |
//! | `repo.rs` | the profile SQL; [`crate::db::Db`] as the profiles' [`kura::Source`] |
//! | `sink.rs` | the version-guarded write-behind sink |
//! | `routes.rs` | the HTTP routes |
//! | `seed.rs` | demo data |

mod behind;
pub mod model;
pub mod reinvalidate;
pub mod repo;
pub mod routes;
pub mod seed;
mod service;
pub mod sink;

pub use behind::{WritePath, Written};
pub use model::{NewProfile, Profile, ProfilePatch};
pub use service::{ProfileService, Removed, ServiceError, Warmed};
pub use sink::Guarded;
