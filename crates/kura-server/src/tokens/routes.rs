//! Token revocation and sessions: `POST /api/v1/auth/revoke`,
//! `GET`/`DELETE /api/v1/sessions`, `DELETE /api/v1/sessions/{sid}`.
//!
//! | request | who | does |
//! |---|---|---|
//! | `POST /api/v1/auth/revoke` (no body, or `{}`) | any caller | revokes the presented token (logout); 422 when it has no `jti` |
//! | `POST /api/v1/auth/revoke` `{"jti": "…", "exp": N}` | `admin` | revokes that token until `exp` |
//! | `POST /api/v1/auth/revoke` `{"sid": "…"}` | `admin`, or the session's owner | revokes every token of the session |
//! | `GET /api/v1/sessions[?user_id=…]` | the caller; `admin` for another user | the user's sessions |
//! | `DELETE /api/v1/sessions/{sid}` | the session's owner or `admin` | revokes the session's tokens |
//! | `DELETE /api/v1/sessions[?user_id=…]` | the caller; `admin` for another user | revokes all of them (logout everywhere) |

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::repo::Session;
use super::{RevokeError, Revoked, Tokens};
use crate::auth::{Caller, MAX_TOKEN_ID_LEN, token_id_fits};
use crate::http::QueryParams;
use crate::http::error::{ApiError, ErrorBody};

/// `POST /api/v1/auth/revoke` body: empty (the presented token), or one
/// of `jti` (with `exp`) and `sid`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// A token id to revoke (admin).
    pub jti: Option<String>,
    /// The token's expiry, seconds since the epoch (required with `jti`).
    pub exp: Option<i64>,
    /// A session whose tokens to revoke (admin or the session's owner).
    pub sid: Option<String>,
}

/// What a revoke call did.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevokeResponse {
    /// The revocations recorded (empty when the token had already expired:
    /// nothing is stored for it).
    pub revoked: Vec<Revoked>,
}

/// `?user_id=` of the session routes: another user's sessions (admin).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionsQuery {
    /// The user (token subject) whose sessions to address; default the
    /// caller.
    pub user_id: Option<String>,
}

/// A user's sessions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// Oldest first.
    pub sessions: Vec<Session>,
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if !token_id_fits(id) {
        return Err(ApiError::Unprocessable(format!(
            "{what}: 1 to {} bytes",
            MAX_TOKEN_ID_LEN
        )));
    }
    Ok(())
}

fn db_unavailable(e: &crate::db::DbError) -> ApiError {
    tracing::error!(error = %e, "token store unavailable");
    ApiError::Unavailable("database unavailable")
}

fn not_revoked(e: &RevokeError) -> ApiError {
    match e {
        RevokeError::Db(e) => db_unavailable(e),
        RevokeError::NotApplied => ApiError::Unavailable(
            "the revocation is recorded, but the cache cannot be reached: other instances may \
             accept the token until it is applied; retry",
        ),
    }
}

/// Revokes the presented token, a token by `jti`, or a session's tokens.
#[utoipa::path(
    post, path = "/api/v1/auth/revoke", tag = "auth",
    request_body(content = Option<RevokeRequest>, description = "Empty: the presented token"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Revoked (at once on every instance)", body = RevokeResponse),
        (status = 401, description = "Missing, invalid, expired or revoked token", body = ErrorBody),
        (status = 403, description = "Admin role (or the session's ownership) required", body = ErrorBody),
        (status = 422, description = "Bad body, or a token without jti", body = ErrorBody),
        (status = 503, description = "Database unavailable, or (without the invalidation feed) recorded but not yet applied to the cache", body = ErrorBody),
    )
)]
pub async fn revoke(
    State(t): State<Tokens>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<RevokeResponse>, ApiError> {
    let req: RevokeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RevokeRequest::default()
    } else {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::Unprocessable(
                "invalid request body: expected a JSON object".into(),
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::Unprocessable(format!("invalid request body: {e}")))?
    };
    let revoked = match (req.jti, req.sid) {
        (Some(_), Some(_)) => {
            return Err(ApiError::Unprocessable(
                "name either jti or sid, not both".into(),
            ));
        }
        (Some(jti), None) => {
            caller.require_admin()?;
            check_id("jti", &jti)?;
            let exp = req.exp.ok_or_else(|| {
                ApiError::Unprocessable(
                    "exp (the token's expiry, unix seconds) is required with jti".into(),
                )
            })?;
            t.revoke_token(&jti, exp)
                .await
                .map_err(|e| not_revoked(&e))?
        }
        (None, Some(sid)) => {
            check_id("sid", &sid)?;
            if !caller.admin {
                let owned = t
                    .session(&sid)
                    .await
                    .map_err(|e| db_unavailable(&e))?
                    .is_some_and(|x| *x.user_id == *caller.sub);
                if !owned {
                    return Err(ApiError::Forbidden(
                        "only the session's owner or an admin may revoke it",
                    ));
                }
            }
            Some(
                t.revoke_session(&sid, req.exp)
                    .await
                    .map_err(|e| not_revoked(&e))?
                    .0,
            )
        }
        (None, None) => {
            if req.exp.is_some() {
                return Err(ApiError::Unprocessable("exp goes with jti".into()));
            }
            let jti = caller.jti.as_deref().ok_or_else(|| {
                ApiError::Unprocessable(
                    "this token has no jti: it cannot be revoked on its own (revoke its session, or let it expire)".into(),
                )
            })?;
            let exp = i64::try_from(caller.exp).unwrap_or(i64::MAX);
            t.revoke_token(jti, exp)
                .await
                .map_err(|e| not_revoked(&e))?
        }
    };
    Ok(Json(RevokeResponse {
        revoked: revoked.into_iter().collect(),
    }))
}

/// The user whose sessions a request addresses: the caller, or for an
/// admin the one named.
fn subject(caller: &Caller, q: &SessionsQuery) -> Result<String, ApiError> {
    match &q.user_id {
        Some(u) if **u != *caller.sub => {
            caller.require_admin()?;
            Ok(u.clone())
        }
        _ => Ok(caller.sub.to_string()),
    }
}

/// Lists a user's sessions.
#[utoipa::path(
    get, path = "/api/v1/sessions", tag = "auth",
    params(SessionsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The sessions, oldest first", body = SessionList),
        (status = 401, description = "Missing, invalid, expired or revoked token", body = ErrorBody),
        (status = 403, description = "Admin role required for another user", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn list_sessions(
    State(t): State<Tokens>,
    caller: Caller,
    QueryParams(q): QueryParams<SessionsQuery>,
) -> Result<Json<SessionList>, ApiError> {
    let sub = subject(&caller, &q)?;
    let sessions = t.sessions_of(&sub).await.map_err(|e| db_unavailable(&e))?;
    Ok(Json(SessionList { sessions }))
}

/// Revokes one session's tokens and deletes it.
#[utoipa::path(
    delete, path = "/api/v1/sessions/{sid}", tag = "auth",
    params(("sid" = String, Path, description = "Session id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Missing, invalid, expired or revoked token", body = ErrorBody),
        (status = 403, description = "Another user's session", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn delete_session(
    State(t): State<Tokens>,
    caller: Caller,
    Path(sid): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_id("sid", &sid)?;
    let session = t.session(&sid).await.map_err(|e| db_unavailable(&e))?;
    match session {
        Some(x) if caller.admin || *x.user_id == *caller.sub => {}
        Some(_) => return Err(ApiError::Forbidden("not allowed to end this session")),
        None => return Err(ApiError::NotFound("session not found")),
    }
    t.revoke_session(&sid, None)
        .await
        .map_err(|e| not_revoked(&e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes every session of a user (logout everywhere).
#[utoipa::path(
    delete, path = "/api/v1/sessions", tag = "auth",
    params(SessionsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The sessions revoked", body = RevokeResponse),
        (status = 401, description = "Missing, invalid, expired or revoked token", body = ErrorBody),
        (status = 403, description = "Admin role required for another user", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn delete_sessions(
    State(t): State<Tokens>,
    caller: Caller,
    QueryParams(q): QueryParams<SessionsQuery>,
) -> Result<Json<RevokeResponse>, ApiError> {
    let sub = subject(&caller, &q)?;
    let sessions = t.sessions_of(&sub).await.map_err(|e| db_unavailable(&e))?;
    let mut revoked = Vec::with_capacity(sessions.len());
    for x in sessions {
        revoked.push(
            t.revoke_session(&x.sid, None)
                .await
                .map_err(|e| not_revoked(&e))?
                .0,
        );
    }
    Ok(Json(RevokeResponse { revoked }))
}
