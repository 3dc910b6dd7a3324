//! `--rate-limit CLASS=N/PERIOD`: a middleware over the API that counts
//! each authenticated request of a token subject in its class
//! ([`kura::ratelimit::RateLimiter`], GCRA in Redis; per instance when
//! Redis is unreachable) and answers `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset`, or 429 with `Retry-After`.
//!
//! Classes: `batch` (`POST /api/v1/profiles/batch`), `admin`
//! (`/api/v1/admin/...`), `read` (other `GET`s) and `write` (the rest).
//! Only admitted callers are counted: requests without a valid token, or
//! with a revoked one, are not (they answer 401), so a stolen token that
//! was revoked cannot use up its subject's quota; nor are `/healthz`,
//! `/metrics` and `/openapi.json`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use kura::ratelimit::{Limited, Quota, RateLimiter, Scope};

use super::error::detail_response;
use crate::auth::Gate;
use crate::config::RateLimitSetting;

/// `RateLimit-Limit`.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset` (seconds until the limit is whole again).
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// The configured limits of an instance.
#[derive(Debug)]
pub struct Limits {
    limiter: RateLimiter,
    quotas: HashMap<String, Quota>,
    gate: Arc<Gate>,
}

impl Limits {
    /// The limits of `settings`, counted in `cache`, for the callers
    /// `gate` admits; `None` when no class is limited.
    #[must_use]
    pub fn new(
        cache: &kura::Cache,
        settings: &[RateLimitSetting],
        gate: Arc<Gate>,
    ) -> Option<Arc<Self>> {
        if settings.is_empty() {
            return None;
        }
        Some(Arc::new(Self {
            gate,
            limiter: RateLimiter::new(cache),
            quotas: settings
                .iter()
                .map(|s| (s.class.clone(), s.quota))
                .collect(),
        }))
    }
}

/// The class of a request, `None` for what is never limited.
fn class(method: &Method, path: &str) -> Option<&'static str> {
    let api = path.strip_prefix("/api/v1/")?;
    Some(if api.starts_with("admin/") {
        "admin"
    } else if api == "profiles/batch" {
        "batch"
    } else if method == Method::GET || method == Method::HEAD {
        "read"
    } else {
        "write"
    })
}

fn secs(d: std::time::Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs_f64().ceil() as u64)
}

fn headers(r: &mut Response, l: &Limited) {
    let h = r.headers_mut();
    h.insert(RATELIMIT_LIMIT, HeaderValue::from(l.limit));
    h.insert(RATELIMIT_REMAINING, HeaderValue::from(l.remaining));
    h.insert(RATELIMIT_RESET, secs(l.reset));
}

/// The middleware (see the module docs).
pub async fn limit(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    let Some(class) = class(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let Some(quota) = limits.quotas.get(class).copied() else {
        return next.run(req).await;
    };
    // The revocation check is the one the route's extractor makes next (a
    // hit of the check remembered with the verified token).
    let Some(caller) = limits.gate.admissible(req.headers()).await else {
        return next.run(req).await;
    };
    let l = match limits.limiter.check(class, &caller.sub, quota).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "rate limit not checked");
            return next.run(req).await;
        }
    };
    if l.scope == Scope::Instance {
        tracing::debug!(
            class,
            "rate limit counted by this instance (Redis unreachable)"
        );
    }
    if !l.allowed {
        let mut r = detail_response(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("rate limit exceeded: {quota} for {class} requests"),
        );
        headers(&mut r, &l);
        let retry = (l.retry_after.as_secs_f64().ceil() as u64).max(1);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry));
        return r;
    }
    let mut r = next.run(req).await;
    headers(&mut r, &l);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class(&Method::GET, "/api/v1/profiles/x"), Some("read"));
        assert_eq!(class(&Method::GET, "/api/v1/profile"), Some("read"));
        assert_eq!(class(&Method::PUT, "/api/v1/profiles/x"), Some("write"));
        assert_eq!(class(&Method::POST, "/api/v1/profiles"), Some("write"));
        assert_eq!(
            class(&Method::POST, "/api/v1/profiles/batch"),
            Some("batch")
        );
        assert_eq!(
            class(&Method::DELETE, "/api/v1/admin/cache/profiles"),
            Some("admin")
        );
        assert_eq!(class(&Method::GET, "/healthz"), None);
        assert_eq!(class(&Method::GET, "/metrics"), None);
    }
}
