//! `RedisCluster`: formation, slot routing, and failover after a primary is killed.

use std::net::SocketAddr;

use kura_testkit::RedisCluster;
use kura_testkit::resp::{self, Reply, RespConn};

/// The node that owns `key`, asked of `seed` (which answers MOVED unless it owns the key).
async fn owner_of(seed: SocketAddr, key: &str) -> SocketAddr {
    match resp::command(seed, &["GET", key]).await.unwrap() {
        Reply::Error(e) if e.starts_with("MOVED") => {
            e.split_whitespace().nth(2).unwrap().parse().unwrap()
        }
        _ => seed,
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

    // Keys spread over the primaries: write some on each and make sure its replica has them.
    // WAIT counts acknowledgements of this connection's own writes, so both go on one.
    let mut owners = std::collections::HashMap::new();
    for i in 0..30 {
        let key = format!("key:{i}");
        let owner = owner_of(seed, &key).await;
        let mut conn = RespConn::connect(owner).await.unwrap();
        assert_eq!(
            conn.command(&["SET", &key, "v"]).await.unwrap(),
            Reply::Simple("OK".into())
        );
        assert_eq!(
            conn.command(&["WAIT", "1", "5000"]).await.unwrap(),
            Reply::Integer(1)
        );
        owners.entry(owner).or_insert(key);
    }
    assert_eq!(owners.len(), 3, "keys land on every primary");

    let killed = cluster.kill_primary(0).await;
    assert_eq!(killed, primaries[0]);
    cluster.wait_until_healthy().await;
    let after = cluster.primaries().await;
    assert_eq!(after.len(), 3);
    assert!(!after.contains(&killed));

    // The promoted replica serves the dead primary's keys.
    let key = &owners[&killed];
    let owner = owner_of(after[1], key).await;
    assert_ne!(owner, killed);
    let reply = resp::command(owner, &["GET", key]).await.unwrap();
    assert_eq!(reply, Reply::Bulk(Some(b"v".to_vec())));
}

#[tokio::test]
#[should_panic(expected = "at least 3 primaries")]
async fn needs_three_primaries() {
    let _ = RedisCluster::start(2, 0).await;
}
