//! The HTTP API (axum): routes, extractors, the request timeout, the
//! OpenAPI document and the server handle.
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
//!
//! The hot path (`GET /api/v1/profiles/{id}` on a hit) is: one HS256
//! verification, one Redis `GET`, and the cached JSON bytes sent as they
//! are. The only middleware is the body limit and the request timeout.

pub mod admin;
pub mod auth;
pub mod error;
pub mod health;
pub mod metrics;
pub mod profiles;
pub mod ratelimit;
pub mod tokens;
pub mod userdata;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use utoipa::OpenApi;
use uuid::Uuid;

use self::auth::Auth;
use self::error::ApiError;
use crate::app::App;
use crate::config::Config;
use crate::profiles::ProfileService;

/// The response header that says where a read was answered from.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Where a hit came from: `l1` (the near cache) or `l2` (Redis).
pub const X_CACHE_LAYER: HeaderName = HeaderName::from_static("x-cache-layer");

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The service layer.
    pub service: ProfileService,
    /// Token verification.
    pub auth: Auth,
    /// Whether the cache is the embedded memory store (health says
    /// `"redis": "memory"`).
    pub memory_store: bool,
    /// The OpenAPI document, rendered once.
    pub openapi: Bytes,
    /// The invalidation feed relay of this instance (`None`: off).
    pub feed: Option<Arc<crate::feed::Feed>>,
    /// The rate limits (`None`: off).
    pub limits: Option<Arc<ratelimit::Limits>>,
    /// Revocation checks and sessions.
    pub tokens: crate::tokens::Tokens,
    /// Settings and preferences.
    pub userdata: crate::userdata::UserData,
    /// Per-route request metrics (`None`: `--http-metrics off`).
    pub http_metrics: Option<&'static metrics::HttpMetrics>,
    /// The last `/healthz` report, answered again for a second.
    pub health: health::HealthCache,
}

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

/// The OpenAPI document of the service.
#[derive(OpenApi)]
#[openapi(
    info(title = "kura", description = "User profile service over a Redis cache (kura)."),
    paths(
        profiles::get_profile,
        profiles::put_profile,
        profiles::delete_profile,
        profiles::create_profile,
        profiles::batch,
        profiles::get_own,
        profiles::put_own,
        userdata::get_settings,
        userdata::put_settings,
        userdata::get_preferences,
        userdata::put_preferences,
        tokens::revoke,
        tokens::list_sessions,
        tokens::delete_session,
        tokens::delete_sessions,
        admin::warm,
        admin::clear_profiles,
        admin::clear_user,
        admin::clear_tag,
        admin::cache_metrics,
        health::health,
        health::metrics,
        health::openapi,
    ),
    components(schemas(error::ErrorBody)),
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
pub fn router(state: Arc<AppState>, config: &Config) -> Router {
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
    let api = if state.limits.is_some() {
        api.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ratelimit::limit,
        ))
    } else {
        api
    };
    let api = api
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(RequestTimeoutLayer::new(config.request_timeout).recording(state.http_metrics));
    // A span per request, parented by the request's trace context.
    #[cfg(feature = "otel")]
    let api = api.layer(crate::otel::TraceLayer);
    api.with_state(state)
}

/// The router of the `--metrics-listen` listener: `/metrics` only.
pub fn metrics_router(state: Arc<AppState>, config: &Config) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .fallback(|| async { ApiError::NotFound("not found") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(RequestTimeoutLayer::new(config.request_timeout))
        .with_state(state)
}

/// A listener serving a router until told to stop.
#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Listener {
    async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting and waits up to `grace` for requests in flight.
    async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(r) => r??,
            Err(_) => {
                tracing::warn!(addr = %self.addr, ?grace, "requests still running after the grace period: stopped");
                self.task.abort();
            }
        }
        Ok(())
    }
}

/// `http://<addr>`, with an unspecified address shown as loopback.
fn url_of(mut a: SocketAddr) -> String {
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{a}")
}

/// Answers 504 `{"detail": "request timed out"}` when the inner service
/// takes longer than the limit, and records each answer (timeouts
/// included) in the per-route request metrics when given a table. A plain
/// future wrapper: no boxing, no extra task.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeoutLayer {
    limit: Duration,
    metrics: Option<&'static metrics::HttpMetrics>,
}

impl RequestTimeoutLayer {
    /// Requests past `limit` answer 504.
    #[must_use]
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            metrics: None,
        }
    }

    /// Also records every answer in `metrics` (`None`: not recorded).
    #[must_use]
    pub fn recording(mut self, metrics: Option<&'static metrics::HttpMetrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            limit: self.limit,
            metrics: self.metrics,
        }
    }
}

/// The service made by [`RequestTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    limit: Duration,
    metrics: Option<&'static metrics::HttpMetrics>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for RequestTimeout<S>
where
    S: tower::Service<axum::http::Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let recording = self
            .metrics
            .map(|m| (m, m.slot(&req), std::time::Instant::now()));
        TimeoutFuture {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep(self.limit),
            recording,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`RequestTimeout`].
    #[derive(Debug)]
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: tokio::time::Sleep,
        recording: Option<(&'static metrics::HttpMetrics, metrics::Slot, std::time::Instant)>,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for TimeoutFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let r = match this.inner.poll(cx) {
            Poll::Ready(Ok(r)) => r,
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => {
                    tracing::warn!("request timed out");
                    ApiError::Timeout.into_response()
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        if let Some((m, slot, started)) = this.recording.take() {
            m.answered(slot, &r, started);
        }
        Poll::Ready(Ok(r))
    }
}

/// A running server: its address and a handle to stop it.
#[derive(Debug)]
pub struct Server {
    api: Listener,
    metrics: Option<Listener>,
    state: Arc<AppState>,
    grace: Duration,
    flushers: Option<crate::write_behind::Flushers>,
    /// Stops the sessions' background work, and its task.
    tokens: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Server {
    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.api.addr
    }

    /// `http://<addr>`, with an unspecified listen address shown as
    /// loopback.
    #[must_use]
    pub fn url(&self) -> String {
        url_of(self.api.addr)
    }

    /// The address of the `--metrics-listen` listener, when there is one.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr)
    }

    /// `http://<metrics addr>` (as [`Server::url`]), when `/metrics` has a
    /// listener of its own.
    #[must_use]
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_addr().map(url_of)
    }

    /// The service layer (for tests and embedding).
    #[must_use]
    pub fn service(&self) -> &ProfileService {
        &self.state.service
    }

    /// Revocations and sessions (for tests and embedding).
    #[must_use]
    pub fn tokens(&self) -> &crate::tokens::Tokens {
        &self.state.tokens
    }

    /// Stops accepting connections, lets requests in flight finish (up to
    /// the configured grace period), stops the write-behind flushers after
    /// their batch in hand, stops the invalidation feed relay, flushes the
    /// cache counters and closes the database pool.
    ///
    /// # Errors
    ///
    /// When the server task failed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let api = self.api.stop(self.grace).await;
        if let Some(m) = self.metrics.take() {
            m.stop(self.grace).await?;
        }
        if let Some(feed) = &self.state.feed {
            feed.stop(self.grace).await;
        }
        api?;
        if let Some(f) = self.flushers.take().filter(|f| !f.is_empty()) {
            let r = f.stop(self.grace).await;
            tracing::info!(
                "write-behind flushers stopped: {}",
                crate::write_behind::describe(&r)
            );
        }
        if let Some((stop, task)) = self.tokens.take() {
            let _ = stop.send(());
            if tokio::time::timeout(self.grace, task).await.is_err() {
                tracing::warn!("session activity flush still running after the grace period");
            }
        }
        let _ = self.state.service.cache().flush_metrics().await;
        // A load abandoned by a timed-out request can hold a connection
        // until the next read of its key drives it: don't wait on it.
        if tokio::time::timeout(Duration::from_secs(2), self.state.service.db().close())
            .await
            .is_err()
        {
            tracing::warn!("database pool closed with connections still in use");
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Opens the database and cache for `config` and starts serving.
///
/// # Errors
///
/// When the database cannot be opened or migrated, the token verification
/// is not configured, or the address cannot be bound.
pub async fn serve(config: Config) -> anyhow::Result<Server> {
    let app = App::open(&config).await?;
    serve_app(app, &config).await
}

/// Starts serving an opened [`App`]. Start-up warming, when configured,
/// runs in the background after the listener is bound.
///
/// # Errors
///
/// When the token verification is not configured or the address cannot be
/// bound.
pub async fn serve_app(app: App, config: &Config) -> anyhow::Result<Server> {
    let auth = Auth::new(&config.auth)?;
    auth.prefetch().await;
    let openapi = Bytes::from(ApiDoc::openapi().to_json()?);
    let feed = crate::feed::Feed::start(app.service.db(), app.service.cache(), config)
        .await?
        .map(Arc::new);
    let limits = ratelimit::Limits::new(app.service.cache(), &config.rate_limits);
    let tokens = crate::tokens::Tokens::new(
        app.service.db().clone(),
        app.service.queued_cache(),
        config.revocation,
        feed.is_some(),
        config.max_sessions,
    );
    let userdata = crate::userdata::UserData::new(
        app.service.db().clone(),
        app.service.queued_cache(),
        &config.wb,
    );
    let (stop_tokens, tokens_stopped) = oneshot::channel::<()>();
    let tokens_task = tokio::spawn(tokens.clone().run(async move {
        let _ = tokens_stopped.await;
    }));
    let state = Arc::new(AppState {
        service: app.service,
        auth,
        memory_store: app.memory_store,
        openapi,
        feed,
        limits,
        tokens,
        userdata,
        http_metrics: config
            .http_metrics
            .then(|| metrics::HttpMetrics::leaked(ROUTES)),
        health: health::HealthCache::default(),
    });
    let api = Listener::bind(config.listen, router(state.clone(), config)).await?;
    let metrics = match config.metrics_listen {
        Some(a) => {
            let m = Listener::bind(a, metrics_router(state.clone(), config)).await?;
            tracing::info!(addr = %m.addr, "serving /metrics");
            Some(m)
        }
        None => None,
    };
    let addr = api.addr;
    tracing::info!(%addr, database = state.service.db().backend(), cache = if state.memory_store { "memory" } else { "redis" }, "listening");
    // Any request may ask for `?strategy=behind`, whatever the default
    // strategy and wherever the flushers run: say at start what the queue's
    // store can lose.
    crate::write_behind::check_durability(state.service.write_behind(), state.memory_store).await;
    let mut flushers =
        crate::write_behind::Flushers::start(&state.service, config.wb.flushers, config);
    // One flusher per document queue, with the profile flushers.
    if config.wb.flushers > 0 {
        for kind in [
            crate::db::userdata::DocKind::Settings,
            crate::db::userdata::DocKind::Preferences,
        ] {
            let f = match config
                .redis_url
                .is_some()
                .then(|| crate::app::open_cache(config))
            {
                Some(Ok((cache, _))) => state.userdata.flusher_on(kind, &cache),
                _ => state
                    .userdata
                    .flusher_on(kind, state.service.queued_cache()),
            };
            flushers.spawn(f);
        }
    }
    if config.warm_on_start {
        let service = state.service.clone();
        let (limit, days) = (config.warm_limit, config.warm_since_days);
        tokio::spawn(async move {
            match service.warm(limit, days, None).await {
                Ok(w) => tracing::info!(
                    cached = w.cached,
                    locked_out = w.locked_out,
                    "start-up warming done"
                ),
                Err(e) => tracing::warn!(error = %e, "start-up warming failed"),
            }
        });
    }
    Ok(Server {
        api,
        metrics,
        state,
        grace: config.shutdown_grace,
        flushers: Some(flushers),
        tokens: Some((stop_tokens, tokens_task)),
    })
}
