//! `RedisCluster`: formation, slot routing, and failover after a primary is killed.

use std::net::SocketAddr;

use kura_testkit::RedisCluster;
use kura_testkit::resp::{self, Reply, RespConn};

/// Runs a command on the node that owns the key, following one MOVED redirection.
async fn on_owner(seed: SocketAddr, args: &[&str]) -> (SocketAddr, Reply) {
    let reply = resp::command(seed, args).await.unwrap();
    match &reply {
        Reply::Error(e) if e.starts_with("MOVED") => {
            let target: SocketAddr = e.split_whitespace().nth(2).unwrap().parse().unwrap();
            (target, resp::command(target, args).await.unwrap())
        }
        _ => (seed, reply),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_routes_and_fails_over() {
    let mut cluster = RedisCluster::start(3, 1).await;
    assert_eq!(cluster.urls().len(), 6);
    assert!(
        cluster
            .urls()
            .iter()
            .all(|u| u.starts_with("redis://127.0.0.1:"))
    );
    let primaries = cluster.primaries().await;
    assert_eq!(primaries.len(), 3);

    let seed = cluster.addrs()[0];
    let info = resp::command(seed, &["CLUSTER", "INFO"])
        .await
        .unwrap()
        .as_text()
        .unwrap();
    assert_eq!(resp::info_field(&info, "cluster_state"), Some("ok"));
    assert_eq!(resp::info_field(&info, "cluster_known_nodes"), Some("6"));

    // Keys spread over the primaries; write one per primary and make sure replicas have them.
    let mut owners = std::collections::HashMap::new();
    for i in 0..30 {
        let key = format!("key:{i}");
        let (owner, reply) = on_owner(seed, &["SET", &key, "v"]).await;
        assert_eq!(reply, Reply::Simple("OK".into()));
        owners.entry(owner).or_insert(key);
    }
    assert_eq!(owners.len(), 3, "keys land on every primary");
    for owner in owners.keys() {
        let mut conn = RespConn::connect(*owner).await.unwrap();
        assert_eq!(
            conn.command(&["WAIT", "1", "5000"]).await.unwrap(),
            Reply::Integer(1)
        );
    }

    let killed = cluster.kill_primary(0).await;
    assert_eq!(killed, primaries[0]);
    cluster.wait_until_healthy().await;
    let after = cluster.primaries().await;
    assert_eq!(after.len(), 3);
    assert!(!after.contains(&killed));

    // The promoted replica serves the dead primary's keys.
    let key = &owners[&killed];
    let live_seed = after[1];
    let (owner, reply) = on_owner(live_seed, &["GET", key]).await;
    assert_ne!(owner, killed);
    assert_eq!(reply, Reply::Bulk(Some(b"v".to_vec())));
}

#[tokio::test]
#[should_panic(expected = "at least 3 primaries")]
async fn needs_three_primaries() {
    let _ = RedisCluster::start(2, 0).await;
}
