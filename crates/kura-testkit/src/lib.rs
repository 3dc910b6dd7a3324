//! Test support for kura: throwaway `redis-server` processes, Redis Cluster and Sentinel
//! harnesses, and a fault-injecting TCP proxy.
//!
//! Integration tests that kill, slow down or partition Redis must never touch the shared
//! server a machine runs; they start their own with this crate instead. Everything here binds
//! `127.0.0.1` on a port the kernel picks, so tests run in parallel without clashing.
//!
//! # Layout
//!
//! - [`free_port`]: a currently unused TCP port on the loopback interface.
//! - [`RedisServer`] (`redis.rs`): one `redis-server` child process in its own temporary
//!   directory, with crash-style [`stop`](RedisServer::stop) and
//!   [`restart`](RedisServer::restart) on the same port and data directory.
//! - [`FaultProxy`] (`proxy.rs`): a TCP proxy between a client and an upstream (Redis or
//!   PostgreSQL) whose fault mode — latency, partition, resets, refusals, truncated
//!   responses — can be switched at any time while traffic flows.
//! - [`RedisCluster`] (`cluster.rs`): a Redis Cluster of such processes formed with
//!   `redis-cli --cluster create`, with [`kill_primary`](RedisCluster::kill_primary).
//! - [`RedisSentinelGroup`] (`sentinel.rs`): a master, two replicas and three sentinels, with
//!   [`kill_master`](RedisSentinelGroup::kill_master).
//! - [`PgServer`] (`postgres.rs`): a PostgreSQL cluster of the test's own (`initdb` in a
//!   temporary directory, a free port, settings such as `wal_level = logical`), stopped by
//!   its pid; never the shared server.
//! - [`resp`]: just enough RESP to talk to a server in tests without a Redis client crate.
//! - [`layering`]: the import graph of a crate's top-level modules and its cycles, for the
//!   crates' layering tests.
//!
//! # Requirements
//!
//! `redis-server` and `redis-cli` (7.x) on `PATH`; Linux (liveness is read from `/proc`).
//!
//! # Examples
//!
//! ```no_run
//! use kura_testkit::{FaultProxy, RedisServer};
//! use std::time::Duration;
//!
//! # async fn demo() {
//! let redis = RedisServer::start().await;
//! let proxy = FaultProxy::start(redis.addr()).await;
//! // Point the code under test at the proxy, then inject faults while it runs.
//! let url = format!("redis://{}", proxy.addr());
//! proxy.set_latency(Duration::from_millis(50));
//! proxy.blackhole();
//! proxy.heal();
//! # let _ = url;
//! # }
//! ```

mod cluster;
pub mod layering;
mod postgres;
mod proxy;
mod redis;
pub mod resp;
mod sentinel;

pub use cluster::RedisCluster;
pub use postgres::PgServer;
pub use proxy::FaultProxy;
pub use redis::{RedisOptions, RedisServer};
pub use sentinel::RedisSentinelGroup;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// Returns a TCP port on `127.0.0.1` that was free a moment ago.
///
/// The port is found by binding port 0 and releasing the socket, so another process may take
/// it before the caller binds it; callers that start servers on it should retry with a new
/// port when the bind fails (as [`RedisServer::start`] does).
///
/// # Panics
///
/// Panics if the loopback interface cannot be bound at all.
#[must_use]
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}
