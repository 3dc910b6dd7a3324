//! A Redis Cluster of throwaway `redis-server` processes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::resp::{self, Reply};
use crate::{RedisOptions, RedisServer, free_port};

/// How long a node may be unreachable before the cluster fails it over. Short, so failover
/// tests take seconds, long enough not to fail over a node that is merely busy.
const NODE_TIMEOUT_MS: u64 = 2000;

/// How long [`RedisCluster::start`] waits for the cluster to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    port: u16,
    flags: String,
    /// First slot of the first range this node serves, if any.
    first_slot: Option<u16>,
}

impl NodeLine {
    fn is_primary(&self) -> bool {
        self.flags.split(',').any(|f| f == "master")
    }

    fn is_failed(&self) -> bool {
        self.flags.split(',').any(|f| f == "fail" || f == "fail?")
    }
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?;
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let first_slot = fields
                .get(8..)
                .unwrap_or_default()
                .iter()
                .find(|f| !f.starts_with('['))
                .and_then(|range| range.split('-').next()?.parse().ok());
            Some(NodeLine {
                port,
                flags: fields.get(2)?.to_string(),
                first_slot,
            })
        })
        .collect()
}

/// A Redis Cluster of `primaries` primaries with `replicas_per_primary` replicas each, every
/// node a [`RedisServer`] on a free port, formed with `redis-cli --cluster create`.
///
/// Nodes fail over after 2 s of unreachability (`cluster-node-timeout 2000`). Dropping the
/// cluster kills every node and removes their directories.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() {
/// let mut cluster = kura_testkit::RedisCluster::start(3, 1).await;
/// let urls = cluster.urls(); // seed nodes for a cluster client
/// cluster.kill_primary(0).await; // crash the primary of the lowest slots
/// cluster.wait_until_healthy().await; // a replica has taken over
/// # let _ = urls;
/// # }
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    primaries: usize,
    replicas_per_primary: usize,
}

impl RedisCluster {
    /// Starts the nodes, forms the cluster and waits until every node reports
    /// `cluster_state:ok` and every replica is in sync with its primary.
    ///
    /// # Panics
    ///
    /// When `primaries < 3` (Redis Cluster needs three), when a node does not start, or when
    /// the cluster does not form within 30 s; the message includes `redis-cli`'s output.
    pub async fn start(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        Self::start_with(primaries, replicas_per_primary, RedisOptions::default()).await
    }

    /// [`RedisCluster::start`] with options for every node (for example the
    /// append-only file).
    ///
    /// # Panics
    ///
    /// As [`RedisCluster::start`].
    pub async fn start_with(
        primaries: usize,
        replicas_per_primary: usize,
        node: RedisOptions,
    ) -> RedisCluster {
        assert!(primaries >= 3, "Redis Cluster needs at least 3 primaries");
        let count = primaries * (1 + replicas_per_primary);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let opts = node.clone().args([
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                "nodes.conf".to_owned(),
                "--cluster-node-timeout".to_owned(),
                NODE_TIMEOUT_MS.to_string(),
                // The default bus port (port + 10000) may be taken or out of range.
                "--cluster-port".to_owned(),
                free_port().to_string(),
            ]);
            nodes.push(RedisServer::start_with(opts).await);
        }
        let mut create = tokio::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(node.addr().to_string());
        }
        create
            .arg("--cluster-replicas")
            .arg(replicas_per_primary.to_string())
            .arg("--cluster-yes")
            .kill_on_drop(true);
        let output = tokio::time::timeout(FORM_TIMEOUT, create.output())
            .await
            .expect("redis-cli --cluster create timed out")
            .expect("run redis-cli (is it on PATH?)");
        let cli_log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed ({}):\n{cli_log}",
            output.status
        );
        let cluster = RedisCluster {
            nodes,
            primaries,
            replicas_per_primary,
        };
        if let Err(state) = cluster.wait_healthy(FORM_TIMEOUT, true).await {
            panic!("the cluster did not form: {state}\nredis-cli said:\n{cli_log}");
        }
        tracing::debug!(nodes = count, "redis cluster formed");
        cluster
    }

    /// `redis://127.0.0.1:<port>` of every node (primaries and replicas, running or not), in
    /// start order.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Addresses of every node, in start order.
    #[must_use]
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(RedisServer::addr).collect()
    }

    /// kura's `REDIS_URL` for this cluster: `redis+cluster://` with every
    /// node as a seed.
    #[must_use]
    pub fn kura_url(&self) -> String {
        let nodes: Vec<String> = self.addrs().iter().map(ToString::to_string).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The nodes themselves, for restarting or inspecting one.
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// Addresses of the running primaries that serve slots, ordered by their first slot.
    ///
    /// # Panics
    ///
    /// When no running node answers `CLUSTER NODES`.
    pub async fn primaries(&self) -> Vec<SocketAddr> {
        let lines = self
            .cluster_nodes()
            .await
            .expect("no node answers CLUSTER NODES");
        let mut primaries: Vec<(u16, u16)> = lines
            .iter()
            .filter(|n| n.is_primary() && !n.is_failed() && self.is_running_port(n.port))
            .filter_map(|n| Some((n.first_slot?, n.port)))
            .collect();
        primaries.sort_unstable();
        primaries
            .into_iter()
            .map(|(_, port)| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect()
    }

    /// Kills (SIGKILL) the `i`-th running primary in slot order and returns its address.
    /// Its replica is promoted once the cluster notices, after about 2 s; see
    /// [`wait_until_healthy`](Self::wait_until_healthy).
    ///
    /// # Panics
    ///
    /// When there is no `i`-th running primary.
    pub async fn kill_primary(&mut self, i: usize) -> SocketAddr {
        let primaries = self.primaries().await;
        let addr = *primaries
            .get(i)
            .unwrap_or_else(|| panic!("no primary #{i}: running primaries are {primaries:?}"));
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.addr() == addr)
            .expect("every primary is one of the nodes");
        node.stop().await;
        tracing::debug!(%addr, "cluster primary killed");
        addr
    }

    /// Waits (up to 30 s) until every running node reports `cluster_state:ok` and the slots
    /// are served by as many running primaries as the cluster was created with.
    ///
    /// # Panics
    ///
    /// When that does not happen in time, with the last observed state.
    pub async fn wait_until_healthy(&self) {
        if let Err(state) = self.wait_healthy(FORM_TIMEOUT, false).await {
            panic!("the cluster did not become healthy: {state}");
        }
    }

    fn is_running_port(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|n| n.port() == port && n.is_running())
    }

    async fn cluster_nodes(&self) -> Option<Vec<NodeLine>> {
        for addr in self.running_addrs() {
            if let Ok(Reply::Bulk(Some(text))) = resp::command(addr, &["CLUSTER", "NODES"]).await {
                return Some(parse_nodes(&String::from_utf8_lossy(&text)));
            }
        }
        None
    }

    fn running_addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::addr)
            .collect()
    }

    /// Polls until healthy; `Err` with a description of the last state on timeout.
    async fn wait_healthy(&self, timeout: Duration, replicas_synced: bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.health(replicas_synced).await;
            match state {
                Ok(()) => return Ok(()),
                Err(state) if Instant::now() >= deadline => return Err(state),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn health(&self, replicas_synced: bool) -> Result<(), String> {
        let running: Vec<&RedisServer> = self.nodes.iter().filter(|n| n.is_running()).collect();
        let mut synced_replicas = 0;
        for node in &running {
            let info = match resp::command(node.addr(), &["CLUSTER", "INFO"]).await {
                Ok(reply) => reply.as_text().unwrap_or_default(),
                Err(e) => return Err(format!("{}: {e}", node.addr())),
            };
            if resp::info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!("{} says cluster_state is not ok", node.addr()));
            }
            let Ok(Reply::Bulk(Some(text))) =
                resp::command(node.addr(), &["CLUSTER", "NODES"]).await
            else {
                return Err(format!("{}: no CLUSTER NODES", node.addr()));
            };
            let lines = parse_nodes(&String::from_utf8_lossy(&text));
            let serving = lines
                .iter()
                .filter(|l| l.is_primary() && !l.is_failed() && l.first_slot.is_some())
                .filter(|l| running.iter().any(|n| n.port() == l.port))
                .count();
            if serving != self.primaries {
                return Err(format!(
                    "{} sees {serving} running primaries serving slots, expected {}",
                    node.addr(),
                    self.primaries
                ));
            }
            if replicas_synced {
                let Ok(reply) = resp::command(node.addr(), &["INFO", "replication"]).await else {
                    return Err(format!("{}: no INFO", node.addr()));
                };
                let info = reply.as_text().unwrap_or_default();
                if resp::info_field(&info, "role") == Some("slave") {
                    if resp::info_field(&info, "master_link_status") != Some("up") {
                        return Err(format!("replica {} is not in sync yet", node.addr()));
                    }
                    synced_replicas += 1;
                }
            }
        }
        // Until redis-cli has attached them, replicas are still empty primaries.
        let expected = self.primaries * self.replicas_per_primary;
        if replicas_synced && synced_replicas != expected {
            return Err(format!(
                "{synced_replicas} of {expected} replicas are in sync"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes_lines() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922 [123->-x]
c3 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected
d4 127.0.0.1:7004@17004 slave a1 0 1 1 connected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].port, 7001);
        assert!(nodes[0].is_primary() && !nodes[0].is_failed());
        assert_eq!(nodes[0].first_slot, Some(0));
        assert_eq!(nodes[1].first_slot, Some(5461));
        assert!(nodes[2].is_failed());
        assert_eq!(nodes[2].first_slot, None);
        assert!(!nodes[3].is_primary());
    }
}
