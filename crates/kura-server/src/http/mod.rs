//! The HTTP plumbing every feature's routes share: errors answered as
//! `{"detail": …}` ([`error`]), the extractors ([`extract`]: JSON bodies,
//! query parameters, path ids, the verified [`crate::auth::Caller`]), the
//! request timeout ([`timeout`]), the per-route request metrics
//! ([`metrics`]), the rate limits ([`ratelimit`]) and, with the `otel`
//! feature, request spans (`trace`).
//!
//! The routes themselves are the features' (`profiles/routes.rs`, …); the
//! router, the OpenAPI document and the server are the composition root's
//! ([`crate::app`]). This module imports no feature.
//!
//! The hot path (`GET /api/v1/profiles/{id}` on a hit) is: one HS256
//! verification, one Redis `GET`, and the cached JSON bytes sent as they
//! are. The only middleware is the body limit and the request timeout.

pub mod error;
pub mod extract;
pub mod metrics;
pub mod ratelimit;
pub mod timeout;
#[cfg(feature = "otel")]
pub mod trace;

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use self::error::ApiError;
pub use self::extract::{JsonBody, QueryParams, UpdateQuery, UserIdPath};

/// The response header that says where a read was answered from.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Where a hit came from: `l1` (the near cache) or `l2` (Redis).
pub const X_CACHE_LAYER: HeaderName = HeaderName::from_static("x-cache-layer");

/// The response header of a `PUT` that says how the write was applied:
/// `invalidate`, `through`, or `behind` (a `behind` write that could not be
/// queued says `through`).
pub const X_WRITE: HeaderName = HeaderName::from_static("x-write");

/// A JSON response from a value.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            b,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "response does not serialize");
            ApiError::Internal.into_response()
        }
    }
}
