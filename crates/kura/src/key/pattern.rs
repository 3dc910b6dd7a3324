//! [`KeyPattern`]: a glob over one type's keys, for `SCAN MATCH` and for
//! telling which entry a scanned key belongs to.

use super::*;

/// A validated pattern over the ids of one kind.
#[derive(Debug, Clone)]
pub struct KeyPattern {
    pub(super) builder: KeyBuilder,
    pub(super) kind: Kind,
    pub(super) id_glob: String,
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
pub(super) struct Glob;

impl Glob {
    pub(super) fn compile(glob: &str) -> Result<(), KeyError> {
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

    pub(super) fn matches(glob: &str, s: &str) -> bool {
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
