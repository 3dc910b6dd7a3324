//! [`UserData`]: settings and preferences through the cache.

use std::time::Duration;

use kura::{BehindError, CacheAside, Fetched, QueuedCache, WriteBehind, WriteThrough, WriteTurn};
use uuid::Uuid;

use super::repo::{DocKind, DocSink, UserDoc};
use crate::config::{OnFull, WbConfig, WriteStrategy};
use crate::db::{Db, DbError};
use crate::to_completion::ToCompletion;

/// The largest document accepted, in bytes of compact JSON.
pub const MAX_DOC_BYTES: usize = 16 * 1024;

/// The deepest nesting accepted.
pub const MAX_DOC_DEPTH: usize = 32;

/// The database as the source of one document kind.
#[derive(Debug, Clone)]
pub struct DocSource {
    db: Db,
    kind: DocKind,
}

impl kura::Source for DocSource {
    type Value = UserDoc;
    type Error = DbError;

    async fn load(&self, id: &str) -> Result<Option<UserDoc>, DbError> {
        match Uuid::parse_str(id) {
            Ok(u) => self.db.doc(self.kind, u).await,
            Err(_) => Ok(None),
        }
    }
}

/// Why a document write failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    /// The user has no profile.
    #[error("profile not found")]
    NoProfile,
    /// The document is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The database failed and nothing usable is cached.
    #[error(transparent)]
    Cache(#[from] kura::Error),
    /// The write cannot be taken now (queue full, queued writes not yet
    /// in the database, another writer holds the lock).
    #[error("{detail}")]
    Busy {
        /// When to try again.
        retry_after: Duration,
        /// What to tell the client.
        detail: String,
    },
    /// Too many concurrent `behind` writes of one document.
    #[error("too many concurrent writes to this document")]
    Contended,
}

impl From<kura::TurnError> for DocError {
    fn from(e: kura::TurnError) -> Self {
        DocError::Busy {
            retry_after: Duration::from_secs(1),
            detail: e.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
struct Docs {
    reads: CacheAside<DocSource>,
    writes: WriteThrough,
    behind: WriteBehind<DocSource>,
}

/// Settings and preferences through the cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UserData {
    db: Db,
    wb: WbConfig,
    strategy: WriteStrategy,
    settings: Docs,
    preferences: Docs,
}

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Checks a document: a JSON object of at most [`MAX_DOC_BYTES`] and
/// [`MAX_DOC_DEPTH`] levels; returns its compact JSON.
///
/// # Errors
///
/// [`DocError::Invalid`] saying what is wrong.
pub fn validate(
    kind: DocKind,
    data: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, DocError> {
    let text = serde_json::to_string(data).map_err(|e| DocError::Invalid(e.to_string()))?;
    let what = kind.table();
    if text.len() > MAX_DOC_BYTES {
        return Err(DocError::Invalid(format!(
            "{what}: at most {MAX_DOC_BYTES} bytes of JSON (got {})",
            text.len()
        )));
    }
    let d = data.values().map(depth).max().unwrap_or(0) + 1;
    if d > MAX_DOC_DEPTH {
        return Err(DocError::Invalid(format!(
            "{what}: at most {MAX_DOC_DEPTH} levels of nesting (got {d})"
        )));
    }
    Ok(text)
}

impl UserData {
    /// Settings and preferences over `db` and `cache`, with the queue
    /// limits of `wb`, written with `strategy` unless a write names one.
    #[must_use]
    pub fn new(db: Db, cache: &QueuedCache, wb: &WbConfig, strategy: WriteStrategy) -> Self {
        let docs = |kind: DocKind| {
            let reads = cache.aside(
                kind.kind(),
                DocSource {
                    db: db.clone(),
                    kind,
                },
            );
            Docs {
                behind: cache.write_behind(&reads).limits(wb.limits()),
                writes: cache.write_through(kind.kind()),
                reads,
            }
        };
        Self {
            settings: docs(DocKind::Settings),
            preferences: docs(DocKind::Preferences),
            wb: wb.clone(),
            strategy,
            db,
        }
    }

    /// The write strategy of a write that names none.
    #[must_use]
    pub fn strategy(&self) -> WriteStrategy {
        self.strategy
    }

    /// A flusher of `kind`'s queue into the database, reading the queue
    /// through `cache` (a cache of its own per flusher on Redis: see
    /// [`crate::profiles::ProfileService::flusher_on`]).
    pub fn flusher_on(
        &self,
        kind: DocKind,
        cache: &QueuedCache,
    ) -> kura::Flusher<DocSource, DocSink> {
        let wb = cache
            .behind(
                kind.kind(),
                DocSource {
                    db: self.db.clone(),
                    kind,
                },
            )
            .limits(self.wb.limits());
        wb.flusher(DocSink {
            db: self.db.clone(),
            kind,
        })
        .batch_size(self.wb.batch)
        .linger(self.wb.linger)
        .claim_idle(self.wb.claim_idle)
        .max_attempts(self.wb.max_attempts)
    }

    /// What the settings' and preferences' near caches hold, by type.
    #[must_use]
    pub fn near_stats(&self) -> Vec<(&'static str, kura::near::NearStats)> {
        [
            (DocKind::Settings.table(), self.settings.reads.near_stats()),
            (
                DocKind::Preferences.table(),
                self.preferences.reads.near_stats(),
            ),
        ]
        .into_iter()
        .filter_map(|(k, s)| Some((k, s?)))
        .collect()
    }

    /// The queue of `kind` (for status and tests).
    #[must_use]
    pub fn write_behind(&self, kind: DocKind) -> &WriteBehind<DocSource> {
        &self.docs(kind).behind
    }

    /// Takes both documents' write turns, each once it has no queued
    /// write (before a profile delete); the turns end with
    /// [`UserData::release`].
    ///
    /// # Errors
    ///
    /// [`DocError::Busy`] when a turn or the wait ran out.
    pub(crate) async fn settle(&self, user_id: Uuid) -> Result<Vec<WriteTurn>, DocError> {
        let id = user_id.hyphenated().to_string();
        let mut held = Vec::new();
        for kind in [DocKind::Settings, DocKind::Preferences] {
            match self.docs(kind).behind.direct_turn(&id).await {
                Ok(t) => held.push(t),
                Err(e) => {
                    Self::release(held).await;
                    return Err(e.into());
                }
            }
        }
        Ok(held)
    }

    /// Ends turns taken by [`UserData::settle`].
    pub(crate) async fn release(turns: Vec<WriteTurn>) {
        for t in turns {
            t.release().await;
        }
    }

    fn docs(&self, kind: DocKind) -> &Docs {
        match kind {
            DocKind::Settings => &self.settings,
            DocKind::Preferences => &self.preferences,
        }
    }

    /// Reads a user's document through the cache.
    ///
    /// # Errors
    ///
    /// [`DocError::Cache`] when the database fails and nothing usable is
    /// cached.
    pub async fn get(&self, kind: DocKind, user_id: &Uuid) -> Result<Fetched<UserDoc>, DocError> {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        Ok(self
            .docs(kind)
            .reads
            .get(crate::registry::user_key_id(user_id, &mut buf))
            .await?)
    }

    /// Writes a user's document with `strategy` and returns the row as
    /// it now stands (for `behind`: as accepted) and how it was written.
    /// A direct write runs to completion even if the request is dropped.
    ///
    /// # Errors
    ///
    /// [`DocError::Invalid`], [`DocError::NoProfile`],
    /// [`DocError::Database`]; [`DocError::Busy`] when queued writes of the
    /// document did not reach the database in time, or (`behind`) the
    /// queue is full with `--wb-on-full reject`; [`DocError::Contended`].
    pub async fn put(
        &self,
        kind: DocKind,
        user_id: Uuid,
        data: &serde_json::Map<String, serde_json::Value>,
        strategy: WriteStrategy,
    ) -> Result<(UserDoc, WriteStrategy), DocError> {
        let text = validate(kind, data)?;
        if strategy == WriteStrategy::Behind {
            return self.put_behind(kind, user_id, data, text).await;
        }
        let doc = self.put_direct(kind, user_id, text, strategy).await?;
        Ok((doc, strategy))
    }

    /// A direct write under the document's write lock, after its queued
    /// writes reached the database.
    async fn put_direct(
        &self,
        kind: DocKind,
        user_id: Uuid,
        text: String,
        strategy: WriteStrategy,
    ) -> Result<UserDoc, DocError> {
        let turn = self
            .docs(kind)
            .behind
            .direct_turn(&user_id.hyphenated().to_string())
            .await?;
        let this = self.clone();
        ToCompletion::new(async move {
            let r = this.commit(kind, user_id, &text, strategy).await;
            turn.release().await;
            r
        })
        .await
    }

    async fn commit(
        &self,
        kind: DocKind,
        user_id: Uuid,
        text: &str,
        strategy: WriteStrategy,
    ) -> Result<UserDoc, DocError> {
        let written = self.db.put_doc(kind, user_id, text).await;
        let docs = self.docs(kind);
        let id = user_id.hyphenated().to_string();
        let doc = match written {
            Ok(Some(d)) => d,
            Ok(None) => return Err(DocError::NoProfile),
            Err(e) => {
                // It may have committed: the old value must not stay.
                let _ = docs.writes.invalidate(&id).await;
                return Err(e.into());
            }
        };
        let r = match strategy {
            WriteStrategy::Through => docs.writes.update(&id, &doc).await,
            _ => docs.writes.invalidate(&id).await,
        };
        if let Err(e) = r {
            tracing::error!(user_id = id, error = %e, "cache step after commit failed");
        }
        Ok(doc)
    }

    /// A `behind` write: accepted into the cache and its queue under the
    /// document's write lock; written directly when it cannot be queued.
    async fn put_behind(
        &self,
        kind: DocKind,
        user_id: Uuid,
        data: &serde_json::Map<String, serde_json::Value>,
        text: String,
    ) -> Result<(UserDoc, WriteStrategy), DocError> {
        let docs = self.docs(kind);
        let id = user_id.hyphenated().to_string();
        let turn = docs.behind.turn(&id).await?;
        let now = chrono::Utc::now();
        let accepted = docs
            .behind
            .accept(&id, |cur| UserDoc {
                user_id,
                data: data.clone(),
                updated_at: now,
                version: cur.version + 1,
            })
            .await;
        turn.release().await;
        let (reason, strategy) = match accepted {
            Ok(a) => return Ok((a.value, WriteStrategy::Behind)),
            // Nothing to base a queued write on: the first write is direct.
            Err(BehindError::NotFound) => ("absent", WriteStrategy::Invalidate),
            Err(BehindError::Full { .. }) if self.wb.on_full == OnFull::Reject => {
                return Err(DocError::Busy {
                    retry_after: Duration::from_secs(1),
                    detail: "the write-behind queue is full; retry later".to_owned(),
                });
            }
            Err(BehindError::Full { .. }) => ("full", WriteStrategy::Through),
            Err(BehindError::Contended) => return Err(DocError::Contended),
            Err(BehindError::Read(e)) => return Err(DocError::Cache(e)),
            Err(BehindError::Key(e)) => return Err(DocError::Invalid(e.to_string())),
            Err(e) => {
                tracing::warn!(user_id = id, error = %e, "behind write not queued: written through");
                ("unavailable", WriteStrategy::Through)
            }
        };
        metrics::counter!("kura_wb_write_through_total", "reason" => reason, "cache_type" => kind.table())
            .increment(1);
        let doc = self.put_direct(kind, user_id, text, strategy).await?;
        Ok((doc, strategy))
    }
}
