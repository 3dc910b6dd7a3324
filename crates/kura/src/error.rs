//! Errors: one enum for the store seam, one for callers of the strategies.
//!
//! Store errors never reach callers of a read or a write: the strategies turn
//! them into a database fallback, a pending invalidation and a breaker tick.
//! What does reach callers is bad input and a source failure with nothing
//! cached to fall back on.

use std::sync::Arc;

use crate::codec::CodecError;
use crate::key::KeyError;

/// What kind of failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The command did not answer within the operation timeout.
    Timeout,
    /// The connection failed or the server answered with an error.
    Server,
    /// The key holds a value of another type (`WRONGTYPE`): bad data, not an
    /// outage. Callers repair the key instead of tripping the breaker.
    WrongType,
    /// The circuit breaker is open: the store was not asked.
    Unavailable,
}

/// A failure of the cache server or its connection: its [`kind`], what it
/// was about (a key, a reply), and the error underneath when there is one
/// (as redis-rs' `RedisError` carries its kind and detail).
///
/// [`kind`]: StoreError::kind
#[derive(Debug, Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    detail: Option<Arc<str>>,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StoreError {
    /// An error of `kind` with a detail.
    #[must_use]
    pub fn new(kind: StoreErrorKind, detail: impl Into<Arc<str>>) -> Self {
        Self {
            kind,
            detail: Some(detail.into()),
            source: None,
        }
    }

    /// The operation timed out.
    #[must_use]
    pub fn timeout() -> Self {
        Self {
            kind: StoreErrorKind::Timeout,
            detail: None,
            source: None,
        }
    }

    /// The circuit breaker is open: the store was not asked.
    #[must_use]
    pub fn unavailable() -> Self {
        Self {
            kind: StoreErrorKind::Unavailable,
            detail: None,
            source: None,
        }
    }

    /// The server or the connection failed: `detail` says what.
    #[must_use]
    pub fn server(detail: impl Into<Arc<str>>) -> Self {
        Self::new(StoreErrorKind::Server, detail)
    }

    /// The key `key` holds a value of another type.
    #[must_use]
    pub fn wrong_type(key: impl Into<Arc<str>>) -> Self {
        Self::new(StoreErrorKind::WrongType, key)
    }

    /// The same error with `source` as the error underneath.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// What kind of failure it is.
    #[must_use]
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// What it was about (a key, a reply, the server's message), if known.
    #[must_use]
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// Whether the error says the server is unhealthy (counts against the
    /// circuit breaker), as opposed to bad data at one key.
    #[must_use]
    pub fn is_outage(&self) -> bool {
        self.kind != StoreErrorKind::WrongType
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind, self.detail.as_deref()) {
            (StoreErrorKind::Timeout, _) => f.write_str("cache operation timed out"),
            (StoreErrorKind::Unavailable, _) => f.write_str("cache unavailable (circuit open)"),
            (StoreErrorKind::Server, Some(d)) => write!(f, "cache server error: {d}"),
            (StoreErrorKind::Server, None) => f.write_str("cache server error"),
            (StoreErrorKind::WrongType, Some(k)) if !k.is_empty() => {
                write!(f, "key {k} holds the wrong type")
            }
            (StoreErrorKind::WrongType, _) => f.write_str("a key holds the wrong type"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        let kind = if e.code() == Some("WRONGTYPE") {
            StoreErrorKind::WrongType
        } else if e.is_timeout() {
            StoreErrorKind::Timeout
        } else {
            StoreErrorKind::Server
        };
        let detail = match kind {
            StoreErrorKind::WrongType => String::new(),
            _ => e.to_string(),
        };
        StoreError::new(kind, detail).with_source(e)
    }
}

/// A boxed error of the system of record.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a caller of the strategies can get back.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The id cannot be a cache key.
    #[error("invalid key: {0}")]
    Key(#[from] KeyError),
    /// The tag is not one kura accepts ([`crate::tags::validate_tag`]).
    #[error("invalid tag: {0}")]
    Tag(#[from] crate::tags::TagError),
    /// The source failed and no stale value was on hand.
    #[error("source failed: {0}")]
    Source(Arc<dyn std::error::Error + Send + Sync + 'static>),
    /// The load took longer than the type's hard load timeout and no stale
    /// copy was on hand (see [`crate::policy::freshness`]); the load goes on in the
    /// background and fills the cache.
    #[error("the load did not finish within {0:?}")]
    LoadTimeout(std::time::Duration),
    /// The value cannot be encoded (not a JSON object).
    #[error("{0}")]
    Codec(Arc<CodecError>),
    /// The operation needs the cache server and it is unavailable (admin
    /// operations such as pattern invalidation; reads and writes never
    /// return this).
    #[error("cache unavailable: {0}")]
    Unavailable(StoreError),
}

impl Error {
    pub(crate) fn source_error(e: impl Into<BoxError>) -> Self {
        Error::Source(Arc::from(e.into()))
    }
}

impl From<CodecError> for Error {
    fn from(e: CodecError) -> Self {
        Error::Codec(Arc::new(e))
    }
}
