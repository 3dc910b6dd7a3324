//! `kura bench` end to end against a tiny in-process service.

mod support;

use std::time::{Duration, Instant};

use kura_bench::{BenchArgs, BenchError, Report, StopReason, run};

async fn bench(flags: &[&str]) -> anyhow::Result<Report> {
    let args = BenchArgs::from_args(flags.iter().copied()).expect("flags parse");
    run(args).await
}

fn numbered(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_add_up_and_statuses_and_x_cache_mix_are_right() {
    let server = support::start().await;
    let (_dir, ids) = support::ids_file(numbered(1..=100));
    let r = bench(&[
        "--url",
        &server.url(),
        "--ids-file",
        &ids,
        "--dist",
        "uniform",
        "--requests",
        "500",
        "--concurrency",
        "8",
        "--warmup",
        "0s",
        "--seed",
        "1",
    ])
    .await
    .unwrap();

    assert_eq!(r.requests, 500);
    assert_eq!(r.stopped_by, StopReason::Requests);
    assert_eq!(r.errors, 0);
    assert_eq!(r.timeouts, 0);
    assert_eq!(r.responses, 500);
    let ok = r.statuses.get(&200).copied().unwrap_or(0);
    let not_found = r.statuses.get(&404).copied().unwrap_or(0);
    assert_eq!(ok + not_found, 500, "{:?}", r.statuses);
    assert_eq!(r.statuses.len(), 2, "{:?}", r.statuses);
    // Half of the ids are even: both outcomes are common.
    assert!(ok > 150 && not_found > 150, "{:?}", r.statuses);
    assert_eq!(r.x_cache.hit, ok);
    assert_eq!(r.x_cache.none, not_found);
    assert_eq!(
        r.x_cache.miss + r.x_cache.stale + r.x_cache.bypass + r.x_cache.other,
        0
    );
    assert_eq!(r.hit_ratio, Some(1.0));
    assert_eq!(r.intervals.iter().map(|i| i.requests).sum::<u64>(), 500);
    assert_eq!(r.intervals.iter().map(|i| i.hits).sum::<u64>(), ok);
    assert_eq!(r.warmup_requests, 0);
    assert!(r.throughput > 0.0);
    assert!(r.latency_ms.p50 > 0.0);
    assert!(r.latency_ms.p50 <= r.latency_ms.p90);
    assert!(r.latency_ms.p90 <= r.latency_ms.p99);
    assert!(r.latency_ms.p99 <= r.latency_ms.p999);
    assert!(r.latency_ms.p999 <= r.latency_ms.max);
    // The service saw exactly the measured requests, spread over many ids.
    assert_eq!(server.total_gets(), 500);
    assert!(server.seen.lock().unwrap().gets.len() > 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_sends_every_request_to_one_id() {
    let server = support::start().await;
    let r = bench(&[
        "--url",
        &server.url(),
        "--id",
        "42",
        "--dist",
        "hot",
        "--requests",
        "100",
        "--concurrency",
        "4",
        "--warmup",
        "0s",
    ])
    .await
    .unwrap();
    assert_eq!(r.statuses.get(&200), Some(&100));
    assert_eq!(server.gets_of("42"), 100);
    assert_eq!(server.total_gets(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipf_skews_towards_the_first_ids() {
    let server = support::start().await;
    let (_dir, ids) = support::ids_file(numbered(1..=200));
    let r = bench(&[
        "--url",
        &server.url(),
        "--ids-file",
        &ids,
        "--dist",
        "zipf",
        "--zipf-exponent",
        "1.0",
        "--requests",
        "4000",
        "--concurrency",
        "8",
        "--warmup",
        "0s",
        "--seed",
        "3",
    ])
    .await
    .unwrap();
    assert_eq!(r.requests, 4000);
    let first = server.gets_of("1");
    let median = server.gets_of("100");
    // P(1) / P(100) = 100 for s = 1: about 680 against 7.
    assert!(first > 10 * median.max(1), "first {first}, median {median}");
    assert!(first > 400, "first {first}");
    assert!(server.gets_of("2") > median);
}

#[tokio::test]
async fn remote_targets_are_refused() {
    for url in [
        "http://10.1.2.3",
        "http://10.1.2.3:8080",
        "http://example.com:80",
    ] {
        let started = Instant::now();
        let err = bench(&["--url", url, "--id", "1", "--requests", "1"])
            .await
            .unwrap_err();
        let err = err.downcast::<BenchError>().expect("a BenchError");
        assert!(
            matches!(err, BenchError::RemoteTarget { .. }),
            "{url}: {err}"
        );
        assert!(err.to_string().contains("--allow-remote"));
        // Refused up front, not after trying to connect.
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}

#[tokio::test]
async fn missing_ids_are_an_error() {
    let err = bench(&["--url", "http://127.0.0.1:9", "--requests", "1"])
        .await
        .unwrap_err();
    assert!(
        matches!(err.downcast_ref::<BenchError>(), Some(BenchError::NoIds)),
        "{err}"
    );
    let err = bench(&["--ids-file", "/nonexistent/ids.txt", "--requests", "1"])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<BenchError>(),
            Some(BenchError::IdsFile { .. })
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounds_the_run() {
    let server = support::start().await;
    let started = Instant::now();
    let r = bench(&[
        "--url",
        &server.url(),
        "--id",
        "2",
        "--duration",
        "300ms",
        "--concurrency",
        "4",
        "--warmup",
        "0s",
    ])
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(r.stopped_by, StopReason::Duration);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!((r.duration_secs - 0.3).abs() < 0.05, "{}", r.duration_secs);
    assert!(r.requests > 0);
    assert_eq!(r.requests, r.responses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_never_answers_still_ends_the_run_with_timeouts() {
    let server = support::start().await;
    let started = Instant::now();
    let r = bench(&[
        "--url",
        &server.url(),
        "--path",
        "/hang",
        "--timeout",
        "100ms",
        "--duration",
        "550ms",
        "--concurrency",
        "4",
        "--warmup",
        "0s",
    ])
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.responses, 0);
    // Five rounds of 100 ms timeouts on each of the four connections; fewer on a busy machine.
    assert!(r.timeouts >= 8, "{}", r.timeouts);
    assert_eq!(r.requests, r.timeouts);
    assert_eq!(r.latency_ms.max, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_counts_transport_errors_and_ends() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let r = bench(&[
        "--url",
        &format!("http://127.0.0.1:{port}"),
        "--id",
        "1",
        "--duration",
        "200ms",
        "--concurrency",
        "2",
        "--warmup",
        "0s",
    ])
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(r.errors > 0);
    assert_eq!(r.responses, 0);
    // Failed connects back off instead of spinning.
    assert!(r.errors < 200, "{}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_sends_the_templated_body_token_headers_and_query() {
    let server = support::start().await;
    let r = bench(&[
        "--url",
        &server.url(),
        "--method",
        "PUT",
        "--id",
        "7",
        "--token",
        "s3cret",
        "--header",
        "X-Extra: yes",
        "--query",
        "strategy=through",
        "--requests",
        "20",
        "--concurrency",
        "2",
        "--warmup",
        "0s",
    ])
    .await
    .unwrap();
    assert_eq!(r.statuses.get(&200), Some(&20));
    assert_eq!(r.x_cache.bypass, 20);
    assert_eq!(r.hit_ratio, Some(0.0));
    let seen = server.seen.lock().unwrap();
    assert_eq!(seen.puts.len(), 20);
    let mut bodies = std::collections::HashSet::new();
    for put in &seen.puts {
        assert_eq!(put.authorization.as_deref(), Some("Bearer s3cret"));
        assert_eq!(put.extra.as_deref(), Some("yes"));
        assert_eq!(put.query.as_deref(), Some("strategy=through"));
        let v: serde_json::Value = serde_json::from_str(&put.body).unwrap();
        let phone = v["phone"].as_str().unwrap();
        assert_eq!(phone.len(), 13, "{phone}");
        assert!(
            phone.starts_with("080-") && phone.as_bytes()[8] == b'-',
            "{phone}"
        );
        bodies.insert(put.body.clone());
    }
    assert!(bodies.len() > 15, "bodies vary: {}", bodies.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_requests_are_sent_but_not_recorded() {
    let server = support::start().await;
    let r = bench(&[
        "--url",
        &server.url(),
        "--id",
        "4",
        "--warmup",
        "200ms",
        "--requests",
        "50",
        "--concurrency",
        "2",
    ])
    .await
    .unwrap();
    assert_eq!(r.requests, 50);
    assert!(r.warmup_requests > 0);
    assert_eq!(server.total_gets(), 50 + r.warmup_requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_paces_an_open_loop() {
    let server = support::start().await;
    let r = bench(&[
        "--url",
        &server.url(),
        "--id",
        "2",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--concurrency",
        "4",
        "--warmup",
        "0s",
    ])
    .await
    .unwrap();
    assert_eq!(r.rate, Some(200.0));
    assert!((150..=205).contains(&r.requests), "{}", r.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_zipf_run_shows_the_hit_ratio_climbing() {
    let server = support::start().await;
    let (_dir, ids) = support::ids_file(numbered(1..=20_000));
    let r = bench(&[
        "--url",
        &server.url(),
        "--path",
        "/cold/{id}",
        "--ids-file",
        &ids,
        "--duration",
        "2s",
        "--rate",
        "2000",
        "--concurrency",
        "8",
        "--warmup",
        "0s",
        "--seed",
        "5",
    ])
    .await
    .unwrap();
    assert_eq!(r.intervals.len(), 2, "{:?}", r.intervals);
    let first = r.intervals[0].hit_ratio.unwrap();
    let second = r.intervals[1].hit_ratio.unwrap();
    assert!(second > first, "{first} then {second}");
    assert_eq!(r.x_cache.hit + r.x_cache.miss, r.responses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_report_goes_to_the_out_file() {
    let server = support::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let r = bench(&[
        "--url",
        &server.url(),
        "--id",
        "2",
        "--requests",
        "30",
        "--warmup",
        "0s",
        "--concurrency",
        "3",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ])
    .await
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(json["requests"], 30);
    assert_eq!(json["statuses"]["200"], 30);
    assert_eq!(json["x_cache"]["hit"], 30);
    assert_eq!(json["hit_ratio"], 1.0);
    assert_eq!(json["stopped_by"], "requests");
    assert!(json["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(json["intervals"].as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!(r.requests, 30);
}
