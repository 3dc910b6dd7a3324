//! Key naming: `<namespace>:<segment>:<id>[:<suffix>]`, validated and escaped.
//!
//! Every key kura reads or writes is built here, so the naming rules of the
//! seed (`cache:profile:<user_id>`, `cache:document:<document_id>:metadata`)
//! hold everywhere and no caller can smuggle a glob metacharacter into a
//! pattern delete.
//!
//! Besides the value key that other services read with a plain `GET`, each
//! entry has companion keys that only kura uses. They live under
//! `<namespace>:~<tag>:` so that a `SCAN MATCH cache:profile:*` by another
//! tool sees profile values only:
//!
//! | key | holds |
//! |---|---|
//! | `cache:profile:<id>` | the value (JSON) |
//! | `cache:~l:profile:<id>` | the load lease (owner token) |
//! | `cache:~s:profile:<id>` | the stale copy served when the source fails |
//! | `cache:~n:profile:<id>` | the "not found" marker (penetration guard) |
//! | `cache:~p:profile:<id>` | a write-behind write not yet in the database (no TTL) |
//!
//! With Redis Cluster the id is wrapped in a hash tag (`cache:profile:{<id>}`)
//! so that an entry's keys share one slot; that is the one difference in the
//! key layout between topologies.

use std::fmt;

mod builder;
mod pattern;

pub use self::builder::{EntryKeys, KeyBuilder};
use self::pattern::Glob;
pub use self::pattern::{KeyPattern, escape_glob};

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Why a key could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The id is empty.
    #[error("id is empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("id is {0} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong(usize),
    /// The id contains a character that is not allowed in a key part.
    #[error("id contains {0:?}, which is not allowed in a cache key")]
    ForbiddenChar(char),
    /// A namespace, segment or suffix is not a lowercase identifier.
    #[error("{what} {value:?} must match [a-z0-9_]+ (and not start with '~')")]
    BadName {
        /// Which part was rejected.
        what: &'static str,
        /// The rejected text.
        value: String,
    },
    /// A glob pattern is malformed (unclosed `[` or a trailing `\`).
    #[error("pattern {0:?} is malformed")]
    BadPattern(String),
}

/// A data type: its policy name and where its keys live. The library has no
/// types of its own; an application defines its kinds as constants (or, for
/// types declared at run time, with names it keeps for the process's life).
///
/// `name` selects the TTL policy and labels metrics; `segment` and `suffix`
/// place the key. For most types they coincide (`profile` →
/// `cache:profile:<id>`); document metadata is the seed's exception
/// (`document_meta` → `cache:document:<id>:metadata`).
///
/// # Examples
///
/// ```
/// use kura::Kind;
///
/// const AVATAR: Kind = Kind::new("avatar");
/// assert_eq!(AVATAR.name(), "avatar");
/// // The seed's document metadata: `cache:document:<id>:metadata`.
/// const DOCUMENT_META: Kind = Kind::new("document_meta")
///     .with_segment("document")
///     .with_suffix("metadata");
/// assert_eq!(DOCUMENT_META.segment(), "document");
/// assert_eq!(DOCUMENT_META.suffix(), Some("metadata"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kind {
    name: &'static str,
    segment: &'static str,
    suffix: Option<&'static str>,
}

impl Kind {
    /// A kind whose key segment equals its name.
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            segment: name,
            suffix: None,
        }
    }

    /// Places the keys under another segment than the policy name.
    #[must_use]
    pub const fn with_segment(mut self, segment: &'static str) -> Self {
        self.segment = segment;
        self
    }

    /// Appends `:<suffix>` after the id.
    #[must_use]
    pub const fn with_suffix(mut self, suffix: &'static str) -> Self {
        self.suffix = Some(suffix);
        self
    }

    /// The policy and metrics name.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The key segment after the namespace.
    #[must_use]
    pub const fn segment(&self) -> &'static str {
        self.segment
    }

    /// The key suffix after the id, if any.
    #[must_use]
    pub const fn suffix(&self) -> Option<&'static str> {
        self.suffix
    }

    /// Checks the static names; called once when a strategy handle is made.
    ///
    /// # Errors
    ///
    /// [`KeyError::BadName`] for a name, segment or suffix outside
    /// `[a-z0-9_]+`.
    pub fn validate(&self) -> Result<(), KeyError> {
        check_name("kind name", self.name)?;
        check_name("key segment", self.segment)?;
        if let Some(s) = self.suffix {
            check_name("key suffix", s)?;
        }
        Ok(())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

pub(crate) fn check_name(what: &'static str, value: &str) -> Result<(), KeyError> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadName {
            what,
            value: value.to_owned(),
        })
    }
}

/// Checks an id against the key rules.
///
/// Rejected: empty ids, ids over [`MAX_ID_LEN`] bytes, whitespace and control
/// characters, the glob metacharacters `* ? [ ] \`, the separator `:` and the
/// hash-tag braces `{ }`. Rejecting rather than escaping keeps keys readable
/// by other services and makes a pattern built from an id impossible to widen.
///
/// # Errors
///
/// [`KeyError`] naming the first offending character or the length.
///
/// # Examples
///
/// ```
/// use kura::key::{validate_id, KeyError};
///
/// assert!(validate_id("0b6a1a8e-39a4-4c4e-9f63-2f5b8a0d2c11").is_ok());
/// assert_eq!(validate_id("a*b"), Err(KeyError::ForbiddenChar('*')));
/// ```
pub fn validate_id(id: &str) -> Result<(), KeyError> {
    if id.is_empty() {
        return Err(KeyError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(KeyError::TooLong(id.len()));
    }
    // Fast path: the common id alphabet (UUIDs, integers, slugs), one table
    // look-up per byte.
    if id.bytes().all(|b| PLAIN[b as usize]) {
        return Ok(());
    }
    for c in id.chars() {
        if c.is_whitespace()
            || c.is_control()
            || matches!(c, '*' | '?' | '[' | ']' | '\\' | ':' | '{' | '}')
        {
            return Err(KeyError::ForbiddenChar(c));
        }
    }
    Ok(())
}

/// Bytes of the common id alphabet: `[A-Za-z0-9._-]`.
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.';
        b += 1;
    }
    t
};

/// Companion key tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Companion {
    Lease,
    Stale,
    Absent,
    Pending,
}

impl Companion {
    fn tag(self) -> &'static str {
        match self {
            Companion::Lease => "~l:",
            Companion::Stale => "~s:",
            Companion::Absent => "~n:",
            Companion::Pending => "~p:",
        }
    }
}

/// The stale-copy key of the entry whose value key is `value_key`, or
/// `None` when the key is kura's own (`<namespace>:~…`) or not of the
/// `<namespace>:…` shape.
pub(crate) fn stale_key_of(value_key: &str) -> Option<String> {
    let (namespace, rest) = value_key.split_once(':')?;
    if rest.is_empty() || rest.starts_with('~') {
        return None;
    }
    Some(format!("{namespace}:{}{rest}", Companion::Stale.tag()))
}

/// The value key of the entry whose "not found" marker is `key`
/// (`<namespace>:~n:<rest>` → `<namespace>:<rest>`), or `None` for any
/// other key.
pub(crate) fn value_key_of_absent(key: &str) -> Option<String> {
    let (namespace, rest) = key.split_once(':')?;
    let rest = rest.strip_prefix(Companion::Absent.tag())?;
    Some(format!("{namespace}:{rest}"))
}

#[cfg(test)]
mod tests;
