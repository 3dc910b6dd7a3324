//! The envelope step: how every value kura writes (a fill after a load, a
//! refill of an eager refresh, a write-through update, a write-behind
//! accept) is sealed in its envelope: the value's version, its tags, the
//! stamps epoch its load began in and, for types with eager refresh, when
//! the entry expires. One function, so that no write path forgets a part of
//! the header a reader relies on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{CodecError, Encoded, Header, encode_with};
use crate::source::Versioned;

/// A sealed value: its envelope and the tags it carries.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The envelope and the bare JSON.
    pub encoded: Encoded,
    /// The value's tags ([`Versioned::tags`]).
    pub tags: Vec<String>,
}

/// The header of a value written now that lives `ttl` (`None`: not
/// cached, or no expiry to record), loaded from stamps `epoch`, with
/// `tags`; the expiry is recorded only for types with eager refresh (it is
/// what decides when to reload early).
#[must_use]
pub fn header_for<'a>(
    eager_refresh: bool,
    ttl: Option<Duration>,
    epoch: u64,
    tags: &'a [String],
) -> Header<'a> {
    let expires_ms = match (eager_refresh, ttl) {
        (true, Some(ttl)) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            (now + ttl).as_millis() as u64
        }
        _ => 0,
    };
    Header {
        expires_ms,
        epoch,
        tags,
    }
}

/// Seals `value` (see the module docs): version and tags from the value,
/// the expiry from `ttl` when `eager_refresh`, at most `max_bytes`.
///
/// # Errors
///
/// As [`encode_with`]: a value that is not a JSON object, a bad tag, or
/// past `max_bytes`.
pub fn seal<T: Serialize + Versioned + ?Sized>(
    value: &T,
    ttl: Option<Duration>,
    eager_refresh: bool,
    epoch: u64,
    max_bytes: usize,
) -> Result<Sealed, CodecError> {
    let tags = value.tags();
    let header = header_for(eager_refresh, ttl, epoch, &tags);
    let encoded = encode_with(value, value.version(), max_bytes, &header)?;
    Ok(Sealed { encoded, tags })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Row {
        a: u32,
        version: u64,
        tag: Option<String>,
    }

    impl Versioned for Row {
        fn version(&self) -> u64 {
            self.version
        }
        fn tags(&self) -> Vec<String> {
            self.tag.iter().cloned().collect()
        }
    }

    #[test]
    fn seals_version_epoch_tags_and_the_expiry_of_eager_types() {
        let row = Row {
            a: 1,
            version: 7,
            tag: Some("tenant:a".into()),
        };
        let s = seal(&row, Some(Duration::from_secs(60)), true, 42, 1 << 20).unwrap();
        let meta = super::super::peek_meta(&s.encoded.envelope);
        assert_eq!(meta.epoch, 42);
        assert_eq!(super::super::peek_version(&s.encoded.envelope), Some(7));
        assert_eq!(s.tags, vec!["tenant:a".to_owned()]);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(meta.expires_ms > now_ms + 55_000 && meta.expires_ms <= now_ms + 60_000);
        // No eager refresh: no expiry recorded.
        let s = seal(&row, Some(Duration::from_secs(60)), false, 42, 1 << 20).unwrap();
        assert_eq!(super::super::peek_meta(&s.encoded.envelope).expires_ms, 0);
        // Too large.
        assert!(matches!(
            seal(&row, None, false, 0, 10),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
