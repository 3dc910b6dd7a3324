//! `/metrics`: every series carries `# HELP` text, and `--metrics-listen`
//! moves the endpoint to a listener of its own.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use clap::Parser;
use kura_server::{Cli, Command, Config};
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Backend, TestApp};
use uuid::Uuid;

/// The metric names that have samples but no `# HELP` line.
fn undescribed(text: &str) -> Vec<String> {
    let helped: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut missing: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|name| {
            // A histogram's samples are its name plus a suffix.
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s).filter(|base| {
                        helped.contains(base) || text.contains(&format!("# TYPE {base} histogram"))
                    })
                })
                .unwrap_or(name)
        })
        .filter(|name| !helped.contains(name))
        .map(str::to_owned)
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

async fn scrape(http: &reqwest::Client, url: &str) -> (StatusCode, String) {
    let r = http.get(url).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

/// Drives reads, write-behind and write-through writes and a delete, so
/// that the library's and the service's series are registered.
async fn traffic(app: &TestApp) {
    let user = Uuid::new_v4();
    app.create(&user).await;
    let path = format!("/api/v1/profiles/{user}");
    for _ in 0..2 {
        assert_eq!(app.get(&path, &app.admin()).await.status(), StatusCode::OK);
    }
    for strategy in ["behind", "through", "invalidate"] {
        let r = app
            .call(
                Method::PUT,
                &format!("{path}?strategy={strategy}"),
                Some(&app.admin()),
                Some(&json!({"name": strategy})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{strategy}");
    }
    let r = app
        .call(Method::DELETE, &path, Some(&app.admin()), None)
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_has_help_text() {
    let app = TestApp::start(Backend::SqliteMemory).await;
    traffic(&app).await;
    let (status, m) = scrape(&app.http, &format!("{}/metrics", app.url)).await;
    assert_eq!(status, StatusCode::OK);
    for series in [
        "cache_hits_total",
        "cache_misses_total",
        "cache_get_duration_seconds",
        "cache_wb_accepted_total",
        "cache_wb_queue_depth",
    ] {
        assert!(m.contains(&format!("\n{series}")), "{series} missing:\n{m}");
    }
    let missing = undescribed(&m);
    assert!(missing.is_empty(), "no # HELP for {missing:?}:\n{m}");
    app.stop().await;
}

/// The value of the one sample line that starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Per-route request series: counted by route template, method, status and
/// X-Cache, with a latency histogram; requests to no route are `unmatched`;
/// `--http-metrics off` leaves them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_route_status_and_outcome() {
    let app = TestApp::start(Backend::SqliteMemory).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let path = format!("/api/v1/profiles/{user}");
    let token = app.token(&user, false);
    for _ in 0..3 {
        assert_eq!(app.get(&path, &token).await.status(), StatusCode::OK);
    }
    let ghost = format!("/api/v1/profiles/{}", Uuid::new_v4());
    assert_eq!(
        app.get(&ghost, &app.admin()).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.get("/nowhere", &token).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = app.call(Method::GET, &path, None, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (_, m) = scrape(&app.http, &format!("{}/metrics", app.url)).await;
    let route = r#"route="/api/v1/profiles/{user_id}",method="GET""#;
    assert_eq!(
        sample(
            &m,
            &format!(r#"http_requests_total{{{route},status="200",cache="miss"}}"#)
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"http_requests_total{{{route},status="200",cache="hit"}}"#)
        ),
        Some(2.0)
    );
    assert!(
        sample(
            &m,
            &format!(r#"http_requests_total{{{route},status="404","#)
        )
        .is_some(),
        "the cached miss of the ghost: {m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"http_requests_total{{{route},status="401",cache="none"}}"#)
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"http_requests_total{route="unmatched",method="GET",status="404",cache="none"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"http_requests_total{route="/api/v1/profiles",method="POST",status="201",cache="none"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"http_request_duration_seconds_count{{{route},cache="hit"}}"#)
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"http_request_duration_seconds_bucket{{{route},cache="hit",le="+Inf"}}"#)
        ),
        Some(2.0)
    );
    let missing = undescribed(&m);
    assert!(missing.is_empty(), "no # HELP for {missing:?}");
    app.stop().await;

    let off = TestApp::start_with(Backend::SqliteMemory, |c| c.http_metrics = false).await;
    off.get("/healthz", &off.admin()).await;
    let (_, m) = scrape(&off.http, &format!("{}/metrics", off.url)).await;
    assert!(!m.contains("http_requests_total"), "--http-metrics off");
    off.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_metrics_apart_from_the_api() {
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    traffic(&app).await;
    let metrics_url = app.server().metrics_url().expect("a metrics listener");
    assert_ne!(metrics_url, app.url);
    // Not on the API port any more.
    let r = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // On its own port, in the Prometheus text format.
    let r = app
        .http
        .get(format!("{metrics_url}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let m = r.text().await.unwrap();
    assert!(m.contains("\ncache_hits_total{"), "{m}");
    // The metrics port serves nothing else.
    for path in ["/api/v1/profiles/batch", "/healthz", "/openapi.json"] {
        let (status, _) = scrape(&app.http, &format!("{metrics_url}{path}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // The API port still answers everything else.
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
    // Both listeners are closed by the shutdown.
    let gone = tokio::time::timeout(
        Duration::from_secs(5),
        reqwest::Client::new()
            .get(format!("{metrics_url}/metrics"))
            .send(),
    )
    .await
    .expect("refused at once");
    assert!(gone.is_err(), "the metrics listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_metrics_listen_the_api_port_serves_metrics() {
    let app = TestApp::start(Backend::SqliteMemory).await;
    assert_eq!(app.server().metrics_url(), None);
    let (status, m) = scrape(&app.http, &format!("{}/metrics", app.url)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(m.contains("# TYPE "), "{m}");
    app.stop().await;
}

#[test]
fn metrics_listen_is_a_serve_flag() {
    let parse = |args: &[&str]| -> Config {
        let cli = Cli::try_parse_from(args).unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        Config::from_args(&a)
    };
    assert_eq!(parse(&["kura", "serve"]).metrics_listen, None);
    assert_eq!(
        parse(&["kura", "serve", "--metrics-listen", "127.0.0.1:9100"]).metrics_listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
    assert!(Cli::try_parse_from(["kura", "serve", "--metrics-listen", "nowhere"]).is_err());
}
