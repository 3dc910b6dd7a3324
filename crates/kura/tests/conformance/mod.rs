//! The store conformance suite: every atomic step, with the expectations
//! every store must meet. Run per backend by `store_conformance.rs` and
//! `topologies.rs`.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use crate::support::{Backend, Row, cleanup, ns};
use bytes::Bytes;
use kura::codec;
use kura::key::{EntryKeys, KeyBuilder};
use kura::store::{
    AcceptOutcome, AcceptRequest, AcquireRequest, Acquired, FillOutcome, FillRequest, FillValue,
    Lifetimes, QueueKeys, Retry, Settled, UpdateOutcome, UpdateRequest,
};
use kura::{Kind, QueueStore, Store};

pub fn keys(s: &dyn Store, ns: &str) -> KeyBuilder {
    KeyBuilder::new(ns, s.needs_hash_tags()).unwrap()
}

pub fn entry(s: &dyn Store, ns: &str, id: &str) -> EntryKeys {
    keys(s, ns).entry(&Kind::new("profile"), id).unwrap()
}

pub fn envelope(name: &str, version: u64) -> Bytes {
    let row = Row {
        id: "x".into(),
        name: name.into(),
        version,
    };
    codec::encode(&row, version, codec::DEFAULT_MAX_VALUE_BYTES)
        .unwrap()
        .envelope
}

pub fn life(ttl_ms: u64, stale_ms: u64) -> Lifetimes {
    Lifetimes {
        ttl: Duration::from_millis(ttl_ms),
        stale_ttl: Duration::from_millis(stale_ms),
    }
}

pub fn acq<'a>(e: &'a EntryKeys, token: &'a str) -> AcquireRequest<'a> {
    AcquireRequest {
        keys: e,
        token,
        lease_ttl: Duration::from_secs(5),
        value_ttl: Duration::from_secs(60),
    }
}

pub fn fill_req<'a>(
    e: &'a EntryKeys,
    token: &'a str,
    bytes: Bytes,
    version: u64,
) -> FillRequest<'a> {
    FillRequest {
        keys: e,
        token,
        value: FillValue::Value { bytes, version },
        lifetimes: life(60_000, 0),
    }
}

pub fn name_of(b: &Bytes) -> String {
    codec::decode::<Row>(b).unwrap().value.name
}

pub async fn lease_is_exclusive_and_reentrant(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let got = s.acquire(&[acq(&e, "A")]).await.unwrap();
    assert_eq!(got, vec![Acquired::Leased { stale: None }]);
    let got = s.acquire(&[acq(&e, "B")]).await.unwrap();
    assert_eq!(got, vec![Acquired::Busy { stale: None }]);
    // A retried request by the holder is not told to wait for itself.
    let got = s.acquire(&[acq(&e, "A")]).await.unwrap();
    assert_eq!(got, vec![Acquired::Leased { stale: None }]);
    cleanup(&ns).await;
}

pub async fn fill_lands_only_under_the_lease(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    let out = s
        .fill(&[fill_req(&e, "B", envelope("b", 1), 1)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost], "a stranger cannot fill");
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    let out = s
        .fill(&[fill_req(&e, "A", envelope("a", 1), 1)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
    let v = s.get(&e.value, None).await.unwrap().unwrap();
    assert_eq!(name_of(&v), "a");
    match &s.acquire(&[acq(&e, "C")]).await.unwrap()[0] {
        Acquired::Value(b) => assert_eq!(name_of(b), "a"),
        other => panic!("expected the value, got {other:?}"),
    }
    // The lease is released by the fill: a second fill is rejected.
    let out = s
        .fill(&[fill_req(&e, "A", envelope("a2", 2), 2)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost]);
    cleanup(&ns).await;
}

pub async fn invalidation_voids_the_lease(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    assert_eq!(s.invalidate(&[&e]).await.unwrap(), 0, "nothing was cached");
    let out = s
        .fill(&[fill_req(&e, "A", envelope("old", 1), 1)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost]);
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    // A new reader after the invalidation gets a fresh lease.
    let got = s.acquire(&[acq(&e, "B")]).await.unwrap();
    assert_eq!(got, vec![Acquired::Leased { stale: None }]);
    cleanup(&ns).await;
}

pub async fn update_voids_the_lease_and_only_replaces_older(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let up = |v: u64| UpdateRequest {
        keys: &e,
        bytes: envelope(&format!("v{v}"), v),
        version: v,
        lifetimes: life(60_000, 0),
    };
    // Absent: nothing is created, and a load in flight is voided.
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    assert_eq!(
        s.update(&[up(2)]).await.unwrap(),
        vec![UpdateOutcome::NotCached]
    );
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    let out = s
        .fill(&[fill_req(&e, "A", envelope("v1", 1), 1)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost]);
    // Present and older: replaced. Same or newer: kept.
    s.acquire(&[acq(&e, "B")]).await.unwrap();
    s.fill(&[fill_req(&e, "B", envelope("v2", 2), 2)])
        .await
        .unwrap();
    assert_eq!(
        s.update(&[up(3)]).await.unwrap(),
        vec![UpdateOutcome::Stored]
    );
    assert_eq!(
        s.update(&[up(2)]).await.unwrap(),
        vec![UpdateOutcome::NotNewer]
    );
    assert_eq!(
        s.update(&[up(3)]).await.unwrap(),
        vec![UpdateOutcome::NotNewer]
    );
    let v = s.get(&e.value, None).await.unwrap().unwrap();
    assert_eq!(name_of(&v), "v3");
    // Versions compare as numbers, not text ("10" > "9").
    assert_eq!(
        s.update(&[up(10)]).await.unwrap(),
        vec![UpdateOutcome::Stored]
    );
    assert_eq!(
        s.update(&[up(9)]).await.unwrap(),
        vec![UpdateOutcome::NotNewer]
    );
    cleanup(&ns).await;
}

pub async fn not_found_is_remembered_and_cleared(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "ghost");
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    let out = s
        .fill(&[FillRequest {
            keys: &e,
            token: "A",
            value: FillValue::Absent,
            lifetimes: life(60_000, 0),
        }])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
    assert_eq!(
        s.acquire(&[acq(&e, "B")]).await.unwrap(),
        vec![Acquired::Absent]
    );
    // Other services reading the value key see nothing.
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    s.invalidate(&[&e]).await.unwrap();
    assert_eq!(
        s.acquire(&[acq(&e, "B")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    cleanup(&ns).await;
}

pub async fn stale_copy_outlives_the_value(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    let req = FillRequest {
        keys: &e,
        token: "A",
        value: FillValue::Value {
            bytes: envelope("old", 1),
            version: 1,
        },
        lifetimes: life(100, 60_000),
    };
    s.fill(&[req]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(s.get(&e.value, None).await.unwrap(), None, "value expired");
    match &s.acquire(&[acq(&e, "B")]).await.unwrap()[0] {
        Acquired::Leased { stale: Some(st) } => assert_eq!(name_of(st), "old"),
        other => panic!("expected a lease with the stale copy, got {other:?}"),
    }
    match &s.acquire(&[acq(&e, "C")]).await.unwrap()[0] {
        Acquired::Busy { stale: Some(st) } => assert_eq!(name_of(st), "old"),
        other => panic!("expected busy with the stale copy, got {other:?}"),
    }
    // An invalidation takes the stale copy too: nothing invalidated is served.
    s.invalidate(&[&e]).await.unwrap();
    assert_eq!(
        s.acquire(&[acq(&e, "D")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    cleanup(&ns).await;
}

pub async fn release_only_by_the_holder(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    s.release(&[(&e, "B")]).await.unwrap();
    assert_eq!(
        s.acquire(&[acq(&e, "C")]).await.unwrap(),
        vec![Acquired::Busy { stale: None }]
    );
    s.release(&[(&e, "A")]).await.unwrap();
    assert_eq!(
        s.acquire(&[acq(&e, "C")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    cleanup(&ns).await;
}

pub async fn lease_expires(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let short = AcquireRequest {
        keys: &e,
        token: "A",
        lease_ttl: Duration::from_millis(100),
        value_ttl: Duration::from_secs(60),
    };
    s.acquire(&[short]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        s.acquire(&[acq(&e, "B")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }],
        "a dead holder's lease runs out"
    );
    cleanup(&ns).await;
}

pub async fn batches_are_per_entry(b: Backend) {
    let s = b.store();
    let ns = ns();
    let es: Vec<EntryKeys> = (0..5).map(|i| entry(&*s, &ns, &format!("u{i}"))).collect();
    s.acquire(&[acq(&es[0], "X")]).await.unwrap();
    let reqs: Vec<_> = es.iter().map(|e| acq(e, "T")).collect();
    let got = s.acquire(&reqs).await.unwrap();
    assert_eq!(got[0], Acquired::Busy { stale: None });
    assert!(
        got[1..]
            .iter()
            .all(|a| *a == Acquired::Leased { stale: None })
    );
    let fills: Vec<_> = es
        .iter()
        .enumerate()
        .map(|(i, e)| fill_req(e, "T", envelope(&format!("n{i}"), 1), 1))
        .collect();
    let out = s.fill(&fills).await.unwrap();
    assert_eq!(out[0], FillOutcome::LeaseLost);
    assert!(out[1..].iter().all(|o| *o == FillOutcome::Stored));
    let ks: Vec<&str> = es.iter().map(|e| e.value.as_str()).collect();
    let vals = s.get_many(&ks).await.unwrap();
    assert!(vals[0].is_none());
    for (i, v) in vals.iter().enumerate().skip(1) {
        assert_eq!(name_of(v.as_ref().unwrap()), format!("n{i}"));
    }
    let refs: Vec<&EntryKeys> = es.iter().collect();
    assert_eq!(s.invalidate(&refs).await.unwrap(), 4);
    cleanup(&ns).await;
}

pub async fn pattern_invalidation_counts_matches_only(b: Backend) {
    let s = b.store();
    let ns = ns();
    let kb = keys(&*s, &ns);
    let mut cached = 0;
    for id in ["a1", "a2", "a3", "b1", "b2"] {
        let e = kb.entry(&Kind::new("profile"), id).unwrap();
        s.acquire(&[acq(&e, "T")]).await.unwrap();
        s.fill(&[fill_req(&e, "T", envelope(id, 1), 1)])
            .await
            .unwrap();
        cached += 1;
    }
    assert_eq!(cached, 5);
    // A settings entry whose id also starts with "a" is another type.
    let other = kb.entry(&Kind::new("settings"), "a9").unwrap();
    s.acquire(&[acq(&other, "T")]).await.unwrap();
    s.fill(&[fill_req(&other, "T", envelope("s", 1), 1)])
        .await
        .unwrap();
    // A lease in flight on a matching key is voided too.
    let leased = kb.entry(&Kind::new("profile"), "a7").unwrap();
    s.acquire(&[acq(&leased, "L")]).await.unwrap();

    let pat = kb.pattern(&Kind::new("profile"), "a*").unwrap();
    assert_eq!(s.invalidate_matching(&pat).await.unwrap(), 3);
    for id in ["a1", "a2", "a3"] {
        let e = kb.entry(&Kind::new("profile"), id).unwrap();
        assert_eq!(s.get(&e.value, None).await.unwrap(), None, "{id}");
    }
    for id in ["b1", "b2"] {
        let e = kb.entry(&Kind::new("profile"), id).unwrap();
        assert!(s.get(&e.value, None).await.unwrap().is_some(), "{id} kept");
    }
    assert!(
        s.get(&other.value, None).await.unwrap().is_some(),
        "other type kept"
    );
    let out = s
        .fill(&[fill_req(&leased, "L", envelope("late", 1), 1)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost]);
    let all = kb.pattern(&Kind::new("profile"), "*").unwrap();
    assert_eq!(s.invalidate_matching(&all).await.unwrap(), 2);
    assert_eq!(s.invalidate_matching(&all).await.unwrap(), 0);
    cleanup(&ns).await;
}

pub async fn values_expire_and_refresh(b: Backend) {
    let s = b.store();
    let ns = ns();
    let k1 = format!("{ns}:plain:one");
    let k2 = format!("{ns}:plain:two");
    s.set(&k1, Bytes::from_static(b"{}"), Duration::from_millis(150))
        .await
        .unwrap();
    s.set(&k2, Bytes::from_static(b"{}"), Duration::from_millis(150))
        .await
        .unwrap();
    // A read with a refresh resets the TTL (the adaptive rule's GETEX).
    let got = s.get(&k2, Some(Duration::from_secs(60))).await.unwrap();
    assert_eq!(got.as_deref(), Some(&b"{}"[..]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.get(&k1, None).await.unwrap(), None);
    assert!(s.get(&k2, None).await.unwrap().is_some());
    cleanup(&ns).await;
}

pub async fn discard_removes_only_what_was_seen(b: Backend) {
    let s = b.store();
    let ns = ns();
    let k = format!("{ns}:profile:bad");
    s.set(&k, Bytes::from_static(b"garbage"), Duration::from_secs(60))
        .await
        .unwrap();
    s.discard(&k, &Bytes::from_static(b"other")).await.unwrap();
    assert!(
        s.get(&k, None).await.unwrap().is_some(),
        "changed since: kept"
    );
    s.discard(&k, &Bytes::from_static(b"garbage"))
        .await
        .unwrap();
    assert_eq!(s.get(&k, None).await.unwrap(), None);
    cleanup(&ns).await;
}

pub async fn counters_add_up(b: Backend) {
    let s = b.store();
    let ns = ns();
    let h = format!("metrics:{ns}:hits");
    let m = format!("metrics:{ns}:misses");
    assert_eq!(s.counters(&[&h, &m]).await.unwrap(), vec![0, 0]);
    s.incr(&[(&h, 5), (&m, 2)]).await.unwrap();
    s.incr(&[(&h, 1)]).await.unwrap();
    assert_eq!(s.counters(&[&h, &m]).await.unwrap(), vec![6, 2]);
    cleanup(&ns).await;
}

pub async fn locks_are_owned(b: Backend) {
    let s = b.store();
    let ns = ns();
    let k = format!("{ns}:~lock:warm:profile");
    let ttl = Duration::from_secs(5);
    assert!(s.lock(&k, "A", ttl).await.unwrap());
    assert!(!s.lock(&k, "B", ttl).await.unwrap());
    assert!(s.extend_lock(&k, "A", ttl).await.unwrap());
    assert!(!s.extend_lock(&k, "B", ttl).await.unwrap());
    s.unlock(&k, "B").await.unwrap();
    assert!(
        !s.lock(&k, "B", ttl).await.unwrap(),
        "a stranger cannot unlock"
    );
    s.unlock(&k, "A").await.unwrap();
    assert!(s.lock(&k, "B", Duration::from_millis(100)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        s.lock(&k, "C", ttl).await.unwrap(),
        "an expired lock is free"
    );
    cleanup(&ns).await;
}

pub async fn foreign_values_without_version_are_replaceable(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    // As the seed's Python service writes it: no "_v" header.
    s.set(
        &e.value,
        Bytes::from("{\"id\":\"x\",\"name\":\"seed\",\"version\":7}"),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let up = UpdateRequest {
        keys: &e,
        bytes: envelope("kura", 1),
        version: 1,
        lifetimes: life(60_000, 0),
    };
    assert_eq!(s.update(&[up]).await.unwrap(), vec![UpdateOutcome::Stored]);
    cleanup(&ns).await;
}

pub fn queue(ns: &str) -> QueueKeys {
    QueueKeys {
        stream: format!("{ns}:~wb:profile"),
        dead: format!("{ns}:~wb:profile:dead"),
        group: "kura".into(),
    }
}

pub fn accept_req<'a>(
    e: &'a EntryKeys,
    q: &'a QueueKeys,
    expected: u64,
    name: &str,
    version: u64,
) -> AcceptRequest<'a> {
    AcceptRequest {
        keys: e,
        queue: q,
        id: "u1",
        expected_version: expected,
        bytes: envelope(name, version),
        version,
        lifetimes: life(100, 0),
        max_depth: 0,
        max_age: Duration::ZERO,
        min_replicas: 0,
        replica_timeout: Duration::ZERO,
    }
}

pub async fn accept_is_compare_and_set_and_durable(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let q = queue(&ns);
    // Nothing cached yet: nothing to compare with, nothing written, and
    // the load in flight may still fill.
    s.acquire(&[acq(&e, "L")]).await.unwrap();
    let out = s.accept(&accept_req(&e, &q, 1, "v2", 2)).await.unwrap();
    assert_eq!(out, AcceptOutcome::Uncached);
    let out = s
        .fill(&[fill_req(&e, "L", envelope("v1", 1), 1)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
    let out = s.accept(&accept_req(&e, &q, 1, "v2", 2)).await.unwrap();
    assert!(matches!(out, AcceptOutcome::Accepted { .. }), "{out:?}");
    // Based on a stale version: refused with the current one.
    let out = s.accept(&accept_req(&e, &q, 1, "other", 2)).await.unwrap();
    assert_eq!(out, AcceptOutcome::Conflict { current: 2 });
    let out = s.accept(&accept_req(&e, &q, 2, "v3", 3)).await.unwrap();
    assert!(matches!(out, AcceptOutcome::Accepted { .. }));
    // The value expires (100 ms) and is invalidated; the pending copy is
    // still read, and put back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.invalidate(&[&e]).await.unwrap();
    match &s.acquire(&[acq(&e, "R")]).await.unwrap()[0] {
        Acquired::Value(v) => assert_eq!(name_of(v), "v3"),
        other => panic!("expected the pending value, got {other:?}"),
    }
    assert_eq!(
        name_of(&s.get(&e.value, None).await.unwrap().unwrap()),
        "v3"
    );
    let copies = s.pending_copies(&[&e]).await.unwrap();
    assert_eq!(name_of(copies[0].as_ref().unwrap()), "v3");
    let stats = s.queue_stats(&q).await.unwrap();
    assert_eq!(stats.depth, 2);
    cleanup(&ns).await;
}

pub async fn queue_delivers_reclaims_and_acknowledges(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let q = queue(&ns);
    cache_version(&*s, &e, "v0", 0).await;
    s.accept(&accept_req(&e, &q, 0, "v1", 1)).await.unwrap();
    s.accept(&accept_req(&e, &q, 1, "v2", 2)).await.unwrap();
    let got = s
        .queue_read(&q, "c1", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].id.as_str(), got[0].version), ("u1", 1));
    assert_eq!(got[1].version, 2);
    assert!(got[0].added_ms() > 0);
    // Delivered once: a second read finds nothing new.
    let none = s
        .queue_read(&q, "c2", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(s.queue_stats(&q).await.unwrap().in_flight, 2);
    // Not idle long enough yet, then reclaimed by another consumer.
    assert!(
        s.queue_claim(&q, "c2", Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    let claimed = s
        .queue_claim(&q, "c2", Duration::from_millis(100), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    // Settling an older version keeps the newer pending copy.
    let ids: Vec<String> = claimed.iter().map(|c| c.entry_id.clone()).collect();
    s.queue_ack(
        &q,
        &[Settled {
            id: "u1",
            keys: &e,
            version: 1,
            entry_ids: &ids[..1],
        }],
    )
    .await
    .unwrap();
    assert!(s.pending_copies(&[&e]).await.unwrap()[0].is_some());
    s.queue_ack(
        &q,
        &[Settled {
            id: "u1",
            keys: &e,
            version: 2,
            entry_ids: &ids[1..],
        }],
    )
    .await
    .unwrap();
    assert!(s.pending_copies(&[&e]).await.unwrap()[0].is_none());
    let st = s.queue_stats(&q).await.unwrap();
    assert_eq!((st.depth, st.in_flight), (0, 0));
    cleanup(&ns).await;
}

pub async fn dead_letters_drop_the_write(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let q = queue(&ns);
    cache_version(&*s, &e, "v0", 0).await;
    s.accept(&accept_req(&e, &q, 0, "bad", 1)).await.unwrap();
    let got = s
        .queue_read(&q, "c1", 10, Duration::from_millis(50))
        .await
        .unwrap();
    let ids = vec![got[0].entry_id.clone()];
    let settled = Settled {
        id: "u1",
        keys: &e,
        version: 1,
        entry_ids: &ids,
    };
    s.queue_dead_letter(&q, &[(settled, "constraint failed", envelope("bad", 1))], 0)
        .await
        .unwrap();
    assert!(s.pending_copies(&[&e]).await.unwrap()[0].is_none());
    assert_eq!(
        s.get(&e.value, None).await.unwrap(),
        None,
        "no longer served"
    );
    let st = s.queue_stats(&q).await.unwrap();
    assert_eq!((st.depth, st.dead_letters), (0, 1));
    let dead = s.dead_letters(&q, 5).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id.as_str(), dead[0].version), ("u1", 1));
    assert_eq!(dead[0].error, "constraint failed");
    cleanup(&ns).await;
}

/// Puts `version` in the cache as a loaded value (lease, load, fill), the
/// way a read before a write-behind accept leaves it.
pub async fn cache_version(s: &dyn Store, e: &EntryKeys, name: &str, version: u64) {
    s.acquire(&[acq(e, "seed")]).await.unwrap();
    let out = s
        .fill(&[fill_req(e, "seed", envelope(name, version), version)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
}

/// A write both based on a stale version and over the queue limit: the
/// conflict is a fact about the caller's data (it must re-read whatever
/// the queue holds), so both stores answer `Conflict` first.
pub async fn conflict_is_reported_before_a_full_queue(b: Backend) {
    let s = b.store();
    let ns = ns();
    let q = queue(&ns);
    let other = entry(&*s, &ns, "u0");
    cache_version(&*s, &other, "a", 1).await;
    let out = s.accept(&accept_req(&other, &q, 1, "b", 2)).await.unwrap();
    assert!(matches!(out, AcceptOutcome::Accepted { .. }), "{out:?}");
    let e = entry(&*s, &ns, "u1");
    cache_version(&*s, &e, "a", 2).await;
    let mut req = accept_req(&e, &q, 1, "stale", 2);
    req.max_depth = 1;
    let out = s.accept(&req).await.unwrap();
    assert_eq!(out, AcceptOutcome::Conflict { current: 2 });
    // Based on the current version, the same write is refused as full.
    let mut req = accept_req(&e, &q, 2, "fresh", 3);
    req.max_depth = 1;
    let out = s.accept(&req).await.unwrap();
    assert!(
        matches!(out, AcceptOutcome::Full { depth: 1, .. }),
        "{out:?}"
    );
    cleanup(&ns).await;
}

/// A dead letter names the entity the settle request carries, whatever the
/// key layout (document metadata keys end in `:metadata`, not the id).
pub async fn dead_letter_names_the_entity_of_the_request(b: Backend) {
    let s = b.store();
    let ns = ns();
    let q = queue(&ns);
    let e = keys(&*s, &ns)
        .entry(
            &Kind::new("document_meta")
                .with_segment("document")
                .with_suffix("metadata"),
            "d1",
        )
        .unwrap();
    cache_version(&*s, &e, "a", 1).await;
    let mut req = accept_req(&e, &q, 1, "bad", 2);
    req.id = "d1";
    let out = s.accept(&req).await.unwrap();
    assert!(matches!(out, AcceptOutcome::Accepted { .. }), "{out:?}");
    let got = s
        .queue_read(&q, "c1", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(got[0].id, "d1");
    let ids = vec![got[0].entry_id.clone()];
    let settled = Settled {
        id: "d1",
        keys: &e,
        version: 2,
        entry_ids: &ids,
    };
    s.queue_dead_letter(&q, &[(settled, "constraint failed", envelope("bad", 2))], 0)
        .await
        .unwrap();
    let dead = s.dead_letters(&q, 5).await.unwrap();
    assert_eq!((dead[0].id.as_str(), dead[0].version), ("d1", 2));
    cleanup(&ns).await;
}

/// With neither a pending copy nor a value cached there is nothing to
/// compare the expected version with: the accept must not be acknowledged
/// on a guess, and nothing is stored or queued.
pub async fn accept_without_a_cached_version_is_not_acknowledged(b: Backend) {
    let s = b.store();
    let ns = ns();
    let q = queue(&ns);
    let e = entry(&*s, &ns, "u1");
    let out = s.accept(&accept_req(&e, &q, 5, "guess", 6)).await.unwrap();
    assert!(
        !matches!(out, AcceptOutcome::Accepted { .. }),
        "acknowledged on a guess: {out:?}"
    );
    assert!(s.pending_copies(&[&e]).await.unwrap()[0].is_none());
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    assert_eq!(s.queue_stats(&q).await.unwrap().depth, 0);
    cleanup(&ns).await;
}

/// The dead-letter stream keeps its newest `max_len` letters; the step
/// says how many older ones it trimmed.
pub async fn dead_letters_are_bounded(b: Backend) {
    let s = b.store();
    let ns = ns();
    let q = queue(&ns);
    let mut trimmed = 0;
    for i in 0..5u64 {
        let id = format!("u{i}");
        let e = entry(&*s, &ns, &id);
        let settled = Settled {
            id: &id,
            keys: &e,
            version: i + 1,
            entry_ids: &[],
        };
        trimmed += s
            .queue_dead_letter(&q, &[(settled, "refused", envelope("x", i + 1))], 3)
            .await
            .unwrap();
    }
    assert_eq!(trimmed, 2);
    let st = s.queue_stats(&q).await.unwrap();
    assert_eq!(st.dead_letters, 3);
    let dead = s.dead_letters(&q, 10).await.unwrap();
    let ids: Vec<&str> = dead.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["u4", "u3", "u2"], "newest first, oldest trimmed");
    cleanup(&ns).await;
}

/// A refused write put back for a retry goes to the end of the queue with
/// its attempt count and retry time, in place of the entries it replaces:
/// the head (and so the queue's age) is what waits behind it.
pub async fn a_retried_write_goes_to_the_end_of_the_queue(b: Backend) {
    let s = b.store();
    let ns = ns();
    let q = queue(&ns);
    let e1 = entry(&*s, &ns, "u1");
    let e2 = entry(&*s, &ns, "u2");
    cache_version(&*s, &e1, "a", 1).await;
    cache_version(&*s, &e2, "a", 1).await;
    s.accept(&accept_req(&e1, &q, 1, "b", 2)).await.unwrap();
    let mut req = accept_req(&e2, &q, 1, "b", 2);
    req.id = "u2";
    s.accept(&req).await.unwrap();
    let got = s
        .queue_read(&q, "c1", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].id.as_str(), got[0].attempts), ("u1", 0));
    let old = vec![got[0].entry_id.clone()];
    let new = s
        .queue_retry(
            &q,
            &[Retry {
                id: "u1",
                version: 2,
                attempts: 1,
                not_before_ms: 42,
                entry_ids: &old,
            }],
        )
        .await
        .unwrap();
    assert_eq!(new.len(), 1);
    let st = s.queue_stats(&q).await.unwrap();
    assert_eq!((st.depth, st.in_flight), (2, 1), "{st:?}");
    let again = s
        .queue_read(&q, "c1", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    let r = &again[0];
    assert_eq!(
        (
            r.entry_id.as_str(),
            r.id.as_str(),
            r.version,
            r.attempts,
            r.not_before_ms
        ),
        (new[0].as_str(), "u1", 2, 1, 42)
    );
    assert!(r.added_ms() >= got[1].added_ms(), "behind u2's entry");
    assert!(
        s.pending_copies(&[&e1]).await.unwrap()[0].is_some(),
        "still pending"
    );
    cleanup(&ns).await;
}

/// A fill that keeps no stale copy drops the one an earlier fill left.
pub async fn fill_without_stale_drops_the_old_stale_copy(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    let with_stale = FillRequest {
        lifetimes: life(100, 60_000),
        ..fill_req(&e, "A", envelope("old", 1), 1)
    };
    assert_eq!(
        s.fill(&[with_stale]).await.unwrap(),
        vec![FillOutcome::Stored]
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    match &s.acquire(&[acq(&e, "B")]).await.unwrap()[0] {
        Acquired::Leased { stale: Some(st) } => assert_eq!(name_of(st), "old"),
        other => panic!("expected a lease with the stale copy, got {other:?}"),
    }
    // A fill that asks for no stale copy leaves none behind: the old one
    // is older than the value now cached.
    let new = envelope("new", 2);
    let out = s.fill(&[fill_req(&e, "B", new.clone(), 2)]).await.unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
    s.discard(&e.value, &new).await.unwrap();
    assert_eq!(
        s.acquire(&[acq(&e, "C")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }],
        "no stale copy survives a fill that asked for none"
    );
    cleanup(&ns).await;
}

pub async fn refresh_extends_the_stale_copy(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    // As Cache::lifetimes writes them: stale = ttl + max_stale (500 ms).
    let req = FillRequest {
        lifetimes: life(200, 700),
        ..fill_req(&e, "A", envelope("v1", 1), 1)
    };
    s.fill(&[req]).await.unwrap();
    // A read that resets the value's TTL (the adaptive rule) moves the
    // stale copy's end too: it still outlives the value by max_stale.
    let v = s.get(&e.value, Some(Duration::from_secs(3))).await.unwrap();
    assert_eq!(name_of(&v.unwrap()), "v1");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let v = s
        .get(&e.value, None)
        .await
        .unwrap()
        .expect("value refreshed");
    // Take the value away to look at the stale copy.
    s.discard(&e.value, &v).await.unwrap();
    match &s.acquire(&[acq(&e, "B")]).await.unwrap()[0] {
        Acquired::Leased { stale: Some(st) } => assert_eq!(name_of(st), "v1"),
        other => panic!("expected the stale copy to outlive the refreshed value, got {other:?}"),
    }
    cleanup(&ns).await;
}

/// Takes the leases of `es` and fills them with `value_len`-byte values,
/// 100 to a round trip; returns how many were stored. A lease may be
/// evicted between its acquire and its fill under memory pressure: that
/// fill is lost, as after an invalidation.
async fn fill_all(s: &dyn Store, es: &[EntryKeys], value_len: usize, l: Lifetimes) -> usize {
    let pad = "x".repeat(value_len);
    let mut stored = 0;
    for chunk in es.chunks(100) {
        let reqs: Vec<_> = chunk.iter().map(|e| acq(e, "T")).collect();
        let got = s.acquire(&reqs).await.unwrap();
        assert!(
            got.iter().all(|a| matches!(a, Acquired::Leased { .. })),
            "leases granted: {got:?}"
        );
        let fills: Vec<_> = chunk
            .iter()
            .map(|e| FillRequest {
                lifetimes: l,
                ..fill_req(e, "T", envelope(&pad, 1), 1)
            })
            .collect();
        let out = s.fill(&fills).await.unwrap();
        assert!(
            out.iter()
                .all(|o| matches!(o, FillOutcome::Stored | FillOutcome::LeaseLost)),
            "{out:?}"
        );
        stored += out.iter().filter(|o| **o == FillOutcome::Stored).count();
    }
    stored
}

/// How many of `es` have their value cached.
async fn cached(s: &dyn Store, es: &[EntryKeys]) -> usize {
    let mut n = 0;
    for chunk in es.chunks(100) {
        let ks: Vec<&str> = chunk.iter().map(|e| e.value.as_str()).collect();
        n += s.get_many(&ks).await.unwrap().iter().flatten().count();
    }
    n
}

/// A store bounded to about `bound` bytes (the memory store's bound, or
/// Redis's `maxmemory` with a `volatile-*` policy), written four times
/// over: it keeps accepting and caching new entries, evicts the least
/// recently used ones, and never a write-behind write not yet in the
/// database.
pub async fn bounded_store_evicts_old_entries(s: Arc<dyn QueueStore>, ns: &str, bound: usize) {
    let value_len = 1_000;
    let q = queue(ns);
    let pending: Vec<EntryKeys> = (0..5).map(|i| entry(&*s, ns, &format!("p{i}"))).collect();
    for e in &pending {
        cache_version(&*s, e, "a", 1).await;
        let out = s.accept(&accept_req(e, &q, 1, "queued", 2)).await.unwrap();
        assert!(matches!(out, AcceptOutcome::Accepted { .. }), "{out:?}");
    }
    let old: Vec<EntryKeys> = (0..200).map(|i| entry(&*s, ns, &format!("o{i}"))).collect();
    assert_eq!(
        fill_all(&*s, &old, value_len, life(600_000, 0)).await,
        old.len()
    );
    // Both stores' LRU clocks count seconds.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let flood: Vec<EntryKeys> = (0..4 * bound / value_len)
        .map(|i| entry(&*s, ns, &format!("n{i}")))
        .collect();
    let stored = fill_all(&*s, &flood, value_len, life(600_000, 0)).await;
    assert!(
        stored >= flood.len() * 9 / 10,
        "the store keeps accepting entries: {stored} of {} stored",
        flood.len()
    );

    let held = cached(&*s, &flood).await;
    assert!(held < flood.len(), "nothing was evicted: bound not applied");
    assert!(
        held * value_len >= bound / 4,
        "the store stopped caching: {held} entries of {value_len} bytes under a bound of {bound}"
    );
    let old_held = cached(&*s, &old).await;
    let recent_held = cached(&*s, &flood[flood.len() - old.len()..]).await;
    assert!(
        old_held < recent_held,
        "older entries are evicted first: {old_held} old and {recent_held} recent of {} kept",
        old.len()
    );
    let copies = s
        .pending_copies(&pending.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(copies.iter().all(Option::is_some), "pending copies evicted");
    for e in &pending {
        match &s.acquire(&[acq(e, "R")]).await.unwrap()[0] {
            Acquired::Value(v) => assert_eq!(name_of(v), "queued"),
            other => panic!("expected the pending write, got {other:?}"),
        }
    }
}

/// A bounded store cleared by pattern again and again, and filled with
/// entries that expire again and again, still holds a working set well
/// inside its bound: clearing and expiry give back everything they
/// charged.
pub async fn clearing_and_expiry_keep_the_whole_bound(s: Arc<dyn Store>, ns: &str, bound: usize) {
    let value_len = 500;
    // About a third of the bound with per-entry overhead.
    let es: Vec<EntryKeys> = (0..bound / 3 / (value_len + 200))
        .map(|i| entry(&*s, ns, &format!("w{i}")))
        .collect();
    let all = keys(&*s, ns).pattern(&Kind::new("profile"), "*").unwrap();
    // As a service reads (the value first, then a lease on a miss) and an
    // operator clears the type.
    for _ in 0..25 {
        cached(&*s, &es).await;
        let stored = fill_all(&*s, &es, value_len, life(600_000, 0)).await;
        assert_eq!(stored, es.len(), "fills lost under a third of the bound");
        s.invalidate_matching(&all).await.unwrap();
    }
    // Values and stale copies that expire between two reads.
    for _ in 0..4 {
        assert_eq!(cached(&*s, &es).await, 0);
        assert_eq!(
            fill_all(&*s, &es, value_len, life(150, 300)).await,
            es.len()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(cached(&*s, &es).await, 0);
    assert_eq!(
        fill_all(&*s, &es, value_len, life(600_000, 0)).await,
        es.len()
    );
    assert_eq!(
        cached(&*s, &es).await,
        es.len(),
        "a working set of a third of the bound is cached whole"
    );
}

/// Caches `version` at `e` under a fresh lease, with a stale copy.
async fn cache_with_stale(s: &dyn Store, e: &EntryKeys, version: u64) {
    let token = format!("fill{version}");
    s.acquire(&[acq(e, &token)]).await.unwrap();
    let out = s
        .fill(&[FillRequest {
            keys: e,
            token: &token,
            value: FillValue::Value {
                bytes: envelope(&format!("v{version}"), version),
                version,
            },
            lifetimes: life(60_000, 120_000),
        }])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
}

pub async fn feed_event_invalidates_only_older_values(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    cache_with_stale(&*s, &e, 2).await;
    // The cached value already reflects the change (or a later one): kept.
    assert_eq!(s.invalidate_older(&[(&e, Some(1))]).await.unwrap(), 0);
    assert_eq!(s.invalidate_older(&[(&e, Some(2))]).await.unwrap(), 0);
    assert_eq!(
        name_of(&s.get(&e.value, None).await.unwrap().unwrap()),
        "v2"
    );
    // Older: value and stale copy go.
    assert_eq!(s.invalidate_older(&[(&e, Some(3))]).await.unwrap(), 1);
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    assert_eq!(
        s.acquire(&[acq(&e, "A")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }],
        "the stale copy went too"
    );
    // A load in flight read the row before the change: its lease is voided.
    assert_eq!(s.invalidate_older(&[(&e, Some(4))]).await.unwrap(), 0);
    let out = s
        .fill(&[fill_req(&e, "A", envelope("v3", 3), 3)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost]);
    // Versions compare as numbers, not text ("10" > "9").
    cache_with_stale(&*s, &e, 9).await;
    assert_eq!(s.invalidate_older(&[(&e, Some(10))]).await.unwrap(), 1);
    cache_with_stale(&*s, &e, 10).await;
    assert_eq!(s.invalidate_older(&[(&e, Some(9))]).await.unwrap(), 0);
    // A "not found" marker goes on an insert.
    let g = entry(&*s, &ns, "ghost");
    s.acquire(&[acq(&g, "G")]).await.unwrap();
    s.fill(&[FillRequest {
        keys: &g,
        token: "G",
        value: FillValue::Absent,
        lifetimes: life(60_000, 0),
    }])
    .await
    .unwrap();
    assert_eq!(
        s.acquire(&[acq(&g, "H")]).await.unwrap(),
        vec![Acquired::Absent]
    );
    assert_eq!(s.invalidate_older(&[(&g, Some(1))]).await.unwrap(), 0);
    assert_eq!(
        s.acquire(&[acq(&g, "H")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    cleanup(&ns).await;
}

/// A change that arrives while a load is in flight fences the load's lease
/// with its version instead of voiding it: a load that read that version
/// or a newer one still fills (the writer's own invalidation usually
/// started it; voiding it would cost a second miss), one that read an
/// older row, or none, does not.
pub async fn feed_event_fences_loads_in_flight(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let fill = |token: &'static str, version: u64| {
        let s = s.clone();
        let e = e.clone();
        async move {
            s.fill(&[fill_req(
                &e,
                token,
                envelope(&format!("v{version}"), version),
                version,
            )])
            .await
            .unwrap()[0]
        }
    };
    // The load read the committed version: its fill lands.
    assert_eq!(
        s.acquire(&[acq(&e, "A")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    assert_eq!(s.invalidate_older(&[(&e, Some(5))]).await.unwrap(), 0);
    assert_eq!(
        s.acquire(&[acq(&e, "other")]).await.unwrap(),
        vec![Acquired::Busy { stale: None }],
        "the load in flight keeps its lease"
    );
    assert_eq!(fill("A", 5).await, FillOutcome::Stored);
    assert_eq!(
        name_of(&s.get(&e.value, None).await.unwrap().unwrap()),
        "v5"
    );
    s.invalidate(&[&e]).await.unwrap();
    // The load read an older row: refused, and the lease is gone.
    s.acquire(&[acq(&e, "B")]).await.unwrap();
    s.invalidate_older(&[(&e, Some(7))]).await.unwrap();
    // A later event with a lower version does not lower the floor.
    s.invalidate_older(&[(&e, Some(6))]).await.unwrap();
    assert_eq!(fill("B", 6).await, FillOutcome::LeaseLost);
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    assert_eq!(
        s.acquire(&[acq(&e, "C")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    // A load that found no row, under a floor: the row exists.
    s.invalidate_older(&[(&e, Some(8))]).await.unwrap();
    let out = s
        .fill(&[FillRequest {
            keys: &e,
            token: "C",
            value: FillValue::Absent,
            lifetimes: life(60_000, 0),
        }])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost]);
    assert_eq!(
        s.acquire(&[acq(&e, "D")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    // A re-entrant acquire (a retried pipeline) keeps the floor.
    s.invalidate_older(&[(&e, Some(9))]).await.unwrap();
    assert_eq!(
        s.acquire(&[acq(&e, "D")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    assert_eq!(fill("D", 8).await, FillOutcome::LeaseLost);
    // The holder can still give its fenced lease back.
    s.acquire(&[acq(&e, "E")]).await.unwrap();
    s.invalidate_older(&[(&e, Some(10))]).await.unwrap();
    s.release(&[(&e, "E")]).await.unwrap();
    assert_eq!(
        s.acquire(&[acq(&e, "F")]).await.unwrap(),
        vec![Acquired::Leased { stale: None }]
    );
    // Versions compare as numbers ("10" > "9"); a newer load lands.
    s.invalidate_older(&[(&e, Some(10))]).await.unwrap();
    assert_eq!(fill("F", 9).await, FillOutcome::LeaseLost);
    s.acquire(&[acq(&e, "G")]).await.unwrap();
    s.invalidate_older(&[(&e, Some(9))]).await.unwrap();
    assert_eq!(fill("G", 11).await, FillOutcome::Stored);
    s.invalidate(&[&e]).await.unwrap();
    // A delete voids the load whatever it read.
    s.acquire(&[acq(&e, "H")]).await.unwrap();
    s.invalidate_older(&[(&e, None)]).await.unwrap();
    assert_eq!(fill("H", 12).await, FillOutcome::LeaseLost);
    cleanup(&ns).await;
}

pub async fn feed_delete_event_always_invalidates(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e1 = entry(&*s, &ns, "u1");
    let e2 = entry(&*s, &ns, "u2");
    cache_with_stale(&*s, &e1, 7).await;
    cache_with_stale(&*s, &e2, 7).await;
    // One batch, per entry: a delete of u1, an older change of u2.
    assert_eq!(
        s.invalidate_older(&[(&e1, None), (&e2, Some(3))])
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.get(&e1.value, None).await.unwrap(), None);
    assert!(s.get(&e2.value, None).await.unwrap().is_some());
    // Applied again (a duplicate): nothing more to do, no error.
    assert_eq!(s.invalidate_older(&[(&e1, None)]).await.unwrap(), 0);
    cleanup(&ns).await;
}

pub async fn feed_event_keeps_the_pending_copy(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let q = queue(&ns);
    cache_with_stale(&*s, &e, 1).await;
    let out = s.accept(&accept_req(&e, &q, 1, "v2", 2)).await.unwrap();
    assert!(matches!(out, AcceptOutcome::Accepted { .. }), "{out:?}");
    // A change the write-behind write has not seen yet (version 3) drops
    // the value; the accepted write still waits for the database.
    assert_eq!(s.invalidate_older(&[(&e, Some(3))]).await.unwrap(), 1);
    assert_eq!(s.get(&e.value, None).await.unwrap(), None);
    let copies = s.pending_copies(&[&e]).await.unwrap();
    assert_eq!(name_of(copies[0].as_ref().unwrap()), "v2");
    cleanup(&ns).await;
}

/// Fills `e` with a value (and stale copy) loaded at stamps `epoch`.
async fn cache_at_epoch(s: &dyn Store, e: &EntryKeys, epoch: u64) {
    let token = format!("fill-at-{epoch}");
    s.acquire(&[acq(e, &token)]).await.unwrap();
    let bytes = codec::encode_with(
        &Row {
            id: "x".into(),
            name: format!("at {epoch}"),
            version: 1,
        },
        1,
        codec::DEFAULT_MAX_VALUE_BYTES,
        &codec::Header {
            expires_ms: 0,
            epoch,
            tags: &[],
        },
    )
    .unwrap()
    .envelope;
    let out = s
        .fill(&[FillRequest {
            keys: e,
            token: &token,
            value: FillValue::Value { bytes, version: 1 },
            lifetimes: life(60_000, 120_000),
        }])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
}

/// A sweep after a clear at epoch 100 removes the type's values loaded
/// before it (and their stale copies), and keeps later fills, entries with
/// a pending write-behind write, and other types.
pub async fn sweep_removes_what_a_clear_covered(b: Backend) {
    let s = b.store();
    let ns = ns();
    let kb = keys(&*s, &ns);
    let profile = |id: &str| kb.entry(&Kind::new("profile"), id).unwrap();
    let (old, plain, later, pending) = (
        profile("old"),
        profile("plain"),
        profile("later"),
        profile("pending"),
    );
    let other = kb.entry(&Kind::new("settings"), "old").unwrap();
    cache_at_epoch(&*s, &old, 99).await;
    // A value without kura's header counts as epoch 0.
    cache_with_stale(&*s, &plain, 1).await;
    cache_at_epoch(&*s, &later, 100).await;
    cache_at_epoch(&*s, &pending, 50).await;
    let q = queue(&ns);
    let mut req = accept_req(&pending, &q, 1, "pending", 2);
    req.lifetimes = life(60_000, 0);
    assert!(matches!(
        s.accept(&req).await.unwrap(),
        AcceptOutcome::Accepted { .. }
    ));
    cache_at_epoch(&*s, &other, 1).await;
    let pattern = kb.pattern(&Kind::new("profile"), "*").unwrap();
    assert_eq!(s.sweep(&pattern, 100).await.unwrap(), 2, "old and plain");
    for gone in [&old, &plain] {
        assert_eq!(s.get(&gone.value, None).await.unwrap(), None);
        assert_eq!(
            s.get(&gone.stale, None).await.unwrap(),
            None,
            "stale copy too"
        );
    }
    for kept in [&later, &pending, &other] {
        assert!(
            s.get(&kept.value, None).await.unwrap().is_some(),
            "{}",
            kept.value
        );
    }
    assert_eq!(
        s.sweep(&pattern, 100).await.unwrap(),
        0,
        "nothing left to sweep"
    );
    cleanup(&ns).await;
}

/// A position goes back only from the value expected.
pub async fn feed_position_rewinds_only_from_what_it_holds(b: Backend) {
    let s = b.store();
    let ns = ns();
    let key = keys(&*s, &ns).internal("feed:position");
    assert!(!s.rewind(&key, 5, 3).await.unwrap(), "nothing held");
    assert_eq!(s.advance(&key, 10).await.unwrap(), 10);
    assert!(!s.rewind(&key, 9, 3).await.unwrap(), "moved meanwhile");
    assert!(s.rewind(&key, 10, 3).await.unwrap());
    assert_eq!(s.get(&key, None).await.unwrap().unwrap(), &b"3"[..]);
    assert_eq!(
        s.advance(&key, 4).await.unwrap(),
        4,
        "forward again from there"
    );
    cleanup(&ns).await;
}

pub async fn feed_position_only_moves_forward(b: Backend) {
    let stores = b.fleet(8);
    let ns = ns();
    let key = keys(&*stores[0], &ns).internal("feed:position");
    let s = &stores[0];
    assert_eq!(s.get(&key, None).await.unwrap(), None);
    assert_eq!(s.advance(&key, 5).await.unwrap(), 5);
    assert_eq!(s.advance(&key, 3).await.unwrap(), 5, "not backwards");
    assert_eq!(s.advance(&key, 5).await.unwrap(), 5);
    // Compared as numbers: 10 > 9.
    assert_eq!(s.advance(&key, 9).await.unwrap(), 9);
    assert_eq!(s.advance(&key, 10).await.unwrap(), 10);
    assert_eq!(s.get(&key, None).await.unwrap().unwrap(), &b"10"[..]);
    // Concurrent relays report positions in any order; every value any of
    // them sees (the step's answer, a plain read) never goes down.
    let mut tasks = Vec::new();
    for (i, st) in stores.iter().enumerate() {
        let st = st.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for j in 0..60u64 {
                // Values from 10 to ~1000, not in order across tasks.
                let v = 10 + (j * 17 + i as u64 * 101) % 1000;
                seen.push(st.advance(&key, v).await.unwrap());
                let read = st.get(&key, None).await.unwrap().unwrap();
                seen.push(std::str::from_utf8(&read).unwrap().parse::<u64>().unwrap());
            }
            seen
        }));
    }
    let mut top = 0;
    for t in tasks {
        let seen = t.await.unwrap();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "a relay saw the position go back: {seen:?}"
        );
        top = top.max(*seen.last().unwrap());
    }
    let max = (0..8u64)
        .flat_map(|i| (0..60u64).map(move |j| 10 + (j * 17 + i * 101) % 1000))
        .max()
        .unwrap();
    let held = s.get(&key, None).await.unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&held).unwrap(), max.to_string());
    assert!(top <= max);
    cleanup(&ns).await;
}

pub async fn refresh_lease_only_over_a_cached_value(b: Backend) {
    let s = b.store();
    let ns = ns();
    let e = entry(&*s, &ns, "u1");
    let ttl = Duration::from_secs(5);
    let at = |name: &str, version: u64, expires_ms: u64| {
        let row = Row {
            id: "x".into(),
            name: name.into(),
            version,
        };
        let h = codec::Header {
            expires_ms,
            ..codec::Header::default()
        };
        codec::encode_with(&row, version, codec::DEFAULT_MAX_VALUE_BYTES, &h)
            .unwrap()
            .envelope
    };
    assert!(
        !s.refresh_lease(&e, "R", ttl, 1000).await.unwrap(),
        "nothing cached: a miss's lease, not a refresh"
    );
    s.acquire(&[acq(&e, "A")]).await.unwrap();
    s.fill(&[fill_req(&e, "A", at("a", 3, 1000), 3)])
        .await
        .unwrap();
    assert!(
        !s.refresh_lease(&e, "R", ttl, 999).await.unwrap(),
        "not the value the caller read"
    );
    assert!(s.refresh_lease(&e, "R", ttl, 1000).await.unwrap());
    assert!(
        !s.refresh_lease(&e, "R2", ttl, 1000).await.unwrap(),
        "one refresh at a time"
    );
    // Readers still get the cached value while the refresh runs.
    match &s.acquire(&[acq(&e, "C")]).await.unwrap()[0] {
        Acquired::Value(b) => assert_eq!(name_of(b), "a"),
        other => panic!("expected the value, got {other:?}"),
    }
    // The same version replaces the value (a reload resets its lifetime).
    let out = s
        .refill(&[fill_req(&e, "R", at("same", 3, 2000), 3)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::Stored]);
    assert_eq!(
        name_of(&s.get(&e.value, None).await.unwrap().unwrap()),
        "same"
    );
    // A reader that saw the value before the refill cannot start another.
    assert!(!s.refresh_lease(&e, "late", ttl, 1000).await.unwrap());
    // An older one does not, and an update voids the refresh lease.
    assert!(s.refresh_lease(&e, "R3", ttl, 2000).await.unwrap());
    let out = s
        .refill(&[fill_req(&e, "R3", at("old", 2, 3000), 2)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::NotNewer]);
    assert!(s.refresh_lease(&e, "R4", ttl, 2000).await.unwrap());
    s.update(&[UpdateRequest {
        keys: &e,
        bytes: at("written", 4, 4000),
        version: 4,
        lifetimes: life(60_000, 0),
    }])
    .await
    .unwrap();
    let out = s
        .refill(&[fill_req(&e, "R4", at("reloaded", 4, 5000), 4)])
        .await
        .unwrap();
    assert_eq!(out, vec![FillOutcome::LeaseLost]);
    assert_eq!(
        name_of(&s.get(&e.value, None).await.unwrap().unwrap()),
        "written"
    );
    cleanup(&ns).await;
}

pub async fn stamps_bump_atomically(b: Backend) {
    let s = b.store();
    let ns = ns();
    let key = format!("{ns}:~stamps");
    assert!(s.stamps(&key).await.unwrap().is_empty());
    let before = s.stamps_version();
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let start = now_us();
    let e1 = s.bump_stamp(&key, "kind:profile", 0).await.unwrap();
    let e2 = s.bump_stamp(&key, "tag:tenant:a", 0).await.unwrap();
    let e3 = s.bump_stamp(&key, "kind:profile", 0).await.unwrap();
    // The store's clock (the same machine's here), strictly increasing.
    assert!(
        e1 + 5_000_000 >= start && e1 <= now_us() + 5_000_000,
        "{e1} vs {start}"
    );
    assert!(e1 < e2 && e2 < e3, "{e1} {e2} {e3}");
    let mut got = s.stamps(&key).await.unwrap();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("epoch".to_owned(), e3),
            ("id".to_owned(), e1),
            ("kind:profile".to_owned(), e3),
            ("tag:tenant:a".to_owned(), e2)
        ]
    );
    // A caller that knows a higher epoch (the store's clock went back, or
    // the hash was made again) gets one above it.
    let ahead = e3 + 10_000_000_000;
    assert_eq!(
        s.bump_stamp(&key, "kind:x", ahead).await.unwrap(),
        ahead + 1
    );
    if let Some(v) = before {
        assert!(
            s.stamps_version().unwrap() > v,
            "a local store counts changes"
        );
    }
    // Concurrent bumps each get an epoch of their own.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            s.bump_stamp(&key, &format!("tag:t{i}"), 0).await.unwrap()
        }));
    }
    let mut epochs = Vec::new();
    for t in tasks {
        epochs.push(t.await.unwrap());
    }
    epochs.sort_unstable();
    epochs.dedup();
    assert_eq!(epochs.len(), 20, "each its own epoch");
    assert!(epochs[0] > ahead + 1);
    // The hash is under the namespace: the cleanup removes it.
    cleanup(&ns).await;
}
/// Every case, one after another, against one backend.
pub async fn run_all(b: Backend) {
    accept_is_compare_and_set_and_durable(b.clone()).await;
    queue_delivers_reclaims_and_acknowledges(b.clone()).await;
    dead_letters_drop_the_write(b.clone()).await;
    conflict_is_reported_before_a_full_queue(b.clone()).await;
    dead_letter_names_the_entity_of_the_request(b.clone()).await;
    accept_without_a_cached_version_is_not_acknowledged(b.clone()).await;
    dead_letters_are_bounded(b.clone()).await;
    a_retried_write_goes_to_the_end_of_the_queue(b.clone()).await;
    lease_is_exclusive_and_reentrant(b.clone()).await;
    fill_lands_only_under_the_lease(b.clone()).await;
    invalidation_voids_the_lease(b.clone()).await;
    update_voids_the_lease_and_only_replaces_older(b.clone()).await;
    not_found_is_remembered_and_cleared(b.clone()).await;
    stale_copy_outlives_the_value(b.clone()).await;
    release_only_by_the_holder(b.clone()).await;
    lease_expires(b.clone()).await;
    batches_are_per_entry(b.clone()).await;
    pattern_invalidation_counts_matches_only(b.clone()).await;
    values_expire_and_refresh(b.clone()).await;
    discard_removes_only_what_was_seen(b.clone()).await;
    counters_add_up(b.clone()).await;
    locks_are_owned(b.clone()).await;
    foreign_values_without_version_are_replaceable(b.clone()).await;
    fill_without_stale_drops_the_old_stale_copy(b.clone()).await;
    refresh_extends_the_stale_copy(b.clone()).await;
    feed_event_invalidates_only_older_values(b.clone()).await;
    feed_event_fences_loads_in_flight(b.clone()).await;
    feed_delete_event_always_invalidates(b.clone()).await;
    feed_event_keeps_the_pending_copy(b.clone()).await;
    feed_position_only_moves_forward(b.clone()).await;
    refresh_lease_only_over_a_cached_value(b.clone()).await;
    stamps_bump_atomically(b.clone()).await;
    sweep_removes_what_a_clear_covered(b.clone()).await;
    feed_position_rewinds_only_from_what_it_holds(b.clone()).await;
}
