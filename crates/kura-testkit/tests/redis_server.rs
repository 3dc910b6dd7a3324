//! `RedisServer`: start, crash, restart, persistence, cleanup.

use kura_testkit::resp::{Reply, RespConn};
use kura_testkit::{RedisOptions, RedisServer, free_port};

fn bulk(s: &str) -> Reply {
    Reply::Bulk(Some(s.as_bytes().to_vec()))
}

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still show "Z" in its stat.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"))
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
}

#[tokio::test]
async fn starts_answers_and_reports_its_address() {
    let redis = RedisServer::start().await;
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(redis.addr().port(), redis.port());
    assert!(redis.addr().ip().is_loopback());
    assert!(process_alive(redis.pid()));

    let mut conn = RespConn::connect(redis.addr()).await.unwrap();
    assert_eq!(
        conn.command(&["PING"]).await.unwrap(),
        Reply::Simple("PONG".into())
    );
    assert_eq!(
        conn.command(&["SET", "k", "v"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(conn.command(&["GET", "k"]).await.unwrap(), bulk("v"));
}

#[tokio::test]
async fn stop_is_a_crash_and_restart_without_aof_comes_back_empty() {
    let mut redis = RedisServer::start().await;
    let first_pid = redis.pid();
    let mut conn = RespConn::connect(redis.addr()).await.unwrap();
    conn.command(&["SET", "k", "v"]).await.unwrap();

    redis.stop().await;
    assert!(!process_alive(first_pid));
    assert!(!redis.is_running());
    assert!(
        RespConn::connect(redis.addr()).await.is_err(),
        "nothing listens after stop"
    );
    // The established connection is dead too.
    assert!(conn.command(&["PING"]).await.is_err());

    redis.restart().await;
    assert_ne!(redis.pid(), first_pid);
    assert!(redis.is_running());
    let mut conn = RespConn::connect(redis.addr()).await.unwrap();
    assert_eq!(
        conn.command(&["GET", "k"]).await.unwrap(),
        Reply::Bulk(None)
    );
}

#[tokio::test]
async fn appendonly_data_survives_a_crash() {
    let mut redis = RedisServer::start_with(RedisOptions::default().appendonly(true)).await;
    let port = redis.port();
    let mut conn = RespConn::connect(redis.addr()).await.unwrap();
    for i in 0..50 {
        let key = format!("k{i}");
        conn.command(&["SET", &key, "v"]).await.unwrap();
    }
    conn.command(&["SET", "last", "written"]).await.unwrap();

    redis.stop().await;
    redis.restart().await;
    assert_eq!(redis.port(), port);
    let mut conn = RespConn::connect(redis.addr()).await.unwrap();
    assert_eq!(
        conn.command(&["GET", "last"]).await.unwrap(),
        bulk("written")
    );
    assert_eq!(conn.command(&["DBSIZE"]).await.unwrap(), Reply::Integer(51));
}

#[tokio::test]
async fn restart_while_running_replaces_the_process() {
    let mut redis = RedisServer::start().await;
    let pid = redis.pid();
    redis.restart().await;
    assert_ne!(redis.pid(), pid);
    assert!(!process_alive(pid));
    kura_testkit::resp::ping(redis.addr()).await.unwrap();
}

#[tokio::test]
async fn extra_args_reach_the_server() {
    let redis =
        RedisServer::start_with(RedisOptions::default().args(["--maxmemory", "12mb"])).await;
    let mut conn = RespConn::connect(redis.addr()).await.unwrap();
    let reply = conn.command(&["CONFIG", "GET", "maxmemory"]).await.unwrap();
    assert_eq!(
        reply,
        Reply::Array(Some(vec![
            bulk("maxmemory"),
            bulk(&(12 * 1024 * 1024).to_string())
        ]))
    );
    let reply = conn
        .command(&["CONFIG", "GET", "appendonly"])
        .await
        .unwrap();
    assert_eq!(
        reply,
        Reply::Array(Some(vec![bulk("appendonly"), bulk("no")]))
    );
}

#[tokio::test]
async fn drop_kills_the_process_and_removes_its_directory() {
    let redis = RedisServer::start().await;
    let pid = redis.pid();
    let dir = redis.dir().to_path_buf();
    assert!(dir.join("redis.log").exists());
    assert!(redis.log_tail().contains("Ready to accept connections"));
    drop(redis);
    assert!(!process_alive(pid));
    assert!(!dir.exists());
}

#[tokio::test]
async fn servers_run_side_by_side() {
    let a = RedisServer::start().await;
    let b = RedisServer::start().await;
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    let mut ca = RespConn::connect(a.addr()).await.unwrap();
    let mut cb = RespConn::connect(b.addr()).await.unwrap();
    ca.command(&["SET", "only", "a"]).await.unwrap();
    assert_eq!(
        cb.command(&["GET", "only"]).await.unwrap(),
        Reply::Bulk(None)
    );
}

#[tokio::test]
#[should_panic(expected = "redis-server did not start")]
async fn a_bad_argument_panics_with_the_log() {
    let _ = RedisServer::start_with(RedisOptions::default().args(["--no-such-option", "1"])).await;
}
