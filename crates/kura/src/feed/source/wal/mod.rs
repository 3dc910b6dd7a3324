//! The WAL feed's changes: a logical replication stream (`pgoutput`)
//! assembled into [`FeedEvent`]s by commit position, with the watermark a
//! [`super::ChangeSource`] answers. No connection here: a driver hands each
//! message over ([`WalChanges::begin`], [`WalChanges::change`],
//! [`WalChanges::commit`], [`WalChanges::keepalive`]) and serves
//! [`WalChanges::read`] to the relay.
//!
//! # Positions
//!
//! A change's position is its transaction's commit LSN (the start of the
//! commit record), the order in which the publisher sends transactions.
//! The watermark is the end of the last commit record received (or a
//! keepalive's `wal_end` between transactions): every transaction whose
//! commit starts below it has been received whole. Confirming a position
//! `P` to the slot (`flush = P`) makes the server skip, on the next start,
//! exactly the transactions whose commit starts below `P`: the ones the
//! fleet applied.
//!
//! # The version rule: ordered by LSN, not by version
//!
//! A trigger sees the row's version as the writer left it, and kura's
//! writers raise it on every change. A WAL event would too, but a writer
//! that does not touch the version column (`UPDATE profiles SET first_name
//! = …` from psql) leaves it equal to the cached one, and
//! [`crate::Store::invalidate_older`] would keep the stale value. So a WAL
//! event carries **no version**: it invalidates unconditionally and voids
//! the loads in flight (their lease). What is kept is only what is known
//! to be at least as new as the change: a value loaded by a load that
//! began after the event was applied, which read the database after the
//! commit (the publisher sends a transaction only once it committed).
//! Events are applied in commit-LSN order, and applying one twice is
//! harmless (one more miss). The rule is checked against a model of a
//! database, a stream and concurrent loads in this module's tests, where
//! the version rule is shown to keep a stale value.
//!
//! The price: a write through kura invalidates at once (read-your-writes)
//! and its WAL event invalidates once more a few milliseconds later, so a
//! hot key written through kura is loaded twice per write.
//!
//! # Bulk transactions, TRUNCATE and unreadable rows
//!
//! A transaction that changes more than `bulk_clear` rows of a kind clears
//! the kind instead (one event with [`FeedEvent::clear`]); so does a
//! `TRUNCATE`. A row whose id cannot be read (NULL, not in the replica
//! identity of a DELETE, a relation never described) clears its kind:
//! nothing is skipped, and [`WalChanges::unreadable`] counts them.

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::pgoutput::{self, DecodeError, Message, Value};
use crate::feed::FeedEvent;

/// A fed table as the WAL feed maps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalTable {
    /// Its schema (`public` unless qualified).
    pub schema: String,
    /// Its name.
    pub table: String,
    /// The cache kind it feeds.
    pub kind: String,
    /// The column the cache key's id comes from.
    pub id_column: String,
}

#[derive(Debug, Clone)]
struct Rel {
    /// Mapped kind and the index of its id column (`None`: the column is
    /// missing, every change clears the kind).
    mapped: Option<(String, Option<usize>)>,
    /// The id column is in the replica identity key.
    id_in_key: bool,
}

#[derive(Debug, Default)]
struct Open {
    commit_lsn: u64,
    events: Vec<(String, String)>,
    seen: BTreeSet<(String, String)>,
    per_kind: HashMap<String, usize>,
    cleared: BTreeSet<String>,
}

/// A logical replication stream assembled into positioned events.
#[derive(Debug)]
pub struct WalChanges {
    tables: HashMap<(String, String), (String, String)>,
    relations: HashMap<u32, Rel>,
    open: Option<Open>,
    ready: VecDeque<(u64, FeedEvent)>,
    watermark: u64,
    bulk_clear: usize,
    seq: i64,
    unreadable: u64,
    open_ms: i64,
}

impl WalChanges {
    /// Changes of `tables`, starting at `start` (the slot's confirmed
    /// position: everything below it was applied), clearing a kind for a
    /// transaction that changes more than `bulk_clear` of its rows.
    #[must_use]
    pub fn new(tables: impl IntoIterator<Item = WalTable>, bulk_clear: usize, start: u64) -> Self {
        Self {
            tables: tables
                .into_iter()
                .map(|t| ((t.schema, t.table), (t.kind, t.id_column)))
                .collect(),
            relations: HashMap::new(),
            open: None,
            ready: VecDeque::new(),
            watermark: start,
            bulk_clear: bulk_clear.max(1),
            seq: 0,
            unreadable: 0,
            open_ms: 0,
        }
    }

    /// A transaction begins; it commits at `commit_lsn`, at `commit_ms`
    /// (Unix milliseconds).
    pub fn begin(&mut self, commit_lsn: u64, commit_ms: i64) {
        self.open = Some(Open {
            commit_lsn,
            ..Open::default()
        });
        self.open_ms = commit_ms;
    }

    /// One `pgoutput` message of the open transaction (or a relation
    /// description between transactions).
    ///
    /// # Errors
    ///
    /// [`DecodeError`] when the message cannot be decoded: the stream
    /// cannot be trusted past it (the caller reconnects; nothing was
    /// confirmed past the last commit).
    pub fn change(&mut self, payload: &[u8]) -> Result<(), DecodeError> {
        match pgoutput::decode(payload)? {
            Message::Relation(rel) => {
                let mapped = self
                    .tables
                    .get(&(rel.namespace.clone(), rel.name.clone()))
                    .map(|(kind, col)| {
                        let idx = rel.columns.iter().position(|c| &c.name == col);
                        (kind.clone(), idx)
                    });
                let id_in_key = match &mapped {
                    Some((_, Some(i))) => rel.replica_identity == b'f' || rel.columns[*i].key,
                    _ => false,
                };
                self.relations.insert(rel.id, Rel { mapped, id_in_key });
            }
            Message::Insert { relation, new } => self.row(relation, Some(&new), true),
            Message::Update { relation, old, new } => {
                if let Some(old) = old {
                    self.row(relation, Some(&old), false);
                }
                self.row(relation, Some(&new), true);
            }
            Message::Delete { relation, old } => self.row(relation, Some(&old), false),
            Message::Truncate { relations } => {
                for id in relations {
                    if let Some(kind) = self.kind_of(id) {
                        self.clear_kind(kind);
                    }
                }
            }
            Message::Other(_) => {}
        }
        Ok(())
    }

    fn kind_of(&self, relation: u32) -> Option<String> {
        self.relations
            .get(&relation)
            .and_then(|r| r.mapped.as_ref())
            .map(|(k, _)| k.clone())
    }

    fn clear_kind(&mut self, kind: String) {
        if let Some(open) = self.open.as_mut() {
            open.cleared.insert(kind);
        }
    }

    /// A row of `relation`: `full` when the tuple is a whole new row,
    /// otherwise an old key (which holds the id only if it is in the key).
    fn row(&mut self, relation: u32, tuple: Option<&pgoutput::Tuple>, full: bool) {
        let Some(rel) = self.relations.get(&relation) else {
            // A change of a relation never described: cannot be mapped.
            // Publications hold fed tables only, so clear them all.
            self.unreadable += 1;
            let kinds: BTreeSet<String> = self.tables.values().map(|(k, _)| k.clone()).collect();
            for k in kinds {
                self.clear_kind(k);
            }
            return;
        };
        let Some((kind, idx)) = rel.mapped.clone() else {
            return;
        };
        let id = match (idx, tuple) {
            (Some(i), Some(t)) if full || rel.id_in_key => match t.get(i) {
                Some(Value::Text(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        };
        let Some(open) = self.open.as_mut() else {
            return;
        };
        match id {
            Some(id) => {
                if open.cleared.contains(&kind) || !open.seen.insert((kind.clone(), id.clone())) {
                    return;
                }
                let n = open.per_kind.entry(kind.clone()).or_default();
                *n += 1;
                if *n > self.bulk_clear {
                    open.cleared.insert(kind);
                } else {
                    open.events.push((kind, id));
                }
            }
            None => {
                self.unreadable += 1;
                open.cleared.insert(kind);
            }
        }
    }

    /// The open transaction committed: its events become readable at its
    /// commit position, and the watermark moves to `end_lsn`.
    pub fn commit(&mut self, commit_lsn: u64, end_lsn: u64, commit_ms: i64) {
        let at = if commit_ms != 0 {
            commit_ms
        } else {
            self.open_ms
        };
        if let Some(open) = self.open.take() {
            let pos = if open.commit_lsn != 0 {
                open.commit_lsn
            } else {
                commit_lsn
            };
            for kind in &open.cleared {
                self.seq += 1;
                self.ready.push_back((
                    pos,
                    FeedEvent {
                        seq: self.seq,
                        kind: kind.clone(),
                        id: String::new(),
                        version: None,
                        committed_at_ms: at,
                        clear: true,
                    },
                ));
            }
            for (kind, id) in open.events {
                if open.cleared.contains(&kind) {
                    continue;
                }
                self.seq += 1;
                self.ready.push_back((
                    pos,
                    FeedEvent {
                        seq: self.seq,
                        kind,
                        id,
                        version: None,
                        committed_at_ms: at,
                        clear: false,
                    },
                ));
            }
        }
        self.watermark = self.watermark.max(end_lsn);
    }

    /// A keepalive: between transactions, everything below `wal_end` has
    /// been sent.
    pub fn keepalive(&mut self, wal_end: u64) {
        if self.open.is_none() {
            self.watermark = self.watermark.max(wal_end);
        }
    }

    /// Everything with a position below it has been received.
    #[must_use]
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Events with a position in `[from, to)`, after `after` (the last
    /// `(position, seq)` read), at most `limit`, in `(position, seq)` order.
    #[must_use]
    pub fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Vec<(u64, FeedEvent)> {
        let start = self.ready.partition_point(|(p, ev)| match after {
            Some((ap, aseq)) => (*p, ev.seq) <= (ap, aseq) || *p < from,
            None => *p < from,
        });
        self.ready
            .iter()
            .skip(start)
            .take_while(|(p, _)| *p < to)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Forgets the events below `below` (applied by the fleet).
    pub fn release(&mut self, below: u64) -> u64 {
        let n = self.ready.partition_point(|(p, _)| *p < below);
        self.ready.drain(..n);
        n as u64
    }

    /// The lowest position held.
    #[must_use]
    pub fn oldest(&self) -> Option<u64> {
        self.ready.front().map(|(p, _)| *p)
    }

    /// Events held at or past `from`.
    #[must_use]
    pub fn backlog(&self, from: u64) -> u64 {
        (self.ready.len() - self.ready.partition_point(|(p, _)| *p < from)) as u64
    }

    /// Rows whose entity could not be read (their kind was cleared).
    #[must_use]
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }
}

#[cfg(test)]
mod tests;
