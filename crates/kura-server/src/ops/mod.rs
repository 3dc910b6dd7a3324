//! Operations: `/healthz`, `/metrics` and `/openapi.json` ([`health`]),
//! the invalidation feed relay and its state ([`feed`]), and the
//! write-behind queue's durability and status ([`write_behind`]).

use std::sync::Arc;

use axum::body::Bytes;

use crate::http::metrics::HttpMetrics;
use crate::profiles::ProfileService;
use crate::tokens::Tokens;
use crate::userdata::UserData;

pub mod feed;
pub mod health;
pub mod write_behind;

/// What the operations routes read.
#[derive(Debug)]
pub struct Ops {
    /// Profiles (the database and cache health, gauges).
    pub profiles: Arc<ProfileService>,
    /// Settings and preferences (their near-cache gauges).
    pub userdata: Arc<UserData>,
    /// Revocations and sessions (their near-cache gauges).
    pub tokens: Tokens,
    /// Whether the cache is the embedded memory store (health says
    /// `"redis": "memory"`).
    pub memory_store: bool,
    /// The OpenAPI document, rendered once.
    pub openapi: Bytes,
    /// The invalidation feed relay of this instance (`None`: off).
    pub feed: Option<Arc<feed::Feed>>,
    /// Per-route request metrics (`None`: `--http-metrics off`).
    pub http_metrics: Option<&'static HttpMetrics>,
    /// The last `/healthz` report, answered again for a second.
    pub health: health::HealthCache,
}
