//! The extractors of the API: a JSON object body ([`JsonBody`]), query
//! parameters ([`QueryParams`]), the `{user_id}` path segment
//! ([`UserIdPath`]), and the verified, admitted [`Caller`] (through the
//! application's [`Gate`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;
use uuid::Uuid;

use super::error::ApiError;
use crate::auth::{Caller, Gate};
use crate::config::WriteStrategy;

/// A JSON object request body: over the limit → 413; anything that does
/// not parse as `T` (syntax, not an object, unknown field, wrong type) →
/// 422. The content type is not required.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest(r.body_text())
            }
        })?;
        // serde reads a struct from an array too (by position): only
        // objects are request bodies here.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::Unprocessable(
                "invalid request body: expected a JSON object".into(),
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::Unprocessable(format!("invalid request body: {e}")))
    }
}

/// Query parameters; a bad value → 422.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|r| ApiError::Unprocessable(r.body_text()))
    }
}

/// The `{user_id}` path segment as a UUID; malformed → 422.
#[derive(Debug, Clone, Copy)]
pub struct UserIdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for UserIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::Unprocessable(r.body_text()))?;
        Uuid::parse_str(&raw)
            .map(UserIdPath)
            .map_err(|_| ApiError::Unprocessable(format!("user_id: {raw:?} is not a valid UUID")))
    }
}

/// The caller of a request: its bearer token verified and admitted by the
/// state's [`Gate`] (401 or 503 otherwise).
impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<Gate>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let gate = Arc::<Gate>::from_ref(state);
        Ok(gate.caller(&parts.headers).await?)
    }
}

/// `?strategy=` of a profile update.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UpdateQuery {
    /// `invalidate` (default unless configured otherwise), `through` or
    /// `behind`.
    pub strategy: Option<String>,
}

impl UpdateQuery {
    /// The strategy asked for, if any.
    ///
    /// # Errors
    ///
    /// [`ApiError::Unprocessable`] for an unknown one.
    pub fn strategy(&self) -> Result<Option<WriteStrategy>, ApiError> {
        self.strategy
            .as_deref()
            .map(|s| {
                WriteStrategy::parse(s).ok_or_else(|| {
                    ApiError::Unprocessable(format!(
                        "strategy: {s:?} is not one of invalidate, through, behind"
                    ))
                })
            })
            .transpose()
    }
}
