//! A well-formedness check of JSON text, for cached bytes that are passed on
//! without being parsed ([`decode_json`](super::decode_json)).
//!
//! The check only answers "is this one complete JSON text in UTF-8?", so it
//! needs no tokens, no allocation and no recursion: one pass over the bytes
//! with a bit stack of the open containers. It runs on every
//! `CacheAside::get_json` hit, where `serde_json` into `IgnoredAny` cost
//! about as much as the rest of kura's hit path together; strings, most of a
//! cached value, are skipped eight bytes at a time.
//!
//! It accepts exactly the texts `serde_json` parses (RFC 8259 grammar; `\u`
//! escapes are four hex digits, not checked for surrogate pairs, as
//! `serde_json` does when it skips a value), with two differences, both
//! stricter: the bytes must be valid UTF-8 (`serde_json` does not check the
//! inside of a string it skips), and containers nest at most
//! [`MAX_DEPTH`] deep (`serde_json`'s typed decoding stops at 128 as well).

/// Deepest nesting of arrays and objects accepted.
pub(crate) const MAX_DEPTH: u32 = 128;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether `b` is one JSON text (surrounding whitespace allowed).
pub(crate) fn is_well_formed(b: &[u8]) -> bool {
    structure(b).is_some()
}

/// The grammar, iteratively. `None` for anything malformed. UTF-8 is checked
/// on the way: outside strings the grammar allows ASCII only, and strings
/// check their multi-byte sequences themselves.
fn structure(b: &[u8]) -> Option<()> {
    // Bit d of `objects` says whether the container open at depth d is an
    // object (else an array).
    let mut objects: u128 = 0;
    let mut depth: u32 = 0;
    let mut i = ws(b, 0);
    loop {
        // A value starts at `i`.
        match *b.get(i)? {
            open @ (b'{' | b'[') => {
                if depth == MAX_DEPTH {
                    return None;
                }
                let object = open == b'{';
                objects = (objects & !(1 << depth)) | (u128::from(object) << depth);
                depth += 1;
                i = ws(b, i + 1);
                if b.get(i) == Some(if object { &b'}' } else { &b']' }) {
                    // Empty: a complete value.
                    i += 1;
                    depth -= 1;
                } else {
                    if object {
                        i = key(b, i)?;
                    }
                    continue;
                }
            }
            b'"' => i = string(b, i + 1)?,
            b't' => i = literal(b, i, b"true")?,
            b'f' => i = literal(b, i, b"false")?,
            b'n' => i = literal(b, i, b"null")?,
            b'-' | b'0'..=b'9' => i = number(b, i)?,
            _ => return None,
        }
        // After a value: the next member, or the end of one or more
        // containers, or the end of the text.
        loop {
            i = ws(b, i);
            if depth == 0 {
                return (i == b.len()).then_some(());
            }
            let in_object = objects >> (depth - 1) & 1 == 1;
            match *b.get(i)? {
                b',' => {
                    i = ws(b, i + 1);
                    if in_object {
                        i = key(b, i)?;
                    }
                    break;
                }
                b'}' if in_object => {
                    i += 1;
                    depth -= 1;
                }
                b']' if !in_object => {
                    i += 1;
                    depth -= 1;
                }
                _ => return None,
            }
        }
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(i) {
        i += 1;
    }
    i
}

/// `"name"` then `:`; returns where the member's value starts.
fn key(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = ws(b, string(b, i + 1)?);
    if b.get(i) != Some(&b':') {
        return None;
    }
    Some(ws(b, i + 1))
}

/// The rest of a string from just after its opening quote; returns the index
/// after the closing quote.
fn string(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        // Eight plain bytes at a time: ASCII without quote, backslash or
        // control byte.
        while let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().ok()?);
            let s = special(w) | (w & HIGHS);
            if s != 0 {
                // The lowest flagged byte is a real one (see `special`).
                i += (s.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i = escape(b, i + 1)?,
            0..=0x1f => return None,
            0x80.. => {
                // Non-ASCII text comes in runs (a name, an address).
                i = utf8(b, i)?;
                while b.get(i).is_some_and(|&c| c >= 0x80) {
                    i = utf8(b, i)?;
                }
            }
            _ => i += 1,
        }
    }
}

/// One multi-byte UTF-8 sequence starting at `i` (the rules of
/// `std::str::from_utf8`: no overlong forms, no surrogates, nothing past
/// U+10FFFF); returns the index after it.
#[inline]
fn utf8(b: &[u8], i: usize) -> Option<usize> {
    let (len, second) = match b[i] {
        0xC2..=0xDF => (2, 0x80..=0xBF),
        0xE0 => (3, 0xA0..=0xBF),
        0xE1..=0xEC | 0xEE..=0xEF => (3, 0x80..=0xBF),
        0xED => (3, 0x80..=0x9F),
        0xF0 => (4, 0x90..=0xBF),
        0xF1..=0xF3 => (4, 0x80..=0xBF),
        0xF4 => (4, 0x80..=0x8F),
        _ => return None,
    };
    let rest = b.get(i + 1..i + len)?;
    (second.contains(&rest[0]) && rest[1..].iter().all(|&c| c & 0xC0 == 0x80)).then_some(i + len)
}

/// Flags (bit 7 of each byte, little-endian) the bytes of `w` that may be
/// `"`, `\` or below 0x20. Zero exactly when there is none, and the lowest
/// flagged byte is always a real one: a false flag needs a borrow, which
/// only runs upwards from a real one.
fn special(w: u64) -> u64 {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    zero(w ^ (ONES * u64::from(b'"')))
        | zero(w ^ (ONES * u64::from(b'\\')))
        | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS)
}

/// An escape from just after its backslash.
fn escape(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(i + 1),
        b'u' => b
            .get(i + 1..i + 5)?
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then_some(i + 5),
        _ => None,
    }
}

fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b.get(i..)?.starts_with(word).then_some(i + word.len())
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match *b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(i + 1),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits(i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What `serde_json` says, with this check's two stricter rules.
    fn reference(b: &[u8]) -> bool {
        std::str::from_utf8(b).is_ok() && serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
    }

    #[test]
    fn accepts_json_texts() {
        for t in [
            "{}",
            "[]",
            " { } ",
            "0",
            "-0.5e+10",
            "\"\"",
            "true",
            "null",
            "[1,[2,[3,{}]],{\"a\":[]}]",
            "{\"a\":\"\\u00e9\\n\\\"\",\"b\":-12.5E3,\"c\":[true,false,null]}",
            "{\"name\":\"山田 太郎\",\"email\":\"user0@example.jp\",\"version\":3}",
        ] {
            assert!(is_well_formed(t.as_bytes()), "{t}");
            assert!(reference(t.as_bytes()), "{t}");
        }
    }

    #[test]
    fn refuses_malformed_texts() {
        for t in [
            "",
            " ",
            "{",
            "}",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "[1,]",
            "[1 2]",
            "{\"a\":1",
            "{\"a\":\"x",
            "{a:1}",
            "01",
            "1.",
            "1e",
            "-",
            "+1",
            "tru",
            "nul",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"a\u{1}b\"",
            "{} {}",
            "[}",
            "{]",
            "{\"a\":1]",
        ] {
            assert!(!is_well_formed(t.as_bytes()), "{t:?}");
            assert!(!reference(t.as_bytes()), "{t:?}");
        }
        for bad in [
            &b"\"\xff\""[..],
            b"\"\xc3\"",
            b"\"\xc0\xaf\"",
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\"\xe5\xb1\"",
            b"[\xc3\xa9]",
        ] {
            assert!(!is_well_formed(bad), "{bad:?}");
            assert!(!reference(bad), "{bad:?}");
        }
        assert!(is_well_formed("\"é山𝄞\"".as_bytes()));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(is_well_formed(deep(MAX_DEPTH as usize).as_bytes()));
        assert!(!is_well_formed(deep(MAX_DEPTH as usize + 1).as_bytes()));
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
            prop::collection::vec(any::<char>(), 0..6)
                .prop_map(|c| Value::String(c.into_iter().collect())),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Everything `serde_json` writes is accepted, compact or pretty.
        #[test]
        fn accepts_what_serde_json_writes(v in json()) {
            prop_assert!(is_well_formed(&serde_json::to_vec(&v).unwrap()));
            prop_assert!(is_well_formed(&serde_json::to_vec_pretty(&v).unwrap()));
        }

        /// Cut, overwritten, inserted or removed bytes: the same answer as
        /// `serde_json`.
        #[test]
        fn agrees_with_serde_json_on_damaged_texts(
            v in json(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 1..4),
        ) {
            let mut b = serde_json::to_vec(&v).unwrap();
            for (at, op, byte) in edits {
                if b.is_empty() {
                    break;
                }
                let i = at.index(b.len());
                // Bytes that matter to the grammar, more often than chance.
                const GRAMMAR: &[u8] = b"{}[]\",:\\0-.eE tfnu\x01\xc3\x80\xa9\xe5";
                let byte = if byte >= 200 { byte } else { GRAMMAR[usize::from(byte) % GRAMMAR.len()] };
                match op {
                    0 => b.truncate(i),
                    1 => b[i] = byte,
                    2 => b.insert(i, byte),
                    _ => {
                        b.remove(i);
                    }
                }
            }
            prop_assert_eq!(is_well_formed(&b), reference(&b), "{:?}", String::from_utf8_lossy(&b));
        }
    }
}
