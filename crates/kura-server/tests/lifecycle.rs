//! Start-up and shutdown: warming in the background after start, requests
//! in flight finishing on shutdown, and the binary stopping cleanly on
//! SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use kura_testkit::FaultProxy;
use reqwest::StatusCode;
use support::{Backend, TestApp, TestDb, x_cache};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_on_start_runs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("warm.db").display());
    let mut seed_config = kura_server::Config::default();
    seed_config.database_url = Some(url.clone());
    let seeded = {
        let app = kura_server::App::open(&seed_config).await.unwrap();
        let s = kura_server::profiles::seed::seed(app.service.db(), 20, 11, |_| {})
            .await
            .unwrap();
        app.service.db().close().await;
        s.user_ids
    };
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.database_url = Some(url);
        c.warm_on_start = true;
        c.warm_since_days = 31;
    })
    .await;
    // Peek (a read that never fills) until every profile is cached.
    let cache = app.server().service().cache().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cached = 0;
        for id in &seeded {
            let v: Option<serde_json::Value> = cache
                .peek(kura_server::registry::PROFILE, &id.to_string())
                .await
                .unwrap();
            cached += usize::from(v.is_some());
        }
        if cached == seeded.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "warmed after start: {cached}/{}",
            seeded.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = app
        .get(&format!("/api/v1/profiles/{}", seeded[7]), &app.admin())
        .await;
    assert_eq!(x_cache(&r), "hit");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    if !support::pg_base().contains("127.0.0.1:5432") {
        return;
    }
    let db = TestDb::create().await;
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db.url.replace("127.0.0.1:5432", &proxy.addr().to_string());
    let mut app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.database_url = Some(url);
    })
    .await;
    let user = uuid::Uuid::new_v4();
    app.create(&user).await;
    proxy.set_latency(Duration::from_millis(250));

    let request = app
        .http
        .get(format!("{}/api/v1/profiles/{user}", app.url))
        .bearer_auth(app.admin())
        .send();
    let in_flight = tokio::spawn(request);
    // Well inside the request's first database round trip (2 x 250 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = app.server.take().unwrap();
    let url = app.url.clone();
    let stopped = tokio::spawn(server.shutdown());

    let r = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&r), "miss");
    stopped.await.unwrap().expect("clean shutdown");
    let after = reqwest::Client::new()
        .get(format!("{url}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "no new connections after shutdown");
    proxy.heal();
    app.stop().await;
    drop(db);
}

#[test]
fn the_binary_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env("KURA_JWT_SECRET", "sigterm-test")
        .env("KURA_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server log ended before it listened")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        if v["message"] == "listening" {
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    let health = blocking_get(&format!("http://{addr}/healthz"));
    assert!(health.contains("\"redis\":\"memory\""), "{health}");

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "exit status {s}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "stopped within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("server stopped")),
        "{rest:?}"
    );
}

/// A GET without an async runtime (the SIGTERM test is synchronous).
fn blocking_get(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

#[test]
fn demo_prints_a_curl_line_that_misses_then_hits() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .current_dir(dir.path())
        .args(["serve", "--demo", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("KURA_JWT_SECRET")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let curl = loop {
        let line = lines.next().expect("demo output").unwrap();
        if line.trim_start().starts_with("curl -si") {
            break line;
        }
    };
    // curl -si -H 'Authorization: Bearer <token>' <url>
    let token = curl
        .split("Bearer ")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap()
        .to_owned();
    let url = curl.rsplit(' ').next().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses: Vec<(u16, String)> = rt.block_on(async {
        let c = reqwest::Client::new();
        let mut out = Vec::new();
        for _ in 0..2 {
            let r = c.get(&url).bearer_auth(&token).send().await.unwrap();
            out.push((r.status().as_u16(), x_cache(&r)));
        }
        out
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert_eq!(
        statuses,
        vec![(200, "miss".to_owned()), (200, "hit".to_owned())]
    );
    assert!(dir.path().join("kura.db").exists(), "embedded SQLite");
}
