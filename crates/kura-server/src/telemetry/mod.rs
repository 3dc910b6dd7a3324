//! Logs (`tracing`, text or JSON), the Prometheus recorder, and with the
//! `otel` feature trace export (`otel`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

#[cfg(feature = "otel")]
pub mod otel;

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), lines
/// go to stderr. A second call (tests) is ignored.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // PostgreSQL's notices come in at INFO (sqlx logs them by severity):
    // not kura's news, shown only when RUST_LOG asks for them.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    // With the `otel` feature and an OTLP endpoint configured, spans are
    // exported too (all of kura's, whatever RUST_LOG says of the logs).
    #[cfg(feature = "otel")]
    let registry = {
        let provider = otel::provider_from_env();
        let layer = provider.as_ref().map(|p| {
            otel::layer(p).with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("kura", tracing::Level::INFO)
                    .with_target("kura_server", tracing::Level::INFO),
            )
        });
        if let Some(p) = provider {
            opentelemetry::global::set_tracer_provider(p);
        }
        registry.with(layer)
    };
    let _ = registry.try_init();
}

/// Describes the series the service emits itself (the library's are
/// described by [`kura::metrics::describe`]).
fn describe() {
    metrics::describe_gauge!(
        "cache_feed_slot_lag_bytes",
        "WAL feed: bytes of WAL between the replication slot's confirmed position and the server's current one."
    );
    metrics::describe_gauge!(
        "cache_feed_slot_lag_seconds",
        "WAL feed: seconds the slot's confirmed position has not moved while the slot keeps WAL."
    );
    metrics::describe_counter!(
        "cache_feed_slot_recreated_total",
        "WAL feed: replication slots made again after PostgreSQL invalidated them or they went missing (the fed types were cleared)."
    );
    metrics::describe_counter!(
        "kura_wb_write_through_total",
        "behind writes written through to the database instead, by reason (full, unavailable)."
    );
    metrics::describe_gauge!(
        "kura_unsure_invalidations",
        "Profiles whose failed write may still commit, waiting for their row to be invalidated again."
    );
    metrics::describe_counter!(
        "kura_unsure_dropped_total",
        "Failed writes invalidated once only because too many were waiting for their rows."
    );
}

/// Latency buckets in seconds, from 50 µs (a hit) to 5 s.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// The process's Prometheus handle, installing the recorder on first use
/// and describing every series (`# HELP`).
///
/// The library registers its metric handles when strategy handles are made,
/// so this must run before them. It installs at most once per process;
/// `None` when another recorder was installed first (then `/metrics` says
/// so).
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .map(|b| b.install_recorder())
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!(error = %e, "prometheus recorder not installed");
                    return None;
                }
            };
            kura::metrics::describe();
            describe();
            let upkeep = builder.clone();
            // Histograms are drained by upkeep; a plain thread keeps it off
            // the request runtime and independent of which runtime runs.
            let _ = std::thread::Builder::new()
                .name("kura-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            Some(builder)
        })
        .as_ref()
}
