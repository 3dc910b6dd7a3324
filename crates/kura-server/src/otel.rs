//! OpenTelemetry traces (the `otel` feature): a span per request, with the
//! W3C trace context of the request (`traceparent`, `tracestate`) as its
//! parent, and the library's cache-step spans (`cache.read`,
//! `cache.lease_wait`, `cache.load`, `cache.fill`, `cache.write`,
//! `cache.flush`) below it, exported over OTLP/HTTP.
//!
//! Export starts when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with the exporter's usual
//! variables; without it, or without the feature, nothing is recorded.
//!
//! | span | fields |
//! |---|---|
//! | `request` (named `METHOD route` in OpenTelemetry) | `http.request.method`, `http.route`, `http.response.status_code`, `cache.outcome` (the `X-Cache` answer) |

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::MatchedPath;
use axum::http::{HeaderMap, Request};
use axum::response::Response;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The tracing layer exporting to `provider`'s tracer.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("kura"))
}

/// The OTLP/HTTP exporter's provider, when an endpoint is configured.
#[must_use]
pub fn provider_from_env() -> Option<SdkTracerProvider> {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .build(),
        ),
        Err(e) => {
            eprintln!("OTLP trace export not started: {e}");
            None
        }
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// The span of one request, its parent taken from the request's W3C trace
/// context.
pub fn request_span<B>(req: &Request<B>) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(crate::http::metrics::UNMATCHED, MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{} {route}", req.method()),
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        cache.outcome = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&Headers(req.headers()));
    let _ = span.set_parent(parent);
    span
}

/// Puts each request in its [`request_span`].
#[derive(Debug, Clone, Copy)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

/// The service made by [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for Traced<S>
where
    S: tower::Service<Request<B>, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let span = request_span(&req);
        let fut = {
            let _enter = span.enter();
            self.inner.call(req)
        };
        let recorded = span.clone();
        Box::pin(
            async move {
                let r = fut.await;
                if let Ok(resp) = &r {
                    recorded.record("http.response.status_code", resp.status().as_u16());
                    if let Some(c) = resp
                        .headers()
                        .get(crate::http::X_CACHE)
                        .and_then(|v| v.to_str().ok())
                    {
                        recorded.record("cache.outcome", c);
                    }
                }
                r
            }
            .instrument(span),
        )
    }
}
