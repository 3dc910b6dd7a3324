//! Health, Prometheus metrics and the OpenAPI document. No token needed.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::Ops;
use crate::http::error::{ApiError, ErrorBody};

/// How long a health check waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a health report is answered again before it is made anew:
/// whatever the request rate (the route needs no token), the checks cost
/// the database at most one statement, and Redis one round trip each,
/// per interval.
const REPORT_FOR: Duration = Duration::from_secs(1);

/// The last health report, shared by the requests of one interval; one
/// request at a time makes the next.
#[derive(Debug, Default)]
pub struct HealthCache {
    last: tokio::sync::Mutex<Option<(std::time::Instant, StatusCode, Health)>>,
}

/// The health report.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `healthy`; `degraded` when Redis is down (reads and writes go to the
    /// database); `unhealthy` when the database is down.
    pub status: &'static str,
    /// `ok` or `down`.
    pub database: &'static str,
    /// `ok`, `down`, or `memory` when the embedded in-process store is used
    /// instead of Redis.
    pub redis: &'static str,
    /// The invalidation feed: whether this instance relays, and the lag
    /// and backlog of the fleet's relaying (a lag does not change
    /// `status`).
    pub feed: super::feed::FeedHealth,
}

/// Checks the database and the cache server (the report is at most a
/// second old: the checks run at most once a second, whatever the request
/// rate).
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "Healthy or degraded (Redis down)", body = Health),
        (status = 503, description = "The database is down", body = Health),
    )
)]
pub async fn health(State(s): State<Arc<Ops>>) -> Response {
    let mut last = s.health.last.lock().await;
    let fresh = last
        .as_ref()
        .filter(|(at, _, _)| at.elapsed() < REPORT_FOR)
        .map(|(_, code, h)| (*code, h.clone()));
    let (code, report) = match fresh {
        Some(r) => r,
        None => {
            let (code, report) = check(&s).await;
            *last = Some((std::time::Instant::now(), code, report.clone()));
            (code, report)
        }
    };
    drop(last);
    (code, Json(report)).into_response()
}

/// Runs the checks: one database statement, one Redis round trip for the
/// cache and one for the feed.
async fn check(s: &Ops) -> (StatusCode, Health) {
    let db = async {
        match tokio::time::timeout(PROBE_TIMEOUT, s.profiles.db().ping()).await {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health: database down");
                "down"
            }
            Err(_) => {
                tracing::warn!("health: database did not answer");
                "down"
            }
        }
    };
    let redis = async {
        if s.memory_store {
            return "memory";
        }
        match s.profiles.cache().ping().await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(error = %e, "health: redis down");
                "down"
            }
        }
    };
    let feed = super::feed::FeedHealth::of(s.feed.as_ref());
    let (database, redis, feed) = tokio::join!(db, redis, feed);
    let (code, status) = match (database, redis) {
        ("ok", "down") => (StatusCode::OK, "degraded"),
        ("ok", _) => (StatusCode::OK, "healthy"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
    };
    (
        code,
        Health {
            status,
            database,
            redis,
            feed,
        },
    )
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text", body = String, content_type = "text/plain"),
        (status = 503, description = "No recorder installed in this process", body = ErrorBody),
    )
)]
pub async fn metrics(State(s): State<Arc<Ops>>) -> Response {
    // The write-behind depth and lag gauges, fresh even where no flusher
    // runs (the library sets them as it reads the queue).
    let _ = tokio::time::timeout(PROBE_TIMEOUT, s.profiles.write_behind().status()).await;
    s.profiles.publish_gauges();
    let near = s
        .profiles
        .near_stats()
        .map(|n| ("profile", n))
        .into_iter()
        .chain(s.userdata.near_stats())
        .chain(s.tokens.near_stats());
    for (kind, n) in near {
        metrics::gauge!("cache_l1_entries", "cache_type" => kind).set(n.entries as f64);
        metrics::gauge!("cache_l1_bytes", "cache_type" => kind).set(n.bytes as f64);
    }
    match crate::telemetry::prometheus() {
        Some(h) => {
            let mut text = h.render();
            if let Some(m) = &s.http_metrics {
                m.render(&mut text);
            }
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                )],
                text,
            )
                .into_response()
        }
        None => ApiError::Unavailable("metrics recorder not installed").into_response(),
    }
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
pub async fn openapi(State(s): State<Arc<Ops>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        s.openapi.clone(),
    )
        .into_response()
}
