//! Profile routes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use kura::Fetched;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::model::{NewProfile, Profile, ProfilePatch};
use super::{ProfileService, ServiceError};
use crate::auth::Caller;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::UpdateQuery;
use crate::http::{
    JsonBody, QueryParams, UserIdPath, X_CACHE, X_CACHE_LAYER, X_WRITE, json_response,
};
use crate::userdata::UserData;

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound => ApiError::NotFound("profile not found"),
            ServiceError::AlreadyExists => ApiError::Conflict("profile already exists"),
            ServiceError::Invalid(m) => ApiError::Unprocessable(m),
            ServiceError::QueueFull {
                retry_after,
                detail,
            } => ApiError::Busy {
                detail,
                retry_after,
            },
            ServiceError::Contended => {
                ApiError::Conflict("too many concurrent writes to this profile; retry")
            }
            ServiceError::WriteBehind(e) => {
                tracing::error!(error = e, "write-behind failed");
                ApiError::Internal
            }
            ServiceError::Database(e) => e.into(),
            ServiceError::Cache(e) => e.into(),
        }
    }
}

/// Most ids one batch request may name.
pub const MAX_BATCH: usize = 1000;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Writes a value's JSON object with the seed's `cached_at` (RFC 3339 UTC,
/// milliseconds) as its last field.
fn put_with_cached_at(out: &mut BytesMut, json: &[u8], at: Option<std::time::SystemTime>) {
    let Some(at) = at else {
        out.put_slice(json);
        return;
    };
    let Some(body) = json.strip_suffix(b"}") else {
        out.put_slice(json);
        return;
    };
    out.put_slice(body);
    if body.len() > 1 {
        out.put_u8(b',');
    }
    let at: chrono::DateTime<chrono::Utc> = at.into();
    out.put_slice(b"\"cached_at\":\"");
    out.put_slice(at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string().as_bytes());
    out.put_slice(b"\"}");
}

/// The JSON of a found profile, as the cache holds it (no second
/// serialization when it has it), with `cached_at`.
fn profile_json(f: &Fetched<Profile>) -> Result<Option<Bytes>, ApiError> {
    let json: Bytes = match (f.json(), f.value()) {
        (Some(json), _) => json.clone(),
        (None, Some(v)) => serde_json::to_vec(v)
            .map_err(|e| {
                tracing::error!(error = %e, "profile does not serialize");
                ApiError::Internal
            })?
            .into(),
        (None, None) => return Ok(None),
    };
    let mut out = BytesMut::with_capacity(json.len() + 40);
    put_with_cached_at(&mut out, &json, f.cached_at());
    Ok(Some(out.freeze()))
}

/// The answer to a read: the JSON bytes as the cache holds them, with the
/// seed's `cached_at`, `X-Cache`, and on a hit `Age` (seconds since it was
/// cached).
///
/// The read is the typed [`kura::CacheAside::get`], not `get_json`: decoding
/// a hit into a [`Profile`] is what refuses a well-formed value of another
/// shape at a profile key (drill 6), which a JSON check alone would serve.
fn fetched_response(f: &Fetched<Profile>) -> Response {
    let cache = HeaderValue::from_static(f.status().as_str());
    let body = match profile_json(f) {
        Ok(Some(b)) => Body::from(b),
        Ok(None) => {
            let mut r = ApiError::NotFound("profile not found").into_response();
            r.headers_mut().insert(X_CACHE, cache);
            return r;
        }
        Err(e) => return e.into_response(),
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON);
    h.insert(X_CACHE, cache);
    if let Some(layer) = f.layer() {
        h.insert(X_CACHE_LAYER, HeaderValue::from_static(layer.as_str()));
        if let Some(age) = f.cached_at().and_then(|at| at.elapsed().ok()) {
            h.insert(header::AGE, HeaderValue::from(age.as_secs()));
        }
    }
    r
}

/// Reads a profile through the cache.
#[utoipa::path(
    get, path = "/api/v1/profiles/{user_id}", tag = "profiles",
    params(("user_id" = Uuid, Path, description = "The user id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile, with `cached_at` (RFC 3339 UTC: when it was put in the cache; on a miss, now)", body = Profile,
         headers(("X-Cache" = String, description = "hit, miss, stale or bypass"), ("X-Cache-Layer" = String, description = "on a hit: l1 (the near cache) or l2 (Redis)"), ("Age" = u64, description = "on a hit: seconds since it was cached"))),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Neither the owner nor an admin", body = ErrorBody),
        (status = 404, description = "No such profile", body = ErrorBody),
        (status = 422, description = "Malformed user id", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn get_profile(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    UserIdPath(id): UserIdPath,
) -> Result<Response, ApiError> {
    caller.may_access(&id)?;
    Ok(fetched_response(&s.get(&id).await?))
}

/// Reads the caller's own profile.
#[utoipa::path(
    get, path = "/api/v1/profile", tag = "profiles",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's profile, with `cached_at`", body = Profile,
         headers(("X-Cache" = String, description = "hit, miss, stale or bypass"), ("X-Cache-Layer" = String, description = "on a hit: l1 (the near cache) or l2 (Redis)"), ("Age" = u64, description = "on a hit: seconds since it was cached"))),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 404, description = "No profile", body = ErrorBody),
        (status = 422, description = "The token subject is not a UUID", body = ErrorBody),
    )
)]
pub async fn get_own(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let id = caller.own_id()?;
    Ok(fetched_response(&s.get(&id).await?))
}

async fn update(
    s: &ProfileService,
    id: Uuid,
    q: &UpdateQuery,
    patch: &ProfilePatch,
) -> Result<Response, ApiError> {
    let strategy = q.strategy()?;
    let w = s.write(id, patch, strategy).await?;
    let mut r = match w.json {
        Some(json) => {
            let mut r = Response::new(Body::from(json));
            r.headers_mut().insert(header::CONTENT_TYPE, JSON);
            r
        }
        None => json_response(StatusCode::OK, &w.profile),
    };
    r.headers_mut()
        .insert(X_WRITE, HeaderValue::from_static(w.path.as_str()));
    Ok(r)
}

/// Updates a profile with any subset of its editable fields.
#[utoipa::path(
    put, path = "/api/v1/profiles/{user_id}", tag = "profiles",
    params(("user_id" = Uuid, Path, description = "The user id"), UpdateQuery),
    request_body = ProfilePatch,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile as it now stands (for `behind`: as accepted, before the database has it)", body = Profile,
         headers(("X-Write" = String, description = "invalidate, through or behind: how the write was applied"))),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Neither the owner nor an admin", body = ErrorBody),
        (status = 404, description = "No such profile", body = ErrorBody),
        (status = 409, description = "Too many concurrent writes to the profile (behind)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "Unknown field, wrong type or invalid value", body = ErrorBody),
        (status = 503, description = "Database unavailable, or the write-behind queue is full (with Retry-After)", body = ErrorBody),
    )
)]
pub async fn put_profile(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    UserIdPath(id): UserIdPath,
    QueryParams(q): QueryParams<UpdateQuery>,
    JsonBody(patch): JsonBody<ProfilePatch>,
) -> Result<Response, ApiError> {
    caller.may_access(&id)?;
    update(&s, id, &q, &patch).await
}

/// Updates the caller's own profile.
#[utoipa::path(
    put, path = "/api/v1/profile", tag = "profiles",
    params(UpdateQuery),
    request_body = ProfilePatch,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile as it now stands (for `behind`: as accepted, before the database has it)", body = Profile,
         headers(("X-Write" = String, description = "invalidate, through or behind: how the write was applied"))),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 404, description = "No profile", body = ErrorBody),
        (status = 409, description = "Too many concurrent writes to the profile (behind)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "Unknown field, wrong type or invalid value", body = ErrorBody),
        (status = 503, description = "Database unavailable, or the write-behind queue is full (with Retry-After)", body = ErrorBody),
    )
)]
pub async fn put_own(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    QueryParams(q): QueryParams<UpdateQuery>,
    JsonBody(patch): JsonBody<ProfilePatch>,
) -> Result<Response, ApiError> {
    let id = caller.own_id()?;
    update(&s, id, &q, &patch).await
}

/// Creates a profile.
#[utoipa::path(
    post, path = "/api/v1/profiles", tag = "profiles",
    request_body = NewProfile,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = Profile),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Neither the user nor an admin", body = ErrorBody),
        (status = 409, description = "The user already has a profile", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "Unknown field, wrong type or invalid value", body = ErrorBody),
    )
)]
pub async fn create_profile(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    JsonBody(new): JsonBody<NewProfile>,
) -> Result<Response, ApiError> {
    caller.may_access(&new.user_id)?;
    let p = s.create(&new).await?;
    let mut r = json_response(StatusCode::CREATED, &p);
    if let Ok(loc) = HeaderValue::from_str(&format!("/api/v1/profiles/{}", p.user_id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

/// Deletes a profile and every cached entry of the user.
#[utoipa::path(
    delete, path = "/api/v1/profiles/{user_id}", tag = "profiles",
    params(("user_id" = Uuid, Path, description = "The user id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Neither the owner nor an admin", body = ErrorBody),
        (status = 404, description = "No such profile", body = ErrorBody),
        (status = 422, description = "Malformed user id", body = ErrorBody),
    )
)]
pub async fn delete_profile(
    State(s): State<Arc<ProfileService>>,
    State(userdata): State<Arc<UserData>>,
    caller: Caller,
    UserIdPath(id): UserIdPath,
) -> Result<StatusCode, ApiError> {
    caller.may_access(&id)?;
    // The user's queued settings and preferences reach the database (and
    // no more are accepted) before the rows go with the profile.
    let turns = userdata.settle(id).await?;
    let r = s.delete(id).await;
    UserData::release(turns).await;
    r?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/profiles/batch` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Up to 1000 user ids.
    pub user_ids: Vec<String>,
}

/// `POST /api/v1/profiles/batch` answer (documentation shape; the body is
/// assembled from the cached JSON without re-serializing it).
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    /// The profiles found, in request order (duplicates answered once).
    pub profiles: Vec<Profile>,
    /// How many profiles were found.
    pub count: usize,
    /// Ids answered from the cache.
    pub cache_hits: usize,
    /// Ids loaded from the database.
    pub cache_misses: usize,
}

/// Reads many profiles: one multi-get, one query for the misses, one
/// pipelined fill.
#[utoipa::path(
    post, path = "/api/v1/profiles/batch", tag = "profiles",
    request_body = BatchRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profiles found", body = BatchResponse),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Admin role required", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "Malformed id or more than 1000 ids", body = ErrorBody),
    )
)]
pub async fn batch(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    JsonBody(req): JsonBody<BatchRequest>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    if req.user_ids.len() > MAX_BATCH {
        return Err(ApiError::Unprocessable(format!(
            "user_ids: at most {MAX_BATCH} ids, got {}",
            req.user_ids.len()
        )));
    }
    let ids = req
        .user_ids
        .iter()
        .map(|raw| {
            Uuid::parse_str(raw).map_err(|_| {
                ApiError::Unprocessable(format!("user_ids: {raw:?} is not a valid UUID"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let b = s.get_many(&ids).await?;
    let mut out = BytesMut::with_capacity(64 + b.entries.len() * 400);
    out.put_slice(b"{\"profiles\":[");
    let mut count = 0usize;
    for (_, f) in &b.entries {
        let json: Bytes = match (f.json(), f.value()) {
            (Some(j), _) => j.clone(),
            (None, Some(v)) => serde_json::to_vec(v)
                .map_err(|_| ApiError::Internal)?
                .into(),
            (None, None) => continue,
        };
        if count > 0 {
            out.put_u8(b',');
        }
        put_with_cached_at(&mut out, &json, f.cached_at());
        count += 1;
    }
    out.put_slice(
        format!(
            "],\"count\":{count},\"cache_hits\":{},\"cache_misses\":{}}}",
            b.hits, b.misses
        )
        .as_bytes(),
    );
    let mut r = Response::new(Body::from(out.freeze()));
    r.headers_mut().insert(header::CONTENT_TYPE, JSON);
    Ok(r)
}
