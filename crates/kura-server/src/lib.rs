//! The kura profile service and CLI: the seed's User API profile service,
//! built on the `kura` cache library, over PostgreSQL or SQLite and Redis or
//! an embedded memory store.
//!
//! # Layout
//!
//! Calls point downwards only:
//!
//! ```text
//! main.rs (the `kura` binary: parse, then `run`)
//!   cli.rs  commands.rs            the commands; watch.rs the `kura stats --watch` view
//!   http/{mod, auth, error, profiles, userdata, tokens, ratelimit, admin, health}.rs
//!        │                         routes, JWT, errors, OpenAPI, server handle
//!   write_behind.rs                flushers, durability check, queue status
//!   feed.rs                        the invalidation feed relay, `kura feed status`
//!   profiles.rs                    service layer: every cache decision via `kura`
//!   userdata.rs                    settings and preferences (the same strategies)
//!   tokens.rs                      token revocation checks, sessions, coalesced `last_seen`
//!   app.rs                         opens the database, the store, the TTL policy
//!   db.rs  model.rs  seed.rs       sqlx (PostgreSQL | SQLite), the profile, demo data
//!   db/{sink, feed, userdata, tokens}.rs
//!                                  write-behind sinks; the invalidation log (install, read,
//!                                  prune); settings/preferences, revocations and sessions
//!   config.rs  telemetry.rs        flags and env, logs and Prometheus
//!   signal.rs                      SIGINT/SIGTERM, for `serve` and `flush`
//! migrations/{postgres,sqlite}/    embedded with `sqlx::migrate!`
//! ```
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
//! `kura migrate` (and every start) installs the library's invalidation
//! log and the triggers of `profiles`, `settings`, `preferences` and
//! `revocations` ([`db::Db::install_feed`]); `kura serve`
//! runs a [`kura::feed::Relay`] over [`db::feed::SqlFeedLog`] ([`feed`]).
//! A committed change reaches the cache whoever made it and whatever
//! became of the process that made it, while one instance reaches both
//! the database and Redis; read-your-writes in the writing instance still
//! rests on its own post-commit invalidation. See [`feed`] for which
//! guarantee rests on what.
//!
//! # Embedding and tests
//!
//! [`serve`] starts the service for a [`Config`] and returns a [`Server`]
//! with the bound address (listen on port 0 for any free port) and a
//! graceful [`Server::shutdown`].

pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub mod db;
pub mod feed;
pub mod http;
pub mod model;
#[cfg(feature = "otel")]
pub mod otel;
pub mod profiles;
pub mod registry;
pub mod seed;
mod signal;
pub mod telemetry;
pub mod tokens;
pub mod userdata;
pub mod watch;
pub mod write_behind;

pub use app::App;
pub use cli::{Cli, Command};
pub use config::{AuthConfig, Config, WriteStrategy};
pub use http::{Server, serve, serve_app};

/// Runs a parsed command line.
///
/// # Errors
///
/// Whatever the command fails with.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::Serve(a) => commands::serve(a).await,
        Command::Migrate(a) => commands::migrate(a).await,
        Command::Seed(a) => commands::seed(a).await,
        Command::Warm(a) => commands::warm(a).await,
        Command::Invalidate(a) => commands::invalidate(a).await,
        Command::Stats(a) => commands::stats(a).await,
        Command::Token(a) => commands::token(&a),
        Command::Flush(a) => write_behind::flush(a).await,
        Command::Wb(a) => write_behind::wb(a).await,
        Command::Feed(a) => feed::command(a).await,
        Command::Bench(a) => kura_bench::run(a).await.map(drop),
    }
}
