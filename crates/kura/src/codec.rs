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
//!
//! Non-ASCII text is written as UTF-8, not `\u` escapes, as the seed's
//! `ensure_ascii=False` does. Values written by other services without the
//! header are still read (as version 0).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

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
    let json = serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))?;
    if json.first() != Some(&b'{') || json.last() != Some(&b'}') {
        return Err(CodecError::Encode(
            "the value must serialize to a JSON object".into(),
        ));
    }
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let mut env = BytesMut::with_capacity(json.len() + 64);
    env.put_slice(b"{\"_v\":");
    env.put_slice(itoa(version).as_bytes());
    env.put_slice(b",\"cached_at\":\"");
    env.put_slice(now.to_string().as_bytes());
    env.put_u8(b'"');
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

/// Splits the envelope header off: returns the version and the bare JSON.
fn strip_header(bytes: &Bytes) -> Option<(u64, Bytes)> {
    let version = peek_version(bytes)?;
    let after_v = 6 + digits(version);
    let rest = bytes.get(after_v..)?;
    let rest = rest.strip_prefix(b",\"cached_at\":\"")?;
    let close = rest.iter().position(|&b| b == b'"')?;
    let tail = &rest[close + 1..];
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
    Some((version, body))
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
    let (version, json) = match strip_header(bytes) {
        Some(parts) => parts,
        // Written by someone else (the seed's service, redis-cli): the whole
        // object is the value, and it has no version.
        None => (0, bytes.clone()),
    };
    let value = serde_json::from_slice(&json).map_err(|e| CodecError::Decode(e.to_string()))?;
    Ok(Decoded {
        value,
        version,
        json,
    })
}

/// Checks an envelope without building the value: kura's header must be
/// there and the rest a well-formed JSON object. Returns the version and
/// the bare JSON.
///
/// # Errors
///
/// [`CodecError::Decode`] for bytes without kura's header (written by
/// someone else: their shape is unknown) or that are not well-formed JSON.
pub fn decode_json(bytes: &Bytes) -> Result<(u64, Bytes), CodecError> {
    let (version, json) =
        strip_header(bytes).ok_or_else(|| CodecError::Decode("not a kura envelope".into()))?;
    if !well_formed::is_well_formed(&json) {
        return Err(CodecError::Decode("not well-formed JSON".into()));
    }
    Ok((version, json))
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
        let (v, json) = decode_json(&good.envelope).unwrap();
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
}
