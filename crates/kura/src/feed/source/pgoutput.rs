//! A decoder of PostgreSQL's `pgoutput` logical replication messages
//! (protocol version 1, text format): the row changes the WAL feed reads
//! ([`super::wal`]). Begin and Commit are framed by the replication client;
//! this decodes what is between them.
//!
//! Only what an invalidation needs is kept: each relation's name and
//! columns (which are part of its replica identity key), and per change the
//! relation and its tuple(s) as text. Binary values (`binary 'true'`) are
//! not requested and are refused; a message this decoder does not know
//! (`Y` type, `O` origin, `M` logical message) is [`Message::Other`].
//!
//! Every length is checked: a truncated or malformed message is a
//! [`DecodeError`], never a panic.

/// A `pgoutput` message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput message {tag:?}: {what}")]
pub struct DecodeError {
    /// The message's tag (`'R'`, `'I'`, …; `'?'` for an empty message).
    pub tag: char,
    /// What was wrong.
    pub what: &'static str,
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Part of the replica identity key (sent in a DELETE's old tuple).
    pub key: bool,
}

/// A relation (table) as the publisher describes it before its first change
/// in a stream (and again after its definition changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Its OID in the publisher's catalog (what changes refer to).
    pub id: u32,
    /// Its schema.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its replica identity setting: `d` default (primary key), `n`
    /// nothing, `f` full, `i` an index.
    pub replica_identity: u8,
    /// Its columns, in order.
    pub columns: Vec<Column>,
}

/// One value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (not sent).
    Unchanged,
    /// The value in its text form.
    Text(String),
}

/// A row as sent: one value per column of its relation.
pub type Tuple = Vec<Value>;

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A relation's description.
    Relation(Relation),
    /// A row inserted.
    Insert {
        /// The relation's OID.
        relation: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row updated.
    Update {
        /// The relation's OID.
        relation: u32,
        /// The old row's key (`K`) or whole old row (`O`), when sent: a
        /// changed key, or `REPLICA IDENTITY FULL`.
        old: Option<Tuple>,
        /// The new row.
        new: Tuple,
    },
    /// A row deleted.
    Delete {
        /// The relation's OID.
        relation: u32,
        /// The old row's key (`K`) or whole old row (`O`).
        old: Tuple,
    },
    /// Tables truncated.
    Truncate {
        /// Their OIDs.
        relations: Vec<u32>,
    },
    /// A message the feed does not need (type, origin, logical message).
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
    tag: char,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &'static str) -> DecodeError {
        DecodeError {
            tag: self.tag,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.err("message ends too early"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("string without its terminator"))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| self.err("string not UTF-8"))?
            .to_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn count(&mut self) -> Result<usize, DecodeError> {
        usize::try_from(self.i16()?).map_err(|_| self.err("negative count"))
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.count()?;
        let mut values = Vec::with_capacity(n.min(self.buf.len()));
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = usize::try_from(self.i32()?)
                        .map_err(|_| self.err("negative value length"))?;
                    let bytes = self.take(len)?;
                    Value::Text(
                        std::str::from_utf8(bytes)
                            .map_err(|_| self.err("text value not UTF-8"))?
                            .to_owned(),
                    )
                }
                b'b' => return Err(self.err("binary values are not supported")),
                _ => return Err(self.err("unknown value kind")),
            });
        }
        Ok(values)
    }

    fn done(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("bytes after the message"))
        }
    }
}

/// Decodes one `pgoutput` message (an `XLogData` payload).
///
/// # Errors
///
/// [`DecodeError`] when the message is truncated, has trailing bytes, an
/// unknown tuple marker, a binary value or text that is not UTF-8.
pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
    let Some((&tag, rest)) = payload.split_first() else {
        return Err(DecodeError {
            tag: '?',
            what: "empty message",
        });
    };
    let mut r = Reader {
        buf: rest,
        tag: tag as char,
    };
    let msg = match tag {
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.count()?;
            let mut columns = Vec::with_capacity(n.min(r.buf.len()));
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let _type_oid = r.u32()?;
                let _typmod = r.i32()?;
                columns.push(Column {
                    name,
                    key: flags & 1 == 1,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.err("insert without its new tuple"));
            }
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let (old, marker) = match r.u8()? {
                b'K' | b'O' => {
                    let old = r.tuple()?;
                    (Some(old), r.u8()?)
                }
                m => (None, m),
            };
            if marker != b'N' {
                return Err(r.err("update without its new tuple"));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => {}
                _ => return Err(r.err("delete without its old tuple")),
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(r.buf.len() / 4));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        other => return Ok(Message::Other(other)),
    };
    r.done()?;
    Ok(msg)
}

/// Encodes a message as the publisher does (for tests and simulations of a
/// stream). [`Message::Other`] encodes as its bare tag.
#[must_use]
pub fn encode(msg: &Message) -> Vec<u8> {
    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    fn tuple(out: &mut Vec<u8>, t: &Tuple) {
        out.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for v in t {
            match v {
                Value::Null => out.push(b'n'),
                Value::Unchanged => out.push(b'u'),
                Value::Text(s) => {
                    out.push(b't');
                    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
    }
    let mut out = Vec::new();
    match msg {
        Message::Relation(rel) => {
            out.push(b'R');
            out.extend_from_slice(&rel.id.to_be_bytes());
            cstr(&mut out, &rel.namespace);
            cstr(&mut out, &rel.name);
            out.push(rel.replica_identity);
            out.extend_from_slice(&(rel.columns.len() as i16).to_be_bytes());
            for c in &rel.columns {
                out.push(u8::from(c.key));
                cstr(&mut out, &c.name);
                out.extend_from_slice(&25u32.to_be_bytes());
                out.extend_from_slice(&(-1i32).to_be_bytes());
            }
        }
        Message::Insert { relation, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Update { relation, old, new } => {
            out.push(b'U');
            out.extend_from_slice(&relation.to_be_bytes());
            if let Some(old) = old {
                out.push(b'O');
                tuple(&mut out, old);
            }
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Delete { relation, old } => {
            out.push(b'D');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'K');
            tuple(&mut out, old);
        }
        Message::Truncate { relations } => {
            out.push(b'T');
            out.extend_from_slice(&(relations.len() as u32).to_be_bytes());
            out.push(0);
            for r in relations {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        Message::Other(tag) => out.push(*tag),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    #[test]
    fn a_relation_and_its_changes_decode() {
        let rel = Message::Relation(Relation {
            id: 16384,
            namespace: "public".into(),
            name: "profiles".into(),
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
            ],
        });
        assert_eq!(decode(&encode(&rel)).unwrap(), rel);
        let upd = Message::Update {
            relation: 16384,
            old: None,
            new: vec![text("a"), Value::Unchanged],
        };
        assert_eq!(decode(&encode(&upd)).unwrap(), upd);
        let del = Message::Delete {
            relation: 16384,
            old: vec![Value::Null, text("u")],
        };
        assert_eq!(decode(&encode(&del)).unwrap(), del);
        let tr = Message::Truncate {
            relations: vec![1, 2],
        };
        assert_eq!(decode(&encode(&tr)).unwrap(), tr);
        assert_eq!(decode(b"Yxyz").unwrap(), Message::Other(b'Y'));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert_eq!(decode(b"").unwrap_err().what, "empty message");
        // An insert cut in its value.
        let mut ins = encode(&Message::Insert {
            relation: 1,
            new: vec![text("hello")],
        });
        ins.truncate(ins.len() - 2);
        assert_eq!(decode(&ins).unwrap_err().what, "message ends too early");
        // Trailing bytes.
        let mut tr = encode(&Message::Truncate { relations: vec![7] });
        tr.push(0);
        assert_eq!(decode(&tr).unwrap_err().what, "bytes after the message");
        // A binary value.
        let mut bin = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b'b', 0, 0, 0, 1, 9];
        assert_eq!(
            decode(&bin).unwrap_err().what,
            "binary values are not supported"
        );
        bin[5] = b'X';
        assert_eq!(
            decode(&bin).unwrap_err().what,
            "insert without its new tuple"
        );
    }

    fn value() -> impl Strategy<Value = Value> + Clone {
        prop_oneof![
            Just(Value::Null),
            Just(Value::Unchanged),
            ".{0,12}".prop_map(Value::Text),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        let tuple = prop::collection::vec(value(), 0..6);
        prop_oneof![
            (any::<u32>(), tuple.clone())
                .prop_map(|(relation, new)| Message::Insert { relation, new }),
            (any::<u32>(), prop::option::of(tuple.clone()), tuple.clone())
                .prop_map(|(relation, old, new)| Message::Update { relation, old, new }),
            (any::<u32>(), tuple).prop_map(|(relation, old)| Message::Delete { relation, old }),
            prop::collection::vec(any::<u32>(), 0..5)
                .prop_map(|relations| Message::Truncate { relations }),
            (
                any::<u32>(),
                "[a-z_]{1,10}",
                "[a-z_]{1,10}",
                prop::collection::vec(("[a-z_]{1,8}", any::<bool>()), 0..6)
            )
                .prop_map(|(id, namespace, name, cols)| Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity: b'd',
                    columns: cols
                        .into_iter()
                        .map(|(name, key)| Column { name, key })
                        .collect(),
                })),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in message()) {
            prop_assert_eq!(decode(&encode(&msg)).unwrap(), msg);
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn every_cut_of_a_message_is_an_error(msg in message(), cut in 0usize..64) {
            let bytes = encode(&msg);
            if !matches!(msg, Message::Other(_)) && cut < bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err());
            }
        }
    }
}
