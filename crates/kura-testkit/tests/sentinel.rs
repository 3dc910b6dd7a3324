//! `RedisSentinelGroup`: formation and failover after the master is killed.

use kura_testkit::RedisSentinelGroup;
use kura_testkit::resp::{self, Reply, RespConn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_and_fails_over() {
    let mut group = RedisSentinelGroup::start().await;
    assert_eq!(group.master_name(), "kura");
    assert_eq!(group.sentinel_urls().len(), 3);
    assert_eq!(group.server_urls().len(), 3);
    let master = group.master_addr().await;
    assert_eq!(group.server_urls()[0], format!("redis://{master}"));

    let mut conn = RespConn::connect(master).await.unwrap();
    assert_eq!(
        conn.command(&["SET", "k", "v"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        conn.command(&["WAIT", "2", "5000"]).await.unwrap(),
        Reply::Integer(2)
    );

    let old = group.kill_master().await;
    assert_eq!(old, master);
    let new = group.wait_for_failover(old).await;
    assert_ne!(new, old);
    assert_eq!(group.master_addr().await, new);
    let reply = resp::command(new, &["GET", "k"]).await.unwrap();
    assert_eq!(reply, Reply::Bulk(Some(b"v".to_vec())));
    // The new master takes writes.
    assert_eq!(
        resp::command(new, &["SET", "k2", "v2"]).await.unwrap(),
        Reply::Simple("OK".into())
    );
}
