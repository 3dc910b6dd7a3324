//! Per-request metrics: `http_requests_total{method, route, status, cache}`
//! and `http_request_duration_seconds{method, route, cache}`, where `route`
//! is the matched route template (`/api/v1/profiles/{user_id}`, never the
//! id itself, so the series stay few) and `cache` the answer's `X-Cache`
//! (`hit`, `miss`, `stale`, `bypass`, or `none`).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

use super::X_CACHE;

/// The middleware.
pub async fn record(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let r = next.run(req).await;
    let cache = r
        .headers()
        .get(X_CACHE)
        .and_then(|v| v.to_str().ok())
        .map_or("none", |v| match v {
            "hit" => "hit",
            "miss" => "miss",
            "stale" => "stale",
            "bypass" => "bypass",
            _ => "other",
        });
    let status = r.status().as_u16().to_string();
    metrics::counter!(
        "http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => status,
        "cache" => cache,
    )
    .increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "cache" => cache,
    )
    .record(started.elapsed().as_secs_f64());
    r
}
