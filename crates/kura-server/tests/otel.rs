//! OpenTelemetry traces (`--features otel`): a request carrying a W3C
//! `traceparent` gets a server span in that trace, and the cache steps of
//! a miss (read, load, fill) and of a hit (read, L1 or L2) are spans below
//! it with the outcome as attributes; a write shows its write step.
//! Exported to the SDK's in-memory exporter.

#![cfg(feature = "otel")]

mod support;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Backend, TestApp};
use tracing_subscriber::layer::SubscriberExt as _;
use uuid::Uuid;

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_cache_steps_are_spans_in_the_callers_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber =
        tracing_subscriber::registry().with(kura_server::telemetry::otel::layer(&provider));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let app = TestApp::start(Backend::SqliteMemory).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let token = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    for _ in 0..2 {
        let r = app
            .http
            .get(format!("{}{path}", app.url))
            .bearer_auth(&token)
            .header("traceparent", format!("00-{trace}-{parent}-01"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = app
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(&json!({"name": "traced"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let trace_id = TraceId::from_hex(trace).unwrap();
    let ours: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace_id)
        .collect();
    let requests: Vec<&&SpanData> = ours
        .iter()
        .filter(|s| s.name == "GET /api/v1/profiles/{user_id}")
        .collect();
    assert_eq!(
        requests.len(),
        2,
        "two GETs in the caller's trace: {:?}",
        ours.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    for r in &requests {
        assert_eq!(r.parent_span_id, SpanId::from_hex(parent).unwrap());
        assert_eq!(
            attr(r, "http.route").as_deref(),
            Some("/api/v1/profiles/{user_id}")
        );
        assert_eq!(attr(r, "http.response.status_code").as_deref(), Some("200"));
    }
    let outcomes: Vec<Option<String>> = requests.iter().map(|r| attr(r, "cache.outcome")).collect();
    assert!(
        outcomes.contains(&Some("miss".into())) && outcomes.contains(&Some("hit".into())),
        "{outcomes:?}"
    );
    // The cache steps, children of their request.
    let ids: Vec<SpanId> = requests.iter().map(|r| r.span_context.span_id()).collect();
    let reads: Vec<&&SpanData> = ours
        .iter()
        .filter(|s| s.name == "cache.read" && attr(s, "cache.type").as_deref() == Some("profile"))
        .collect();
    assert_eq!(reads.len(), 2, "one profile read per GET");
    assert!(reads.iter().all(|s| ids.contains(&s.parent_span_id)));
    let read_outcomes: Vec<Option<String>> =
        reads.iter().map(|s| attr(s, "cache.outcome")).collect();
    assert!(
        read_outcomes.contains(&Some("miss".into())) && read_outcomes.contains(&Some("hit".into())),
        "{read_outcomes:?}"
    );
    for step in ["cache.load", "cache.fill"] {
        assert!(
            spans
                .iter()
                .any(|s| s.name == step && attr(s, "cache.type").as_deref() == Some("profile")),
            "{step} missing"
        );
    }
    // The write (not in the caller's trace: no traceparent) has its step.
    assert!(
        spans
            .iter()
            .any(|s| s.name == "PUT /api/v1/profiles/{user_id}")
    );
    assert!(
        spans.iter().any(
            |s| s.name == "cache.write" && attr(s, "cache.op").as_deref() == Some("invalidate")
        )
    );
    app.stop().await;
}
