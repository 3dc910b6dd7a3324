//! The Redis store: Lua scripts over one multiplexed connection, on a
//! standalone server, a Sentinel-managed master or a Cluster.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use redis::{Cmd, Pipeline, Script, Value};

use super::redis_conn::{Conn, Timeouts};

use super::{
    AcceptOutcome, AcceptRequest, AcquireRequest, Acquired, DeadLetter, Durability, FillOutcome,
    FillRequest, FillValue, QueueEntry, QueueKeys, QueueStats, QueueStore, Retry, Settled, Store,
    StoreResult, UpdateOutcome, UpdateRequest,
};
use crate::error::StoreError;
use crate::key::{EntryKeys, KeyPattern};

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
    /// [`StoreError::Server`] when the URL cannot be parsed.
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

/// A [`Store`] over Redis 7.
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
    /// [`StoreError::Server`] when the URL cannot be parsed.
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

async fn ensure_group(conn: &Conn, queue: &QueueKeys) -> StoreResult<()> {
    // From id 0: entries accepted before the first flusher started are
    // delivered too (acknowledged ones were deleted).
    let r: redis::RedisResult<()> = conn
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&queue.stream)
                .arg(&queue.group)
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    match r {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
        _ => Ok(()),
    }
}

fn push_ack<'a>(
    pipe: &mut Pipeline,
    queue: &QueueKeys,
    ids: impl Iterator<Item = &'a String> + Clone,
) {
    if ids.clone().next().is_none() {
        return;
    }
    pipe.cmd("XACK").arg(&queue.stream).arg(&queue.group);
    for id in ids.clone() {
        pipe.arg(id);
    }
    pipe.cmd("XDEL").arg(&queue.stream);
    for id in ids {
        pipe.arg(id);
    }
}

fn entry_of(e: StreamId) -> Option<QueueEntry> {
    let text = |k: &str| match e.map.get(k)? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    Some(QueueEntry {
        id: text("id")?,
        version: text("v")?.parse().ok()?,
        attempts: text("a").and_then(|a| a.parse().ok()).unwrap_or(0),
        not_before_ms: text("at").and_then(|a| a.parse().ok()).unwrap_or(0),
        entry_id: e.id.clone(),
    })
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
    StoreError::Server(format!("unexpected reply from script: {v:?}").into())
}

/// Builds an accept's entry-slot step (everything but the queue entry);
/// `full` when the queue is past a limit (reported after the version
/// check).
fn accept_entry_invocation(pipe: &mut Pipeline, req: &AcceptRequest<'_>, full: bool) {
    entry_invocation(pipe, &ACCEPT_ENTRY, req.keys, |inv| {
        inv.arg(req.expected_version.to_string())
            .arg(&req.bytes[..])
            .arg(millis(req.lifetimes.ttl))
            .arg(req.lifetimes.stale_ttl.as_millis() as u64)
            .arg(if full { "1" } else { "0" });
    });
}

/// The dead-letter `XADD` of a letter, for Cluster (elsewhere it is part
/// of `settle_ack.lua`).
fn push_dead_letter(
    pipe: &mut Pipeline,
    queue: &QueueKeys,
    d: &Settled<'_>,
    error: &str,
    value: &[u8],
) {
    pipe.cmd("XADD")
        .arg(&queue.dead)
        .arg("*")
        .arg("key")
        .arg(&d.keys.value)
        .arg("id")
        .arg(d.id)
        .arg("v")
        .arg(d.version)
        .arg("error")
        .arg(error)
        .arg("value")
        .arg(value);
}

/// Appends `WAIT` when the accept asks for replicas.
fn push_wait(pipe: &mut Pipeline, req: &AcceptRequest<'_>) {
    if req.min_replicas > 0 {
        pipe.cmd("WAIT")
            .arg(req.min_replicas)
            .arg(req.replica_timeout.as_millis().max(1) as u64);
    }
}

/// The replica count `WAIT` answered, when it was sent.
fn wait_result(v: Option<Value>, req: &AcceptRequest<'_>) -> StoreResult<Option<u32>> {
    if req.min_replicas == 0 {
        return Ok(None);
    }
    match v {
        Some(Value::Int(n)) => Ok(Some(n.max(0) as u32)),
        Some(other) => Err(unexpected(&other)),
        None => Err(unexpected(&Value::Nil)),
    }
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

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str, refresh: Option<Duration>) -> StoreResult<Option<Bytes>> {
        let wrong_type = |e: StoreError| match e {
            StoreError::WrongType(_) => StoreError::WrongType(key.to_owned()),
            other => other,
        };
        let mut cmd = match refresh {
            Some(ttl) => {
                if let Some(stale) = self.stale_companion(key) {
                    // One script, still one round trip: the value's TTL
                    // and the stale copy's end move together.
                    let mut pipe = redis::pipe();
                    pipe.invoke_script(GET_REFRESH.key(key).key(stale).arg(millis(ttl)));
                    let v = self.run(&pipe).await.map_err(wrong_type)?;
                    return Ok(v.into_iter().next().and_then(as_bytes));
                }
                let mut c = redis::cmd("GETEX");
                c.arg(key).arg("PX").arg(millis(ttl));
                c
            }
            None => redis::cmd("GET"),
        };
        if refresh.is_none() {
            cmd.arg(key);
        }
        let v: Option<Vec<u8>> = self
            .inner
            .conn
            .query(&cmd)
            .await
            .map_err(|e| wrong_type(StoreError::from(e)))?;
        Ok(v.map(Bytes::from))
    }

    async fn get_many(&self, keys: &[&str]) -> StoreResult<Vec<Option<Bytes>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // On Cluster, MGET is split by slot and put back together in order.
        let vals: Vec<Option<Vec<u8>>> = self.query(redis::cmd("MGET").arg(keys)).await?;
        Ok(vals.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn acquire(&self, reqs: &[AcquireRequest<'_>]) -> StoreResult<Vec<Acquired>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in reqs {
            entry_invocation(&mut pipe, &ACQUIRE, r.keys, |inv| {
                inv.arg(r.token)
                    .arg(millis(r.lease_ttl))
                    .arg(millis(r.value_ttl));
            });
        }
        self.run(&pipe)
            .await?
            .into_iter()
            .map(|v| {
                let Value::Array(mut parts) = v else {
                    return Err(unexpected(&v));
                };
                let code = parts.first().map(as_int).transpose()?.unwrap_or(0);
                let second = if parts.len() > 1 {
                    as_bytes(parts.swap_remove(1))
                } else {
                    None
                };
                match code {
                    1 => second
                        .map(Acquired::Value)
                        .ok_or_else(|| unexpected(&Value::Int(1))),
                    2 => Ok(Acquired::Absent),
                    3 => Ok(Acquired::Leased { stale: second }),
                    4 => Ok(Acquired::Busy { stale: second }),
                    _ => Err(unexpected(&Value::Int(code))),
                }
            })
            .collect()
    }

    async fn fill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        self.fill_as(reqs, false).await
    }

    async fn refill(&self, reqs: &[FillRequest<'_>]) -> StoreResult<Vec<FillOutcome>> {
        self.fill_as(reqs, true).await
    }

    async fn refresh_lease(
        &self,
        keys: &EntryKeys,
        token: &str,
        ttl: Duration,
        seen_expires_ms: u64,
    ) -> StoreResult<bool> {
        let mut pipe = redis::pipe();
        entry_invocation(&mut pipe, &REFRESH_LEASE, keys, |inv| {
            inv.arg(token)
                .arg(millis(ttl))
                .arg(seen_expires_ms.to_string());
        });
        let v = self.run(&pipe).await?;
        Ok(v.first().map(as_int).transpose()?.unwrap_or(0) == 1)
    }

    async fn stamps(&self, key: &str) -> StoreResult<Vec<(String, u64)>> {
        let fields: Vec<(String, String)> = self.query(redis::cmd("HGETALL").arg(key)).await?;
        Ok(fields
            .into_iter()
            .filter_map(|(f, v)| Some((f, v.parse().ok()?)))
            .collect())
    }

    async fn bump_stamp(&self, key: &str, field: &str, held: u64) -> StoreResult<u64> {
        let v = self
            .run_one(BUMP_STAMP.key(key).arg(field).arg(held))
            .await?;
        Ok(as_int(&v)?.max(0) as u64)
    }

    async fn release(&self, entries: &[(&EntryKeys, &str)]) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (keys, token) in entries {
            pipe.invoke_script(RELEASE.key(&keys.lease).arg(*token));
        }
        self.run(&pipe).await.map(drop)
    }

    async fn update(&self, reqs: &[UpdateRequest<'_>]) -> StoreResult<Vec<UpdateOutcome>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in reqs {
            entry_invocation(&mut pipe, &UPDATE, r.keys, |inv| {
                inv.arg(&r.bytes[..])
                    .arg(r.version.to_string())
                    .arg(millis(r.lifetimes.ttl))
                    .arg(r.lifetimes.stale_ttl.as_millis() as u64);
            });
        }
        self.run(&pipe)
            .await?
            .iter()
            .map(|v| match as_int(v)? {
                1 => Ok(UpdateOutcome::Stored),
                0 => Ok(UpdateOutcome::NotCached),
                2 => Ok(UpdateOutcome::NotNewer),
                _ => Err(unexpected(v)),
            })
            .collect()
    }

    async fn invalidate(&self, entries: &[&EntryKeys]) -> StoreResult<u64> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for keys in entries {
            entry_invocation(&mut pipe, &INVALIDATE, keys, |_| {});
        }
        let mut n = 0;
        for v in self.run(&pipe).await? {
            n += as_int(&v)? as u64;
        }
        Ok(n)
    }

    async fn invalidate_older(&self, entries: &[(&EntryKeys, Option<u64>)]) -> StoreResult<u64> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for (keys, version) in entries {
            entry_invocation(&mut pipe, &INVALIDATE_OLDER, keys, |inv| {
                inv.arg(version.map_or_else(String::new, |v| v.to_string()));
            });
        }
        let mut n = 0;
        for v in self.run(&pipe).await? {
            if as_int(&v)? == 1 {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn advance(&self, key: &str, value: u64) -> StoreResult<u64> {
        let v = self
            .run_one(ADVANCE.key(key).arg(value.to_string()))
            .await?;
        text_at(std::slice::from_ref(&v), 0)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| unexpected(&v))
    }

    async fn rate(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
    ) -> StoreResult<super::RateDecision> {
        let (step, period) = super::rate_steps(limit, period);
        let v = self.run_one(GCRA.key(key).arg(step).arg(period)).await?;
        let Value::Array(parts) = &v else {
            return Err(unexpected(&v));
        };
        let n = |i: usize| {
            parts
                .get(i)
                .map(as_int)
                .transpose()
                .map(|x| x.unwrap_or(0).max(0) as u64)
        };
        Ok(super::RateDecision {
            allowed: n(0)? == 1,
            remaining: u32::try_from(n(1)?).unwrap_or(u32::MAX),
            reset: Duration::from_micros(n(2)?),
            retry_after: Duration::from_micros(n(3)?),
        })
    }

    async fn invalidate_matching(&self, pattern: &KeyPattern) -> StoreResult<u64> {
        let mut deleted = 0;
        let mut scan = self.scan(&pattern.scan_match()).await?;
        while let Some(keys) = self.scan_next(&mut scan).await? {
            let mut seen = HashSet::new();
            let entries: Vec<EntryKeys> = keys
                .iter()
                .filter_map(|k| pattern.entry_of(k))
                .filter(|e| seen.insert(e.value.clone()))
                .collect();
            let refs: Vec<&EntryKeys> = entries.iter().collect();
            // The true count: how many values the deletes found, not how
            // many keys the scan listed.
            deleted += self.invalidate(&refs).await?;
        }
        Ok(deleted)
    }

    async fn sweep(&self, pattern: &KeyPattern, epoch: u64) -> StoreResult<u64> {
        let mut removed = 0;
        let epoch = epoch.to_string();
        let mut scan = self.scan(&pattern.scan_match()).await?;
        while let Some(keys) = self.scan_next(&mut scan).await? {
            let mut seen = HashSet::new();
            let entries: Vec<EntryKeys> = keys
                .iter()
                .filter_map(|k| pattern.entry_of(k))
                .filter(|e| seen.insert(e.value.clone()))
                .collect();
            if entries.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for keys in &entries {
                entry_invocation(&mut pipe, &SWEEP, keys, |inv| {
                    inv.arg(&epoch);
                });
            }
            for v in self.run(&pipe).await? {
                removed += as_int(&v)? as u64;
            }
        }
        Ok(removed)
    }

    async fn rewind(&self, key: &str, from: u64, to: u64) -> StoreResult<bool> {
        let v = self
            .run_one(REWIND.key(key).arg(from.to_string()).arg(to.to_string()))
            .await?;
        Ok(as_int(&v)? == 1)
    }

    async fn discard(&self, key: &str, seen: &Bytes) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(DISCARD.key(key).arg(&seen[..]));
        self.run(&pipe).await.map(drop)
    }

    async fn set(&self, key: &str, bytes: Bytes, ttl: Duration) -> StoreResult<()> {
        self.query::<()>(
            redis::cmd("SET")
                .arg(key)
                .arg(&bytes[..])
                .arg("PX")
                .arg(millis(ttl)),
        )
        .await
    }

    async fn incr(&self, counters: &[(&str, i64)]) -> StoreResult<()> {
        if counters.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (k, by) in counters {
            pipe.cmd("INCRBY").arg(*k).arg(*by);
        }
        self.run(&pipe).await.map(drop)
    }

    async fn counters(&self, keys: &[&str]) -> StoreResult<Vec<i64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let vals: Vec<Option<i64>> = self.query(redis::cmd("MGET").arg(keys)).await?;
        Ok(vals.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let r: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl)),
            )
            .await?;
        Ok(r.is_some())
    }

    async fn extend_lock(&self, key: &str, token: &str, ttl: Duration) -> StoreResult<bool> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(EXTEND_LOCK.key(key).arg(token).arg(millis(ttl)));
        let v = self.run(&pipe).await?;
        Ok(v.first().map(as_int).transpose()?.unwrap_or(0) == 1)
    }

    async fn unlock(&self, key: &str, token: &str) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(RELEASE.key(key).arg(token));
        self.run(&pipe).await.map(drop)
    }

    async fn ping(&self) -> StoreResult<()> {
        self.query::<()>(&redis::cmd("PING")).await
    }

    fn needs_hash_tags(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    fn bounds_own_latency(&self) -> bool {
        // One server: every command is bounded by the response timeout and
        // a reconnect by one connect timeout. Cluster redirections and
        // Sentinel look-ups are not, so those keep the cache's timer.
        self.inner.conn.topology() == "redis"
    }

    fn describe(&self) -> &'static str {
        self.inner.conn.topology()
    }

    fn track(
        &self,
        prefixes: Vec<String>,
        sink: std::sync::Weak<dyn super::TrackingSink>,
    ) -> Option<super::Tracking> {
        super::tracking::spawn(self.inner.conn.clone(), self.inner.timeouts, prefixes, sink)
    }
}

#[async_trait]
impl QueueStore for RedisStore {
    async fn accept(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome> {
        if self.inner.conn.is_cluster() {
            return self.accept_cluster(req).await;
        }
        let mut pipe = redis::pipe();
        let mut inv = ACCEPT.prepare_invoke();
        for k in req.keys.as_array() {
            inv.key(k);
        }
        inv.key(&req.queue.stream)
            .arg(req.expected_version.to_string())
            .arg(&req.bytes[..])
            .arg(req.version.to_string())
            .arg(millis(req.lifetimes.ttl))
            .arg(req.lifetimes.stale_ttl.as_millis() as u64)
            .arg(req.id)
            .arg(req.max_depth)
            .arg(req.max_age.as_millis() as u64);
        pipe.invoke_script(&inv);
        push_wait(&mut pipe, req);
        let mut results = self.run(&pipe).await?.into_iter();
        let v = results.next().unwrap_or(Value::Nil);
        let replicated = wait_result(results.next(), req)?;
        let Value::Array(parts) = &v else {
            return Err(unexpected(&v));
        };
        let num = |i: usize| {
            text_at(parts, i)
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match parts.first().map(as_int).transpose()? {
            Some(1) => Ok(AcceptOutcome::Accepted {
                entry_id: text_at(parts, 1).ok_or_else(|| unexpected(&v))?,
                replicated,
            }),
            Some(2) => Ok(AcceptOutcome::Conflict { current: num(1) }),
            Some(3) => Ok(AcceptOutcome::Full {
                depth: num(1),
                oldest_age: Duration::from_millis(num(2)),
            }),
            Some(4) => Ok(AcceptOutcome::Uncached),
            _ => Err(unexpected(&v)),
        }
    }

    fn accepts_atomically(&self) -> bool {
        !self.inner.conn.is_cluster()
    }

    async fn requeue_pending(&self, pattern: &KeyPattern, queue: &QueueKeys) -> StoreResult<u64> {
        let mut requeued = 0;
        // Pending copies have a prefix of their own: the scan returns them
        // only, not every key of the type.
        let mut scan = self.scan(&pattern.pending_scan_match()).await?;
        while let Some(keys) = self.scan_next(&mut scan).await? {
            let entries: Vec<(String, EntryKeys)> = keys
                .into_iter()
                .filter_map(|k| {
                    pattern
                        .entry_of(&k)
                        .filter(|e| e.pending == k)
                        .map(|e| (k, e))
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            let refs: Vec<&EntryKeys> = entries.iter().map(|(_, e)| e).collect();
            let copies = self.pending_copies(&refs).await?;
            let mut pipe = redis::pipe();
            for ((_, e), copy) in entries.iter().zip(copies) {
                let (Some(copy), Some(id)) = (copy, pattern.id_of(&e.value)) else {
                    continue;
                };
                let version = crate::codec::peek_version(&copy).unwrap_or(0);
                pipe.cmd("XADD")
                    .arg(&queue.stream)
                    .arg("*")
                    .arg("id")
                    .arg(id)
                    .arg("v")
                    .arg(version);
                requeued += 1;
            }
            if !pipe.is_empty() {
                self.run(&pipe).await?;
            }
        }
        Ok(requeued)
    }

    async fn pending_copies(&self, entries: &[&EntryKeys]) -> StoreResult<Vec<Option<Bytes>>> {
        let keys: Vec<&str> = entries.iter().map(|e| e.pending.as_str()).collect();
        self.get_many(&keys).await
    }

    async fn queue_read(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> StoreResult<Vec<QueueEntry>> {
        let block = block.min(MAX_BLOCK);
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg(&queue.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        // BLOCK 0 would wait forever: a zero wait is no BLOCK at all.
        if block >= Duration::from_millis(1) {
            c.arg("BLOCK").arg(block.as_millis() as u64);
        }
        c.arg("STREAMS").arg(&queue.stream).arg(">");
        let conn = &self.inner.conn;
        let reply: Option<StreamReadReply> = match conn.query_blocking(&c).await {
            Err(e) if e.code() == Some("NOGROUP") => {
                ensure_group(conn, queue).await?;
                conn.query_blocking(&c).await?
            }
            other => other?,
        };
        Ok(reply
            .map(|r| {
                r.keys
                    .into_iter()
                    .flat_map(|k| k.ids)
                    .filter_map(entry_of)
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn queue_claim(
        &self,
        queue: &QueueKeys,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<QueueEntry>> {
        let at = (queue.stream.clone(), queue.group.clone());
        let cursors = &self.inner.claim_cursors;
        let cursor_of = || {
            cursors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&at)
                .cloned()
                .unwrap_or_else(|| "0-0".to_owned())
        };
        let mut cursor = cursor_of();
        let mut out = Vec::new();
        // Each call looks at no more than 10 × COUNT pending entries: go on
        // from where the last one stopped, within this claim and across
        // claims, so idle entries behind many busy ones are reached too.
        for _ in 0..CLAIM_ROUNDS {
            let reply: redis::RedisResult<StreamAutoClaimReply> = self
                .inner
                .conn
                .query(
                    redis::cmd("XAUTOCLAIM")
                        .arg(&queue.stream)
                        .arg(&queue.group)
                        .arg(consumer)
                        .arg(min_idle.as_millis() as u64)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(count - out.len()),
                )
                .await;
            let r = match reply {
                Ok(r) => r,
                Err(e) if e.code() == Some("NOGROUP") => {
                    ensure_group(&self.inner.conn, queue).await?;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            out.extend(r.claimed.into_iter().filter_map(entry_of));
            let wrapped = r.next_stream_id == "0-0";
            cursor = r.next_stream_id;
            if wrapped || out.len() >= count {
                break;
            }
        }
        cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(at, cursor);
        Ok(out)
    }

    async fn queue_ack(&self, queue: &QueueKeys, done: &[Settled<'_>]) -> StoreResult<()> {
        if done.is_empty() {
            return Ok(());
        }
        if self.inner.conn.is_cluster() {
            return self.settle_then_ack(queue, done, "applied").await;
        }
        let mut pipe = redis::pipe();
        for d in done {
            settle_ack_invocation(&mut pipe, queue, d, "applied", None);
        }
        self.run(&pipe).await.map(drop)
    }

    async fn queue_dead_letter(
        &self,
        queue: &QueueKeys,
        letters: &[(Settled<'_>, &str, Bytes)],
        max_len: u64,
    ) -> StoreResult<u64> {
        if letters.is_empty() {
            return Ok(0);
        }
        if self.inner.conn.is_cluster() {
            // The dead-letter stream, the entries and the queue are in
            // three slots: the letter is written first (a crash after it
            // at worst writes it again), then each write is dropped, then
            // acknowledged.
            let mut pipe = redis::pipe();
            for (d, error, value) in letters {
                push_dead_letter(&mut pipe, queue, d, error, value);
            }
            self.run(&pipe).await?;
            let trimmed = self.trim_dead(queue, max_len).await?;
            let done: Vec<Settled<'_>> = letters.iter().map(|(d, ..)| d.clone()).collect();
            self.settle_then_ack(queue, &done, "dropped").await?;
            return Ok(trimmed);
        }
        let mut pipe = redis::pipe();
        for (d, error, value) in letters {
            settle_ack_invocation(
                &mut pipe,
                queue,
                d,
                "dropped",
                Some((error, value, max_len)),
            );
        }
        let mut trimmed = 0;
        for v in self.run(&pipe).await? {
            trimmed += as_int(&v)?.max(0) as u64;
        }
        Ok(trimmed)
    }

    async fn queue_retry(
        &self,
        queue: &QueueKeys,
        retries: &[Retry<'_>],
    ) -> StoreResult<Vec<String>> {
        if retries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in retries {
            let mut inv = RETRY.prepare_invoke();
            inv.key(&queue.stream)
                .arg(&queue.group)
                .arg(r.id)
                .arg(r.version.to_string())
                .arg(r.attempts)
                .arg(r.not_before_ms);
            for id in r.entry_ids {
                inv.arg(id);
            }
            pipe.invoke_script(&inv);
        }
        self.run_on_one_node(&pipe)
            .await?
            .into_iter()
            .map(|v| match &v {
                Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| unexpected(&v)),
                Value::SimpleString(t) => Ok(t.clone()),
                other => Err(unexpected(other)),
            })
            .collect()
    }

    async fn queue_stats(&self, queue: &QueueKeys) -> StoreResult<QueueStats> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&queue.stream);
        pipe.cmd("XRANGE")
            .arg(&queue.stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("XPENDING").arg(&queue.stream).arg(&queue.group);
        pipe.cmd("XLEN").arg(&queue.dead);
        let r = self.inner.conn.exec(&pipe).await?;
        let first_ms = match r.get(1) {
            Some(Ok(Value::Array(items))) => items.first().and_then(|e| match e {
                Value::Array(parts) => match parts.first() {
                    Some(Value::BulkString(id)) => std::str::from_utf8(id)
                        .ok()?
                        .split('-')
                        .next()?
                        .parse::<u64>()
                        .ok(),
                    _ => None,
                },
                _ => None,
            }),
            _ => None,
        };
        // XPENDING without a group (NOGROUP) means nothing was delivered yet.
        let in_flight = match r.get(2) {
            Some(Ok(Value::Array(parts))) => parts.first().map_or(0, |v| match v {
                Value::Int(n) => *n as u64,
                _ => 0,
            }),
            _ => 0,
        };
        // Entry ids carry the server's clock; compare with the same clock.
        let (secs, micros): (u64, u64) = self.query(&redis::cmd("TIME")).await?;
        let now_ms = secs * 1000 + micros / 1000;
        Ok(QueueStats {
            depth: int_result(r.first()),
            oldest_age_ms: first_ms.map_or(0, |ms| now_ms.saturating_sub(ms)),
            in_flight,
            dead_letters: int_result(r.get(3)),
        })
    }

    async fn dead_letters(&self, queue: &QueueKeys, count: usize) -> StoreResult<Vec<DeadLetter>> {
        let r: StreamRangeReply = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(&queue.dead)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        Ok(r.ids
            .into_iter()
            .map(|e| {
                let field = |k: &str| -> String {
                    match e.map.get(k) {
                        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                        Some(Value::SimpleString(s)) => s.clone(),
                        Some(Value::Int(n)) => n.to_string(),
                        _ => String::new(),
                    }
                };
                DeadLetter {
                    id: field("id"),
                    version: field("v").parse().unwrap_or(0),
                    error: field("error"),
                    value: field("value"),
                    entry_id: e.id,
                }
            })
            .collect())
    }

    async fn evicts_keys_without_ttl(&self) -> StoreResult<Option<String>> {
        let policy: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
            .await?;
        Ok(policy.get(1).filter(|p| p.starts_with("allkeys-")).cloned())
    }

    async fn durability(&self) -> StoreResult<Durability> {
        let aof: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("appendonly"))
            .await?;
        if aof.get(1).map(String::as_str) != Some("yes") {
            return Ok(Durability::Volatile);
        }
        let fsync: Vec<String> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("appendfsync"))
            .await?;
        Ok(Durability::Logged {
            fsync: fsync.get(1).cloned().unwrap_or_default(),
        })
    }
}

impl RedisStore {
    /// Cluster accept: the entry's keys and the queue live in different
    /// slots, so the step is split. The queue's limits are checked first,
    /// then the entry is compare-and-set (value, stale and pending copies),
    /// then the queue entry is appended. A crash between the last two
    /// leaves a pending copy with no queue entry; flushers re-queue such
    /// copies ([`QueueStore::requeue_pending`]), so the write still lands.
    async fn accept_cluster(&self, req: &AcceptRequest<'_>) -> StoreResult<AcceptOutcome> {
        let mut full = None;
        if req.max_depth > 0 || !req.max_age.is_zero() {
            let stats = self.queue_stats(req.queue).await?;
            if (req.max_depth > 0 && stats.depth >= req.max_depth)
                || (!req.max_age.is_zero()
                    && stats.depth > 0
                    && stats.oldest_age_ms >= req.max_age.as_millis() as u64)
            {
                full = Some(AcceptOutcome::Full {
                    depth: stats.depth,
                    oldest_age: Duration::from_millis(stats.oldest_age_ms),
                });
            }
        }
        let mut pipe = redis::pipe();
        // The script checks the version first and reports the queue full
        // only for a write that matched, as the one-server script does.
        accept_entry_invocation(&mut pipe, req, full.is_some());
        // WAIT has no key: it goes with the script to the entry's primary,
        // which holds the pending copy that must survive a failover (a
        // queue entry lost with the stream's primary is re-queued from it).
        push_wait(&mut pipe, req);
        let mut results = self.run_on_one_node(&pipe).await?.into_iter();
        let v = results.next().unwrap_or(Value::Nil);
        let replicated = wait_result(results.next(), req)?;
        let Value::Array(parts) = &v else {
            return Err(unexpected(&v));
        };
        match parts.first().map(as_int).transpose()? {
            Some(1) => {}
            Some(2) => {
                return Ok(AcceptOutcome::Conflict {
                    current: text_at(parts, 1).and_then(|t| t.parse().ok()).unwrap_or(0),
                });
            }
            Some(3) => return full.ok_or_else(|| unexpected(&v)),
            Some(4) => return Ok(AcceptOutcome::Uncached),
            _ => return Err(unexpected(&v)),
        }
        let entry_id: String = self
            .query(
                redis::cmd("XADD")
                    .arg(&req.queue.stream)
                    .arg("*")
                    .arg("id")
                    .arg(req.id)
                    .arg("v")
                    .arg(req.version),
            )
            .await?;
        Ok(AcceptOutcome::Accepted {
            entry_id,
            replicated,
        })
    }
}

impl RedisStore {
    /// Cluster: settles each entity's pending copy, then acknowledges the
    /// queue entries of those whose settle step ran; an entity whose step
    /// failed keeps its entries queued, to be delivered again.
    async fn settle_then_ack(
        &self,
        queue: &QueueKeys,
        done: &[Settled<'_>],
        mode: &str,
    ) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        for d in done {
            entry_invocation(&mut pipe, &SETTLE, d.keys, |inv| {
                inv.arg(d.version.to_string()).arg(mode);
            });
        }
        let results = self.run_results(&pipe, false).await?;
        let mut first_error = None;
        let mut settled = Vec::new();
        for (d, r) in done.iter().zip(results) {
            match r {
                Ok(_) => settled.push(d),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let mut ack = redis::pipe();
        push_ack(
            &mut ack,
            queue,
            settled.iter().flat_map(|d| d.entry_ids.iter()),
        );
        if !ack.is_empty() {
            self.run(&ack).await?;
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Cluster: bounds the dead-letter stream; returns how many it trimmed.
    async fn trim_dead(&self, queue: &QueueKeys, max_len: u64) -> StoreResult<u64> {
        if max_len == 0 {
            return Ok(0);
        }
        let n: u64 = self
            .query(
                redis::cmd("XTRIM")
                    .arg(&queue.dead)
                    .arg("MAXLEN")
                    .arg(max_len),
            )
            .await?;
        Ok(n)
    }
}

/// Builds the one-server step that settles an entity and acknowledges its
/// queue entries (`settle_ack.lua`); a dead letter carries its error, value
/// and the dead-letter stream's bound.
fn settle_ack_invocation(
    pipe: &mut Pipeline,
    queue: &QueueKeys,
    d: &Settled<'_>,
    mode: &str,
    letter: Option<(&str, &Bytes, u64)>,
) {
    let mut inv = SETTLE_ACK.prepare_invoke();
    for k in d.keys.as_array() {
        inv.key(k);
    }
    inv.key(&queue.stream)
        .key(&queue.dead)
        .arg(d.version.to_string())
        .arg(mode)
        .arg(&queue.group)
        .arg(d.entry_ids.len());
    for id in d.entry_ids {
        inv.arg(id);
    }
    if let Some((error, value, max_len)) = letter {
        inv.arg(&d.keys.value)
            .arg(d.id)
            .arg(error)
            .arg(&value[..])
            .arg(max_len);
    }
    pipe.invoke_script(&inv);
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
