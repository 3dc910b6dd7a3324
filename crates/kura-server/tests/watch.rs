//! `kura stats --watch` as a person sees it: run in a tmux pane against a
//! serving instance (and one that is down) under load, the pane's text is
//! read back. Needs `tmux`; without it the test says so and passes only
//! outside CI.

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::{Backend, TestApp};
use uuid::Uuid;

fn have_tmux() -> bool {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "tmux not found: install Debian's `tmux` package"
    );
    eprintln!("SKIPPED: tmux not found; the live view was not checked");
    false
}

fn pane(session: &str) -> String {
    let out = std::process::Command::new("tmux")
        .args(["capture-pane", "-p", "-t", session])
        .output()
        .expect("tmux capture-pane");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_shows_the_instances_under_load() {
    if !have_tmux() {
        return;
    }
    let app = TestApp::start(Backend::SqliteMemory).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let token = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    // Load for as long as the test looks.
    let load = {
        let (http, url) = (app.http.clone(), format!("{}{path}", app.url));
        tokio::spawn(async move {
            loop {
                let r = http.get(&url).bearer_auth(&token).send().await;
                assert_eq!(r.map(|r| r.status()).ok(), Some(StatusCode::OK));
            }
        })
    };
    let down = format!("http://127.0.0.1:{}", kura_testkit::free_port());
    let session = format!("kura_watch_{}", support::random_suffix());
    let cmd = format!(
        "{} stats --watch --url {} --url {down} --interval 500ms",
        env!("CARGO_BIN_EXE_kura"),
        app.url
    );
    let started = std::process::Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "100",
            "-y",
            "30",
            &cmd,
        ])
        .status()
        .expect("tmux new-session");
    assert!(started.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut screen = String::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        screen = pane(&session);
        if screen.contains("profile") && screen.contains("req/s") && !screen.contains("  0 req/s") {
            break;
        }
    }
    let _ = std::process::Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    load.abort();
    eprintln!("the pane:\n{screen}");
    assert!(screen.contains("kura stats --watch"), "{screen}");
    assert!(
        screen.contains("instances up 1/2"),
        "the down instance is counted: {screen}"
    );
    assert!(
        screen.contains(&app.url) && screen.contains(&down),
        "{screen}"
    );
    // The load is all hits after the first read: a hit ratio near 100 %.
    let line = screen
        .lines()
        .find(|l| l.starts_with("profile"))
        .unwrap_or_else(|| panic!("no profile line: {screen}"));
    let ratio: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no hit ratio in {line:?}"));
    assert!(ratio > 90.0, "{line}");
    let reqs: f64 = screen
        .lines()
        .find(|l| l.starts_with("requests"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no request rate: {screen}"));
    assert!(reqs > 10.0, "{screen}");
    assert!(screen.contains("p99 ≤"), "{screen}");
    assert!(
        screen.contains("write-behind") && screen.contains("feed"),
        "{screen}"
    );
    app.stop().await;
}
