//! The memory store's unit tests: every step, the byte accounting and
//! eviction, and a property test of the accounting against its entries.

use super::*;
use crate::store::{
    AcceptRequest, AcquireRequest, Acquired, QueueKeys, QueueStore, Settled, Store, UpdateRequest,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Audit {
    /// The sum of the shards' byte counts.
    accounted: usize,
    /// The sizes of the slots held, expired parts included.
    held: usize,
    /// The sizes of the slots held, counting only their live parts.
    live: usize,
}

impl MemoryStore {
    fn audit(&self) -> Audit {
        let now = self.now();
        let mut a = Audit {
            accounted: 0,
            held: 0,
            live: 0,
        };
        for shard in self.inner.shards.iter() {
            let shard = lock(shard);
            a.accounted += shard.slots.bytes();
            for (k, slot) in shard.slots.iter() {
                a.held += slot.size(k);
                a.live += slot.live_size(k, now);
            }
        }
        a
    }
}

impl Slot {
    /// The size the slot would have once its expired parts are dropped (0
    /// when nothing is left).
    fn live_size(&self, key: &str, now: Instant) -> usize {
        let value = self
            .value
            .as_ref()
            .filter(|t| t.live(now))
            .map_or(0, |t| t.v.len());
        let stale = self
            .stale
            .as_ref()
            .filter(|t| t.live(now))
            .map_or(0, |t| t.v.len());
        let lease = self
            .lease
            .as_ref()
            .filter(|t| t.live(now))
            .map_or(0, |t| t.v.len());
        let pending = self.pending.as_ref().map_or(0, Bytes::len);
        let any = self.value.as_ref().is_some_and(|t| t.live(now))
            || self.stale.as_ref().is_some_and(|t| t.live(now))
            || self.lease.as_ref().is_some_and(|t| t.live(now))
            || self.absent.is_some_and(|t| t > now)
            || self.pending.is_some();
        if any {
            ENTRY_OVERHEAD + key.len() + value + stale + lease + pending
        } else {
            0
        }
    }
}

use crate::key::{KeyBuilder, Kind};
use crate::store::Lifetimes;
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

const IDS: [&str; 4] = ["a1", "a2", "b1", "b2"];

fn kb() -> KeyBuilder {
    KeyBuilder::new("t", false).unwrap()
}

fn entries() -> Vec<EntryKeys> {
    IDS.iter()
        .map(|id| kb().entry(&Kind::new("profile"), id).unwrap())
        .collect()
}

fn queue() -> QueueKeys {
    QueueKeys {
        stream: "t:~wb:profile".into(),
        dead: "t:~wb:profile:dead".into(),
        group: "kura".into(),
    }
}

fn envelope(version: u64, len: usize) -> Bytes {
    Bytes::from(format!(
        "{{\"_v\":{version},\"p\":\"{}\"}}",
        "x".repeat(len)
    ))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn life(ttl: u64, stale: u64) -> Lifetimes {
    Lifetimes {
        ttl: ms(ttl),
        stale_ttl: ms(stale),
    }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn fill(s: &MemoryStore, e: &EntryKeys, version: u64, len: usize, l: Lifetimes) {
    assert_eq!(
        try_fill(s, e, version, len, l).await,
        Some(FillOutcome::Stored)
    );
}

/// Takes the lease and fills, as a reader that missed does; `None` when
/// the lease was not granted (a value, a pending copy or another
/// holder).
async fn try_fill(
    s: &MemoryStore,
    e: &EntryKeys,
    version: u64,
    len: usize,
    l: Lifetimes,
) -> Option<FillOutcome> {
    let acq = AcquireRequest {
        keys: e,
        token: "T",
        lease_ttl: ms(5_000),
        value_ttl: ms(60_000),
    };
    let got = s.acquire(&[acq]).await.unwrap();
    if !matches!(got[0], Acquired::Leased { .. }) {
        return None;
    }
    let mut out = s
        .fill(&[FillRequest {
            keys: e,
            token: "T",
            value: FillValue::Value {
                bytes: envelope(version, len),
                version,
            },
            lifetimes: l,
        }])
        .await
        .unwrap();
    out.pop()
}

fn assert_exact(s: &MemoryStore) {
    let a = s.audit();
    assert_eq!(a.accounted, a.held, "the count drifted: {a:?}");
    assert_eq!(s.used_bytes(), a.accounted);
    assert_eq!(
        s.inner.total.load(Ordering::Relaxed),
        a.accounted,
        "the store-wide total drifted from the shards' counts"
    );
    assert!(a.live <= a.held, "{a:?}");
}

#[test]
fn the_bound_holds_for_the_store_as_a_whole() {
    run(async {
        // 64 shards: a per-shard share of the bound would evict from
        // the shards the hash made fuller than average.
        let s = MemoryStore::with_shards(64, 256 * 1024);
        let es: Vec<EntryKeys> = (0..200)
            .map(|i| kb().entry(&Kind::new("profile"), &format!("w{i}")).unwrap())
            .collect();
        for e in &es {
            fill(&s, e, 1, 600, life(600_000, 0)).await;
        }
        assert_exact(&s);
        // About half the bound: every entry is still there.
        assert!(s.used_bytes() < 192 * 1024, "{}", s.used_bytes());
        let keys: Vec<&str> = es.iter().map(|e| e.value.as_str()).collect();
        let got = s.get_many(&keys).await.unwrap();
        assert_eq!(
            got.iter().flatten().count(),
            es.len(),
            "evicted under half the bound"
        );
        // Twice the bound written: the store stays near its bound.
        let more: Vec<EntryKeys> = (0..800)
            .map(|i| kb().entry(&Kind::new("profile"), &format!("m{i}")).unwrap())
            .collect();
        for e in &more {
            fill(&s, e, 1, 600, life(600_000, 0)).await;
        }
        assert_exact(&s);
        assert!(
            s.used_bytes() <= 256 * 1024 + 4 * 1024,
            "{}",
            s.used_bytes()
        );
    });
}

#[test]
fn used_bytes_is_what_an_entry_holds() {
    run(async {
        let s = MemoryStore::new();
        assert_eq!(s.used_bytes(), 0);
        let e = &entries()[0];
        fill(&s, e, 1, 10, life(60_000, 120_000)).await;
        let v = envelope(1, 10).len();
        assert_eq!(s.used_bytes(), ENTRY_OVERHEAD + e.value.len() + 2 * v);
        s.invalidate(&[e]).await.unwrap();
        assert_eq!(s.used_bytes(), 0);
    });
}

#[test]
fn a_read_that_finds_everything_expired_frees_the_entry() {
    run(async {
        let s = MemoryStore::new();
        let e = &entries()[0];
        fill(&s, e, 1, 10, life(1_000, 2_000)).await;
        s.advance(ms(3_000));
        assert_eq!(s.get(&e.value, None).await.unwrap(), None);
        assert_exact(&s);
        assert_eq!(s.used_bytes(), 0);
    });
}

#[test]
fn a_read_that_finds_the_value_expired_frees_its_bytes() {
    run(async {
        let s = MemoryStore::new();
        let e = &entries()[0];
        fill(&s, e, 1, 100, life(1_000, 60_000)).await;
        s.advance(ms(2_000));
        assert_eq!(s.get(&e.value, None).await.unwrap(), None);
        assert_exact(&s);
        let stale = envelope(1, 100).len();
        assert_eq!(s.used_bytes(), ENTRY_OVERHEAD + e.value.len() + stale);
    });
}

#[test]
fn pattern_invalidation_frees_whole_entries() {
    run(async {
        let s = MemoryStore::new();
        for e in &entries() {
            fill(&s, e, 1, 50, life(60_000, 0)).await;
        }
        let all = kb().pattern(&Kind::new("profile"), "*").unwrap();
        assert_eq!(s.invalidate_matching(&all).await.unwrap(), 4);
        assert_exact(&s);
        assert_eq!(s.used_bytes(), 0);
    });
}

#[test]
fn eviction_frees_what_it_charged() {
    run(async {
        // One shard of 1 KiB: every fill past the bound evicts.
        let s = MemoryStore::with_shards(1, 1024);
        let es: Vec<EntryKeys> = (0..40)
            .map(|i| kb().entry(&Kind::new("profile"), &format!("e{i}")).unwrap())
            .collect();
        for (i, e) in es.iter().enumerate() {
            fill(&s, e, 1, 100, life(1_000 + i as u64 * 50, 0)).await;
            // Some values expire while others are still written.
            s.advance(ms(40));
            s.get(&es[i / 2].value, None).await.unwrap();
            assert_exact(&s);
            assert!(s.used_bytes() <= 1024 + 400, "{}", s.used_bytes());
        }
    });
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    Acquire {
        k: usize,
        token: u8,
    },
    Fill {
        k: usize,
        token: u8,
        version: u64,
        len: usize,
        ttl: u64,
        stale: u64,
    },
    FillAbsent {
        k: usize,
        token: u8,
        ttl: u64,
    },
    Release {
        k: usize,
        token: u8,
    },
    Update {
        k: usize,
        version: u64,
        len: usize,
        ttl: u64,
        stale: u64,
    },
    Invalidate {
        k: usize,
    },
    InvalidateMatching {
        all: bool,
    },
    Discard {
        k: usize,
    },
    Set {
        k: usize,
        len: usize,
        ttl: u64,
    },
    Get {
        k: usize,
        refresh: Option<u64>,
    },
    Accept {
        k: usize,
        len: usize,
        ttl: u64,
        stale: u64,
    },
    Ack {
        k: usize,
    },
    DeadLetter {
        k: usize,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..IDS.len();
    let token = 0u8..3;
    let ttl = 1u64..3_000;
    let stale = prop_oneof![Just(0u64), 1u64..6_000];
    let len = 0usize..300;
    prop_oneof![
        (k.clone(), token.clone()).prop_map(|(k, token)| Op::Acquire { k, token }),
        (
            k.clone(),
            token.clone(),
            1u64..20,
            len.clone(),
            ttl.clone(),
            stale.clone()
        )
            .prop_map(|(k, token, version, len, ttl, stale)| Op::Fill {
                k,
                token,
                version,
                len,
                ttl,
                stale
            }),
        (k.clone(), token.clone(), ttl.clone()).prop_map(|(k, token, ttl)| Op::FillAbsent {
            k,
            token,
            ttl
        }),
        (k.clone(), token).prop_map(|(k, token)| Op::Release { k, token }),
        (k.clone(), 1u64..20, len.clone(), ttl.clone(), stale.clone()).prop_map(
            |(k, version, len, ttl, stale)| Op::Update {
                k,
                version,
                len,
                ttl,
                stale
            }
        ),
        k.clone().prop_map(|k| Op::Invalidate { k }),
        any::<bool>().prop_map(|all| Op::InvalidateMatching { all }),
        k.clone().prop_map(|k| Op::Discard { k }),
        (k.clone(), len.clone(), ttl.clone()).prop_map(|(k, len, ttl)| Op::Set { k, len, ttl }),
        (k.clone(), prop::option::of(ttl.clone())).prop_map(|(k, refresh)| Op::Get { k, refresh }),
        (k.clone(), len, ttl, stale).prop_map(|(k, len, ttl, stale)| Op::Accept {
            k,
            len,
            ttl,
            stale
        }),
        k.clone().prop_map(|k| Op::Ack { k }),
        k.prop_map(|k| Op::DeadLetter { k }),
        (0u64..4_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The version of the entry's current write (pending copy, else value).
async fn current(s: &MemoryStore, e: &EntryKeys) -> u64 {
    let pending = s.pending_copies(&[e]).await.unwrap().remove(0);
    let cur = match pending {
        Some(p) => Some(p),
        None => s.get(&e.value, None).await.unwrap(),
    };
    cur.and_then(|b| peek_version(&b)).unwrap_or(0)
}

async fn settle(s: &MemoryStore, e: &EntryKeys, dead: bool) {
    let Some(p) = s.pending_copies(&[e]).await.unwrap().remove(0) else {
        return;
    };
    let settled = Settled {
        id: "x",
        keys: e,
        version: peek_version(&p).unwrap_or(0),
        entry_ids: &[],
    };
    if dead {
        s.queue_dead_letter(&queue(), &[(settled, "refused", p)], 0)
            .await
            .unwrap();
    } else {
        s.queue_ack(&queue(), &[settled]).await.unwrap();
    }
}

async fn apply(s: &MemoryStore, es: &[EntryKeys], op: &Op) {
    let tok = |t: u8| ["A", "B", "C"][usize::from(t)];
    match *op {
        Op::Acquire { k, token } => {
            s.acquire(&[AcquireRequest {
                keys: &es[k],
                token: tok(token),
                lease_ttl: ms(2_000),
                value_ttl: ms(1_500),
            }])
            .await
            .unwrap();
        }
        Op::Fill {
            k,
            token,
            version,
            len,
            ttl,
            stale,
        } => {
            s.fill(&[FillRequest {
                keys: &es[k],
                token: tok(token),
                value: FillValue::Value {
                    bytes: envelope(version, len),
                    version,
                },
                lifetimes: life(ttl, stale),
            }])
            .await
            .unwrap();
        }
        Op::FillAbsent { k, token, ttl } => {
            s.fill(&[FillRequest {
                keys: &es[k],
                token: tok(token),
                value: FillValue::Absent,
                lifetimes: life(ttl, 0),
            }])
            .await
            .unwrap();
        }
        Op::Release { k, token } => s.release(&[(&es[k], tok(token))]).await.unwrap(),
        Op::Update {
            k,
            version,
            len,
            ttl,
            stale,
        } => {
            s.update(&[UpdateRequest {
                keys: &es[k],
                bytes: envelope(version, len),
                version,
                lifetimes: life(ttl, stale),
            }])
            .await
            .unwrap();
        }
        Op::Invalidate { k } => {
            s.invalidate(&[&es[k]]).await.unwrap();
        }
        Op::InvalidateMatching { all } => {
            let glob = if all { "*" } else { "a*" };
            let p = kb().pattern(&Kind::new("profile"), glob).unwrap();
            s.invalidate_matching(&p).await.unwrap();
        }
        Op::Discard { k } => {
            if let Some(v) = s.get(&es[k].value, None).await.unwrap() {
                s.discard(&es[k].value, &v).await.unwrap();
            }
        }
        Op::Set { k, len, ttl } => {
            s.set(&es[k].value, envelope(0, len), ms(ttl))
                .await
                .unwrap();
        }
        Op::Get { k, refresh } => {
            s.get(&es[k].value, refresh.map(ms)).await.unwrap();
        }
        Op::Accept { k, len, ttl, stale } => {
            let cur = current(s, &es[k]).await;
            s.accept(&AcceptRequest {
                keys: &es[k],
                queue: &queue(),
                id: IDS[k],
                expected_version: cur,
                bytes: envelope(cur + 1, len),
                version: cur + 1,
                lifetimes: life(ttl, stale),
                max_depth: 0,
                max_age: Duration::ZERO,
                min_replicas: 0,
                replica_timeout: Duration::ZERO,
            })
            .await
            .unwrap();
        }
        Op::Ack { k } => settle(s, &es[k], false).await,
        Op::DeadLetter { k } => settle(s, &es[k], true).await,
        Op::Advance { ms: n } => s.advance(ms(n)),
    }
}

/// After everything expired and every pending copy is settled, reading
/// each key once (lazy expiry, nothing test-only) empties the store.
async fn drain(s: &MemoryStore, es: &[EntryKeys]) {
    s.advance(Duration::from_secs(3_600));
    for e in es {
        settle(s, e, false).await;
        s.get(&e.value, None).await.unwrap();
    }
    assert_exact(s);
    assert_eq!(s.used_bytes(), 0, "{:?}", s.audit());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any sequence of steps and clock moves keeps the byte count equal
    /// to the sizes of the slots held, and ends at zero once everything
    /// expired.
    #[test]
    fn byte_count_is_exact(
        ops in prop::collection::vec(op(), 1..120),
        small in any::<bool>(),
    ) {
        run(async {
            // Small: two shards of 600 bytes, so most steps evict.
            let s = if small {
                MemoryStore::with_shards(2, 1_200)
            } else {
                MemoryStore::with_shards(2, 1 << 20)
            };
            let es = entries();
            for op in &ops {
                apply(&s, &es, op).await;
                assert_exact(&s);
            }
            drain(&s, &es).await;
        });
    }
}

/// A long random run over many keys with short TTLs: the count never
/// drifts, and it is back to zero once everything expired.
#[test]
fn soak_byte_count_stays_exact() {
    run(async {
        let mut rng = StdRng::seed_from_u64(11);
        let s = MemoryStore::with_shards(8, 64 * 1024);
        let es: Vec<EntryKeys> = (0..200)
            .map(|i| kb().entry(&Kind::new("profile"), &format!("s{i}")).unwrap())
            .collect();
        let all = kb().pattern(&Kind::new("profile"), "*").unwrap();
        for i in 0..30_000u32 {
            let e = &es[rng.random_range(0..es.len())];
            match rng.random_range(0..10) {
                0..=3 => {
                    if s.get(&e.value, None).await.unwrap().is_none() {
                        let v = rng.random_range(1..1_000);
                        let l = life(rng.random_range(1..2_000), rng.random_range(0..4_000));
                        let len = rng.random_range(0..400);
                        try_fill(&s, e, v, len, l).await;
                    }
                }
                4 => {
                    let v = rng.random_range(1..1_000);
                    s.update(&[UpdateRequest {
                        keys: e,
                        bytes: envelope(v, 64),
                        version: v,
                        lifetimes: life(1_000, 3_000),
                    }])
                    .await
                    .unwrap();
                }
                5 => {
                    s.invalidate(&[e]).await.unwrap();
                }
                6 => {
                    let r = rng.random_range(1..3_000);
                    s.get(&e.value, Some(ms(r))).await.unwrap();
                }
                7 => {
                    let cur = current(&s, e).await;
                    let req = AcceptRequest {
                        keys: e,
                        queue: &queue(),
                        id: "x",
                        expected_version: cur,
                        bytes: envelope(cur + 1, 32),
                        version: cur + 1,
                        lifetimes: life(500, 0),
                        max_depth: 0,
                        max_age: Duration::ZERO,
                        min_replicas: 0,
                        replica_timeout: Duration::ZERO,
                    };
                    s.accept(&req).await.unwrap();
                }
                8 => settle(&s, e, rng.random_bool(0.2)).await,
                _ => s.advance(ms(rng.random_range(0..200))),
            }
            if i % 5_000 == 4_999 {
                s.invalidate_matching(&all).await.unwrap();
            }
            if i % 100 == 0 {
                assert_exact(&s);
            }
        }
        assert_exact(&s);
        drain(&s, &es).await;
    });
}
