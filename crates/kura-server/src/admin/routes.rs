//! Admin routes: warming, invalidation and hit-rate metrics. All need the
//! `admin` role.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::{QueryParams, UserIdPath};
use crate::profiles::ProfileService;

/// Largest `limit` one warming request may ask for.
pub const MAX_WARM_LIMIT: u64 = 1_000_000;

/// `POST /api/v1/admin/cache/warm` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WarmQuery {
    /// Most profiles to load (default 1000).
    pub limit: Option<u64>,
    /// Users who logged in within this many days (default 7).
    pub since_days: Option<u32>,
}

/// The outcome of a warming request.
#[derive(Debug, Serialize, ToSchema)]
pub struct WarmResponse {
    /// Profiles put in the cache.
    pub cached: u64,
    /// Another instance was warming at the same time: nothing was done.
    pub locked_out: bool,
}

/// The outcome of an invalidation request.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedResponse {
    /// Cached values deleted. For a clear: the values it covered when the
    /// cache can count them cheaply (the embedded store), otherwise 0 with
    /// `covered` null.
    pub deleted: u64,
    /// The cache server was unreachable: the invalidation is pending and is
    /// applied before this instance uses the cache again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deferred: bool,
}

/// The outcome of a clear (every profile) or a tag invalidation: one step
/// whatever the number of values stops them being served.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClearedResponse {
    /// A clear of every profile: the cached profiles removed from the cache
    /// after the clear (`null` with `?wait=false`, while the sweep runs in
    /// the background). A tag: the values covered when the cache can count
    /// them cheaply (the embedded store), otherwise 0; they expire by TTL.
    pub deleted: Option<u64>,
    /// Always `true`: done by the O(1) clear.
    pub cleared: bool,
    /// The values covered when the clear was made, `null` when the cache
    /// does not count them (Redis: counted by the sweep instead).
    pub covered: Option<u64>,
    /// The stamp epoch the clear set.
    pub epoch: u64,
    /// `?wait=false`: the sweep of the cleared profiles goes on in the
    /// background.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sweeping: bool,
}

impl From<kura::tags::Cleared> for ClearedResponse {
    fn from(c: kura::tags::Cleared) -> Self {
        Self {
            deleted: Some(c.covered.unwrap_or(0)),
            cleared: true,
            covered: c.covered,
            epoch: c.epoch,
            sweeping: false,
        }
    }
}

/// `DELETE /api/v1/admin/cache/profiles` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClearQuery {
    /// Wait for the sweep of the cleared profiles and answer how many it
    /// removed (default `true`); `false` answers at once.
    pub wait: Option<bool>,
}

/// A tag in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TagPath {
    /// The tag, e.g. `kind:profile`.
    pub tag: String,
}

/// Hit and miss counts of the whole fleet.
#[derive(Debug, Serialize, ToSchema)]
pub struct CacheMetrics {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that went to the database.
    pub misses: u64,
    /// `hits + misses`.
    pub total: u64,
    /// `hits / total` in percent, two decimals.
    pub hit_rate: f64,
}

/// Warms the cache with recently active users.
#[utoipa::path(
    post, path = "/api/v1/admin/cache/warm", tag = "admin",
    params(WarmQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Warming done", body = WarmResponse),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Admin role required", body = ErrorBody),
        (status = 422, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = "Cache or database unavailable", body = ErrorBody),
    )
)]
pub async fn warm(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    QueryParams(q): QueryParams<WarmQuery>,
) -> Result<Json<WarmResponse>, ApiError> {
    caller.require_admin()?;
    let limit = q.limit.unwrap_or(1000);
    if limit > MAX_WARM_LIMIT {
        return Err(ApiError::Unprocessable(format!(
            "limit: at most {MAX_WARM_LIMIT}"
        )));
    }
    let since_days = q.since_days.unwrap_or(7);
    let service = s.clone();
    // A run of its own: a client that disconnects or times out does not
    // cancel warming halfway (and leave the fleet lock to expire).
    let w = tokio::spawn(async move { service.warm(limit, since_days, None).await })
        .await
        .map_err(|_| ApiError::Internal)??;
    Ok(Json(WarmResponse {
        cached: w.cached,
        locked_out: w.locked_out,
    }))
}

/// Stops every cached profile being served (one step whatever their
/// number: the O(1) clear), then removes the cleared profiles' keys from the
/// cache (`SCAN` + `UNLINK` of this namespace's profile keys only) and
/// answers how many; `?wait=false` answers at once and sweeps in the
/// background.
#[utoipa::path(
    delete, path = "/api/v1/admin/cache/profiles", tag = "admin",
    params(ClearQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Profiles cleared from the cache", body = ClearedResponse),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Admin role required", body = ErrorBody),
        (status = 503, description = "Cache unavailable (the clear is pending)", body = ErrorBody),
    )
)]
pub async fn clear_profiles(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    QueryParams(q): QueryParams<ClearQuery>,
) -> Result<Json<ClearedResponse>, ApiError> {
    caller.require_admin()?;
    let wait = q.wait.unwrap_or(true);
    let (c, swept) = s.invalidate_all_profiles(wait).await?;
    Ok(Json(ClearedResponse {
        deleted: swept,
        sweeping: !wait,
        ..c.into()
    }))
}

/// Stops every cached value carrying a tag being served (profiles carry
/// `kind:profile`), in one step.
#[utoipa::path(
    delete, path = "/api/v1/admin/cache/tags/{tag}", tag = "admin",
    params(TagPath),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Values with the tag cleared", body = ClearedResponse),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Admin role required", body = ErrorBody),
        (status = 422, description = "Malformed tag", body = ErrorBody),
        (status = 503, description = "Cache unavailable (nothing was cleared)", body = ErrorBody),
    )
)]
pub async fn clear_tag(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    axum::extract::Path(p): axum::extract::Path<TagPath>,
) -> Result<Json<ClearedResponse>, ApiError> {
    caller.require_admin()?;
    let c = s.invalidate_tag(&p.tag).await?;
    Ok(Json(c.into()))
}

/// Removes every cached entry of one user (profile, settings,
/// preferences).
#[utoipa::path(
    delete, path = "/api/v1/admin/cache/users/{user_id}", tag = "admin",
    params(("user_id" = uuid::Uuid, Path, description = "The user id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Entries removed from the cache", body = DeletedResponse),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Admin role required", body = ErrorBody),
        (status = 422, description = "Malformed user id", body = ErrorBody),
    )
)]
pub async fn clear_user(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
    UserIdPath(id): UserIdPath,
) -> Result<Json<DeletedResponse>, ApiError> {
    caller.require_admin()?;
    let r = s.invalidate_user(id).await?;
    Ok(Json(DeletedResponse {
        deleted: r.deleted,
        deferred: r.deferred,
    }))
}

/// Hit and miss counts of the whole fleet (the shared Redis counters).
#[utoipa::path(
    get, path = "/api/v1/admin/cache/metrics", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Counters", body = CacheMetrics),
        (status = 401, description = "Missing, invalid or expired token", body = ErrorBody),
        (status = 403, description = "Admin role required", body = ErrorBody),
    )
)]
pub async fn cache_metrics(
    State(s): State<Arc<ProfileService>>,
    caller: Caller,
) -> Result<Json<CacheMetrics>, ApiError> {
    caller.require_admin()?;
    let st = s.stats().await;
    Ok(Json(CacheMetrics {
        hits: st.hits,
        misses: st.misses,
        total: st.total,
        hit_rate: st.hit_rate,
    }))
}
