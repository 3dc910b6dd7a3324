//! Shared by the trigger log's tests (`feed.rs`, `feed_log.rs`): the bound
//! a change has to reach the cache, the relay on, and reads that wait for a
//! change to be served.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use super::TestApp;

/// How long a change may take to reach the cache. The profile TTL is 300 s,
/// so a missed invalidation cannot pass within it; the relay needs one
/// notification or poll (1 s on PostgreSQL, 100 ms on SQLite) and, when
/// another instance held the relay lease, that lease's expiry.
pub const BOUND: Duration = Duration::from_secs(20);

/// The relay on, as `kura serve` runs by default (support turns it off).
pub fn feed_on(c: &mut kura_server::Config) {
    c.feed.mode = kura_server::config::FeedMode::Log;
}

/// Runs one statement straight on the test's database, not through kura.
pub async fn sql(app: &TestApp, stmt: &str) -> u64 {
    app.direct_sql(stmt).await
}

/// GETs `user` until `done` holds for the answer (status, body); returns
/// how long that took. Panics past [`BOUND`] with the last answer.
pub async fn until(
    app: &TestApp,
    user: &Uuid,
    what: &str,
    done: impl Fn(StatusCode, &Value) -> bool,
) -> Duration {
    let admin = app.admin();
    let start = Instant::now();
    loop {
        let r = app.get(&format!("/api/v1/profiles/{user}"), &admin).await;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if done(status, &body) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < BOUND,
            "{what}: still {status} {body} after {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `user` until the answer is a cache hit.
pub async fn cached(app: &TestApp, user: &Uuid) -> Value {
    let admin = app.admin();
    for _ in 0..50 {
        let r = app.get(&format!("/api/v1/profiles/{user}"), &admin).await;
        assert_eq!(r.status(), StatusCode::OK);
        if super::x_cache(&r) == "hit" {
            return r.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{user} never became a cache hit");
}
