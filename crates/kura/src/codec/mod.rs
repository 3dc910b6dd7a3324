//! The value format: UTF-8 JSON a plain `GET` can read.
//!
//! A cached value is the JSON object of the caller's type with two fields put
//! in front:
//!
//! ```text
//! {"_v":42,"cached_at":"2026-11-26T10:00:00.123456Z","user_id":"…","first_name":"太郎",…}
//! ```
//!
//! - `_v` is the row version. The store scripts read it with an anchored
//!   prefix match (no JSON parsing inside Redis), which is what makes
//!   "set only if newer" one cheap atomic step.
//! - `cached_at` is the seed's timestamp, RFC 3339 in UTC.
//! - `_m` (only when one of its parts is set, [`Header`]): `[expires_ms,
//!   epoch, "tag", …]`, the moment the entry expires (Unix milliseconds,
//!   0 unknown; written for types with eager refresh, see
//!   [`crate::policy::freshness`]), the stamp epoch its load began in and its tags
//!   (see [`crate::tags`]). Read without parsing the JSON
//!   ([`peek_meta`]).
//!
//! Non-ASCII text is written as UTF-8, not `\u` escapes, as the seed's
//! `ensure_ascii=False` does. Values written by other services without the
//! header are still read (as version 0).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

pub mod envelope;
mod well_formed;

/// The default largest value cached, in bytes (the seed's 1 MB rule).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Serialization failed, or the type does not serialize to a JSON object.
    #[error("value cannot be cached as JSON: {0}")]
    Encode(String),
    /// The encoded value is larger than the configured limit.
    #[error("value is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The bytes in the cache are not a valid value of the expected type.
    #[error("cached bytes do not decode: {0}")]
    Decode(String),
}

/// An encoded value: the envelope stored in the cache and the bare JSON of
/// the value (what an HTTP handler returns).
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `{"_v":…,"cached_at":…,<fields>}`.
    pub envelope: Bytes,
    /// `{<fields>}`.
    pub json: Bytes,
    /// The `cached_at` written, Unix milliseconds.
    pub cached_at_ms: i64,
}

/// What the envelope's `_m` field records (nothing is written when all
/// parts are empty).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header<'a> {
    /// When the entry expires, Unix milliseconds (0: not recorded).
    pub expires_ms: u64,
    /// The stamp epoch the value's load began in (see [`crate::tags`]).
    pub epoch: u64,
    /// The value's tags, each checked by [`crate::tags::validate_tag`].
    pub tags: &'a [String],
}

impl Header<'_> {
    fn is_empty(&self) -> bool {
        self.expires_ms == 0 && self.epoch == 0 && self.tags.is_empty()
    }
}

/// The `_m` field of an envelope as read ([`peek_meta`]); all zero and no
/// tags when the envelope has none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta<'a> {
    /// When the entry expires, Unix milliseconds (0: not recorded).
    pub expires_ms: u64,
    /// The stamp epoch the value's load began in.
    pub epoch: u64,
    tags: &'a [u8],
}

impl<'a> Meta<'a> {
    /// The value's tags.
    pub fn tags(&self) -> impl Iterator<Item = &'a str> + 'a {
        let raw = self.tags;
        raw.split(|&b| b == b',')
            .filter_map(|t| t.strip_prefix(b"\"").and_then(|t| t.strip_suffix(b"\"")))
            .filter_map(|t| std::str::from_utf8(t).ok())
    }

    /// Whether the value has tags.
    #[must_use]
    pub fn has_tags(&self) -> bool {
        !self.tags.is_empty()
    }
}

/// Encodes `value` with its `version`.
///
/// # Errors
///
/// [`CodecError::Encode`] when serialization fails or does not produce a JSON
/// object; [`CodecError::TooLarge`] past `limit` bytes.
pub fn encode<T: Serialize + ?Sized>(
    value: &T,
    version: u64,
    limit: usize,
) -> Result<Encoded, CodecError> {
    encode_with(value, version, limit, &Header::default())
}

/// Encodes `value` with its `version` and the `_m` header.
///
/// # Errors
///
/// As [`encode`]; [`CodecError::Encode`] for a tag that
/// [`crate::tags::validate_tag`] refuses.
pub fn encode_with<T: Serialize + ?Sized>(
    value: &T,
    version: u64,
    limit: usize,
    header: &Header<'_>,
) -> Result<Encoded, CodecError> {
    let json = serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))?;
    if json.first() != Some(&b'{') || json.last() != Some(&b'}') {
        return Err(CodecError::Encode(
            "the value must serialize to a JSON object".into(),
        ));
    }
    let at = chrono::Utc::now();
    let now = at.format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let mut env = BytesMut::with_capacity(json.len() + 64);
    env.put_slice(b"{\"_v\":");
    env.put_slice(itoa(version).as_bytes());
    env.put_slice(b",\"cached_at\":\"");
    env.put_slice(now.to_string().as_bytes());
    env.put_u8(b'"');
    if !header.is_empty() {
        env.put_slice(b",\"_m\":[");
        env.put_slice(itoa(header.expires_ms).as_bytes());
        env.put_u8(b',');
        env.put_slice(itoa(header.epoch).as_bytes());
        for t in header.tags {
            crate::tags::validate_tag(t).map_err(|e| CodecError::Encode(e.to_string()))?;
            env.put_slice(b",\"");
            env.put_slice(t.as_bytes());
            env.put_u8(b'"');
        }
        env.put_u8(b']');
    }
    if json.len() > 2 {
        env.put_u8(b',');
        env.put_slice(&json[1..]);
    } else {
        env.put_u8(b'}');
    }
    if env.len() > limit {
        return Err(CodecError::TooLarge {
            size: env.len(),
            limit,
        });
    }
    Ok(Encoded {
        envelope: env.freeze(),
        json: Bytes::from(json),
        cached_at_ms: at.timestamp_millis(),
    })
}

fn itoa(v: u64) -> String {
    v.to_string()
}

/// A decoded value.
#[derive(Debug, Clone)]
pub struct Decoded<T> {
    /// The value.
    pub value: T,
    /// Its version (`_v`), 0 when the writer did not record one.
    pub version: u64,
    /// The bare JSON of the value, without the envelope fields.
    pub json: Bytes,
    /// When it was cached (`cached_at`), Unix milliseconds; 0 when the
    /// writer did not record it.
    pub cached_at_ms: i64,
}

/// Reads the version from an envelope without parsing the JSON (the same
/// anchored match the Redis scripts use).
#[must_use]
pub fn peek_version(bytes: &[u8]) -> Option<u64> {
    let rest = bytes.strip_prefix(b"{\"_v\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 || end > 19 {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// When `cached_at` (`2026-11-26T10:00:00.123456Z`, what [`encode_with`]
/// writes) is, in Unix milliseconds; 0 for any other text. Read by hand:
/// it is on the path of every hit.
#[must_use]
pub fn cached_at_ms(text: &[u8]) -> i64 {
    fn num(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    }
    let parse = || -> Option<i64> {
        if text.len() < 20 || text[4] != b'-' || text[7] != b'-' || text[10] != b'T' {
            return None;
        }
        if text[13] != b':' || text[16] != b':' || *text.last()? != b'Z' {
            return None;
        }
        let (y, m, d) = (num(&text[0..4])?, num(&text[5..7])?, num(&text[8..10])?);
        let (h, min, s) = (
            num(&text[11..13])?,
            num(&text[14..16])?,
            num(&text[17..19])?,
        );
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || min > 59 || s > 60 {
            return None;
        }
        let ms = match &text[19..text.len() - 1] {
            [] => 0,
            [b'.', frac @ ..] if !frac.is_empty() && frac.len() <= 9 => {
                let f = num(frac)?;
                f * 1000 / 10i64.pow(frac.len() as u32)
            }
            _ => return None,
        };
        // Days from the civil date (Howard Hinnant's algorithm).
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(((days * 24 + h) * 60 + min) * 60_000 + s * 1000 + ms)
    };
    parse().unwrap_or(0)
}

/// The parts of kura's header: the version, when it was cached (Unix ms),
/// the `_m` field and where the value's own fields begin (at a `,` or the
/// closing `}`).
fn header(bytes: &[u8]) -> Option<(u64, i64, Meta<'_>, usize)> {
    let version = peek_version(bytes)?;
    let after_v = 6 + digits(version);
    let rest = bytes.get(after_v..)?;
    let rest = rest.strip_prefix(b",\"cached_at\":\"")?;
    let close = rest.iter().position(|&b| b == b'"')?;
    let cached_at = cached_at_ms(&rest[..close]);
    let mut at = after_v + 14 + close + 1;
    let mut meta = Meta::default();
    if let Some(m) = bytes[at..].strip_prefix(b",\"_m\":[") {
        let end = m.iter().position(|&b| b == b']')?;
        let inner = &m[..end];
        let mut parts = inner.splitn(3, |&b| b == b',');
        let num = |p: Option<&[u8]>| -> Option<u64> {
            let p = p?;
            if p.is_empty() || p.len() > 19 || !p.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(p).ok()?.parse().ok()
        };
        meta.expires_ms = num(parts.next())?;
        meta.epoch = num(parts.next())?;
        meta.tags = parts.next().unwrap_or_default();
        at += 7 + end + 1;
    }
    Some((version, cached_at, meta, at))
}

/// Reads the `_m` field of an envelope without parsing the JSON (all zero
/// when there is none or the bytes are not kura's).
#[must_use]
pub fn peek_meta(bytes: &[u8]) -> Meta<'_> {
    header(bytes).map(|(_, _, m, _)| m).unwrap_or_default()
}

/// Splits the envelope header off: returns the version and the bare JSON.
fn strip_header(bytes: &Bytes) -> Option<(u64, i64, Bytes)> {
    let (version, cached_at, _, at) = header(bytes)?;
    let tail = &bytes[at..];
    let body = match tail.first()? {
        b'}' if tail.len() == 1 => Bytes::from_static(b"{}"),
        b',' => {
            let mut b = BytesMut::with_capacity(tail.len());
            b.put_u8(b'{');
            b.put_slice(&tail[1..]);
            b.freeze()
        }
        _ => return None,
    };
    Some((version, cached_at, body))
}

fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// Decodes a cached value.
///
/// # Errors
///
/// [`CodecError::Decode`] when the bytes are not JSON of type `T`; callers
/// treat that as a miss and remove the value.
pub fn decode<T: DeserializeOwned>(bytes: &Bytes) -> Result<Decoded<T>, CodecError> {
    let (version, cached_at_ms, json) = match strip_header(bytes) {
        Some(parts) => parts,
        // Written by someone else (the seed's service, redis-cli): the whole
        // object is the value, and it has no version.
        None => (0, 0, bytes.clone()),
    };
    let value = serde_json::from_slice(&json).map_err(|e| CodecError::Decode(e.to_string()))?;
    Ok(Decoded {
        value,
        version,
        json,
        cached_at_ms,
    })
}

/// Checks an envelope without building the value: kura's header must be
/// there and the rest a well-formed JSON object. Returns the version, the
/// bare JSON and when it was cached (Unix ms, 0 when not recorded).
///
/// # Errors
///
/// [`CodecError::Decode`] for bytes without kura's header (written by
/// someone else: their shape is unknown) or that are not well-formed JSON.
pub fn decode_json(bytes: &Bytes) -> Result<(u64, Bytes, i64), CodecError> {
    let (version, cached_at, json) =
        strip_header(bytes).ok_or_else(|| CodecError::Decode("not a kura envelope".into()))?;
    if !well_formed::is_well_formed(&json) {
        return Err(CodecError::Decode("not well-formed JSON".into()));
    }
    Ok((version, json, cached_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct P {
        name: String,
        n: u32,
    }

    #[test]
    fn round_trip_keeps_utf8_and_header() {
        let p = P {
            name: "山田太郎".into(),
            n: 7,
        };
        let e = encode(&p, 42, DEFAULT_MAX_VALUE_BYTES).unwrap();
        let text = std::str::from_utf8(&e.envelope).unwrap();
        assert!(text.starts_with("{\"_v\":42,\"cached_at\":\""), "{text}");
        assert!(text.contains("\"name\":\"山田太郎\""), "{text}");
        assert_eq!(peek_version(&e.envelope), Some(42));
        let d: Decoded<P> = decode(&e.envelope).unwrap();
        assert_eq!(d.value, p);
        assert_eq!(d.version, 42);
        assert_eq!(&d.json[..], &e.json[..]);
        let v: serde_json::Value = serde_json::from_slice(&e.envelope).unwrap();
        assert!(v["cached_at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn meta_header_round_trip() {
        let p = P {
            name: "x".into(),
            n: 1,
        };
        let tags = vec!["tenant:acme".to_owned(), "kind:profile".to_owned()];
        let h = Header {
            expires_ms: 1_700_000_000_123,
            epoch: 7,
            tags: &tags,
        };
        let e = encode_with(&p, 3, 1000, &h).unwrap();
        let text = std::str::from_utf8(&e.envelope).unwrap();
        assert!(
            text.contains(",\"_m\":[1700000000123,7,\"tenant:acme\",\"kind:profile\"],\"name\""),
            "{text}"
        );
        let m = peek_meta(&e.envelope);
        assert_eq!((m.expires_ms, m.epoch), (1_700_000_000_123, 7));
        assert_eq!(
            m.tags().collect::<Vec<_>>(),
            ["tenant:acme", "kind:profile"]
        );
        let d: Decoded<P> = decode(&e.envelope).unwrap();
        assert_eq!((d.value, d.version), (p, 3));
        assert_eq!(decode_json(&e.envelope).unwrap().1, e.json);
        // Without tags, and an empty object.
        #[derive(Serialize, Deserialize)]
        struct E {}
        let h = Header {
            expires_ms: 5,
            ..Header::default()
        };
        let e = encode_with(&E {}, 0, 100, &h).unwrap();
        assert_eq!(peek_meta(&e.envelope).expires_ms, 5);
        assert!(!peek_meta(&e.envelope).has_tags());
        let _: Decoded<E> = decode(&e.envelope).unwrap();
        // No header: all zero; a bad tag is refused.
        let plain = encode(&E {}, 0, 100).unwrap();
        assert_eq!(peek_meta(&plain.envelope), Meta::default());
        let bad = vec!["a\"b".to_owned()];
        let h = Header {
            tags: &bad,
            ..Header::default()
        };
        assert!(matches!(
            encode_with(&E {}, 0, 100, &h),
            Err(CodecError::Encode(_))
        ));
        // A truncated `_m` is not kura's envelope.
        assert!(
            decode_json(&Bytes::from_static(
                b"{\"_v\":1,\"cached_at\":\"x\",\"_m\":[1,2"
            ))
            .is_err()
        );
    }

    #[test]
    fn empty_object_and_foreign_values() {
        #[derive(Serialize, Deserialize)]
        struct E {}
        let e = encode(&E {}, 0, 100).unwrap();
        let _: Decoded<E> = decode(&e.envelope).unwrap();
        let seed = Bytes::from_static(
            "{\"name\":\"太郎\",\"n\":1,\"cached_at\":\"2025-01-01T00:00:00\"}".as_bytes(),
        );
        let d: Decoded<P> = decode(&seed).unwrap();
        assert_eq!(d.version, 0);
        assert_eq!(d.value.n, 1);
    }

    #[test]
    fn rejects_non_objects_oversize_and_garbage() {
        assert!(matches!(encode(&5u32, 1, 100), Err(CodecError::Encode(_))));
        let big = P {
            name: "x".repeat(200),
            n: 1,
        };
        assert!(matches!(
            encode(&big, 1, 100),
            Err(CodecError::TooLarge { .. })
        ));
        for bad in [
            &b"\xff\xfe garbage"[..],
            b"{\"_v\":1,\"cached_at\":\"x\",\"name\":\"tru",
            b"",
            b"[]",
        ] {
            let r: Result<Decoded<P>, _> = decode(&Bytes::copy_from_slice(bad));
            assert!(r.is_err(), "{bad:?}");
        }
        assert_eq!(peek_version(b"{\"_v\":,"), None);
        // The envelope check: header and well-formed JSON, shape unseen.
        let good = encode(
            &P {
                name: "x".into(),
                n: 1,
            },
            3,
            1000,
        )
        .unwrap();
        let (v, json, _) = decode_json(&good.envelope).unwrap();
        assert_eq!((v, &json[..]), (3, &good.json[..]));
        for bad in [
            &b"{\"name\":\"no header\"}"[..],
            b"{\"_v\":1,\"cached_at\":\"x\",\"name\":\"tru",
            b"{\"_v\":1,\"cached_at\":\"x\",\"a\":1}}",
        ] {
            assert!(
                decode_json(&Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(peek_version(b"{\"_v\":99999999999999999999,"), None);
    }

    #[test]
    fn cached_at_is_read_by_hand() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-26T10:00:00.123456Z").unwrap();
        assert_eq!(
            cached_at_ms(b"2026-11-26T10:00:00.123456Z"),
            at.timestamp_millis()
        );
        for (text, rfc) in [
            ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"),
            ("2000-02-29T23:59:59.999Z", "2000-02-29T23:59:59.999Z"),
            ("2026-03-01T00:00:00.5Z", "2026-03-01T00:00:00.5Z"),
        ] {
            let want = chrono::DateTime::parse_from_rfc3339(rfc)
                .unwrap()
                .timestamp_millis();
            assert_eq!(cached_at_ms(text.as_bytes()), want, "{text}");
        }
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-26 10:00:00Z",
            "2026-11-26T10:00:00+09:00",
        ] {
            assert_eq!(cached_at_ms(bad.as_bytes()), 0, "{bad}");
        }
        let e = encode(&serde_json::json!({"a": 1}), 3, 1000).unwrap();
        let d: Decoded<serde_json::Value> = decode(&e.envelope).unwrap();
        assert_eq!(d.cached_at_ms, e.cached_at_ms);
        assert!((chrono::Utc::now().timestamp_millis() - d.cached_at_ms).abs() < 5_000);
    }
}
