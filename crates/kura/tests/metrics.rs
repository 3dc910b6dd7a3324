//! The `metrics` facade: per-type counters and histograms under the names
//! the documentation promises.

mod support;

use std::sync::OnceLock;

use kura::Kind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use support::{Backend, Db, TestDb, cleanup};

fn snapshotter() -> &'static Snapshotter {
    static S: OnceLock<Snapshotter> = OnceLock::new();
    S.get_or_init(|| {
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        rec.install().expect("one recorder per test binary");
        snap
    })
}

fn counter(
    snap: &[(
        CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    )],
    name: &str,
    kind: &str,
) -> u64 {
    snap.iter()
        .filter(|(k, ..)| k.kind() == MetricKind::Counter && k.key().name() == name)
        .filter(|(k, ..)| {
            k.key()
                .labels()
                .any(|l| l.key() == "cache_type" && l.value() == kind)
        })
        .map(|(.., v)| match v {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_type_counters_and_histograms() {
    let snap = snapshotter();
    let (cache, ns) = Backend::Memory.cache();
    let db = TestDb::new();
    db.put("u1", "x");
    // A type name of this test's own keeps the counts apart from others.
    let kind = Kind::new("metrics_probe");
    let reader = cache.aside(kind, Db(db.clone()));
    reader.get("u1").await.unwrap();
    reader.get("u1").await.unwrap();
    reader.get("u1").await.unwrap();
    reader.get("gone").await.unwrap();
    cache.invalidate(kind, "u1").await.unwrap();
    db.set_fail(true);
    let _ = reader.get("u1").await;
    let s: Vec<_> = snap.snapshot().into_vec();
    let name = "metrics_probe";
    assert_eq!(counter(&s, "cache_hits_total", name), 2);
    assert_eq!(counter(&s, "cache_misses_total", name), 2);
    assert_eq!(counter(&s, "cache_loads_total", name), 3);
    assert_eq!(counter(&s, "cache_load_errors_total", name), 1);
    assert_eq!(counter(&s, "cache_invalidations_total", name), 1);
    let hist = s.iter().any(|(k, ..)| {
        k.kind() == MetricKind::Histogram && k.key().name() == "cache_get_duration_seconds"
    });
    assert!(hist, "latency histogram recorded");
    cleanup(&ns).await;
}
