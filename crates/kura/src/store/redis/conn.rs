//! The connections behind the Redis store, one shape per topology:
//! standalone, Cluster and Sentinel.
//!
//! Each topology has a shared multiplexed connection for ordinary commands
//! and one of its own for blocking queue reads. Pipelines are single round
//! trips on a standalone server; on Cluster they are split into single
//! commands sent concurrently (a pipeline there must stay in one slot, and
//! a batch spans many), which the multiplexed connections to each node
//! still send back to back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo, Pipeline, RedisResult,
    Value,
};

use crate::error::StoreError;

/// Timeouts every topology applies.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) response: Duration,
    pub(super) connect: Duration,
    /// Extra allowance on the blocking connection.
    pub(super) block: Duration,
}

/// Which servers a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// `redis://` or `rediss://`.
    Single(String),
    /// `redis+cluster://[auth@]h1:p1,h2:p2`: seed nodes.
    Cluster(Vec<String>),
    /// `redis+sentinel://[auth@]h1:p1,h2:p2/<master>[/<db>]`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        /// `redis://[auth@]x/<db>` carrying the data nodes' credentials.
        node: String,
    },
}

impl Target {
    pub(super) fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::server(format!("bad redis url ({why})"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (format!("{a}@"), r),
            None => (String::new(), rest),
        };
        let hosts = |list: &str| -> Result<Vec<String>, StoreError> {
            let hs: Vec<String> = list
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{auth}{h}"))
                .collect();
            if hs.is_empty() {
                return Err(bad("no hosts"));
            }
            Ok(hs)
        };
        match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => Ok(Target::Single(url.to_owned())),
            "redis+cluster" | "redis-cluster" => {
                Ok(Target::Cluster(hosts(rest.trim_end_matches('/'))?))
            }
            "redis+sentinel" | "redis-sentinel" => {
                let mut parts = rest.splitn(3, '/');
                let list = parts.next().unwrap_or_default();
                let master = parts
                    .next()
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| bad("no master name after the sentinel addresses"))?;
                let db = parts.next().filter(|d| !d.is_empty()).unwrap_or("0");
                // Sentinels themselves are reached without the data nodes'
                // password.
                let sentinels = list
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(|h| format!("redis://{h}"))
                    .collect::<Vec<_>>();
                if sentinels.is_empty() {
                    return Err(bad("no sentinel addresses"));
                }
                Ok(Target::Sentinel {
                    sentinels,
                    master: master.to_owned(),
                    node: format!("redis://{auth}localhost/{db}"),
                })
            }
            other => Err(bad(&format!("unknown scheme {other}"))),
        }
    }
}

fn nodelay() -> TcpSettings {
    // Small requests and replies: Nagle's algorithm would add up to 40 ms to
    // each round trip.
    TcpSettings::default().set_nodelay(true)
}

fn manager_config(t: Timeouts, response: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response))
        .set_connection_timeout(Some(t.connect))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        // One attempt per reconnect: a command waiting for the connection
        // waits at most one connect timeout; the next command tries again.
        .set_number_of_retries(0)
}

fn managers(
    client: redis::Client,
    t: Timeouts,
) -> RedisResult<(ConnectionManager, ConnectionManager)> {
    let conn =
        ConnectionManager::new_lazy_with_config(client.clone(), manager_config(t, t.response))?;
    let blocking =
        ConnectionManager::new_lazy_with_config(client, manager_config(t, t.response + t.block))?;
    Ok((conn, blocking))
}

/// A connection to one topology.
#[derive(Clone)]
pub(super) struct Conn {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.topology())
    }
}

// One value per store, behind an `Arc`: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Single {
        conn: ConnectionManager,
        blocking: ConnectionManager,
        info: ConnectionInfo,
    },
    Cluster {
        /// A seed's connection settings (credentials, TLS), for
        /// connections of its own to each primary.
        seed: ConnectionInfo,
        client: ClusterClient,
        blocking_client: ClusterClient,
        conn: tokio::sync::OnceCell<ClusterConnection>,
        blocking: tokio::sync::OnceCell<ClusterConnection>,
    },
    Sentinel(Sentinel),
}

/// A master found through Sentinel, found again after a failover.
struct Sentinel {
    client: tokio::sync::Mutex<SentinelClient>,
    current: RwLock<Option<Master>>,
    timeouts: Timeouts,
    resolving: AtomicBool,
    /// Milliseconds since `epoch` of the last resolution.
    resolved_at: AtomicU64,
    epoch: Instant,
}

/// The connections to the master Sentinel named last.
#[derive(Clone)]
struct Master {
    addr: String,
    conn: ConnectionManager,
    blocking: ConnectionManager,
}

/// How often the master's address is checked even without errors: a
/// demoted master still answers reads, so errors alone would be late.
const SENTINEL_RECHECK: Duration = Duration::from_secs(2);

impl Conn {
    pub(super) fn open(url: &str, t: Timeouts) -> Result<Self, StoreError> {
        let inner = match Target::parse(url)? {
            Target::Single(url) => {
                let info = url
                    .as_str()
                    .into_connection_info()?
                    .set_tcp_settings(nodelay());
                let (conn, blocking) = managers(redis::Client::open(info.clone())?, t)?;
                Inner::Single {
                    conn,
                    blocking,
                    info,
                }
            }
            Target::Cluster(nodes) => {
                let seed = nodes
                    .first()
                    .map(String::as_str)
                    .unwrap_or_default()
                    .into_connection_info()?
                    .set_tcp_settings(nodelay());
                let build = |response: Duration| {
                    ClusterClient::builder(nodes.clone())
                        .tcp_settings(nodelay())
                        .connection_timeout(t.connect)
                        .response_timeout(response)
                        .retries(2)
                        .build()
                };
                Inner::Cluster {
                    seed,
                    client: build(t.response)?,
                    blocking_client: build(t.response + t.block)?,
                    conn: tokio::sync::OnceCell::new(),
                    blocking: tokio::sync::OnceCell::new(),
                }
            }
            Target::Sentinel {
                sentinels,
                master,
                node,
            } => {
                let node_info = node.as_str().into_connection_info()?;
                let info = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(node_info.redis_settings().clone())
                    .set_tcp_settings(nodelay());
                let client = SentinelClient::build(
                    sentinels,
                    master,
                    Some(info),
                    SentinelServerType::Master,
                )?;
                Inner::Sentinel(Sentinel {
                    client: tokio::sync::Mutex::new(client),
                    current: RwLock::new(None),
                    timeouts: t,
                    resolving: AtomicBool::new(false),
                    resolved_at: AtomicU64::new(0),
                    epoch: Instant::now(),
                })
            }
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub(super) fn topology(&self) -> &'static str {
        match &*self.inner {
            Inner::Single { .. } => "redis",
            Inner::Cluster { .. } => "redis-cluster",
            Inner::Sentinel(_) => "redis-sentinel",
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(&*self.inner, Inner::Cluster { .. })
    }

    /// The shared standalone connection (`None` on Cluster).
    pub(super) fn manager(&self) -> Option<ConnectionManager> {
        match &*self.inner {
            Inner::Single { conn, .. } => Some(conn.clone()),
            Inner::Sentinel(s) => s.current().map(|(c, _)| c),
            Inner::Cluster { .. } => None,
        }
    }

    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        self.query_on(cmd, false).await
    }

    pub(super) async fn query_blocking<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        self.query_on(cmd, true).await
    }

    async fn query_on<T: FromRedisValue>(&self, cmd: &Cmd, blocking: bool) -> RedisResult<T> {
        match &*self.inner {
            Inner::Single {
                conn, blocking: b, ..
            } => {
                let mut c = if blocking { b.clone() } else { conn.clone() };
                cmd.query_async(&mut c).await
            }
            Inner::Cluster {
                client,
                blocking_client,
                conn,
                blocking: b,
                ..
            } => {
                let mut c = if blocking {
                    cluster(b, blocking_client).await?
                } else {
                    cluster(conn, client).await?
                };
                cmd.query_async(&mut c).await
            }
            Inner::Sentinel(s) => {
                self.recheck_sentinel();
                let (conn, b) = s.connection().await?;
                let mut c = if blocking { b } else { conn };
                let r = cmd.query_async(&mut c).await;
                s.observe(&r);
                r
            }
        }
    }

    /// Runs a pipeline; each command's own result (errors included).
    pub(super) async fn exec(&self, pipe: &Pipeline) -> RedisResult<Vec<RedisResult<Value>>> {
        match &*self.inner {
            Inner::Single { conn, .. } => {
                let mut c = conn.clone();
                pipe.clone().ignore_errors().query_async(&mut c).await
            }
            Inner::Cluster { client, conn, .. } => {
                let c = cluster(conn, client).await?;
                let calls = pipe.cmd_iter().map(|cmd| {
                    let mut c = c.clone();
                    // A server error comes back as a value here; make it an
                    // error as a pipeline with `ignore_errors` would.
                    async move {
                        c.req_packed_command(cmd)
                            .await
                            .and_then(Value::extract_error)
                    }
                });
                Ok(futures::future::join_all(calls).await)
            }
            Inner::Sentinel(s) => {
                self.recheck_sentinel();
                let (mut c, _) = s.connection().await?;
                let r: RedisResult<Vec<RedisResult<Value>>> =
                    pipe.clone().ignore_errors().query_async(&mut c).await;
                match &r {
                    Ok(results) => {
                        if let Some(Err(e)) = results.iter().find(|x| x.is_err()) {
                            s.observe::<()>(&Err(e.clone()));
                        }
                    }
                    Err(e) => s.observe::<()>(&Err(e.clone())),
                }
                r
            }
        }
    }

    /// Runs a pipeline on one node as a whole: on Cluster, the node of its
    /// first keyed command (every keyed command must share its slot).
    pub(super) async fn exec_together(
        &self,
        pipe: &Pipeline,
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        match &*self.inner {
            Inner::Cluster { client, conn, .. } => {
                let mut c = cluster(conn, client).await?;
                let values: Vec<Value> = c.req_packed_commands(pipe, 0, pipe.len()).await?;
                Ok(values.into_iter().map(Value::extract_error).collect())
            }
            _ => self.exec(pipe).await,
        }
    }

    /// The primaries to `SCAN`, each named by a slot it serves (none when
    /// not a cluster: the connection's own server).
    pub(super) async fn primaries(&self) -> RedisResult<Vec<u16>> {
        let Inner::Cluster { client, conn, .. } = &*self.inner else {
            return Ok(Vec::new());
        };
        let mut c = cluster(conn, client).await?;
        let text: String = c
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .and_then(|v| Ok(String::from_redis_value(v)?))?;
        Ok(parse_primaries(&text))
    }

    /// Sends `cmd` to the primary serving `slot`. Routing by slot, not by
    /// address, lets the client connect to a node it has not used yet.
    pub(super) async fn query_node<T: FromRedisValue>(
        &self,
        slot: u16,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match &*self.inner {
            Inner::Cluster { client, conn, .. } => {
                let mut c = cluster(conn, client).await?;
                let v = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                            slot,
                            SlotAddr::Master,
                        ))),
                    )
                    .await?;
                T::from_redis_value(v).map_err(Into::into)
            }
            _ => self.query(cmd).await,
        }
    }
}

impl Conn {
    /// The nodes an invalidation stream must listen to (the standalone
    /// server, Sentinel's current master, or every Cluster primary), each
    /// with its address and connection settings, and a fingerprint of the
    /// topology: when it changes (a failover, a slot move) the stream must
    /// start again.
    pub(super) async fn tracking_nodes(
        &self,
    ) -> RedisResult<(Vec<(String, ConnectionInfo)>, String)> {
        match &*self.inner {
            Inner::Single { info, .. } => {
                Ok((vec![(info.addr().to_string(), info.clone())], String::new()))
            }
            Inner::Sentinel(s) => {
                let client = {
                    let mut c = s.client.lock().await;
                    c.async_get_client().await?
                };
                let info = client
                    .get_connection_info()
                    .clone()
                    .set_tcp_settings(nodelay());
                let addr = info.addr().to_string();
                Ok((vec![(addr.clone(), info)], addr))
            }
            Inner::Cluster {
                seed, client, conn, ..
            } => {
                let mut c = cluster(conn, client).await?;
                let text: String = c
                    .route_command(
                        redis::cmd("CLUSTER").arg("NODES").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await
                    .and_then(|v| Ok(String::from_redis_value(v)?))?;
                let primaries = parse_primary_slots(&text);
                let nodes = primaries
                    .iter()
                    .filter_map(|(addr, _)| {
                        let (host, port) = addr.rsplit_once(':')?;
                        let port = port.parse().ok()?;
                        Some((
                            addr.clone(),
                            seed.clone()
                                .set_addr(ConnectionAddr::Tcp(host.to_owned(), port)),
                        ))
                    })
                    .collect();
                let fingerprint = primaries
                    .iter()
                    .map(|(a, slots)| format!("{a} {slots}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                Ok((nodes, fingerprint))
            }
        }
    }
}

/// Primaries from `CLUSTER NODES` as `(host:port, slot ranges)`, sorted;
/// failed primaries and primaries without slots are skipped.
pub(super) fn parse_primary_slots(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = f.get(2)?;
            if !flags.contains("master") || flags.contains("fail") || flags.contains("noaddr") {
                return None;
            }
            let addr = f.get(1)?.split('@').next()?.to_owned();
            let slots = f.get(8..)?.join(" ");
            (!slots.is_empty()).then_some((addr, slots))
        })
        .collect();
    out.sort();
    out
}

async fn cluster(
    cell: &tokio::sync::OnceCell<ClusterConnection>,
    client: &ClusterClient,
) -> RedisResult<ClusterConnection> {
    // Connected on first use (and again after a failed attempt), so the
    // store can be created while the cluster is unreachable.
    cell.get_or_try_init(|| client.get_async_connection())
        .await
        .cloned()
}

/// Primaries from `CLUSTER NODES`, each as the first slot it serves;
/// failed primaries and primaries without slots are skipped.
pub(super) fn parse_primaries(text: &str) -> Vec<u16> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = f.get(2)?;
            if !flags.contains("master") || flags.contains("fail") || flags.contains("noaddr") {
                return None;
            }
            // Slot fields follow the eighth; `[...]` ones are migrations.
            f.get(8..)?
                .iter()
                .find(|r| !r.starts_with('['))
                .and_then(|r| r.split('-').next()?.parse().ok())
        })
        .collect()
}

impl Sentinel {
    fn current(&self) -> Option<(ConnectionManager, ConnectionManager)> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|m| (m.conn.clone(), m.blocking.clone()))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn due(&self) -> bool {
        self.now_ms()
            .saturating_sub(self.resolved_at.load(Ordering::Relaxed))
            > SENTINEL_RECHECK.as_millis() as u64
    }

    /// The current master's connections, resolved first if unknown.
    async fn connection(&self) -> RedisResult<(ConnectionManager, ConnectionManager)> {
        match self.current() {
            Some(c) => Ok(c),
            None => self.resolve().await,
        }
    }

    /// Asks the sentinels for the master and switches to it if it moved.
    async fn resolve(&self) -> RedisResult<(ConnectionManager, ConnectionManager)> {
        let client = {
            let mut s = self.client.lock().await;
            s.async_get_client().await?
        };
        self.resolved_at.store(self.now_ms(), Ordering::Relaxed);
        let addr = client.get_connection_info().addr().to_string();
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cur.as_ref().is_none_or(|m| m.addr != addr) {
            if let Some(old) = cur.as_ref() {
                tracing::warn!(
                    from = old.addr,
                    to = addr,
                    "redis master changed: following it"
                );
            }
            let (conn, blocking) = managers(client, self.timeouts)?;
            *cur = Some(Master {
                addr,
                conn,
                blocking,
            });
        }
        let m = cur.as_ref().expect("just set");
        Ok((m.conn.clone(), m.blocking.clone()))
    }

    /// Notes an error that may mean the master moved: the next call asks
    /// the sentinels again.
    fn observe<T>(&self, r: &RedisResult<T>) {
        if let Err(e) = r {
            let moved = e.is_unrecoverable_error()
                || e.is_io_error()
                || e.is_timeout()
                || e.code() == Some("READONLY")
                || e.code() == Some("MASTERDOWN");
            if moved {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            }
        }
    }
}

impl Conn {
    /// On Sentinel, checks in the background every few seconds that the
    /// master has not moved: a demoted master still answers reads, so
    /// errors alone would notice late.
    fn recheck_sentinel(&self) {
        let Inner::Sentinel(s) = &*self.inner else {
            return;
        };
        if !s.due() || s.resolving.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Inner::Sentinel(s) = &*me.inner {
                if let Err(e) = s.resolve().await {
                    tracing::debug!(error = %e, "sentinel check failed");
                }
                s.resolving.store(false, Ordering::Release);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379/0").unwrap(),
            Target::Single("redis://127.0.0.1:6379/0".into())
        );
        assert_eq!(
            Target::parse("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001").unwrap(),
            Target::Cluster(vec![
                "redis://:pw@10.0.0.1:7000".into(),
                "redis://:pw@10.0.0.2:7001".into()
            ])
        );
        assert_eq!(
            Target::parse("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/2").unwrap(),
            Target::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master: "mymaster".into(),
                node: "redis://:pw@localhost/2".into(),
            }
        );
        assert!(Target::parse("redis+sentinel://s1:26379").is_err());
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("http://x").is_err());
        assert!(Target::parse("nonsense").is_err());
    }

    #[test]
    fn primaries_from_cluster_nodes() {
        let text = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
c 127.0.0.1:7002@17002 master,fail - 0 0 3 connected
d 127.0.0.1:7003@17003 slave a 0 0 1 connected
";
        assert_eq!(parse_primaries(text), vec![0, 5461]);
    }
}
