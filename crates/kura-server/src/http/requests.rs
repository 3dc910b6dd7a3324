//! Per-request metrics: `http_requests_total{method, route, status, cache}`
//! and `http_request_duration_seconds{method, route, cache}`, where `route`
//! is the matched route template (`/api/v1/profiles/{user_id}`, never the
//! id itself, so the series stay few) and `cache` the answer's `X-Cache`
//! (`hit`, `miss`, `stale`, `bypass`, `other`, or `none`).
//!
//! The metric handles are made once per (route, method, status, cache) and
//! kept: a request then costs a read lock and two atomic updates, not a
//! registry lookup with its label strings.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};

use super::X_CACHE;

const CACHE: [&str; 6] = ["none", "hit", "miss", "stale", "bypass", "other"];

/// `(route, method, status, cache)` → handles. The route is the matched
/// template's text; the router hands out one shared copy per route, so the
/// key holds that copy.
type Key = (Arc<str>, Method, u16, usize);

static HANDLES: LazyLock<RwLock<HashMap<Key, (Counter, Histogram)>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

fn handles(key: Key) -> (Counter, Histogram) {
    if let Some(h) = HANDLES
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
    {
        return h.clone();
    }
    let (route, method, status, cache) = &key;
    let h = (
        metrics::counter!(
            "http_requests_total",
            "method" => method.as_str().to_owned(),
            "route" => route.to_string(),
            "status" => status.to_string(),
            "cache" => CACHE[*cache],
        ),
        metrics::histogram!(
            "http_request_duration_seconds",
            "method" => method.as_str().to_owned(),
            "route" => route.to_string(),
            "cache" => CACHE[*cache],
        ),
    );
    HANDLES
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(key, h.clone());
    h
}

/// The middleware.
pub async fn record(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route: Arc<str> = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| Arc::from("unmatched"), |p| Arc::from(p.as_str()));
    let r = next.run(req).await;
    let cache = match r.headers().get(X_CACHE).map(|v| v.as_bytes()) {
        None => 0,
        Some(b"hit") => 1,
        Some(b"miss") => 2,
        Some(b"stale") => 3,
        Some(b"bypass") => 4,
        Some(_) => 5,
    };
    let (count, time) = handles((route, method, r.status().as_u16(), cache));
    count.increment(1);
    time.record(started.elapsed().as_secs_f64());
    r
}
