//! OpenTelemetry traces (the `otel` feature): a span per request
//! ([`crate::http::trace`]), with the W3C trace context of the request (`traceparent`, `tracestate`) as its
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

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;

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
