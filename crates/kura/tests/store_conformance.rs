//! The store conformance suite against the Redis store (the real server)
//! and the memory store, with the same expectations (`conformance/`).

mod conformance;
mod support;

use conformance::*;
use kura::Kind;
use kura::key::KeyBuilder;
use kura::store::{Acquired, FillOutcome};
use support::{Backend, cleanup, ns};

both_stores!(
    accept_is_compare_and_set_and_durable,
    queue_delivers_reclaims_and_acknowledges,
    dead_letters_drop_the_write,
    conflict_is_reported_before_a_full_queue,
    dead_letter_names_the_entity_of_the_request,
    accept_without_a_cached_version_is_not_acknowledged,
    dead_letters_are_bounded,
    a_retried_write_goes_to_the_end_of_the_queue,
    lease_is_exclusive_and_reentrant,
    fill_lands_only_under_the_lease,
    invalidation_voids_the_lease,
    update_voids_the_lease_and_only_replaces_older,
    not_found_is_remembered_and_cleared,
    stale_copy_outlives_the_value,
    release_only_by_the_holder,
    lease_expires,
    batches_are_per_entry,
    pattern_invalidation_counts_matches_only,
    values_expire_and_refresh,
    discard_removes_only_what_was_seen,
    counters_add_up,
    locks_are_owned,
    foreign_values_without_version_are_replaceable,
    fill_without_stale_drops_the_old_stale_copy,
    refresh_extends_the_stale_copy,
    feed_event_invalidates_only_older_values,
    feed_event_fences_loads_in_flight,
    feed_delete_event_always_invalidates,
    feed_event_keeps_the_pending_copy,
    feed_position_only_moves_forward,
    refresh_lease_only_over_a_cached_value,
    stamps_bump_atomically,
    sweep_removes_what_a_clear_covered,
    feed_position_rewinds_only_from_what_it_holds,
);

/// The memory store's bound in the bounded cases.
const MEMORY_BOUND: usize = 1 << 20;
/// The `maxmemory` of the Redis the bounded cases start (the empty server
/// itself takes about 1 MiB of it).
const REDIS_BOUND: usize = 4 << 20;

fn bounded_memory() -> std::sync::Arc<dyn kura::QueueStore> {
    std::sync::Arc::new(kura::store::MemoryStore::new().with_max_bytes(MEMORY_BOUND))
}

/// A `redis-server` of the test's own with `maxmemory` and the policy
/// kura needs (`volatile-lru`: keys without a TTL, such as pending
/// write-behind copies and the queue, are never evicted). Never set on
/// the shared server.
async fn bounded_redis() -> (
    kura_testkit::RedisServer,
    std::sync::Arc<dyn kura::QueueStore>,
) {
    let srv = kura_testkit::RedisServer::start_with(kura_testkit::RedisOptions::default().args([
        "--maxmemory".to_owned(),
        REDIS_BOUND.to_string(),
        "--maxmemory-policy".to_owned(),
        "volatile-lru".to_owned(),
    ]))
    .await;
    let s = kura::store::RedisStore::open(&srv.url()).unwrap();
    (srv, std::sync::Arc::new(s))
}

mod bounded {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store_evicts_old_entries() {
        bounded_store_evicts_old_entries(bounded_memory(), &ns(), MEMORY_BOUND).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_store_evicts_old_entries() {
        let (_srv, s) = bounded_redis().await;
        bounded_store_evicts_old_entries(s, &ns(), REDIS_BOUND).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store_clearing_and_expiry_keep_the_whole_bound() {
        clearing_and_expiry_keep_the_whole_bound(bounded_memory(), &ns(), MEMORY_BOUND).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_store_clearing_and_expiry_keep_the_whole_bound() {
        let (_srv, s) = bounded_redis().await;
        // The empty server takes about a quarter of `maxmemory`.
        clearing_and_expiry_keep_the_whole_bound(s, &ns(), REDIS_BOUND / 2).await;
    }
}

/// Redis only: a key of the wrong type left by someone else is repaired by
/// the scripts, and a plain read reports it as bad data, not an outage.
#[tokio::test]
async fn redis_wrong_type_is_repaired() {
    use redis::AsyncCommands;
    let s = Backend::Redis.store();
    let ns = ns();
    let e = KeyBuilder::new(&ns, false)
        .unwrap()
        .entry(&Kind::new("profile"), "u1")
        .unwrap();
    let mut c = support::redis_conn().await;
    let _: () = c.hset(&e.value, "f", "v").await.unwrap();
    let err = s.get(&e.value, None).await.unwrap_err();
    assert_eq!(err.kind(), kura::StoreErrorKind::WrongType, "{err:?}");
    assert!(!err.is_outage());
    assert_eq!(
        s.acquire(&[acq(&e, "A")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    let t: String = redis::cmd("TYPE")
        .arg(&e.value)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(t, "none", "the script removed the foreign key");
    cleanup(&ns).await;
}

/// Redis only: the scripts are loaded again after the server forgets them.
#[tokio::test]
async fn redis_reloads_scripts_after_flush() {
    let srv = kura_testkit::RedisServer::start().await;
    let s = kura::store::RedisStore::open(&srv.url()).unwrap();
    let e = KeyBuilder::new("t", false)
        .unwrap()
        .entry(&Kind::new("profile"), "u1")
        .unwrap();
    use kura::Store;
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    let mut c = redis::Client::open(srv.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    let out = s
        .fill(&[fill_req(&e, "A", envelope("a", 1), 1)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
}
