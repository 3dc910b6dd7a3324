//! `FaultProxy`: forwarding, latency, partitions, resets, refusals, cuts, and shutdown.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kura_testkit::resp::{self, PING, PONG, Reply, RespConn};
use kura_testkit::{FaultProxy, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a raw PING on `stream` and reads the answer, waiting at most `timeout`.
async fn ping_on(stream: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    tokio::time::timeout(timeout, async {
        stream.write_all(PING).await?;
        let mut buf = vec![0u8; PONG.len()];
        let mut got = 0;
        while got < buf.len() {
            let n = stream.read(&mut buf[got..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        Ok(buf)
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr)
        .await
        .expect("connect to the proxy")
}

/// Waits until `cond` holds, for at most 2 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(5);

#[tokio::test]
async fn forwards_ping_transparently() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    assert!(proxy.addr().ip().is_loopback());
    assert_eq!(proxy.port(), proxy.addr().port());
    assert_ne!(proxy.port(), redis.port());

    let mut stream = connect(proxy.addr()).await;
    for _ in 0..3 {
        assert_eq!(ping_on(&mut stream, LONG).await.unwrap(), PONG);
    }
    eventually("one connection", || proxy.connections() == 1).await;

    let mut conn = RespConn::connect(proxy.addr()).await.unwrap();
    let big = "x".repeat(200_000);
    assert_eq!(
        conn.command(&["SET", "big", &big]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        conn.command(&["GET", "big"]).await.unwrap(),
        Reply::Bulk(Some(big.into_bytes()))
    );
    eventually("two connections", || proxy.connections() == 2).await;

    drop(stream);
    drop(conn);
    eventually("no connections", || proxy.connections() == 0).await;
}

#[tokio::test]
async fn latency_is_added_to_each_round_trip() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut stream = connect(proxy.addr()).await;
    ping_on(&mut stream, LONG).await.unwrap();

    proxy.set_latency(Duration::from_millis(50));
    let started = Instant::now();
    assert_eq!(ping_on(&mut stream, LONG).await.unwrap(), PONG);
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );

    // Applies to new connections too (each direction is delayed, so the connect + PING on a
    // fresh connection also takes at least the latency).
    let started = Instant::now();
    resp::ping(proxy.addr()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(50));

    proxy.set_latency(Duration::from_millis(200));
    let started = Instant::now();
    ping_on(&mut stream, LONG).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn blackhole_times_out_clients_and_heal_restores_service() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut before = connect(proxy.addr()).await;
    ping_on(&mut before, LONG).await.unwrap();

    proxy.blackhole();
    let err = ping_on(&mut before, SHORT).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);

    // New connections are accepted and stay open, but nothing gets through.
    let mut during = connect(proxy.addr()).await;
    let err = ping_on(&mut during, SHORT).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    eventually("both partitioned connections open", || {
        proxy.connections() == 2
    })
    .await;

    proxy.heal();
    // The partitioned connections are closed: their lost replies never arrive.
    for stream in [&mut before, &mut during] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(LONG, stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "healed connection must be closed, got {read:?}"
        );
    }
    let mut after = connect(proxy.addr()).await;
    assert_eq!(ping_on(&mut after, LONG).await.unwrap(), PONG);
}

#[tokio::test]
async fn heal_keeps_connections_that_were_never_partitioned() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    proxy.blackhole();
    proxy.heal();
    let mut stream = connect(proxy.addr()).await;
    ping_on(&mut stream, LONG).await.unwrap();
    proxy.set_latency(Duration::from_millis(10));
    proxy.heal();
    // A heal without a partition since this connection opened leaves it alone.
    assert_eq!(ping_on(&mut stream, LONG).await.unwrap(), PONG);
}

#[tokio::test]
async fn reset_breaks_current_connections_only() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut stream = connect(proxy.addr()).await;
    ping_on(&mut stream, LONG).await.unwrap();

    proxy.reset();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(LONG, stream.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    eventually("no connections", || proxy.connections() == 0).await;

    let mut fresh = connect(proxy.addr()).await;
    assert_eq!(ping_on(&mut fresh, LONG).await.unwrap(), PONG);
}

#[tokio::test]
async fn refuse_resets_new_and_current_connections_until_healed() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut current = connect(proxy.addr()).await;
    ping_on(&mut current, LONG).await.unwrap();

    proxy.refuse();
    assert!(ping_on(&mut current, LONG).await.is_err());
    for _ in 0..3 {
        // The kernel completes the handshake before the proxy can refuse, so the error shows
        // on the first I/O rather than on connect.
        match TcpStream::connect(proxy.addr()).await {
            Err(_) => {}
            Ok(mut s) => {
                let err = ping_on(&mut s, LONG).await.unwrap_err();
                assert_ne!(err.kind(), io::ErrorKind::TimedOut, "{err}");
            }
        }
    }

    proxy.heal();
    let mut healed = connect(proxy.addr()).await;
    assert_eq!(ping_on(&mut healed, LONG).await.unwrap(), PONG);
}

#[tokio::test]
async fn cut_after_truncates_the_response() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut setup = RespConn::connect(redis.addr()).await.unwrap();
    setup
        .command(&["SET", "big", &"y".repeat(10_000)])
        .await
        .unwrap();

    let mut stream = connect(proxy.addr()).await;
    ping_on(&mut stream, LONG).await.unwrap();
    proxy.cut_after(100);
    stream
        .write_all(&resp::encode(&["GET", "big"]))
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(LONG, stream.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(read.is_ok(), "{read:?}");
    assert_eq!(got.len(), 100);
    assert!(got.starts_with(b"$10000\r\nyyy"));

    // New connections get the same budget: a PONG (7 bytes) passes, the next reply is cut.
    let mut conn = RespConn::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        conn.command(&["PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    assert!(conn.command(&["GET", "big"]).await.is_err());

    proxy.heal();
    let mut conn = RespConn::connect(proxy.addr()).await.unwrap();
    assert_eq!(
        conn.command(&["GET", "big"]).await.unwrap(),
        Reply::Bulk(Some(vec![b'y'; 10_000]))
    );
}

#[tokio::test]
async fn upstream_down_resets_the_client() {
    let mut redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    redis.stop().await;
    let mut stream = connect(proxy.addr()).await;
    let err = ping_on(&mut stream, LONG).await.unwrap_err();
    assert_ne!(err.kind(), io::ErrorKind::TimedOut);
    redis.restart().await;
    let mut stream = connect(proxy.addr()).await;
    assert_eq!(ping_on(&mut stream, LONG).await.unwrap(), PONG);
}

#[tokio::test]
async fn drop_closes_everything() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let addr = proxy.addr();
    let mut stream = connect(addr).await;
    ping_on(&mut stream, LONG).await.unwrap();
    proxy.blackhole();
    drop(proxy);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(LONG, stream.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The listener is gone (the accept task is aborted on the next scheduler turn).
    let deadline = Instant::now() + LONG;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "proxy still accepting after drop"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_switch_safely_under_traffic() {
    let redis = RedisServer::start().await;
    let proxy = FaultProxy::start(redis.addr()).await;
    let addr = proxy.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut ok = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    continue;
                };
                while let Ok(reply) = ping_on(&mut s, Duration::from_millis(100)).await {
                    assert_eq!(reply, PONG);
                    ok += 1;
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                }
            }
            ok
        }));
    }
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        proxy.set_latency(Duration::from_millis(5 + round));
        tokio::time::sleep(Duration::from_millis(40)).await;
        proxy.blackhole();
        tokio::time::sleep(Duration::from_millis(40)).await;
        proxy.reset();
        proxy.cut_after(3);
        tokio::time::sleep(Duration::from_millis(40)).await;
        proxy.refuse();
        tokio::time::sleep(Duration::from_millis(40)).await;
        proxy.heal();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    assert!(total > 0);
    let mut stream = connect(addr).await;
    assert_eq!(ping_on(&mut stream, LONG).await.unwrap(), PONG);
}
