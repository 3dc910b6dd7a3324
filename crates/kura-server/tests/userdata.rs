//! Settings and preferences over HTTP: read through the cache, written
//! with `invalidate` and `through`, validated, with the profile's access
//! rules; deleted with the profile; a direct database write reaches the
//! cache through the invalidation feed.

mod support;

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, expect_detail, x_cache};
use uuid::Uuid;

async fn put(app: &TestApp, path: &str, token: &str, body: &Value) -> reqwest::Response {
    app.call(Method::PUT, path, Some(token), Some(body)).await
}

async fn read_write_and_rules(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let stranger = app.token(&Uuid::new_v4(), false);
    for word in ["settings", "preferences"] {
        let path = format!("/api/v1/profiles/{user}/{word}");
        let d = expect_detail(app.get(&path, &owner).await, StatusCode::NOT_FOUND).await;
        assert_eq!(d, format!("{word} not found"));
        // Written, then read: a miss, then a hit with the same body.
        let r = put(&app, &path, &owner, &json!({"theme": "dark", "lang": "ja"})).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-write"], "invalidate");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (v["version"].as_i64(), v["data"]["theme"].as_str()),
            (Some(1), Some("dark"))
        );
        let r = app.get(&path, &owner).await;
        assert_eq!(x_cache(&r), "miss");
        let r = app.get(&path, &owner).await;
        assert_eq!(x_cache(&r), "hit");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["data"], json!({"theme": "dark", "lang": "ja"}));
        // `through` puts the committed version in the cache.
        let r = put(
            &app,
            &format!("{path}?strategy=through"),
            &owner,
            &json!({"theme": "light"}),
        )
        .await;
        assert_eq!(r.headers()["x-write"], "through");
        let r = app.get(&path, &owner).await;
        assert_eq!(
            x_cache(&r),
            "hit",
            "{word}: through updated the cached copy"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (v["version"].as_i64(), &v["data"]),
            (Some(2), &json!({"theme": "light"}))
        );
        // `invalidate` drops it; the next read loads version 3.
        put(&app, &path, &owner, &json!({"theme": "blue"})).await;
        let r = app.get(&path, &owner).await;
        assert_eq!(x_cache(&r), "miss");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["version"], 3);

        // Access: the owner and admins only.
        expect_detail(app.get(&path, &stranger).await, StatusCode::FORBIDDEN).await;
        expect_detail(
            put(&app, &path, &stranger, &json!({})).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert_eq!(app.get(&path, &app.admin()).await.status(), StatusCode::OK);

        // Bad input, each with a detail; nothing written.
        let big = "x".repeat(17 * 1024);
        for (body, says) in [
            (json!({"blob": big}), "at most 16384 bytes"),
            (json!([1, 2]), "JSON object"),
            (json!("text"), "JSON object"),
        ] {
            let d = expect_detail(
                put(&app, &path, &owner, &body).await,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
            assert!(d.contains(says), "{word}: {d}");
        }
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!({ "d": deep });
        }
        let d = expect_detail(
            put(&app, &path, &owner, &deep).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(d.contains("levels"), "{d}");
        let d = expect_detail(
            put(&app, &format!("{path}?strategy=later"), &owner, &json!({})).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(d.contains("strategy"), "{d}");
        let v: Value = app.get(&path, &owner).await.json().await.unwrap();
        assert_eq!(v["version"], 3, "{word}: a refused write changed nothing");
        // No profile, no document.
        let ghost = Uuid::new_v4();
        let d = expect_detail(
            put(
                &app,
                &format!("/api/v1/profiles/{ghost}/{word}"),
                &app.admin(),
                &json!({}),
            )
            .await,
            StatusCode::NOT_FOUND,
        )
        .await;
        assert_eq!(d, "profile not found");
        expect_detail(
            app.get(&format!("/api/v1/profiles/not-a-uuid/{word}"), &owner)
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }

    // Deleting the profile removes all three, in the database and cache.
    for word in ["settings", "preferences"] {
        let r = app
            .get(&format!("/api/v1/profiles/{user}/{word}"), &owner)
            .await;
        assert_eq!(x_cache(&r), "hit");
    }
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/profiles/{user}"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    for word in ["settings", "preferences"] {
        let d = expect_detail(
            app.get(&format!("/api/v1/profiles/{user}/{word}"), &owner)
                .await,
            StatusCode::NOT_FOUND,
        )
        .await;
        assert_eq!(d, format!("{word} not found"));
    }
    app.stop().await;
}

/// A write straight in the database reaches the cached settings through
/// the invalidation feed (the tables have its triggers).
async fn direct_writes_reach_the_cache(b: Backend) {
    let app = TestApp::start_with(b, |c| c.feed.mode = kura_server::config::FeedMode::Log).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}/settings");
    put(&app, &path, &owner, &json!({"theme": "dark"})).await;
    app.get(&path, &owner).await;
    assert_eq!(x_cache(&app.get(&path, &owner).await), "hit");
    let id = match b {
        Backend::PgRedis => format!("'{user}'"),
        Backend::SqliteMemory => format!("'{}'", user.hyphenated()),
    };
    let n = app
        .direct_sql(&format!(
            "UPDATE settings SET data = '{{\"theme\": \"sql\"}}' WHERE user_id = {id}"
        ))
        .await;
    assert_eq!(n, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = app.get(&path, &owner).await.json().await.unwrap();
        if v["data"]["theme"] == "sql" {
            assert_eq!(v["version"], 2, "the trigger bumped the version");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the direct write never reached the cache: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// `behind`: accepted into the cache (read at once), flushed to the
/// database; the first write of a document is direct; a direct write after
/// a `behind` one waits for its flush and lands on top of it.
async fn behind_writes_are_queued_and_ordered(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let admin = app.admin();
    for word in ["settings", "preferences"] {
        let path = format!("/api/v1/profiles/{user}/{word}");
        let behind = format!("{path}?strategy=behind");
        // Nothing to base a queued write on: written directly.
        let r = put(&app, &behind, &owner, &json!({"n": 1})).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-write"], "invalidate", "{word}");
        // Now queued: answered with the accepted version, read at once.
        let r = put(&app, &behind, &owner, &json!({"n": 2})).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-write"], "behind", "{word}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (v["version"].as_i64(), &v["data"]),
            (Some(2), &json!({"n": 2}))
        );
        let v: Value = app.get(&path, &owner).await.json().await.unwrap();
        assert_eq!(
            v["data"],
            json!({"n": 2}),
            "{word}: a read sees the queued write"
        );
        // A direct write waits for the flush and goes on top of it.
        let r = put(&app, &path, &owner, &json!({"n": 3})).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["version"], 3,
            "{word}: the direct write came after the queued one"
        );
        // Another queued write, then the database holds it once flushed:
        // the cache entry is dropped and the row read back.
        put(&app, &behind, &owner, &json!({"n": 4})).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = app
                .call(
                    Method::DELETE,
                    &format!("/api/v1/admin/cache/users/{user}"),
                    Some(&admin),
                    None,
                )
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            let r = app.get(&path, &owner).await;
            let status = x_cache(&r);
            let v: Value = r.json().await.unwrap();
            if status != "hit" && v["version"] == 4 {
                assert_eq!(v["data"], json!({"n": 4}));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{word}: the queued write never reached the database: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A profile delete lets the queued documents land first, then removes
    // them with the profile.
    let path = format!("/api/v1/profiles/{user}/settings");
    put(
        &app,
        &format!("{path}?strategy=behind"),
        &owner,
        &json!({"n": 5}),
    )
    .await;
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/profiles/{user}"),
            Some(&owner),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    expect_detail(app.get(&path, &owner).await, StatusCode::NOT_FOUND).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    expect_detail(app.get(&path, &owner).await, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

both_backends!(
    read_write_and_rules,
    direct_writes_reach_the_cache,
    behind_writes_are_queued_and_ordered,
);

/// The OpenAPI document lists every route of these issues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_the_new_routes() {
    let app = TestApp::start(Backend::SqliteMemory).await;
    let v: Value = app
        .http
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (path, methods) in [
        ("/api/v1/profiles/{user_id}/settings", &["get", "put"][..]),
        (
            "/api/v1/profiles/{user_id}/preferences",
            &["get", "put"][..],
        ),
        ("/api/v1/auth/revoke", &["post"][..]),
        ("/api/v1/sessions", &["get", "delete"][..]),
        ("/api/v1/sessions/{sid}", &["delete"][..]),
    ] {
        for m in methods {
            assert!(
                v["paths"][path][m].is_object(),
                "{m} {path} missing from /openapi.json"
            );
        }
    }
    app.stop().await;
}
