//! The Redis store: Lua scripts over one multiplexed connection, on a
//! standalone server, a Sentinel-managed master or a Cluster.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{Cmd, Pipeline, Script, Value};

use self::conn::{Conn, Timeouts};
use crate::error::StoreError;
use crate::key::EntryKeys;
use crate::store::{FillOutcome, FillRequest, FillValue, StoreResult};

mod caps;
mod conn;
mod entry;
mod queue;
mod tracking;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(source!($file)))
    };
}

macro_rules! source {
    ($file:literal) => {
        concat!(
            include_str!("scripts/prelude.lua"),
            include_str!(concat!("scripts/", $file))
        )
    };
}

static ACQUIRE: LazyLock<Script> = script!("acquire.lua");
static FILL: LazyLock<Script> = script!("fill.lua");
static RELEASE: LazyLock<Script> = script!("release.lua");
static UPDATE: LazyLock<Script> = script!("update.lua");
static INVALIDATE: LazyLock<Script> = script!("invalidate.lua");
static DISCARD: LazyLock<Script> = script!("discard.lua");
static EXTEND_LOCK: LazyLock<Script> = script!("extend_lock.lua");
static ACCEPT: LazyLock<Script> = script!("accept.lua");
static SETTLE: LazyLock<Script> = script!("settle.lua");
static ACCEPT_ENTRY: LazyLock<Script> = script!("accept_entry.lua");
static SETTLE_ACK: LazyLock<Script> = script!("settle_ack.lua");
static RETRY: LazyLock<Script> = script!("retry.lua");
static GET_REFRESH: LazyLock<Script> = script!("get_refresh.lua");
static INVALIDATE_OLDER: LazyLock<Script> = script!("invalidate_older.lua");
static ADVANCE: LazyLock<Script> = script!("advance.lua");
static GCRA: LazyLock<Script> = script!("gcra.lua");
static REFRESH_LEASE: LazyLock<Script> = script!("refresh_lease.lua");
static BUMP_STAMP: LazyLock<Script> = script!("bump_stamp.lua");
static SWEEP: LazyLock<Script> = script!("sweep.lua");
static REWIND: LazyLock<Script> = script!("rewind.lua");

/// Every script's source, for `SCRIPT LOAD` after the server lost them.
const SOURCES: [&str; 20] = [
    source!("sweep.lua"),
    source!("rewind.lua"),
    source!("refresh_lease.lua"),
    source!("bump_stamp.lua"),
    source!("acquire.lua"),
    source!("fill.lua"),
    source!("release.lua"),
    source!("update.lua"),
    source!("invalidate.lua"),
    source!("discard.lua"),
    source!("extend_lock.lua"),
    source!("accept.lua"),
    source!("settle.lua"),
    source!("accept_entry.lua"),
    source!("settle_ack.lua"),
    source!("retry.lua"),
    source!("get_refresh.lua"),
    source!("invalidate_older.lua"),
    source!("advance.lua"),
    source!("gcra.lua"),
];

/// Most `XAUTOCLAIM` calls per claim: each looks at up to ten times
/// `COUNT` pending entries.
const CLAIM_ROUNDS: usize = 16;

/// `SCAN` batch size, as in the seed.
const SCAN_COUNT: usize = 100;

/// Builds a [`RedisStore`].
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use kura::store::RedisStore;
///
/// # fn main() -> Result<(), kura::StoreError> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .response_timeout(Duration::from_millis(200))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    response_timeout: Duration,
    connect_timeout: Duration,
}

impl RedisStoreBuilder {
    /// How long one command may take before it fails (default 250 ms).
    /// Keep it short: a slow Redis must fall back to the database quickly.
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }

    /// How long one connection attempt may take (default 500 ms).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Creates the store. The connection is made in the background and
    /// re-made after any failure, so this succeeds while Redis is down.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Server`](crate::error::StoreErrorKind::Server) when the URL cannot be parsed.
    pub fn build(self) -> StoreResult<RedisStore> {
        let timeouts = Timeouts {
            response: self.response_timeout,
            connect: self.connect_timeout,
            block: MAX_BLOCK,
        };
        let conn = Conn::open(&self.url, timeouts)?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                timeouts,
                url: redact(&self.url),
                claim_cursors: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// Hides the password of a Redis URL for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// A [`Store`](crate::Store) over Redis 7.
///
/// One multiplexed connection carries every request (clones share it); it
/// reconnects on its own after a failure. Each entry step is a Lua script
/// run by `EVALSHA` (loaded again after a Redis restart), and a batch is one
/// pipeline.
#[derive(Debug, Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Conn,
    timeouts: Timeouts,
    url: String,
    /// Where the last `XAUTOCLAIM` of each queue stopped (stream and group),
    /// so the next one goes on from there instead of looking at the same
    /// first pending entries again.
    claim_cursors: Mutex<HashMap<(String, String), String>>,
}

/// The longest a queue read blocks on the server.
const MAX_BLOCK: Duration = Duration::from_secs(2);

impl RedisStore {
    /// A builder for the servers at `url`:
    ///
    /// - `redis://[[user]:password@]host:port[/db]` (`rediss://` for TLS): one server;
    /// - `redis+sentinel://[[user]:password@]s1:26379,s2:26379/<master>[/db]`:
    ///   the master the sentinels name, followed after a failover;
    /// - `redis+cluster://[[user]:password@]n1:7000,n2:7001`: a Redis Cluster
    ///   from its seed nodes (keys then carry hash tags, see [`crate::key`]).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            response_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
        }
    }

    /// A store with default timeouts.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Server`](crate::error::StoreErrorKind::Server) when the URL cannot be parsed.
    pub fn open(url: &str) -> StoreResult<Self> {
        Self::builder(url).build()
    }

    /// The server URL, password hidden.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// A clone of the shared connection, for commands kura has no step for
    /// (`None` on Cluster, or before a Sentinel master is known).
    #[must_use]
    pub fn connection(&self) -> Option<ConnectionManager> {
        self.inner.conn.manager()
    }

    /// The stale-copy key of an entry's value key, when a script may use
    /// both (on Cluster only if the key's hash tag puts them in one slot).
    fn stale_companion(&self, key: &str) -> Option<String> {
        let same_slot = !self.inner.conn.is_cluster()
            || key
                .split_once('{')
                .and_then(|(_, r)| r.split_once('}'))
                .is_some_and(|(tag, _)| !tag.is_empty());
        same_slot.then(|| crate::key::stale_key_of(key)).flatten()
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        Ok(self.inner.conn.query(cmd).await?)
    }

    /// Runs a pipeline, loading the scripts once if the server lost them
    /// (`NOSCRIPT` after a restart, a failover or `SCRIPT FLUSH`).
    async fn run(&self, pipe: &Pipeline) -> StoreResult<Vec<Value>> {
        self.run_as(pipe, false).await
    }

    /// One script invocation, its one reply.
    async fn run_one(&self, inv: &redis::ScriptInvocation<'_>) -> StoreResult<Value> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv);
        Ok(self
            .run(&pipe)
            .await?
            .into_iter()
            .next()
            .unwrap_or(Value::Nil))
    }

    /// [`RedisStore::run`] for a pipeline that must reach one node as a
    /// whole (on Cluster: the node of its first key).
    async fn run_on_one_node(&self, pipe: &Pipeline) -> StoreResult<Vec<Value>> {
        self.run_as(pipe, true).await
    }

    async fn run_as(&self, pipe: &Pipeline, one_node: bool) -> StoreResult<Vec<Value>> {
        self.run_results(pipe, one_node)
            .await?
            .into_iter()
            .map(|r| r.map_err(StoreError::from))
            .collect()
    }

    /// Runs a pipeline; each command's own result. The script calls the
    /// server did not know (`NOSCRIPT`) are run again, alone, once the
    /// scripts are loaded: never the whole pipeline, whose other commands
    /// (a dead-letter `XADD`, an acknowledgement) already took effect.
    async fn run_results(
        &self,
        pipe: &Pipeline,
        one_node: bool,
    ) -> StoreResult<Vec<redis::RedisResult<Value>>> {
        let exec = |p: &Pipeline| {
            let conn = &self.inner.conn;
            let p = p.clone();
            async move {
                if one_node {
                    conn.exec_together(&p).await
                } else {
                    conn.exec(&p).await
                }
            }
        };
        let mut results = exec(pipe).await?;
        let missing: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.as_ref().is_err_and(|e| {
                    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                })
            })
            .map(|(i, _)| i)
            .collect();
        if missing.is_empty() {
            return Ok(results);
        }
        self.load_scripts().await?;
        let mut again = redis::pipe();
        let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
        for &i in &missing {
            again.add_command(cmds[i].clone());
        }
        for (i, r) in missing.into_iter().zip(exec(&again).await?) {
            results[i] = r;
        }
        Ok(results)
    }

    /// Loads every script (on every primary of a cluster).
    async fn load_scripts(&self) -> StoreResult<()> {
        for src in SOURCES {
            self.query::<Value>(redis::cmd("SCRIPT").arg("LOAD").arg(src))
                .await?;
        }
        Ok(())
    }

    /// Starts a `SCAN` of every primary (or of the one server).
    async fn scan(&self, pattern: &str) -> StoreResult<Scan> {
        let nodes = self.inner.conn.primaries().await?;
        let targets: Vec<Option<u16>> = if nodes.is_empty() {
            vec![None]
        } else {
            nodes.into_iter().map(Some).collect()
        };
        Ok(Scan {
            pattern: pattern.to_owned(),
            targets,
            at: 0,
            cursor: 0,
        })
    }

    /// The next batch of keys of a scan; `None` when it is done.
    async fn scan_next(&self, scan: &mut Scan) -> StoreResult<Option<Vec<String>>> {
        let Some(node) = scan.targets.get(scan.at).cloned() else {
            return Ok(None);
        };
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(scan.cursor)
            .arg("MATCH")
            .arg(&scan.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<Vec<u8>>) = match &node {
            Some(slot) => self.inner.conn.query_node(*slot, &cmd).await?,
            None => self.inner.conn.query(&cmd).await?,
        };
        if next == 0 {
            scan.at += 1;
        }
        scan.cursor = next;
        Ok(Some(
            keys.into_iter()
                .filter_map(|k| String::from_utf8(k).ok())
                .collect(),
        ))
    }
}

impl RedisStore {
    /// A fill, or with `refresh` a refill ([`Store::refill`]).
    async fn fill_as(
        &self,
        reqs: &[FillRequest<'_>],
        refresh: bool,
    ) -> StoreResult<Vec<FillOutcome>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in reqs {
            entry_invocation(&mut pipe, &FILL, r.keys, |inv| {
                inv.arg(r.token);
                match &r.value {
                    FillValue::Value { bytes, version } => {
                        inv.arg("v").arg(&bytes[..]).arg(version.to_string())
                    }
                    FillValue::Absent => inv.arg("n").arg("").arg("0"),
                };
                inv.arg(millis(r.lifetimes.ttl))
                    .arg(r.lifetimes.stale_ttl.as_millis() as u64);
                if refresh {
                    inv.arg("r");
                }
            });
        }
        self.run(&pipe)
            .await?
            .iter()
            .map(|v| match as_int(v)? {
                1 => Ok(FillOutcome::Stored),
                0 => Ok(FillOutcome::LeaseLost),
                2 => Ok(FillOutcome::NotNewer),
                _ => Err(unexpected(v)),
            })
            .collect()
    }
}

/// A `SCAN` in progress over one or more nodes.
struct Scan {
    pattern: String,
    /// A slot of each primary (`None`: the one server).
    targets: Vec<Option<u16>>,
    at: usize,
    cursor: u64,
}

fn entry_invocation<'a>(
    pipe: &mut Pipeline,
    script: &'a Script,
    keys: &EntryKeys,
    args: impl FnOnce(&mut redis::ScriptInvocation<'a>),
) {
    let mut inv = script.prepare_invoke();
    for k in keys.as_array() {
        inv.key(k);
    }
    args(&mut inv);
    pipe.invoke_script(&inv);
}

fn millis(d: Duration) -> u64 {
    // PX 0 is an error in Redis; a TTL rounds up to at least 1 ms.
    (d.as_millis() as u64).max(1)
}

fn as_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        _ => None,
    }
}

fn as_int(v: &Value) -> StoreResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(unexpected(other)),
    }
}

fn unexpected(v: &Value) -> StoreError {
    StoreError::server(format!("unexpected reply from script: {v:?}"))
}

fn text_at(parts: &[Value], i: usize) -> Option<String> {
    match parts.get(i)? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int_result(v: Option<&redis::RedisResult<Value>>) -> u64 {
    match v {
        Some(Ok(Value::Int(n))) => *n as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("redis://:secret@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn bad_url_is_an_error() {
        assert!(RedisStore::open("not a url").is_err());
    }
}
