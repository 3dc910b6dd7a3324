//! Settings and preferences: a JSON object per user, read through the
//! cache and written with the profile's strategies.
//!
//! | operation | database | cache (library call) |
//! |---|---|---|
//! | read | `SELECT` on a miss | [`CacheAside::get`] (kinds `settings`, `preferences`; TTL 1800 s) |
//! | write, `invalidate` | `INSERT … ON CONFLICT DO UPDATE … version + 1 RETURNING` | [`WriteThrough::invalidate`] after commit |
//! | write, `through` | same | [`WriteThrough::update`] after commit |
//! | profile deleted | both rows deleted with the profile | [`kura::Cache::invalidate_entity`] (profile, settings, preferences) |
//!
//! Both tables are fed to the cache by the invalidation feed, so a write
//! made straight in the database invalidates too.
//!
//! # Not offered
//!
//! `behind`: these documents are written directly (`invalidate` or
//! `through`); a `?strategy=behind` write is refused with 422.

use kura::{CacheAside, Fetched, QueuedCache, WriteThrough};
use uuid::Uuid;

use crate::config::WriteStrategy;
use crate::db::userdata::{DocKind, UserDoc};
use crate::db::{Db, DbError};
use crate::profiles::Finish;

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
}

#[derive(Debug, Clone)]
struct Docs {
    reads: CacheAside<DocSource>,
    writes: WriteThrough,
}

/// Settings and preferences through the cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct UserData {
    db: Db,
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
    /// Settings and preferences over `db` and `cache`.
    #[must_use]
    pub fn new(db: Db, cache: &QueuedCache) -> Self {
        let docs = |kind: DocKind| Docs {
            reads: cache.aside(
                kind.kind(),
                DocSource {
                    db: db.clone(),
                    kind,
                },
            ),
            writes: cache.write_through(kind.kind()),
        };
        Self {
            settings: docs(DocKind::Settings),
            preferences: docs(DocKind::Preferences),
            db,
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
            .get(crate::profiles::key_id(user_id, &mut buf))
            .await?)
    }

    /// Writes a user's document with `strategy` and returns the committed
    /// row. The write runs to completion even if the request is dropped.
    ///
    /// # Errors
    ///
    /// [`DocError::Invalid`] (a bad document, or `behind`),
    /// [`DocError::NoProfile`], [`DocError::Database`].
    pub async fn put(
        &self,
        kind: DocKind,
        user_id: Uuid,
        data: &serde_json::Map<String, serde_json::Value>,
        strategy: WriteStrategy,
    ) -> Result<UserDoc, DocError> {
        if strategy == WriteStrategy::Behind {
            return Err(DocError::Invalid(format!(
                "strategy: {} are written directly (invalidate or through), not behind",
                kind.table()
            )));
        }
        let text = validate(kind, data)?;
        let this = self.clone();
        Finish::new(async move {
            let written = this.db.put_doc(kind, user_id, &text).await;
            let docs = this.docs(kind);
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
        })
        .await
    }
}
