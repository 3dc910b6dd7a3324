//! Errors: one enum for the store seam, one for callers of the strategies.
//!
//! Store errors never reach callers of a read or a write: the strategies turn
//! them into a database fallback, a pending invalidation and a breaker tick.
//! What does reach callers is bad input and a source failure with nothing
//! cached to fall back on.

use std::sync::Arc;

use crate::codec::CodecError;
use crate::key::KeyError;

/// A failure of the cache server or its connection.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The command did not answer within the operation timeout.
    #[error("cache operation timed out")]
    Timeout,
    /// The connection failed or the server answered with an error.
    #[error("cache server error: {0}")]
    Server(Arc<str>),
    /// The key holds a value of another type (`WRONGTYPE`): bad data, not an
    /// outage. Callers repair the key instead of tripping the breaker.
    #[error("key {0} holds the wrong type")]
    WrongType(String),
    /// The circuit breaker is open: the store was not asked.
    #[error("cache unavailable (circuit open)")]
    Unavailable,
}

impl StoreError {
    /// Whether the error says the server is unhealthy (counts against the
    /// circuit breaker), as opposed to bad data at one key.
    #[must_use]
    pub fn is_outage(&self) -> bool {
        !matches!(self, StoreError::WrongType(_))
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        if e.code() == Some("WRONGTYPE") {
            return StoreError::WrongType(String::new());
        }
        if e.is_timeout() {
            return StoreError::Timeout;
        }
        StoreError::Server(e.to_string().into())
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
    /// copy was on hand (see [`crate::freshness`]); the load goes on in the
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
