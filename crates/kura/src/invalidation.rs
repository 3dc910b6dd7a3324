//! Invalidation: one key, many keys in one pipeline, every type of one
//! entity, patterns by `SCAN` + batched deletes (never `KEYS`), and the
//! O(1) clear of a type or tag ([`crate::tags`]) with the sweep that frees
//! what a clear covered.
//!
//! Deleting an entry also deletes its lease, so a load in flight cannot put
//! the old value back, and its stale copy, so nothing invalidated is served
//! even when the source fails later.

use crate::core::Cache;
use crate::error::Error;
use crate::key::{EntryKeys, Kind};
use crate::tags::{Cleared, kind_field, tag_field, validate_tag};

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

impl Cache {
    /// Stops every cached value of `kind` being served, in one store step
    /// whatever their number (see [`crate::tags`]); the entries expire by
    /// their TTL. A load in flight when it is called does not put an older
    /// value back.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad kind; [`Error::Unavailable`] when the store
    /// cannot be reached: the clear is then kept as a pending invalidation
    /// of the type's keys, replayed (by `SCAN`) once the store is back, and
    /// until then this process reads the type from the source.
    pub async fn clear(&self, kind: Kind) -> Result<Cleared, Error> {
        kind.validate()?;
        let c = &self.inner;
        let pattern = c.keys.pattern(&kind, "*")?;
        let covered = c
            .call(None, c.store.count_matching(&pattern))
            .await
            .ok()
            .flatten();
        let r = crate::spans::in_span!(
            c.bump(&kind_field(kind.name())),
            "cache.write",
            cache.r#type = kind.name(),
            cache.op = "clear"
        )
        .await;
        match r {
            Ok(epoch) => Ok(Cleared { epoch, covered }),
            Err(e) => {
                // Kept as a pending invalidation of the type's keys: this
                // process reads the type from the source until it is
                // replayed.
                tracing::warn!(error = %e, kind = kind.name(), "clear deferred as a pattern invalidation");
                c.defer_pattern(pattern);
                Err(e)
            }
        }
    }

    /// Removes from the store the values of `kind` that the clear at `epoch`
    /// ([`Cleared::epoch`]) stopped, with their stale copies, so that their
    /// memory is freed now rather than at the end of their TTL; returns how
    /// many. Values filled since the clear and pending write-behind writes
    /// are kept. Walks the store's keys of the namespace (Redis: `SCAN` +
    /// one script per key found, on every primary): seconds for a million
    /// values, so callers run it after answering, or in the background.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad kind; [`Error::Unavailable`] when the store
    /// fails (what was removed stays removed; the rest expires by its TTL).
    pub async fn sweep(&self, kind: Kind, epoch: u64) -> Result<u64, Error> {
        kind.validate()?;
        let c = &self.inner;
        let pattern = c.keys.pattern(&kind, "*")?;
        c.store
            .sweep(&pattern, epoch)
            .await
            .map_err(Error::Unavailable)
    }

    /// Stops every cached value carrying `tag` ([`crate::Versioned::tags`])
    /// being served, of any type, in one store step (see [`crate::tags`]).
    ///
    /// # Errors
    ///
    /// [`Error::Tag`] for a tag [`crate::tags::validate_tag`] refuses;
    /// [`Error::Unavailable`] when the store cannot be reached.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<Cleared, Error> {
        validate_tag(tag)?;
        let epoch = self.inner.bump(&tag_field(tag)).await?;
        Ok(Cleared {
            epoch,
            covered: None,
        })
    }
}
