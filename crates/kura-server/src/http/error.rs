//! HTTP errors: one variant per status, answered as `{"detail": "<message>"}`.
//!
//! Database and Redis details are logged here and never sent to clients.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{AuthError, Denied, GateError, Refused};
use crate::db::DbError;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub detail: String,
}

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400 Bad Request: the request cannot be read.
    #[error("{0}")]
    BadRequest(String),
    /// 401 Unauthorized: the bearer token is missing, invalid or expired.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403 Forbidden: the caller may not act on this resource.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404 Not Found.
    #[error("{0}")]
    NotFound(&'static str),
    /// 405 Method Not Allowed.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 Conflict: the profile already exists.
    #[error("{0}")]
    Conflict(&'static str),
    /// 413 Payload Too Large: the body is over the limit (64 KiB).
    #[error("request body is too large")]
    PayloadTooLarge,
    /// 422 Unprocessable Entity: unknown field, wrong type, invalid value or
    /// malformed id.
    #[error("{0}")]
    Unprocessable(String),
    /// 500 Internal Server Error (details logged).
    #[error("internal error")]
    Internal,
    /// 503 Service Unavailable: the database (or, for admin cache
    /// operations, the cache server) cannot be reached.
    #[error("{0}")]
    Unavailable(&'static str),
    /// 503 Service Unavailable with `Retry-After`: the write-behind queue
    /// is past its limits, or a write waits for queued ones. The detail is
    /// plain words; the figures behind it are logged.
    #[error("{detail}")]
    Busy {
        /// What is busy.
        detail: String,
        /// The `Retry-After` value.
        retry_after: std::time::Duration,
    },
    /// 504 Gateway Timeout: the request took longer than the request
    /// timeout.
    #[error("request timed out")]
    Timeout,
    /// 504 Gateway Timeout: a database load took longer than the type's
    /// hard load timeout (`--load-hard-timeout`) and no stale copy was on
    /// hand; the load goes on and fills the cache.
    #[error("{0}")]
    LoadTimeout(String),
}

impl ApiError {
    /// The status answered.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) | ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout | ApiError::LoadTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A JSON error body, built without a serializer round trip for the
/// fixed messages.
pub fn detail_response(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::to_vec(&ErrorBody {
        detail: detail.to_owned(),
    })
    .unwrap_or_else(|_| b"{\"detail\":\"error\"}".to_vec());
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = detail_response(self.status(), &self.to_string());
        if matches!(self, ApiError::Unauthorized(_)) {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::Busy { retry_after, .. } = self {
            let secs = retry_after.as_secs_f64().ceil().max(1.0);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
        }
        r
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Unauthorized(match e {
            AuthError::Missing => "missing bearer token",
            AuthError::Invalid => "invalid token",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
        })
    }
}

impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        match e {
            Refused::Revoked => ApiError::Unauthorized("token revoked"),
            Refused::Unknown => {
                ApiError::Unavailable("the token's revocation status cannot be checked now")
            }
        }
    }
}

impl From<GateError> for ApiError {
    fn from(e: GateError) -> Self {
        match e {
            GateError::Auth(e) => e.into(),
            GateError::Refused(r) => r.into(),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> Self {
        match e {
            Denied::Forbidden(m) => ApiError::Forbidden(m),
            Denied::NotAUser => ApiError::Unprocessable(e.to_string()),
        }
    }
}

/// A database failure: 503 when the database cannot be reached, else 500
/// (the details are logged, never answered).
impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        from_db(&e)
    }
}

fn from_db(e: &DbError) -> ApiError {
    let outage = matches!(
        e,
        DbError::Sqlx(
            sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed
        )
    );
    if outage {
        tracing::error!(error = %e, "database unavailable");
        ApiError::Unavailable("database unavailable")
    } else {
        tracing::error!(error = %e, "database error");
        ApiError::Internal
    }
}

/// A cache-layer failure where the database could not stand in.
impl From<kura::Error> for ApiError {
    fn from(e: kura::Error) -> Self {
        match e {
            kura::Error::Key(k) => ApiError::Unprocessable(k.to_string()),
            kura::Error::Tag(t) => ApiError::Unprocessable(t.to_string()),
            kura::Error::LoadTimeout(d) => ApiError::LoadTimeout(format!(
                "the database did not answer within {} ms; the load goes on and fills the cache",
                d.as_millis()
            )),
            kura::Error::Source(s) => match s.downcast_ref::<DbError>() {
                // The library wraps the database error; report it by kind.
                Some(db) => from_db(db),
                None => {
                    tracing::error!(error = %s, "source failed");
                    ApiError::Unavailable("database unavailable")
                }
            },
            kura::Error::Unavailable(e) => {
                tracing::warn!(error = %e, "cache unavailable");
                ApiError::Unavailable("cache unavailable")
            }
            e => {
                tracing::error!(error = %e, "cache error");
                ApiError::Internal
            }
        }
    }
}
