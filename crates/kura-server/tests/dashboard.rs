//! The Grafana dashboard (`deploy/grafana/kura.json`) against a real
//! Prometheus: a `prometheus` of the test's own on a free loopback port
//! scrapes a `kura serve` (near cache, invalidation feed, write-behind and
//! rate limits on) while `kura bench` and the test's own writes load it;
//! then every panel's PromQL must return data, and every series kura
//! describes must have a panel.
//!
//! Needs `prometheus` (Debian's package; `.ci/run` installs it). Without it
//! the test says so and passes only outside CI.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kura_server::config::{FeedMode, NearCacheSetting, RateLimitSetting};
use kura_testkit::free_port;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp};
use uuid::Uuid;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn have_prometheus() -> bool {
    if std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "prometheus not found: install Debian's `prometheus` package"
    );
    eprintln!(
        "SKIPPED: prometheus not found (apt-get install prometheus); the dashboard was not checked"
    );
    false
}

/// Every `expr` of the dashboard's panels.
fn exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// The series kura describes (library and service).
fn described() -> Vec<String> {
    let mut names = Vec::new();
    for f in [
        "crates/kura/src/metrics.rs",
        "crates/kura-server/src/telemetry/mod.rs",
    ] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("describe_") {
            rest = &rest[i..];
            let Some(q) = rest.find('"') else { break };
            let tail = &rest[q + 1..];
            let Some(end) = tail.find('"') else { break };
            let name = &tail[..end];
            if name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !name.is_empty()
            {
                names.push(name.to_owned());
            }
            rest = &tail[end..];
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_series_has_a_panel() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/kura.json")).unwrap(),
    )
    .unwrap();
    let all: String = exprs(&dashboard)
        .into_iter()
        .map(|(_, e)| e + "\n")
        .collect();
    let names = described();
    assert!(names.len() > 40, "{names:?}");
    let missing: Vec<&String> = names.iter().filter(|n| !all.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "series without a panel: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_returns_data_from_a_real_prometheus() {
    if !have_prometheus() {
        return;
    }
    let app = TestApp::start_with(Backend::PgRedis, |c| {
        c.feed.mode = FeedMode::Log;
        c.near_cache = vec![NearCacheSetting {
            kind: "profile".into(),
            entries: 1000,
        }];
        c.rate_limits = vec!["read=1000000/1h".parse::<RateLimitSetting>().unwrap()];
    })
    .await;
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        app.create(u).await;
    }
    let admin = app.admin();

    // Prometheus, scraping the server every second.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let target = app.url.trim_start_matches("http://").to_owned();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: kura\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let mut prom = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let prom_url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let query = async |q: &str| -> Value {
        let r = http
            .get(format!("{prom_url}/api/v1/query"))
            .query(&[("query", q)])
            .send()
            .await;
        match r {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    };

    // Load: `kura bench` reads (hits from L1 and L2) while the test writes
    // (invalidate, through, behind), reads a batch and an admin endpoint.
    let ids = dir.path().join("ids.txt");
    std::fs::write(
        &ids,
        users.iter().map(|u| format!("{u}\n")).collect::<String>(),
    )
    .unwrap();
    let mut bench = tokio::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["bench", "--url", &app.url, "--token", &admin, "--ids-file"])
        .arg(&ids)
        .args([
            "--duration",
            "20s",
            "--warmup",
            "0s",
            "--concurrency",
            "4",
            "--rate",
            "300",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kura bench starts");
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(12) {
        let u = &users[i % users.len()];
        let strategy = ["invalidate", "through", "behind"][i % 3];
        let r = app
            .call(
                Method::PUT,
                &format!("/api/v1/profiles/{u}?strategy={strategy}"),
                Some(&admin),
                Some(&json!({"first_name": format!("n{i}")})),
            )
            .await;
        assert!(r.status().is_success(), "{}", r.status());
        let _ = app.get(&format!("/api/v1/profiles/{u}"), &admin).await;
        if i % 10 == 0 {
            let _ = app
                .call(
                    Method::POST,
                    "/api/v1/profiles/batch",
                    Some(&admin),
                    Some(&json!({"user_ids": [u.to_string()]})),
                )
                .await;
            let r = app.get("/api/v1/admin/cache/metrics", &admin).await;
            assert_eq!(r.status(), StatusCode::OK);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Up and scraped.
    let deadline = Instant::now() + Duration::from_secs(30);
    while query("up{job=\"kura\"}").await["data"]["result"][0]["value"][1] != "1" {
        assert!(Instant::now() < deadline, "prometheus never scraped kura");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/kura.json")).unwrap(),
    )
    .unwrap();
    let mut empty = Vec::new();
    let panels = exprs(&dashboard);
    for (title, expr) in &panels {
        // Grafana's rate interval, as a window that holds several scrapes.
        let q = expr.replace("$__rate_interval", "15s");
        let v = query(&q).await;
        let ok = v["status"] == "success"
            && v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty());
        if !ok {
            empty.push(format!("{title}: {q} -> {v}"));
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {} panel queries returned no data:\n{}",
        empty.len(),
        panels.len(),
        empty.join("\n")
    );
    let _ = bench.start_kill();
    let _ = prom.start_kill();
    app.stop().await;
}
