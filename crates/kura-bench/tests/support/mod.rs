//! A tiny axum service to aim `kura bench` at, on a port the kernel picks.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;

/// What the service saw.
#[derive(Default, Debug)]
pub struct Seen {
    /// GET /api/v1/profiles/{id} requests per id.
    pub gets: HashMap<String, u64>,
    /// Ids already requested on /cold/{id}.
    pub warm: std::collections::HashSet<String>,
    /// PUT requests.
    pub puts: Vec<Put>,
}

/// One PUT request as the service saw it.
#[derive(Debug)]
pub struct Put {
    pub body: String,
    pub authorization: Option<String>,
    pub extra: Option<String>,
    pub query: Option<String>,
}

pub type Shared = Arc<Mutex<Seen>>;

/// A running test service.
pub struct TestServer {
    pub addr: SocketAddr,
    pub seen: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn total_gets(&self) -> u64 {
        self.seen.lock().unwrap().gets.values().sum()
    }

    pub fn gets_of(&self, id: &str) -> u64 {
        self.seen.lock().unwrap().gets.get(id).copied().unwrap_or(0)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 200 with `X-Cache: hit` for even ids, 404 without the header for the others.
async fn profile(State(seen): State<Shared>, Path(id): Path<String>) -> impl IntoResponse {
    *seen.lock().unwrap().gets.entry(id.clone()).or_default() += 1;
    match id.parse::<u64>() {
        Ok(n) if n % 2 == 0 => (
            StatusCode::OK,
            [("x-cache", "hit")],
            format!("{{\"id\":{n}}}"),
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn put_profile(
    State(seen): State<Shared>,
    Path(_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let put = Put {
        body,
        authorization: header("authorization"),
        extra: header("x-extra"),
        query,
    };
    seen.lock().unwrap().puts.push(put);
    (StatusCode::OK, [("x-cache", "bypass")], "{}")
}

/// Miss on the first request of each id, hit afterwards: a cache that starts cold.
async fn cold(State(seen): State<Shared>, Path(id): Path<String>) -> impl IntoResponse {
    let first = seen.lock().unwrap().warm.insert(id);
    let x_cache = if first { "miss" } else { "hit" };
    (StatusCode::OK, [("x-cache", x_cache)], "{}")
}

/// Never answers within any test's timeout.
async fn hang() -> &'static str {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    "late"
}

pub async fn start() -> TestServer {
    let seen = Shared::default();
    let app = Router::new()
        .route("/api/v1/profiles/{id}", get(profile).put(put_profile))
        .route("/cold/{id}", get(cold))
        .route("/hang", get(hang))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestServer { addr, seen, task }
}

/// Writes `ids` one per line to a temporary file that lives as long as the returned guard.
pub fn ids_file(ids: impl IntoIterator<Item = String>) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ids.txt");
    let mut text = String::from("# ids for the test\n\n");
    for id in ids {
        text.push_str(&id);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}
