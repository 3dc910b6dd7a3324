//! Settings and preferences routes: `GET`/`PUT
//! /api/v1/profiles/{user_id}/settings` and `…/preferences`, with the
//! profile's access rules (owner or `admin`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kura::Fetched;

use super::{DocError, DocKind, UserData, UserDoc};
use crate::auth::Caller;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::UpdateQuery;
use crate::http::{
    JsonBody, QueryParams, UserIdPath, X_CACHE, X_CACHE_LAYER, X_WRITE, json_response,
};

/// A document body: any JSON object.
type Doc = serde_json::Map<String, serde_json::Value>;

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        match e {
            DocError::NoProfile => ApiError::NotFound("profile not found"),
            DocError::Invalid(m) => ApiError::Unprocessable(m),
            DocError::Database(e) => e.into(),
            DocError::Cache(e) => e.into(),
            DocError::Busy {
                retry_after,
                detail,
            } => ApiError::Busy {
                detail,
                retry_after,
            },
            DocError::Contended => {
                ApiError::Conflict("too many concurrent writes to this document; retry")
            }
        }
    }
}

fn fetched(kind: DocKind, f: &Fetched<UserDoc>) -> Response {
    let cache = HeaderValue::from_static(f.status().as_str());
    let mut r = match (f.json(), f.value()) {
        (Some(json), _) => {
            let mut r = Response::new(Body::from(json.clone()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        (None, Some(v)) => json_response(axum::http::StatusCode::OK, v),
        (None, None) => ApiError::NotFound(match kind {
            DocKind::Settings => "settings not found",
            DocKind::Preferences => "preferences not found",
        })
        .into_response(),
    };
    r.headers_mut().insert(X_CACHE, cache);
    if let Some(layer) = f.layer() {
        r.headers_mut()
            .insert(X_CACHE_LAYER, HeaderValue::from_static(layer.as_str()));
    }
    r
}

async fn read(
    s: &UserData,
    caller: &Caller,
    kind: DocKind,
    id: uuid::Uuid,
) -> Result<Response, ApiError> {
    caller.may_access(&id)?;
    Ok(fetched(kind, &s.get(kind, &id).await?))
}

async fn write(
    s: &UserData,
    caller: &Caller,
    kind: DocKind,
    id: uuid::Uuid,
    q: &UpdateQuery,
    data: &Doc,
) -> Result<Response, ApiError> {
    caller.may_access(&id)?;
    let strategy = q.strategy()?.unwrap_or(s.strategy());
    let (doc, applied) = s.put(kind, id, data, strategy).await?;
    let mut r = json_response(axum::http::StatusCode::OK, &doc);
    r.headers_mut()
        .insert(X_WRITE, HeaderValue::from_static(applied.as_str()));
    Ok(r)
}

macro_rules! doc_routes {
    ($kind:expr, $word:literal, $get:ident, $put:ident) => {
        #[doc = concat!("Reads a user's ", $word, " through the cache.")]
        #[utoipa::path(
            get, path = concat!("/api/v1/profiles/{user_id}/", $word), tag = "profiles",
            params(("user_id" = uuid::Uuid, Path, description = "The user id")),
            security(("bearer" = [])),
            responses(
                (status = 200, description = concat!("The ", $word), body = UserDoc,
                 headers(("X-Cache" = String, description = "hit, miss, stale or bypass"), ("X-Cache-Layer" = String, description = "on a hit: l1 or l2"))),
                (status = 401, description = "Missing, invalid, expired or revoked token", body = ErrorBody),
                (status = 403, description = "Neither the owner nor an admin", body = ErrorBody),
                (status = 404, description = concat!("No ", $word, " stored"), body = ErrorBody),
                (status = 422, description = "Malformed user id", body = ErrorBody),
                (status = 503, description = "Database unavailable", body = ErrorBody),
            )
        )]
        pub async fn $get(
            State(s): State<Arc<UserData>>,
            caller: Caller,
            UserIdPath(id): UserIdPath,
        ) -> Result<Response, ApiError> {
            read(&s, &caller, $kind, id).await
        }

        #[doc = concat!("Replaces a user's ", $word, " (a JSON object of at most 16 KiB).")]
        #[utoipa::path(
            put, path = concat!("/api/v1/profiles/{user_id}/", $word), tag = "profiles",
            params(("user_id" = uuid::Uuid, Path, description = "The user id"), UpdateQuery),
            request_body(content = Object, description = "The JSON object, at most 16 KiB and 32 levels deep"),
            security(("bearer" = [])),
            responses(
                (status = 200, description = concat!("The ", $word, " as committed (for `behind`: as accepted)"), body = UserDoc,
                 headers(("X-Write" = String, description = "invalidate, through or behind: how the write was applied"))),
                (status = 401, description = "Missing, invalid, expired or revoked token", body = ErrorBody),
                (status = 403, description = "Neither the owner nor an admin", body = ErrorBody),
                (status = 404, description = "No such profile", body = ErrorBody),
                (status = 413, description = "Body over 64 KiB", body = ErrorBody),
                (status = 409, description = "Too many concurrent writes (behind)", body = ErrorBody),
                (status = 422, description = "Not a JSON object, over 16 KiB or too deep, or an unknown strategy", body = ErrorBody),
                (status = 503, description = "Database unavailable, or queued writes still waiting (with Retry-After)", body = ErrorBody),
            )
        )]
        pub async fn $put(
            State(s): State<Arc<UserData>>,
            caller: Caller,
            UserIdPath(id): UserIdPath,
            QueryParams(q): QueryParams<UpdateQuery>,
            JsonBody(data): JsonBody<Doc>,
        ) -> Result<Response, ApiError> {
            write(&s, &caller, $kind, id, &q, &data).await
        }
    };
}

doc_routes!(DocKind::Settings, "settings", get_settings, put_settings);
doc_routes!(
    DocKind::Preferences,
    "preferences",
    get_preferences,
    put_preferences
);
