use super::*;
use crate::feed::source::pgoutput::{Column, Relation, Tuple, encode};
use proptest::prelude::*;

const PROFILES: u32 = 16384;
const OTHER: u32 = 16390;

fn changes(bulk: usize) -> WalChanges {
    let mut w = WalChanges::new(
        [WalTable {
            schema: "public".into(),
            table: "profiles".into(),
            kind: "profile".into(),
            id_column: "user_id".into(),
        }],
        bulk,
        100,
    );
    let rel = |id, name: &str| {
        Message::Relation(Relation {
            id,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'i',
            columns: vec![
                Column {
                    name: "id".into(),
                    key: false,
                },
                Column {
                    name: "user_id".into(),
                    key: true,
                },
                Column {
                    name: "version".into(),
                    key: false,
                },
            ],
        })
    };
    w.change(&encode(&rel(PROFILES, "profiles"))).unwrap();
    w.change(&encode(&rel(OTHER, "documents"))).unwrap();
    w
}

fn row(user: &str) -> Tuple {
    vec![
        Value::Text("x".into()),
        Value::Text(user.into()),
        Value::Text("1".into()),
    ]
}

fn ids(w: &WalChanges) -> Vec<(u64, String, bool)> {
    w.read(0, u64::MAX, None, usize::MAX)
        .into_iter()
        .map(|(p, e)| (p, e.id, e.clear))
        .collect()
}

#[test]
fn changes_are_readable_at_their_commit_once_it_is_received() {
    let mut w = changes(100);
    assert_eq!(w.watermark(), 100);
    w.begin(200, 1);
    w.change(&encode(&Message::Insert {
        relation: PROFILES,
        new: row("a"),
    }))
    .unwrap();
    w.change(&encode(&Message::Update {
        relation: PROFILES,
        old: None,
        new: row("b"),
    }))
    .unwrap();
    // A table that is not fed.
    w.change(&encode(&Message::Insert {
        relation: OTHER,
        new: row("z"),
    }))
    .unwrap();
    // A keepalive inside a transaction does not move the watermark.
    w.keepalive(500);
    assert_eq!(w.watermark(), 100);
    assert!(ids(&w).is_empty(), "nothing before the commit");
    w.commit(200, 240, 1);
    assert_eq!(w.watermark(), 240);
    assert_eq!(
        ids(&w),
        vec![(200, "a".into(), false), (200, "b".into(), false)]
    );
    // Every event carries no version: the LSN rule.
    assert!(
        w.read(0, u64::MAX, None, 9)
            .iter()
            .all(|(_, e)| e.version.is_none())
    );
    w.keepalive(300);
    assert_eq!(w.watermark(), 300);
    // [from, to) and paging.
    assert_eq!(w.read(0, 200, None, 9).len(), 0);
    let first = w.read(200, 300, None, 1);
    assert_eq!(first.len(), 1);
    let next = w.read(200, 300, Some((first[0].0, first[0].1.seq)), 9);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1.id, "b");
    assert_eq!(w.backlog(200), 2);
    assert_eq!(w.oldest(), Some(200));
    assert_eq!(w.release(240), 2);
    assert_eq!(w.backlog(0), 0);
}

#[test]
fn deletes_key_changes_truncates_and_bulk_transactions() {
    let mut w = changes(3);
    w.begin(200, 1);
    w.change(&encode(&Message::Delete {
        relation: PROFILES,
        old: vec![Value::Null, Value::Text("d".into()), Value::Null],
    }))
    .unwrap();
    w.change(&encode(&Message::Update {
        relation: PROFILES,
        old: Some(vec![Value::Null, Value::Text("old".into()), Value::Null]),
        new: row("new"),
    }))
    .unwrap();
    // The same row twice in one transaction: one event.
    w.change(&encode(&Message::Update {
        relation: PROFILES,
        old: None,
        new: row("new"),
    }))
    .unwrap();
    w.commit(200, 210, 1);
    assert_eq!(
        ids(&w),
        vec![
            (200, "d".into(), false),
            (200, "old".into(), false),
            (200, "new".into(), false)
        ]
    );
    w.release(u64::MAX);
    // More than 3 rows of a kind in one transaction: one clear.
    w.begin(300, 1);
    for i in 0..5 {
        w.change(&encode(&Message::Insert {
            relation: PROFILES,
            new: row(&format!("u{i}")),
        }))
        .unwrap();
    }
    w.commit(300, 310, 1);
    assert_eq!(ids(&w), vec![(300, String::new(), true)]);
    w.release(u64::MAX);
    w.begin(400, 1);
    w.change(&encode(&Message::Truncate {
        relations: vec![OTHER, PROFILES],
    }))
    .unwrap();
    w.commit(400, 410, 1);
    assert_eq!(ids(&w), vec![(400, String::new(), true)]);
}

#[test]
fn a_row_whose_id_cannot_be_read_clears_its_kind() {
    let mut w = changes(100);
    w.begin(200, 1);
    // A NULL id.
    w.change(&encode(&Message::Insert {
        relation: PROFILES,
        new: vec![Value::Null, Value::Null, Value::Null],
    }))
    .unwrap();
    w.commit(200, 210, 1);
    assert_eq!(ids(&w), vec![(200, String::new(), true)]);
    // A relation never described.
    w.begin(300, 1);
    w.change(&encode(&Message::Insert {
        relation: 999,
        new: row("a"),
    }))
    .unwrap();
    w.commit(300, 310, 1);
    assert!(w.read(300, u64::MAX, None, 9)[0].1.clear);
    assert_eq!(w.unreadable(), 2);
    // A malformed message is an error, and changes nothing.
    assert!(w.change(b"I\0").is_err());
}

// ---------------------------------------------------------------------------
// The version rule, against a model: one row in a database, writers that do
// or do not raise its version, a stream delivering each commit's event in
// commit order after the commit, loads that read the row and fill later
// under a lease, and the cache applying events by one of two rules.

#[derive(Debug, Clone, Copy)]
enum Op {
    /// A committed write; `bump`: the writer raised the version.
    Write { bump: bool },
    /// Load `i` begins: takes its lease and reads the row.
    Start(usize),
    /// Load `i` fills with what it read (if it may).
    Fill(usize),
    /// The next event of the stream is applied.
    Deliver,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// Ours: an event invalidates unconditionally and voids loads in flight.
    Lsn,
    /// Trust the version: keep a cached value of the same or a newer
    /// version; a load in flight fills if it read that version or newer.
    Version,
}

#[derive(Debug, Default)]
struct Model {
    content: u64,
    version: u64,
    /// Events committed, not yet applied (their row version).
    stream: VecDeque<u64>,
    /// Cached (content, version).
    cached: Option<(u64, u64)>,
    /// Bumped by every applied event (the lease fence).
    generation: u64,
    /// The version floor loads in flight must reach (version rule).
    floor: u64,
    /// Loads in flight: (generation at start, content, version read).
    loads: [Option<(u64, u64, u64)>; 3],
}

impl Model {
    fn run(&mut self, rule: Rule, op: Op) {
        match op {
            Op::Write { bump } => {
                self.content += 1;
                if bump {
                    self.version += 1;
                }
                self.stream.push_back(self.version);
            }
            Op::Start(i) => {
                self.loads[i] = Some((self.generation, self.content, self.version));
            }
            Op::Fill(i) => {
                if let Some((generation, content, version)) = self.loads[i].take() {
                    let ok = match rule {
                        Rule::Lsn => generation == self.generation,
                        Rule::Version => version >= self.floor,
                    };
                    if ok {
                        self.cached = Some((content, version));
                    }
                }
            }
            Op::Deliver => {
                if let Some(v) = self.stream.pop_front() {
                    match rule {
                        Rule::Lsn => {
                            self.cached = None;
                            self.generation += 1;
                        }
                        Rule::Version => {
                            if self.cached.is_some_and(|(_, cv)| cv < v) {
                                self.cached = None;
                            }
                            self.floor = self.floor.max(v);
                        }
                    }
                }
            }
        }
    }

    /// Once every committed event was applied, the cache holds nothing or
    /// the database's row.
    fn fresh(&self) -> bool {
        !self.stream.is_empty() || self.cached.is_none_or(|(c, _)| c == self.content)
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<bool>().prop_map(|bump| Op::Write { bump }),
        (0usize..3).prop_map(Op::Start),
        (0usize..3).prop_map(Op::Fill),
        Just(Op::Deliver),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the interleaving, and whether writers raise the version or
    /// not: once every event was applied, nothing stale is cached (and
    /// nothing stale fills later).
    #[test]
    fn the_lsn_rule_never_keeps_a_stale_value(ops in prop::collection::vec(op(), 0..40)) {
        let mut m = Model::default();
        for op in ops {
            m.run(Rule::Lsn, op);
            prop_assert!(m.fresh(), "stale after {op:?}: {m:?}");
        }
    }
}

/// The version rule is right only if every writer raises the version: a
/// write that leaves it keeps a stale value cached for its whole TTL.
#[test]
fn the_version_rule_keeps_a_stale_value_when_a_writer_leaves_the_version() {
    let script = [
        Op::Start(0),
        Op::Fill(0),
        Op::Write { bump: false },
        Op::Deliver,
    ];
    let mut m = Model::default();
    for op in script {
        m.run(Rule::Version, op);
    }
    assert!(!m.fresh(), "{m:?}");
    let mut m = Model::default();
    for op in script {
        m.run(Rule::Lsn, op);
    }
    assert!(m.fresh(), "{m:?}");
}
