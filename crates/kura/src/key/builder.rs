//! [`KeyBuilder`]: the keys of an entry and of the namespace's internal
//! state, with Cluster hash tags when the store needs them.

use super::*;

/// Builds keys for one namespace.
#[derive(Debug, Clone)]
pub struct KeyBuilder {
    pub(super) namespace: String,
    pub(super) hash_tags: bool,
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
