//! A Sentinel-managed primary with replicas, from throwaway `redis-server` processes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::resp::{self, Reply};
use crate::{RedisOptions, RedisServer};

/// The name the sentinels monitor the primary under.
const MASTER_NAME: &str = "kura";

/// How long the group has to form, and a failover to complete.
const TIMEOUT: Duration = Duration::from_secs(30);

const REPLICAS: usize = 2;
const SENTINELS: usize = 3;

/// One primary (master), two replicas and three sentinels (quorum 2), every process a
/// [`RedisServer`] on a free port.
///
/// Sentinels consider the master down after 1 s without answers, so a failover after
/// [`kill_master`](Self::kill_master) takes a few seconds. Dropping the group kills every
/// process and removes their directories.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() {
/// let mut group = kura_testkit::RedisSentinelGroup::start().await;
/// let sentinels = group.sentinel_urls();
/// let name = group.master_name().to_owned(); // "kura"
/// let old = group.kill_master().await;
/// let new = group.wait_for_failover(old).await;
/// assert_ne!(old, new);
/// # let _ = (sentinels, name);
/// # }
/// ```
#[derive(Debug)]
pub struct RedisSentinelGroup {
    /// The data nodes: the initial master first, then the replicas.
    servers: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
}

impl RedisSentinelGroup {
    /// Starts the master, its replicas (waiting until they are in sync) and the sentinels
    /// (waiting until each knows the master, both replicas and the other sentinels).
    ///
    /// # Panics
    ///
    /// When a process does not start or the group does not form within 30 s.
    pub async fn start() -> RedisSentinelGroup {
        Self::start_with(RedisOptions::default()).await
    }

    /// [`RedisSentinelGroup::start`] with options for the data nodes (for
    /// example the append-only file).
    ///
    /// # Panics
    ///
    /// As [`RedisSentinelGroup::start`].
    pub async fn start_with(node: RedisOptions) -> RedisSentinelGroup {
        let master = RedisServer::start_with(node.clone()).await;
        let mut servers = vec![master];
        for _ in 0..REPLICAS {
            let opts = node.clone().args([
                "--replicaof".to_owned(),
                "127.0.0.1".to_owned(),
                servers[0].port().to_string(),
            ]);
            servers.push(RedisServer::start_with(opts).await);
        }
        let conf = format!(
            "sentinel resolve-hostnames no\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 10000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            port = servers[0].port()
        );
        let mut sentinels = Vec::with_capacity(SENTINELS);
        for _ in 0..SENTINELS {
            sentinels.push(RedisServer::start_sentinel(conf.clone()).await);
        }
        let group = RedisSentinelGroup { servers, sentinels };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match group.formed().await {
                Ok(()) => break,
                Err(state) if Instant::now() >= deadline => {
                    panic!("the sentinel group did not form: {state}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tracing::debug!("sentinel group formed");
        group
    }

    /// `redis://127.0.0.1:<port>` of each sentinel.
    #[must_use]
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// Addresses of the sentinels.
    #[must_use]
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(RedisServer::addr).collect()
    }

    /// The name the sentinels monitor the master under.
    #[must_use]
    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// kura's `REDIS_URL` for this group: `redis+sentinel://` with every
    /// sentinel and the master name.
    #[must_use]
    pub fn kura_url(&self) -> String {
        let nodes: Vec<String> = self
            .sentinel_addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        format!(
            "redis+sentinel://{}/{}",
            nodes.join(","),
            self.master_name()
        )
    }

    /// `redis://127.0.0.1:<port>` of the data nodes (the initial master first).
    #[must_use]
    pub fn server_urls(&self) -> Vec<String> {
        self.servers.iter().map(RedisServer::url).collect()
    }

    /// The data nodes (the initial master first), for restarting or inspecting one.
    pub fn servers_mut(&mut self) -> &mut [RedisServer] {
        &mut self.servers
    }

    /// The master's address as the first answering sentinel reports it.
    ///
    /// # Panics
    ///
    /// When no sentinel answers.
    pub async fn master_addr(&self) -> SocketAddr {
        for sentinel in &self.sentinels {
            if let Some(addr) = master_addr_from(sentinel.addr()).await {
                return addr;
            }
        }
        panic!("no sentinel reports a master for {MASTER_NAME}");
    }

    /// Kills (SIGKILL) the current master and returns its address. The sentinels promote a
    /// replica after about 1–3 s; see [`wait_for_failover`](Self::wait_for_failover).
    ///
    /// # Panics
    ///
    /// When no sentinel answers or the master is not one of the group's processes.
    pub async fn kill_master(&mut self) -> SocketAddr {
        let addr = self.master_addr().await;
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.addr() == addr)
            .unwrap_or_else(|| panic!("master {addr} is not one of the group's servers"));
        server.stop().await;
        tracing::debug!(%addr, "sentinel-managed master killed");
        addr
    }

    /// Waits (up to 30 s) until every running sentinel reports a master other than `old` and
    /// that server answers `ROLE` as master; returns its address.
    ///
    /// # Panics
    ///
    /// When the failover does not complete in time.
    pub async fn wait_for_failover(&self, old: SocketAddr) -> SocketAddr {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut agreed = None;
            let mut all = true;
            for sentinel in self.sentinels.iter().filter(|s| s.is_running()) {
                match master_addr_from(sentinel.addr()).await {
                    Some(addr) if addr != old && agreed.is_none_or(|a| a == addr) => {
                        agreed = Some(addr);
                    }
                    _ => all = false,
                }
            }
            if all
                && let Some(addr) = agreed
                && is_master(addr).await
            {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "no failover away from {old} within {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks that each sentinel knows the master, the replicas and the other sentinels.
    async fn formed(&self) -> Result<(), String> {
        for sentinel in &self.sentinels {
            let reply = resp::command(sentinel.addr(), &["SENTINEL", "MASTER", MASTER_NAME])
                .await
                .map_err(|e| format!("sentinel {}: {e}", sentinel.addr()))?;
            let fields = pairs(&reply);
            let get = |key: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
            };
            let replicas = get("num-slaves").unwrap_or("?");
            let others = get("num-other-sentinels").unwrap_or("?");
            if replicas != REPLICAS.to_string() || others != (SENTINELS - 1).to_string() {
                return Err(format!(
                    "sentinel {} knows {replicas} replicas and {others} other sentinels",
                    sentinel.addr()
                ));
            }
        }
        for replica in &self.servers[1..] {
            let info = resp::command(replica.addr(), &["INFO", "replication"])
                .await
                .map_err(|e| format!("replica {}: {e}", replica.addr()))?
                .as_text()
                .unwrap_or_default();
            if resp::info_field(&info, "master_link_status") != Some("up") {
                return Err(format!("replica {} is not in sync yet", replica.addr()));
            }
        }
        Ok(())
    }
}

/// The key/value pairs of a flat RESP array of bulk strings.
fn pairs(reply: &Reply) -> Vec<(String, String)> {
    let Reply::Array(Some(items)) = reply else {
        return Vec::new();
    };
    items
        .chunks(2)
        .filter_map(|kv| Some((kv.first()?.as_text()?, kv.get(1)?.as_text()?)))
        .collect()
}

async fn master_addr_from(sentinel: SocketAddr) -> Option<SocketAddr> {
    let reply = resp::command(
        sentinel,
        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
    )
    .await
    .ok()?;
    let Reply::Array(Some(items)) = reply else {
        return None;
    };
    let ip = items.first()?.as_text()?;
    let port = items.get(1)?.as_text()?;
    format!("{ip}:{port}").parse().ok()
}

async fn is_master(addr: SocketAddr) -> bool {
    matches!(
        resp::command(addr, &["ROLE"]).await,
        Ok(Reply::Array(Some(items))) if items.first().and_then(Reply::as_text).as_deref() == Some("master")
    )
}
