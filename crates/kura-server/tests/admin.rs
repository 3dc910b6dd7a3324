//! Admin routes (warm, invalidate, hit-rate metrics), health, Prometheus
//! metrics and the OpenAPI document.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, expect_detail, x_cache};
use uuid::Uuid;

both_backends!(
    warm_then_reads_are_hits,
    invalidation_routes,
    hit_rate_metrics,
    health_metrics_and_openapi,
);

async fn seed(app: &TestApp, n: u64) -> Vec<Uuid> {
    let db = app.server().service().db();
    kura_server::profiles::seed::seed(db, n, 7, |_| {})
        .await
        .expect("seed")
        .user_ids
}

async fn warm_then_reads_are_hits(b: Backend) {
    let app = TestApp::start(b).await;
    let ids = seed(&app, 30).await;
    let admin = app.admin();
    let r = app
        .call(
            Method::POST,
            "/api/v1/admin/cache/warm?limit=1000&since_days=31",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["cached"], 30, "{v}");
    for id in ids.iter().take(5) {
        let r = app.get(&format!("/api/v1/profiles/{id}"), &admin).await;
        assert_eq!(x_cache(&r), "hit", "warmed");
    }
    // Warming again skips what is cached.
    let r = app
        .call(
            Method::POST,
            "/api/v1/admin/cache/warm?since_days=31",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["cached"], 0);
    // A small window takes fewer users; `limit` caps them.
    app.call(
        Method::DELETE,
        "/api/v1/admin/cache/profiles",
        Some(&admin),
        None,
    )
    .await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/admin/cache/warm?limit=4&since_days=31",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["cached"], 4);
    let r = app
        .call(
            Method::POST,
            "/api/v1/admin/cache/warm?limit=lots",
            Some(&admin),
            None,
        )
        .await;
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/admin/cache/warm",
            Some(&app.token(&ids[0], false)),
            None,
        )
        .await;
    expect_detail(r, StatusCode::FORBIDDEN).await;
    app.stop().await;
}

async fn invalidation_routes(b: Backend) {
    let memory = b == Backend::SqliteMemory;
    let app = TestApp::start(b).await;
    let admin = app.admin();
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        app.create(u).await;
        app.get(&format!("/api/v1/profiles/{u}"), &admin).await;
    }
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/admin/cache/users/{}", users[0]),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"deleted": 1}));
    let r = app
        .get(&format!("/api/v1/profiles/{}", users[0]), &admin)
        .await;
    assert_eq!(x_cache(&r), "miss");
    assert_eq!(
        x_cache(
            &app.get(&format!("/api/v1/profiles/{}", users[1]), &admin)
                .await
        ),
        "hit"
    );

    let r = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/profiles",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.json::<Value>().await.unwrap();
    // The O(1) clear, then a sweep of the cleared values: how many profile
    // caches it invalidated, on either store, and their keys are gone.
    assert_eq!(body["cleared"], true, "{body}");
    assert_eq!(body["deleted"], json!(3), "{body}");
    let covered = if memory { json!(3) } else { Value::Null };
    assert_eq!(body["covered"], covered, "{body}");
    assert!(body["epoch"].as_u64().unwrap() >= 1, "{body}");
    if !memory {
        for u in &users {
            let key = format!("{}:profile:{u}", app.namespace);
            assert_eq!(app.redis_get(&key).await, None, "{key} swept");
        }
    }
    for u in &users {
        let r = app.get(&format!("/api/v1/profiles/{u}"), &admin).await;
        assert_eq!(x_cache(&r), "miss");
    }
    // `?wait=false`: answered at once, the sweep goes on in the background.
    for u in &users {
        assert_eq!(
            x_cache(&app.get(&format!("/api/v1/profiles/{u}"), &admin).await),
            "hit"
        );
    }
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/profiles?wait=false",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.json::<Value>().await.unwrap();
    assert_eq!(
        (body["cleared"].clone(), body["deleted"].clone()),
        (json!(true), Value::Null),
        "{body}"
    );
    assert_eq!(body["sweeping"], true, "{body}");
    if !memory {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for u in &users {
            let key = format!("{}:profile:{u}", app.namespace);
            while app.redis_get(&key).await.is_some() {
                assert!(std::time::Instant::now() < deadline, "{key} never swept");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    for u in &users {
        let r = app.get(&format!("/api/v1/profiles/{u}"), &admin).await;
        assert_eq!(x_cache(&r), "miss");
    }
    // Profiles carry the tag `kind:profile`: its invalidation reaches them.
    for u in &users {
        let r = app.get(&format!("/api/v1/profiles/{u}"), &admin).await;
        assert_eq!(x_cache(&r), "hit");
    }
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/tags/kind:profile",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.json::<Value>().await.unwrap();
    assert_eq!(
        (body["cleared"].clone(), body["covered"].clone()),
        (json!(true), Value::Null),
        "{body}"
    );
    for u in &users {
        let r = app.get(&format!("/api/v1/profiles/{u}"), &admin).await;
        assert_eq!(x_cache(&r), "miss");
    }
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/tags/no%20spaces",
            Some(&admin),
            None,
        )
        .await;
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/tags/kind:profile",
            Some(&app.token(&users[0], false)),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/admin/cache/users/not-a-uuid",
            Some(&admin),
            None,
        )
        .await;
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/admin/cache/users/{}", users[0]),
            Some(&app.token(&users[0], false)),
            None,
        )
        .await;
    expect_detail(r, StatusCode::FORBIDDEN).await;
    app.stop().await;
}

async fn hit_rate_metrics(b: Backend) {
    let app = TestApp::start(b).await;
    let admin = app.admin();
    let user = Uuid::new_v4();
    app.create(&user).await;
    let path = format!("/api/v1/profiles/{user}");
    for _ in 0..4 {
        app.get(&path, &admin).await;
    }
    let r = app.get("/api/v1/admin/cache/metrics", &admin).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"hits": 3, "misses": 1, "total": 4, "hit_rate": 75.0}),
        "one miss then three hits"
    );
    if b == Backend::PgRedis {
        // The seed's counters, readable by other tools.
        let hits = app
            .redis_get(&format!("metrics:{}:hits", app.namespace))
            .await;
        assert_eq!(hits.as_deref(), Some("3"));
    }
    app.stop().await;
}

async fn health_metrics_and_openapi(b: Backend) {
    let app = TestApp::start(b).await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut v: Value = r.json().await.unwrap();
    // The feed part has its own test (tests/feed.rs).
    v.as_object_mut().unwrap().remove("feed");
    let redis = if b == Backend::PgRedis {
        "ok"
    } else {
        "memory"
    };
    assert_eq!(
        v,
        json!({"status": "healthy", "database": "ok", "redis": redis})
    );

    let user = Uuid::new_v4();
    app.create(&user).await;
    app.get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    let r = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    assert!(
        text.contains("cache_misses_total{cache_type=\"profile\"}"),
        "{text}"
    );
    assert!(text.contains("cache_get_duration_seconds_bucket"), "{text}");

    let r = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    let paths = doc["paths"].as_object().unwrap();
    for (p, methods) in [
        ("/api/v1/profiles/{user_id}", &["get", "put", "delete"][..]),
        ("/api/v1/profiles", &["post"]),
        ("/api/v1/profiles/batch", &["post"]),
        ("/api/v1/profile", &["get", "put"]),
        ("/api/v1/admin/cache/warm", &["post"]),
        ("/api/v1/admin/cache/profiles", &["delete"]),
        ("/api/v1/admin/cache/users/{user_id}", &["delete"]),
        ("/api/v1/admin/cache/tags/{tag}", &["delete"]),
        ("/api/v1/admin/cache/metrics", &["get"]),
        ("/healthz", &["get"]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
    ] {
        for m in methods {
            assert!(paths[p].get(*m).is_some(), "{m} {p} documented");
        }
    }
    for schema in [
        "Profile",
        "ProfilePatch",
        "NewProfile",
        "ErrorBody",
        "BatchResponse",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "schema {schema}"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    app.stop().await;
}
