//! The Redis store's invalidation stream, for the near cache
//! ([`crate::near`]): connections of their own (one per Cluster primary)
//! in RESP3 with `CLIENT TRACKING ON BCAST PREFIX ...`, a `PING` every
//! 100 ms to confirm the stream is live, and a new session (after telling
//! the sink it lost the stream) whenever a connection breaks, a ping fails
//! or the topology moves (Sentinel's master, Cluster's slots).

use std::sync::Weak;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};

use super::conn::{Conn, Timeouts};
use crate::store::{Tracking, TrackingSink};

/// How often the stream is confirmed.
const PING_EVERY: Duration = Duration::from_millis(100);

/// How long a confirmation may take before the stream counts as lost.
const PING_TIMEOUT: Duration = Duration::from_millis(500);

/// The topology is checked every this many pings (about once a second).
const RECHECK_EVERY: u64 = 10;

/// Starts the stream; it stops when the sink is dropped or the handle is.
pub(super) fn spawn(
    conn: Conn,
    timeouts: Timeouts,
    prefixes: Vec<String>,
    sink: Weak<dyn TrackingSink>,
) -> Option<Tracking> {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("near cache: no tokio runtime to run the invalidation stream on; off");
        return None;
    };
    let task = rt.spawn(run(conn, timeouts, prefixes, sink));
    Some(Tracking::new(task.abort_handle()))
}

async fn run(conn: Conn, t: Timeouts, prefixes: Vec<String>, sink: Weak<dyn TrackingSink>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let reason = match session(&conn, t, &prefixes, &sink).await {
            Ok(()) => return,
            Err(reason) => reason,
        };
        let Some(s) = sink.upgrade() else { return };
        s.lost(reason);
        drop(s);
        tracing::debug!(reason, "near cache: invalidation stream lost; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One connected stream; `Ok` when the sink is gone.
async fn session(
    conn: &Conn,
    t: Timeouts,
    prefixes: &[String],
    sink: &Weak<dyn TrackingSink>,
) -> Result<(), &'static str> {
    let (nodes, fingerprint) = tokio::time::timeout(t.connect * 4, conn.tracking_nodes())
        .await
        .map_err(|_| "unreachable")?
        .map_err(|_| "unreachable")?;
    if nodes.is_empty() {
        return Err("no primaries");
    }
    let (dead_tx, mut dead_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut conns: Vec<MultiplexedConnection> = Vec::with_capacity(nodes.len());
    for (_, info) in nodes {
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|_| "bad address")?;
        let push_sink = sink.clone();
        let dead = dead_tx.clone();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(t.connect))
            .set_response_timeout(Some(PING_TIMEOUT))
            .set_push_sender(move |p: PushInfo| {
                deliver(&push_sink, &dead, p);
                Ok::<(), redis::aio::SendError>(())
            });
        let mut c = tokio::time::timeout(
            t.connect * 2,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| "unreachable")?
        .map_err(|_| "unreachable")?;
        let mut on = redis::cmd("CLIENT");
        on.arg("TRACKING").arg("ON").arg("BCAST");
        for p in prefixes {
            on.arg("PREFIX").arg(p);
        }
        on.query_async::<()>(&mut c).await.map_err(|e| {
            tracing::warn!(error = %e, "near cache: CLIENT TRACKING refused");
            "tracking refused"
        })?;
        conns.push(c);
    }
    // Whatever changed before tracking began was not seen: start empty.
    match sink.upgrade() {
        Some(s) => s.lost("connected"),
        None => return Ok(()),
    }
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = dead_rx.recv() => return Err("disconnected"),
        }
        let sent = Instant::now();
        let pings = futures::future::join_all(conns.iter().map(|c| {
            let mut c = c.clone();
            async move { redis::cmd("PING").query_async::<()>(&mut c).await }
        }));
        match tokio::time::timeout(PING_TIMEOUT, pings).await {
            Ok(rs) if rs.iter().all(Result::is_ok) => {}
            _ => return Err("ping failed"),
        }
        // Every push sent before the PING's answer has been delivered (one
        // connection, in order; the push handler runs before the reply is
        // read on).
        match sink.upgrade() {
            Some(s) => s.confirmed(sent),
            None => return Ok(()),
        }
        n += 1;
        if n % RECHECK_EVERY == 0 && !fingerprint.is_empty() {
            if let Ok(Ok((_, now))) =
                tokio::time::timeout(t.connect * 2, conn.tracking_nodes()).await
            {
                if now != fingerprint {
                    return Err("topology changed");
                }
            }
        }
    }
}

fn deliver(
    sink: &Weak<dyn TrackingSink>,
    dead: &tokio::sync::mpsc::UnboundedSender<()>,
    p: PushInfo,
) {
    match p.kind {
        PushKind::Invalidate => {
            let Some(s) = sink.upgrade() else { return };
            match p.data.first() {
                Some(Value::Array(keys)) => {
                    let keys: Vec<&[u8]> = keys
                        .iter()
                        .filter_map(|k| match k {
                            Value::BulkString(b) => Some(b.as_slice()),
                            _ => None,
                        })
                        .collect();
                    s.invalidated(Some(&keys));
                }
                // A null list: the server flushed everything.
                _ => s.invalidated(None),
            }
        }
        PushKind::Disconnection => {
            let _ = dead.send(());
        }
        _ => {}
    }
}
