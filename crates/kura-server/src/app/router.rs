//! The router: every feature's routes under one state, the layers, and the
//! OpenAPI document.
//!
//! | route | who |
//! |---|---|
//! | `GET/PUT/DELETE /api/v1/profiles/{user_id}` | owner or `admin` |
//! | `POST /api/v1/profiles` | the user named in the body, or `admin` |
//! | `POST /api/v1/profiles/batch` | `admin` |
//! | `GET/PUT /api/v1/profile` | the caller (JWT `sub`) |
//! | `GET/PUT /api/v1/profiles/{user_id}/settings`, `…/preferences` | owner or `admin` |
//! | `POST /api/v1/auth/revoke` | the caller (its own token); `admin` (any `jti`, any `sid`); a session's owner (its `sid`) |
//! | `GET/DELETE /api/v1/sessions`, `DELETE /api/v1/sessions/{sid}` | the caller's own; `admin` for anyone's |
//! | `/api/v1/admin/cache/…` | `admin` |
//! | `GET /healthz`, `GET /openapi.json` | anyone |
//! | `GET /metrics` | anyone who reaches its port: the API port, or with `--metrics-listen` only that listener |
//!
//! `/metrics` follows the Prometheus convention of a listener of its own
//! when `--metrics-listen` is set, so that it can be kept off the network
//! the API is exposed to; the API port then answers it 404.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use utoipa::OpenApi;

use super::state::AppState;
use crate::admin::routes as admin;
use crate::config::Config;
use crate::http::error::ApiError;
use crate::http::ratelimit;
use crate::http::timeout::RequestTimeoutLayer;
use crate::ops::health;
use crate::profiles::routes as profiles;
use crate::tokens::routes as tokens;
use crate::userdata::routes as userdata;

/// Every route template of the API, as the router names them (the
/// `route` label of the request metrics).
pub const ROUTES: &[&str] = &[
    "/metrics",
    "/api/v1/profiles",
    "/api/v1/profiles/batch",
    "/api/v1/profiles/{user_id}",
    "/api/v1/profile",
    "/api/v1/profiles/{user_id}/settings",
    "/api/v1/profiles/{user_id}/preferences",
    "/api/v1/auth/revoke",
    "/api/v1/sessions",
    "/api/v1/sessions/{sid}",
    "/api/v1/admin/cache/warm",
    "/api/v1/admin/cache/profiles",
    "/api/v1/admin/cache/users/{user_id}",
    "/api/v1/admin/cache/tags/{tag}",
    "/api/v1/admin/cache/metrics",
    "/healthz",
    "/openapi.json",
];

/// The OpenAPI document of the service.
#[derive(OpenApi)]
#[openapi(
    info(title = "kura", description = "User profile service over a Redis cache (kura)."),
    paths(
        crate::profiles::routes::get_profile,
        crate::profiles::routes::put_profile,
        crate::profiles::routes::delete_profile,
        crate::profiles::routes::create_profile,
        crate::profiles::routes::batch,
        crate::profiles::routes::get_own,
        crate::profiles::routes::put_own,
        crate::userdata::routes::get_settings,
        crate::userdata::routes::put_settings,
        crate::userdata::routes::get_preferences,
        crate::userdata::routes::put_preferences,
        crate::tokens::routes::revoke,
        crate::tokens::routes::list_sessions,
        crate::tokens::routes::delete_session,
        crate::tokens::routes::delete_sessions,
        crate::admin::routes::warm,
        crate::admin::routes::clear_profiles,
        crate::admin::routes::clear_user,
        crate::admin::routes::clear_tag,
        crate::admin::routes::cache_metrics,
        crate::ops::health::health,
        crate::ops::health::metrics,
        crate::ops::health::openapi,
    ),
    components(schemas(crate::http::error::ErrorBody)),
    modifiers(&BearerScheme),
    tags(
        (name = "profiles", description = "Profiles, read through the cache"),
        (name = "auth", description = "Token revocation and sessions"),
        (name = "admin", description = "Cache administration (admin role)"),
        (name = "operations", description = "Health, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The router over `state`: the API, and `/metrics` unless it has a
/// listener of its own ([`Config::metrics_listen`]).
pub fn router(state: AppState, config: &Config) -> Router {
    let api = Router::new();
    let api = if config.metrics_listen.is_none() {
        api.route("/metrics", get(health::metrics))
    } else {
        api
    };
    let api = api
        .route("/api/v1/profiles", post(profiles::create_profile))
        .route("/api/v1/profiles/batch", post(profiles::batch))
        .route(
            "/api/v1/profiles/{user_id}",
            get(profiles::get_profile)
                .put(profiles::put_profile)
                .delete(profiles::delete_profile),
        )
        .route(
            "/api/v1/profile",
            get(profiles::get_own).put(profiles::put_own),
        )
        .route("/api/v1/auth/revoke", post(tokens::revoke))
        .route(
            "/api/v1/sessions",
            get(tokens::list_sessions).delete(tokens::delete_sessions),
        )
        .route("/api/v1/sessions/{sid}", delete(tokens::delete_session))
        .route(
            "/api/v1/profiles/{user_id}/settings",
            get(userdata::get_settings).put(userdata::put_settings),
        )
        .route(
            "/api/v1/profiles/{user_id}/preferences",
            get(userdata::get_preferences).put(userdata::put_preferences),
        )
        .route("/api/v1/admin/cache/warm", post(admin::warm))
        .route(
            "/api/v1/admin/cache/profiles",
            delete(admin::clear_profiles),
        )
        .route(
            "/api/v1/admin/cache/users/{user_id}",
            delete(admin::clear_user),
        )
        .route("/api/v1/admin/cache/tags/{tag}", delete(admin::clear_tag))
        .route("/api/v1/admin/cache/metrics", get(admin::cache_metrics))
        .route("/healthz", get(health::health))
        .route("/openapi.json", get(health::openapi))
        .fallback(|| async { ApiError::NotFound("not found") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    // Only when some class is limited: the layer costs every request.
    let api = match &state.0.limits {
        Some(limits) => api.layer(axum::middleware::from_fn_with_state(
            limits.clone(),
            ratelimit::limit,
        )),
        None => api,
    };
    let api = api.layer(DefaultBodyLimit::max(config.body_limit)).layer(
        RequestTimeoutLayer::new(config.request_timeout).recording(state.0.ops.http_metrics),
    );
    // A span per request, parented by the request's trace context.
    #[cfg(feature = "otel")]
    let api = api.layer(crate::http::trace::TraceLayer);
    api.with_state(state)
}

/// The router of the `--metrics-listen` listener: `/metrics` only.
pub fn metrics_router(state: AppState, config: &Config) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .fallback(|| async { ApiError::NotFound("not found") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(RequestTimeoutLayer::new(config.request_timeout))
        .with_state(state)
}
