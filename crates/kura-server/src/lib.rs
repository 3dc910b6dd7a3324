//! The kura profile service and CLI: the seed's User API profile service,
//! built on the `kura` cache library, over PostgreSQL or SQLite and Redis or
//! an embedded memory store.
//!
//! # Layout
//!
//! Imports point downwards only (a test fails on a cycle between these
//! folders, `tests/layering.rs`):
//!
//! ```text
//! main.rs                      the `kura` binary: parse, then cli::run
//! cli/                         the commands (serve, migrate, seed, warm, invalidate, stats,
//!                              token, flush, wb, feed, bench); `stats --watch`; signals
//! app/                         the composition root: opens the database and cache, builds
//!                              every feature, the router and its state, starts every task
//! admin/  ops/                 cache administration routes; health, metrics, the feed relay,
//!                              the write-behind queue's durability and status
//! profiles/ userdata/ tokens/  one folder per feature: service, routes, repository
//!                              (profiles also: model, behind writes, sink, demo data)
//! http/                        what routes share: errors, extractors, the request timeout,
//!                              request metrics, rate limits, request spans
//! auth/                        token verification (HS256, RS256 with a JWKS) and the
//!                              admission trait the token checks implement
//! db/                          the pool, migrations, the dialect helper, the feed's sources
//!                              (db/feed/: the trigger log, the WAL stream, either)
//! registry.rs  config/         the cached types, each defined once; flags and env
//! telemetry/  to_completion.rs logs, Prometheus, traces; writes that outlive their request
//! migrations/{postgres,sqlite}/ embedded with `sqlx::migrate!`
//! ```
//!
//! A feature's service imports neither `http` nor `cli`; its routes take
//! the parts of the state they need (`State<Arc<ProfileService>>`, …), so
//! no feature knows the application's state type.
//!
//! The service holds no caching logic of its own: reads go through
//! [`kura::CacheAside`], writes commit first and then call
//! [`kura::WriteThrough`] (or, for `behind` writes, are accepted by
//! [`kura::WriteBehind`] and applied later by [`kura::Flusher`]s), deletes
//! call [`kura::Cache::invalidate_entity`], and warming runs
//! [`kura::Warmer`].
//!
//! # Invalidation from the database
//!
//! `--invalidation-feed` picks the source ([`ops::feed::plan`]): on a
//! PostgreSQL server with `wal_level = logical` (`auto`, or `wal`),
//! `kura migrate` and every start prepare a publication for the fed tables
//! of the [`registry`] and `kura migrate` a replication slot
//! ([`db::Db::install_wal_feed`]; no trigger), and the relay streams the
//! slot ([`db::feed::WalSource`]); otherwise (`log`, SQLite) they install
//! the library's invalidation log and the triggers of the fed tables
//! ([`db::Db::install_feed`]) and the relay reads the log
//! ([`db::feed::SqlFeedLog`]). Either way `kura serve` runs a
//! [`kura::feed::Relay`] ([`ops::feed`]): a committed change reaches the
//! cache whoever made it and whatever became of the process that made it,
//! while one instance reaches both the database and Redis; read-your-writes
//! in the writing instance still rests on its own post-commit
//! invalidation. See [`ops::feed`] for which guarantee rests on what.
//!
//! # Embedding and tests
//!
//! [`serve`] starts the service for a [`Config`] and returns a [`Server`]
//! with the bound address (listen on port 0 for any free port) and a
//! graceful [`Server::shutdown`].

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod ops;
pub mod profiles;
pub mod registry;
pub mod telemetry;
pub mod to_completion;
pub mod tokens;
pub mod userdata;

pub use app::{App, Server, serve, serve_app};
pub use cli::{Cli, Command, run};
pub use config::{AuthConfig, Config, WriteStrategy};
