//! Tags and clear: invalidating every value of a type, or every value
//! carrying a tag, in O(1).
//!
//! # How
//!
//! A namespace has one small hash in the store, `<ns>:~stamps`, with an
//! `epoch` counter and one field per cleared type (`kind:<type>`) and per
//! invalidated tag (`tag:<tag>`). [`Cache::clear`](crate::Cache::clear) and
//! [`Cache::invalidate_tag`](crate::Cache::invalidate_tag) are one atomic
//! step: the epoch goes up and the field is set to it. A value
//! records in its envelope ([`crate::codec::Header`]) the epoch its load
//! began in and its tags ([`crate::Versioned::tags`]); it is served only
//! while its type's field and each of its tags' fields are at or below that
//! epoch. Every value also carries its kind's tag, `kind:<type>`, without
//! writing it: `invalidate_tag("kind:profile")` is `clear(Kind::new("profile"))`. Nothing else is touched: the old entries are misses from then on
//! and expire by their TTL (a read that finds one removes it and loads).
//!
//! # Losing the hash
//!
//! The hash has no TTL, but a store can still lose it (a Redis restart
//! without persistence, `FLUSHALL`, an eviction under an `allkeys-*`
//! policy) while values stamped with its epochs survive elsewhere. Two rules
//! keep a clear after the loss effective:
//!
//! - an epoch is the store's clock in microseconds, or one past the highest
//!   epoch the hash or the clearing process knows, whichever is higher
//!   ([`crate::store::StampStore::bump_stamp`]): the first clear of a hash made again
//!   is above every epoch a surviving value carries;
//! - the hash names its incarnation (`id`, its first epoch): a process
//!   whose copy came from another incarnation (or from a hash that is gone)
//!   takes the new one even if its epoch is lower, and empties its near
//!   caches. Without this, processes would keep the old epoch and keep
//!   refusing what processes started after the loss fill.
//!
//! Each process keeps the hash in memory, so the check costs no round trip:
//! the store's invalidation stream (Redis client tracking on
//! `<ns>:~stamps`) tells it when the hash changes and it reads the hash
//! again before serving the next value; a process clearing applies its own
//! change before the call returns. A near cache (L1) is emptied when the
//! hash changes.
//!
//! A load records the epoch of a copy this process can trust: a process
//! that has not read the hash yet (just started), or whose stream is not
//! confirmed live, reads it before the load (one round trip on that miss),
//! so a new process fills from its first read and is never refused for an
//! epoch it could not know. There is no window in which a new process
//! answers `bypass` because of the stamps.
//!
//! A fill whose load began before a clear records the older epoch, so it
//! is refused by every reader that knows the clear (and not written by a
//! process that already knew it when the load ended): a clear cannot be
//! undone by a load that was in flight.
//!
//! # Not guaranteed
//!
//! - That another process stops serving cleared values at the instant the
//!   clear returns: it does when the stream's push reaches it (normally
//!   well under a millisecond), or, if its stream is not confirmed live,
//!   because it then reads the hash before every check (one extra round
//!   trip per read until the stream is back).
//! - Memory: cleared entries stay in the store until their TTL ends; the
//!   hash keeps one field per tag ever invalidated.
//! - Values the cache owns ([`Cache::put`](crate::Cache::put)) and pending
//!   write-behind copies are not cleared: they are not copies of the
//!   database.
//! - A count of the keys a clear covered, on Redis: the keyspace is not
//!   walked ([`Cleared::covered`] is `None`; the memory store counts its
//!   own entries).
//! - "Not found" markers: they carry no epoch, so one cached before a clear
//!   is still answered until its `absent_ttl` (30 s by default) ends; a
//!   row created behind the cache's back then shows after at most that
//!   (write-through invalidations and the feed remove markers at once).
//! - A tag invalidation while the store is unreachable is refused
//!   ([`crate::Error::Unavailable`]) and nothing is pending; a clear of a
//!   type is then kept as a pending invalidation of the type's keys (this
//!   process reads the type from the source until it is replayed), as
//!   [`Cache::invalidate_all`](crate::Cache::invalidate_all) does.

use std::fmt;

/// The longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// Why a tag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TagError {
    /// Empty or longer than [`MAX_TAG_LEN`].
    #[error("a tag is 1 to {MAX_TAG_LEN} bytes, got {0}")]
    Length(usize),
    /// A byte outside `A-Z a-z 0-9 : _ - . @ /`.
    #[error("tag {0:?}: only A-Z a-z 0-9 and : _ - . @ / are allowed")]
    Char(String),
}

/// Checks a tag: 1 to [`MAX_TAG_LEN`] bytes of `A-Z a-z 0-9 : _ - . @ /`
/// (`tenant:acme`, `kind:profile`).
///
/// # Errors
///
/// [`TagError`] for anything else.
pub fn validate_tag(tag: &str) -> Result<(), TagError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(TagError::Length(tag.len()));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":_-.@/".contains(&b))
    {
        return Err(TagError::Char(tag.to_owned()));
    }
    Ok(())
}

/// What a [`Cache::clear`](crate::Cache::clear) or
/// [`Cache::invalidate_tag`](crate::Cache::invalidate_tag) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cleared {
    /// The epoch the clear set: values whose loads began before it are no
    /// longer served.
    pub epoch: u64,
    /// How many cached values it covered, when the store can tell cheaply
    /// ([`crate::Store::count_matching`]: the memory store); `None` on
    /// Redis, and for a tag.
    pub covered: Option<u64>,
}

impl fmt::Display for Cleared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.covered {
            Some(n) => write!(f, "cleared {n} values at epoch {}", self.epoch),
            None => write!(f, "cleared at epoch {}", self.epoch),
        }
    }
}

/// The field of the stamps hash for a type.
pub(crate) fn kind_field(kind: &str) -> String {
    format!("kind:{kind}")
}

/// The field of the stamps hash for a tag.
pub(crate) fn tag_field(tag: &str) -> String {
    format!("tag:{tag}")
}

/// The hash's epoch counter.
pub(crate) const EPOCH_FIELD: &str = "epoch";

/// The hash's incarnation: its first epoch.
pub(crate) const ID_FIELD: &str = "id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_alphabet() {
        for ok in ["tenant:acme", "kind:profile", "a", "x.y-z_w@q/1"] {
            assert_eq!(validate_tag(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_tag(""), Err(TagError::Length(0)));
        assert!(matches!(
            validate_tag(&"a".repeat(129)),
            Err(TagError::Length(129))
        ));
        for bad in ["a b", "a\"b", "a,b", "a]b", "テナント", "a\\b", "a*b"] {
            assert!(matches!(validate_tag(bad), Err(TagError::Char(_))), "{bad}");
        }
    }
}
