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

/// A data type: its policy name and where its keys live.
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
/// assert_eq!(Kind::DOCUMENT_META.segment(), "document");
/// assert_eq!(Kind::DOCUMENT_META.suffix(), Some("metadata"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kind {
    name: &'static str,
    segment: &'static str,
    suffix: Option<&'static str>,
}

impl Kind {
    /// User profiles: `cache:profile:<user_id>`.
    pub const PROFILE: Kind = Kind::new("profile");
    /// User settings: `cache:settings:<user_id>`.
    pub const SETTINGS: Kind = Kind::new("settings");
    /// User preferences: `cache:preferences:<user_id>` (TTL policy `settings`
    /// unless configured otherwise; see [`crate::TtlPolicy`]).
    pub const PREFERENCES: Kind = Kind::new("preferences");
    /// Sessions: `cache:session:<session_id>`.
    pub const SESSION: Kind = Kind::new("session");
    /// The token blacklist (revoked tokens and sessions):
    /// `cache:blacklist:<id>`; each entry ends with its token (see
    /// [`crate::Versioned::expires_at`]).
    pub const BLACKLIST: Kind = Kind::new("blacklist");
    /// Document metadata: `cache:document:<document_id>:metadata`.
    pub const DOCUMENT_META: Kind = Kind::new("document_meta")
        .with_segment("document")
        .with_suffix("metadata");

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
    pub(crate) fn validate(&self) -> Result<(), KeyError> {
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

/// Builds keys for one namespace.
#[derive(Debug, Clone)]
pub struct KeyBuilder {
    namespace: String,
    hash_tags: bool,
}

impl KeyBuilder {
    /// A builder for `namespace` (default in the seed: `cache`).
    ///
    /// # Errors
    ///
    /// [`KeyError::BadName`] when the namespace is not `[a-z0-9_]+`.
    pub fn new(namespace: &str, hash_tags: bool) -> Result<Self, KeyError> {
        check_name("namespace", namespace)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            hash_tags,
        })
    }

    /// The namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Whether ids are wrapped in a Redis Cluster hash tag.
    #[must_use]
    pub fn hash_tags(&self) -> bool {
        self.hash_tags
    }

    /// The value key of `id`.
    ///
    /// # Errors
    ///
    /// [`KeyError`] when `id` breaks the rules of [`validate_id`].
    pub fn value_key(&self, kind: &Kind, id: &str) -> Result<String, KeyError> {
        validate_id(id)?;
        let mut k =
            String::with_capacity(self.namespace.len() + kind.segment.len() + id.len() + 16);
        self.push_parts(&mut k, None, kind, id);
        Ok(k)
    }

    /// What every value key of `kind` starts with (`<ns>:<segment>:`):
    /// companions live under `<ns>:~`, so it covers values only.
    #[must_use]
    pub fn value_prefix(&self, kind: &Kind) -> String {
        format!("{}:{}:", self.namespace, kind.segment)
    }

    /// The prefix of every "not found" marker of a type:
    /// `<namespace>:~n:<segment>:` (what a near cache's invalidation stream
    /// follows besides [`value_prefix`](Self::value_prefix), for its
    /// negative entries).
    #[must_use]
    pub fn absent_prefix(&self, kind: &Kind) -> String {
        format!(
            "{}:{}{}:",
            self.namespace,
            Companion::Absent.tag(),
            kind.segment
        )
    }

    /// All keys of one entry.
    ///
    /// # Errors
    ///
    /// [`KeyError`] when `id` breaks the rules of [`validate_id`].
    pub fn entry(&self, kind: &Kind, id: &str) -> Result<EntryKeys, KeyError> {
        validate_id(id)?;
        Ok(self.entry_unchecked(kind, id))
    }

    pub(crate) fn entry_unchecked(&self, kind: &Kind, id: &str) -> EntryKeys {
        let build = |c: Option<Companion>| {
            let mut k =
                String::with_capacity(self.namespace.len() + kind.segment.len() + id.len() + 20);
            self.push_parts(&mut k, c, kind, id);
            k
        };
        EntryKeys {
            value: build(None),
            lease: build(Some(Companion::Lease)),
            stale: build(Some(Companion::Stale)),
            absent: build(Some(Companion::Absent)),
            pending: build(Some(Companion::Pending)),
        }
    }

    fn push_parts(&self, k: &mut String, c: Option<Companion>, kind: &Kind, id: &str) {
        k.push_str(&self.namespace);
        k.push(':');
        if let Some(c) = c {
            k.push_str(c.tag());
        }
        k.push_str(kind.segment);
        k.push(':');
        if self.hash_tags {
            k.push('{');
            k.push_str(id);
            k.push('}');
        } else {
            k.push_str(id);
        }
        if let Some(s) = kind.suffix {
            k.push(':');
            k.push_str(s);
        }
    }

    /// A key of kura's own under the namespace (locks, counters), never
    /// matching a value pattern: `<namespace>:~<name>`.
    #[must_use]
    pub fn internal(&self, name: &str) -> String {
        format!("{}:~{}", self.namespace, name)
    }

    /// The seed's Redis hit/miss counters: `metrics:<namespace>:hits` and
    /// `metrics:<namespace>:misses` (`metrics:cache:hits` for the default
    /// namespace).
    #[must_use]
    pub fn counter_keys(&self) -> [String; 2] {
        [
            format!("metrics:{}:hits", self.namespace),
            format!("metrics:{}:misses", self.namespace),
        ]
    }

    /// A pattern over the ids of one kind: `id_glob` may use `*`, `?`,
    /// `[...]` and `\` escapes; namespace, segment and suffix are literal.
    ///
    /// # Errors
    ///
    /// [`KeyError::BadPattern`] for a malformed glob.
    pub fn pattern(&self, kind: &Kind, id_glob: &str) -> Result<KeyPattern, KeyError> {
        Glob::compile(id_glob)?;
        if id_glob.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(KeyError::BadPattern(id_glob.to_owned()));
        }
        Ok(KeyPattern {
            builder: self.clone(),
            kind: *kind,
            id_glob: id_glob.to_owned(),
        })
    }

    /// Parses a full key glob such as `cache:profile:*` into a pattern over
    /// one of `kinds`. The glob must name the namespace and a kind's segment
    /// literally; only the id part (and nothing after it but the kind's
    /// suffix) may use wildcards.
    ///
    /// # Errors
    ///
    /// [`KeyError::BadPattern`] when the glob does not start with
    /// `<namespace>:<segment>:` of a known kind.
    pub fn parse_pattern(&self, glob: &str, kinds: &[Kind]) -> Result<KeyPattern, KeyError> {
        let bad = || KeyError::BadPattern(glob.to_owned());
        let rest = glob
            .strip_prefix(self.namespace.as_str())
            .and_then(|r| r.strip_prefix(':'))
            .ok_or_else(bad)?;
        for kind in kinds {
            let Some(id_part) = rest
                .strip_prefix(kind.segment)
                .and_then(|r| r.strip_prefix(':'))
            else {
                continue;
            };
            let id_part = match kind.suffix {
                Some(sfx) => match id_part.strip_suffix(sfx).and_then(|r| r.strip_suffix(':')) {
                    Some(p) => p,
                    // `cache:document:*` covers the suffix through the star.
                    None if id_part.ends_with('*') => id_part,
                    None => continue,
                },
                None => id_part,
            };
            let id_part = if self.hash_tags {
                id_part
                    .strip_prefix('{')
                    .and_then(|p| p.strip_suffix('}'))
                    .unwrap_or(id_part)
            } else {
                id_part
            };
            return self.pattern(kind, id_part);
        }
        Err(bad())
    }
}

/// The keys of one cache entry (value and companions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryKeys {
    /// The value key other services can `GET`.
    pub value: String,
    /// The load lease (owner token).
    pub lease: String,
    /// The stale copy.
    pub stale: String,
    /// The "not found" marker.
    pub absent: String,
    /// A write-behind write not yet in the database.
    pub pending: String,
}

impl EntryKeys {
    /// The five keys in the order the store scripts take them.
    #[must_use]
    pub fn as_array(&self) -> [&str; 5] {
        [
            &self.value,
            &self.lease,
            &self.stale,
            &self.absent,
            &self.pending,
        ]
    }
}

/// A validated pattern over the ids of one kind.
#[derive(Debug, Clone)]
pub struct KeyPattern {
    builder: KeyBuilder,
    kind: Kind,
    id_glob: String,
}

impl KeyPattern {
    /// The kind the pattern covers.
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The `SCAN MATCH` argument. It matches value keys and companions in one
    /// pass (`<ns>:*<segment>:<id-glob>`, literal parts escaped); callers
    /// confirm each key with [`KeyPattern::entry_of`], which rejects the few
    /// keys of other kinds the leading `*` also lets through.
    #[must_use]
    pub fn scan_match(&self) -> String {
        self.match_after(":*")
    }

    /// The `SCAN MATCH` argument for the pending write-behind copies of the
    /// pattern's entries only (`<ns>:~p:<segment>:<id-glob>`): they have a
    /// prefix of their own, so a scan for them does not return every key of
    /// the type.
    #[must_use]
    pub fn pending_scan_match(&self) -> String {
        self.match_after(&format!(":{}", Companion::Pending.tag()))
    }

    /// `<ns><between><segment>:<id-glob>[:<suffix>]`, with the id glob in
    /// its hash tag when keys carry one.
    fn match_after(&self, between: &str) -> String {
        let mut m = String::new();
        push_escaped(&mut m, &self.builder.namespace);
        m.push_str(between);
        push_escaped(&mut m, self.kind.segment);
        m.push(':');
        if self.builder.hash_tags {
            m.push_str("\\{");
        }
        m.push_str(&self.id_glob);
        if self.builder.hash_tags {
            m.push_str("\\}");
        }
        if let Some(s) = self.kind.suffix {
            m.push(':');
            push_escaped(&mut m, s);
        }
        m
    }

    /// The entry a scanned key belongs to, if the key is a value or companion
    /// key of this pattern's kind whose id matches the glob.
    #[must_use]
    pub fn entry_of(&self, key: &str) -> Option<EntryKeys> {
        let id = self.id_of(key)?;
        Some(self.builder.entry_unchecked(&self.kind, &id))
    }

    /// The id of the entry `key` belongs to, if this pattern covers it.
    #[must_use]
    pub fn id_of(&self, key: &str) -> Option<String> {
        let rest = key
            .strip_prefix(self.builder.namespace.as_str())?
            .strip_prefix(':')?;
        let rest = ["~l:", "~s:", "~n:", "~p:"]
            .iter()
            .find_map(|t| rest.strip_prefix(t))
            .unwrap_or(rest);
        let rest = rest.strip_prefix(self.kind.segment)?.strip_prefix(':')?;
        let id = match self.kind.suffix {
            Some(s) => rest.strip_suffix(s)?.strip_suffix(':')?,
            None => rest,
        };
        let id = if self.builder.hash_tags {
            id.strip_prefix('{')?.strip_suffix('}')?
        } else {
            id
        };
        (validate_id(id).is_ok() && Glob::matches(&self.id_glob, id)).then(|| id.to_owned())
    }

    /// Whether `key` is the value key of an entry this pattern covers.
    #[must_use]
    pub fn matches_value_key(&self, key: &str) -> bool {
        self.entry_of(key).is_some_and(|e| e.value == key)
    }
}

fn push_escaped(out: &mut String, literal: &str) {
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '{' | '}') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Escapes `literal` so that a glob matches exactly it.
///
/// # Examples
///
/// ```
/// assert_eq!(kura::key::escape_glob("a*b"), "a\\*b");
/// ```
#[must_use]
pub fn escape_glob(literal: &str) -> String {
    let mut s = String::with_capacity(literal.len());
    push_escaped(&mut s, literal);
    s
}

/// Redis-compatible glob matching (`*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`).
struct Glob;

impl Glob {
    fn compile(glob: &str) -> Result<(), KeyError> {
        let b = glob.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\\' => {
                    if i + 1 >= b.len() {
                        return Err(KeyError::BadPattern(glob.to_owned()));
                    }
                    i += 2;
                }
                b'[' => {
                    let close = b[i + 1..].iter().position(|&c| c == b']');
                    match close {
                        Some(p) => i += p + 2,
                        None => return Err(KeyError::BadPattern(glob.to_owned())),
                    }
                }
                _ => i += 1,
            }
        }
        Ok(())
    }

    fn matches(glob: &str, s: &str) -> bool {
        Self::match_bytes(glob.as_bytes(), s.as_bytes())
    }

    fn match_bytes(p: &[u8], s: &[u8]) -> bool {
        let (mut pi, mut si) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() {
                match p[pi] {
                    b'*' => {
                        star = Some((pi, si));
                        pi += 1;
                        continue;
                    }
                    b'?' => {
                        pi += 1;
                        si += 1;
                        continue;
                    }
                    b'[' => {
                        if let Some((ok, next)) = Self::class(p, pi, s[si]) {
                            if ok {
                                pi = next;
                                si += 1;
                                continue;
                            }
                        }
                    }
                    b'\\' if pi + 1 < p.len() => {
                        if p[pi + 1] == s[si] {
                            pi += 2;
                            si += 1;
                            continue;
                        }
                    }
                    c => {
                        if c == s[si] {
                            pi += 1;
                            si += 1;
                            continue;
                        }
                    }
                }
            }
            match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            }
        }
        while pi < p.len() && p[pi] == b'*' {
            pi += 1;
        }
        pi == p.len()
    }

    /// Matches `c` against the class starting at `p[start] == '['`; returns
    /// the result and the index after the class.
    fn class(p: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
        let mut i = start + 1;
        let negate = p.get(i) == Some(&b'^');
        if negate {
            i += 1;
        }
        let mut hit = false;
        while i < p.len() && p[i] != b']' {
            if p[i] == b'\\' && i + 1 < p.len() {
                hit |= p[i + 1] == c;
                i += 2;
            } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                let (lo, hi) = (p[i].min(p[i + 2]), p[i].max(p[i + 2]));
                hit |= (lo..=hi).contains(&c);
                i += 3;
            } else {
                hit |= p[i] == c;
                i += 1;
            }
        }
        if i >= p.len() {
            return None;
        }
        Some((hit != negate, i + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kb() -> KeyBuilder {
        KeyBuilder::new("cache", false).unwrap()
    }

    #[test]
    fn stale_key_from_the_value_key() {
        for tags in [false, true] {
            let e = KeyBuilder::new("cache", tags)
                .unwrap()
                .entry(&Kind::DOCUMENT_META, "d1")
                .unwrap();
            assert_eq!(stale_key_of(&e.value).as_deref(), Some(e.stale.as_str()));
        }
        assert_eq!(stale_key_of("cache:~lock:warm"), None);
        assert_eq!(stale_key_of("nocolon"), None);
    }

    #[test]
    fn seed_key_shapes() {
        let k = kb();
        assert_eq!(
            k.value_key(&Kind::PROFILE, "u1").unwrap(),
            "cache:profile:u1"
        );
        assert_eq!(
            k.value_key(&Kind::DOCUMENT_META, "d1").unwrap(),
            "cache:document:d1:metadata"
        );
        let e = k.entry(&Kind::PROFILE, "u1").unwrap();
        assert_eq!(e.lease, "cache:~l:profile:u1");
        assert_eq!(e.stale, "cache:~s:profile:u1");
        assert_eq!(e.absent, "cache:~n:profile:u1");
        let tagged = KeyBuilder::new("cache", true).unwrap();
        assert_eq!(
            tagged.value_key(&Kind::PROFILE, "u1").unwrap(),
            "cache:profile:{u1}"
        );
    }

    #[test]
    fn bad_ids_are_rejected() {
        let k = kb();
        for (id, err) in [
            ("", KeyError::Empty),
            ("a b", KeyError::ForbiddenChar(' ')),
            ("a\tb", KeyError::ForbiddenChar('\t')),
            ("a\nb", KeyError::ForbiddenChar('\n')),
            ("a*", KeyError::ForbiddenChar('*')),
            ("a?", KeyError::ForbiddenChar('?')),
            ("[a]", KeyError::ForbiddenChar('[')),
            ("a\\b", KeyError::ForbiddenChar('\\')),
            ("a:b", KeyError::ForbiddenChar(':')),
            ("{a}", KeyError::ForbiddenChar('{')),
            ("a\u{7f}", KeyError::ForbiddenChar('\u{7f}')),
        ] {
            assert_eq!(k.value_key(&Kind::PROFILE, id), Err(err), "{id:?}");
        }
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            k.value_key(&Kind::PROFILE, &long),
            Err(KeyError::TooLong(MAX_ID_LEN + 1))
        );
        assert!(k.value_key(&Kind::PROFILE, &"x".repeat(MAX_ID_LEN)).is_ok());
        assert!(k.value_key(&Kind::PROFILE, "山田-太郎").is_ok());
        assert!(KeyBuilder::new("Cache", false).is_err());
        assert!(KeyBuilder::new("ca*", false).is_err());
    }

    #[test]
    fn pattern_escapes_literals_and_confirms_keys() {
        let k = kb();
        let p = k.pattern(&Kind::PROFILE, "*").unwrap();
        assert_eq!(p.scan_match(), "cache:*profile:*");
        assert!(p.matches_value_key("cache:profile:abc"));
        assert_eq!(
            p.entry_of("cache:~s:profile:abc").unwrap().value,
            "cache:profile:abc"
        );
        // Another kind whose id happens to be "profile" is not ours.
        assert!(p.entry_of("cache:other:profile:x").is_none());
        assert!(p.entry_of("cache:profiles:x").is_none());
        let p = k.pattern(&Kind::PROFILE, "ab?").unwrap();
        assert!(p.matches_value_key("cache:profile:abc"));
        assert!(!p.matches_value_key("cache:profile:abcd"));
        let d = k.pattern(&Kind::DOCUMENT_META, "d[12]").unwrap();
        assert_eq!(d.scan_match(), "cache:*document:d[12]:metadata");
        assert!(d.matches_value_key("cache:document:d1:metadata"));
        assert!(!d.matches_value_key("cache:document:d3:metadata"));
        assert!(k.pattern(&Kind::PROFILE, "[abc").is_err());
        assert!(k.pattern(&Kind::PROFILE, "abc\\").is_err());
    }

    #[test]
    fn pending_copies_have_a_scan_of_their_own() {
        let k = kb();
        let p = k.pattern(&Kind::PROFILE, "*").unwrap();
        assert_eq!(p.pending_scan_match(), "cache:~p:profile:*");
        let d = k.pattern(&Kind::DOCUMENT_META, "*").unwrap();
        assert_eq!(d.pending_scan_match(), "cache:~p:document:*:metadata");
        let tagged = KeyBuilder::new("cache", true).unwrap();
        let t = tagged.pattern(&Kind::PROFILE, "*").unwrap();
        assert_eq!(t.pending_scan_match(), "cache:~p:profile:\\{*\\}");
        let e = tagged.entry(&Kind::PROFILE, "u1").unwrap();
        assert_eq!(t.entry_of(&e.pending).unwrap(), e);
    }

    #[test]
    fn parse_full_globs() {
        let k = kb();
        let kinds = [Kind::PROFILE, Kind::DOCUMENT_META];
        let p = k.parse_pattern("cache:profile:*", &kinds).unwrap();
        assert_eq!(p.kind(), Kind::PROFILE);
        let p = k
            .parse_pattern("cache:document:*:metadata", &kinds)
            .unwrap();
        assert_eq!(p.kind(), Kind::DOCUMENT_META);
        assert!(k.parse_pattern("*", &kinds).is_err());
        assert!(k.parse_pattern("other:profile:*", &kinds).is_err());
        assert!(k.parse_pattern("cache:*", &kinds).is_err());
    }

    #[test]
    fn glob_semantics() {
        for (p, s, want) in [
            ("*", "", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbd", false),
            ("[^a]b", "cb", true),
            ("[^a]b", "ab", false),
            ("[a-c]", "b", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("*a*b", "xxaxxb", true),
        ] {
            assert_eq!(Glob::matches(p, s), want, "{p} vs {s}");
        }
    }
}
