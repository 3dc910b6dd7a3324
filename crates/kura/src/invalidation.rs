//! Invalidation: one key, many keys in one pipeline, every type of one
//! entity, and patterns by `SCAN` + batched deletes (never `KEYS`).
//!
//! Deleting an entry also deletes its lease, so a load in flight cannot put
//! the old value back, and its stale copy, so nothing invalidated is served
//! even when the source fails later.

use crate::cache::Cache;
use crate::error::Error;
use crate::key::{EntryKeys, Kind};

/// What an invalidation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Invalidated {
    /// How many values were cached and are now deleted.
    pub deleted: u64,
    /// Whether the store was unavailable and the invalidation is pending
    /// (until it is replayed, this process reads the keys from the source).
    pub deferred: bool,
}

impl Cache {
    /// Invalidates one entry.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad id. Store errors defer the invalidation.
    pub async fn invalidate(&self, kind: Kind, id: &str) -> Result<Invalidated, Error> {
        self.invalidate_many(kind, &[id]).await
    }

    /// Invalidates many entries of one type in one pipeline.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for the first bad id (nothing is invalidated then).
    /// Store errors defer the invalidation.
    pub async fn invalidate_many<I: AsRef<str>>(
        &self,
        kind: Kind,
        ids: &[I],
    ) -> Result<Invalidated, Error> {
        kind.validate()?;
        let entries = ids
            .iter()
            .map(|id| self.inner.keys.entry(&kind, id.as_ref()).map(|e| (kind, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.invalidate_entries(entries).await)
    }

    /// Invalidates every listed type of one entity, such as the seed's
    /// profile, settings and preferences of a user, in one pipeline.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad id. Store errors defer the invalidation.
    pub async fn invalidate_entity(&self, id: &str, kinds: &[Kind]) -> Result<Invalidated, Error> {
        let entries = kinds
            .iter()
            .map(|k| {
                k.validate()?;
                self.inner.keys.entry(k, id).map(|e| (*k, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.invalidate_entries(entries).await)
    }

    async fn invalidate_entries(&self, entries: Vec<(Kind, EntryKeys)>) -> Invalidated {
        if entries.is_empty() {
            return Invalidated {
                deleted: 0,
                deferred: false,
            };
        }
        let c = &self.inner;
        for (k, _) in &entries {
            c.kind_metrics(k).invalidations.increment(1);
        }
        let refs: Vec<&EntryKeys> = entries.iter().map(|(_, e)| e).collect();
        let r = c.call(None, c.store.invalidate(&refs)).await;
        // From here no new reader in this process joins a load that began
        // before this invalidation.
        for (_, e) in &entries {
            c.epochs.bump(&e.value);
            c.near_evict(&e.value);
        }
        match r {
            Ok(deleted) => Invalidated {
                deleted,
                deferred: false,
            },
            Err(e) => {
                tracing::warn!(error = %e, n = entries.len(), "invalidation deferred");
                for (k, e) in entries {
                    c.defer(k, [e]);
                }
                Invalidated {
                    deleted: 0,
                    deferred: true,
                }
            }
        }
    }

    /// Invalidates every entry of `kind` whose id matches `id_glob` (`*`,
    /// `?`, `[...]`; the namespace and type are matched literally), by
    /// `SCAN ... COUNT 100` and batched deletes. Returns how many values
    /// were cached.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a malformed glob; [`Error::Unavailable`] when the
    /// store cannot be reached, in which case the pattern is kept (once,
    /// however often it fails) and replayed in the background; until then
    /// this process reads every key of the type from the source.
    pub async fn invalidate_pattern(&self, kind: Kind, id_glob: &str) -> Result<u64, Error> {
        kind.validate()?;
        let pattern = self.inner.keys.pattern(&kind, id_glob)?;
        self.invalidate_key_pattern(pattern).await
    }

    /// Invalidates every entry of `kind` (the seed's
    /// `invalidate_all_profile_caches`).
    ///
    /// # Errors
    ///
    /// As [`Cache::invalidate_pattern`].
    pub async fn invalidate_all(&self, kind: Kind) -> Result<u64, Error> {
        self.invalidate_pattern(kind, "*").await
    }

    /// Invalidates by a full key glob such as `cache:profile:*` or
    /// `cache:document:*:metadata`, which must name the namespace and one of
    /// `kinds` literally.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] when the glob names no known kind; otherwise as
    /// [`Cache::invalidate_pattern`].
    pub async fn invalidate_glob(&self, glob: &str, kinds: &[Kind]) -> Result<u64, Error> {
        let pattern = self.inner.keys.parse_pattern(glob, kinds)?;
        self.invalidate_key_pattern(pattern).await
    }

    async fn invalidate_key_pattern(&self, pattern: crate::key::KeyPattern) -> Result<u64, Error> {
        let c = &self.inner;
        let m = c.kind_metrics(&pattern.kind());
        // A scan walks the whole keyspace: give it more than one operation's
        // time, but keep it bounded.
        let r = c
            .call_within(
                std::time::Duration::from_secs(120),
                Some(&m),
                c.store.invalidate_matching(&pattern),
            )
            .await;
        c.epochs.bump_all();
        c.near_clear(&pattern.kind());
        match r {
            Ok(n) => {
                m.invalidations.increment(n);
                Ok(n)
            }
            Err(e) => {
                tracing::warn!(error = %e, pattern = pattern.scan_match(), "pattern invalidation deferred");
                c.defer_pattern(pattern);
                Err(Error::Unavailable(e))
            }
        }
    }
}
