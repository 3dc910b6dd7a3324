//! Profile routes over HTTP, against PostgreSQL + Redis and SQLite + the
//! memory store: reads (miss → hit), every write strategy, create, delete,
//! batch, the caller's own profile, and every error status.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, expect_detail, x_cache};
use uuid::Uuid;

both_backends!(
    get_is_a_miss_then_a_hit,
    unknown_profile_is_404_and_cached_as_absent,
    put_invalidate_then_read_sees_the_new_row,
    put_through_updates_the_cached_value,
    put_behind_is_accepted_and_unknown_strategies_are_422,
    configured_strategy_applies_without_query,
    put_validation_errors_are_422,
    create_drops_a_cached_not_found_and_conflicts,
    delete_removes_every_cached_entry,
    batch_reads_many,
    own_profile_routes,
    oversized_body_is_413,
);

const PROFILE_FIELDS: [&str; 11] = [
    "id",
    "user_id",
    "first_name",
    "last_name",
    "name",
    "email",
    "phone",
    "address",
    "created_at",
    "updated_at",
    "version",
];

async fn get_is_a_miss_then_a_hit(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    let created = app.create(&user).await;
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");

    let r = app.get(&path, &owner).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&r), "miss");
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert!(r.headers().get("age").is_none(), "no Age on a miss");
    let first: Value = r.json().await.unwrap();
    let obj = first.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = PROFILE_FIELDS.to_vec();
    want.push("cached_at");
    want.sort_unstable();
    assert_eq!(keys, want, "exactly the profile fields and cached_at");
    // The seed's `cached_at`: when the value was put in the cache.
    let cached_at = first["cached_at"].as_str().unwrap().to_owned();
    let at = chrono::DateTime::parse_from_rfc3339(&cached_at).expect("RFC 3339");
    assert!(cached_at.ends_with('Z'), "UTC: {cached_at}");
    assert!(
        (chrono::Utc::now() - at.to_utc()).num_seconds().abs() < 60,
        "{cached_at}"
    );
    let mut bare = first.clone();
    bare.as_object_mut().unwrap().remove("cached_at");
    assert_eq!(bare, created);
    assert_eq!(first["first_name"], "太郎");
    assert_eq!(first["version"], 1);
    let ts = first["created_at"].as_str().unwrap();
    assert!(ts.ends_with('Z'), "RFC 3339 UTC: {ts}");
    chrono::DateTime::parse_from_rfc3339(ts).expect("RFC 3339");

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = app.get(&path, &owner).await;
    assert_eq!(x_cache(&r), "hit");
    let age: u64 = r.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!((1..60).contains(&age), "Age {age}");
    let second: Value = r.json().await.unwrap();
    assert_eq!(
        second, first,
        "a hit returns the same JSON, cached_at included"
    );
    app.stop().await;
}

async fn unknown_profile_is_404_and_cached_as_absent(b: Backend) {
    let app = TestApp::start(b).await;
    let admin = app.admin();
    let path = format!("/api/v1/profiles/{}", Uuid::new_v4());
    let r = app.get(&path, &admin).await;
    assert_eq!(x_cache(&r), "miss");
    assert_eq!(
        expect_detail(r, StatusCode::NOT_FOUND).await,
        "profile not found"
    );
    let r = app.get(&path, &admin).await;
    assert_eq!(x_cache(&r), "hit", "not found is remembered");
    expect_detail(r, StatusCode::NOT_FOUND).await;

    let r = app.get("/api/v1/profiles/not-a-uuid", &admin).await;
    let d = expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(d.contains("not a valid UUID"), "{d}");
    let r = app.get("/api/v1/nowhere", &admin).await;
    expect_detail(r, StatusCode::NOT_FOUND).await;
    let r = app
        .call(Method::PATCH, &path, Some(&admin), Some(&json!({})))
        .await;
    expect_detail(r, StatusCode::METHOD_NOT_ALLOWED).await;
    app.stop().await;
}

async fn put(app: &TestApp, user: &Uuid, query: &str, body: Value) -> reqwest::Response {
    app.call(
        Method::PUT,
        &format!("/api/v1/profiles/{user}{query}"),
        Some(&app.token(user, false)),
        Some(&body),
    )
    .await
}

async fn put_invalidate_then_read_sees_the_new_row(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    assert_eq!(x_cache(&app.get(&path, &owner).await), "miss");
    assert_eq!(x_cache(&app.get(&path, &owner).await), "hit");

    let r = put(
        &app,
        &user,
        "?strategy=invalidate",
        json!({"first_name": "次郎", "phone": null}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["first_name"], "次郎");
    assert_eq!(updated["phone"], Value::Null);
    assert_eq!(
        updated["last_name"], "山田",
        "fields left out are unchanged"
    );
    assert_eq!(updated["version"], 2);

    let r = app.get(&path, &owner).await;
    assert_eq!(
        x_cache(&r),
        "miss",
        "the write invalidated the cached profile"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(support::without_cached_at(v), updated);
    assert_eq!(x_cache(&app.get(&path, &owner).await), "hit");

    // An empty patch changes nothing and answers the row as it stands.
    let r = put(&app, &user, "", json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    app.stop().await;
}

async fn put_through_updates_the_cached_value(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    assert_eq!(x_cache(&app.get(&path, &owner).await), "miss");

    let r = put(
        &app,
        &user,
        "?strategy=through",
        json!({"email": "jiro@example.jp"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["version"], 2);

    let r = app.get(&path, &owner).await;
    assert_eq!(x_cache(&r), "hit", "write-through keeps the key cached");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["email"], "jiro@example.jp");
    assert_eq!(support::without_cached_at(v), updated);
    app.stop().await;
}

async fn put_behind_is_accepted_and_unknown_strategies_are_422(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let r = put(
        &app,
        &user,
        "?strategy=behind",
        json!({"name": "山田 三郎"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-write"], "behind");
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["name"].clone(), v["version"].clone()),
        (json!("山田 三郎"), json!(2))
    );
    let r = put(
        &app,
        &user,
        "?strategy=sideways",
        json!({"first_name": "三郎"}),
    )
    .await;
    let d = expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(d.contains("strategy"), "{d}");
    // The unknown strategy wrote nothing; the read sees the queued write.
    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["first_name"].clone(), v["version"].clone()),
        (json!("太郎"), json!(2))
    );
    app.stop().await;
}

async fn configured_strategy_applies_without_query(b: Backend) {
    let app = TestApp::start_with(b, |c| {
        c.write_strategy = kura_server::WriteStrategy::Through;
    })
    .await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    assert_eq!(x_cache(&app.get(&path, &owner).await), "miss");
    let r = put(&app, &user, "", json!({"name": "山田 三郎"})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.get(&path, &owner).await;
    assert_eq!(x_cache(&r), "hit");
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "山田 三郎");
    // The query overrides the configured strategy.
    let r = put(
        &app,
        &user,
        "?strategy=invalidate",
        json!({"name": "山田 四郎"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&app.get(&path, &owner).await), "miss");
    app.stop().await;
}

async fn put_validation_errors_are_422(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    for (body, needle) in [
        (json!({"nickname": "taro"}), "unknown field"),
        (json!({"first_name": 5}), "invalid type"),
        (json!({"email": "not-an-email"}), "email"),
        (json!({"phone": "call me"}), "phone"),
        (json!({"first_name": "x".repeat(101)}), "first_name"),
        (json!(["first_name"]), "expected a JSON object"),
    ] {
        let r = put(&app, &user, "", body.clone()).await;
        let d = expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(d.contains(needle), "{body} → {d}");
    }
    let r = app
        .http
        .put(format!("{}/api/v1/profiles/{user}", app.url))
        .bearer_auth(app.token(&user, false))
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;

    // Unknown user: 404 for an admin, 403 for someone else.
    let other = Uuid::new_v4();
    let r = app
        .call(
            Method::PUT,
            &format!("/api/v1/profiles/{other}"),
            Some(&app.admin()),
            Some(&json!({"first_name": "誰"})),
        )
        .await;
    expect_detail(r, StatusCode::NOT_FOUND).await;
    let r = app
        .call(
            Method::PUT,
            &format!("/api/v1/profiles/{user}"),
            Some(&app.token(&other, false)),
            Some(&json!({"first_name": "誰"})),
        )
        .await;
    expect_detail(r, StatusCode::FORBIDDEN).await;
    app.stop().await;
}

async fn create_drops_a_cached_not_found_and_conflicts(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    expect_detail(app.get(&path, &owner).await, StatusCode::NOT_FOUND).await;
    let r = app.get(&path, &owner).await;
    assert_eq!(x_cache(&r), "hit", "not found is cached");

    // The user creates their own profile.
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles",
            Some(&owner),
            Some(&json!({"user_id": user, "first_name": "花子"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("/api/v1/profiles/{user}")
    );
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["version"], 1);
    assert_eq!(created["last_name"], Value::Null);

    let r = app.get(&path, &owner).await;
    assert_eq!(r.status(), StatusCode::OK, "the cached not-found is gone");
    assert_eq!(x_cache(&r), "miss");

    let again = app
        .call(
            Method::POST,
            "/api/v1/profiles",
            Some(&owner),
            Some(&json!({"user_id": user})),
        )
        .await;
    expect_detail(again, StatusCode::CONFLICT).await;

    // Someone else may not create a profile for this user id.
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles",
            Some(&app.token(&Uuid::new_v4(), false)),
            Some(&json!({"user_id": Uuid::new_v4()})),
        )
        .await;
    expect_detail(r, StatusCode::FORBIDDEN).await;
    for bad in [
        json!({"first_name": "no id"}),
        json!({"user_id": "nope"}),
        json!({"user_id": user, "role": "admin"}),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/profiles",
                Some(&app.admin()),
                Some(&bad),
            )
            .await;
        expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    app.stop().await;
}

async fn delete_removes_every_cached_entry(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    app.get(&path, &owner).await;
    assert_eq!(x_cache(&app.get(&path, &owner).await), "hit");
    if b == Backend::PgRedis {
        // Settings and preferences cached by another service.
        let mut c = app.redis().await;
        for t in ["settings", "preferences"] {
            let _: () = redis::cmd("SET")
                .arg(format!("{}:{t}:{user}", app.namespace))
                .arg("{\"theme\":\"dark\"}")
                .arg("EX")
                .arg(60)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }
    let r = app
        .call(
            Method::DELETE,
            &path,
            Some(&app.token(&Uuid::new_v4(), false)),
            None,
        )
        .await;
    expect_detail(r, StatusCode::FORBIDDEN).await;

    let r = app.call(Method::DELETE, &path, Some(&owner), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    if b == Backend::PgRedis {
        for t in ["profile", "settings", "preferences"] {
            let k = format!("{}:{t}:{user}", app.namespace);
            assert_eq!(app.redis_get(&k).await, None, "{k} removed");
        }
    }
    let r = app.get(&path, &owner).await;
    assert_eq!(x_cache(&r), "miss");
    expect_detail(r, StatusCode::NOT_FOUND).await;
    let r = app.call(Method::DELETE, &path, Some(&owner), None).await;
    expect_detail(r, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

async fn batch_reads_many(b: Backend) {
    let app = TestApp::start(b).await;
    let (a, c) = (Uuid::new_v4(), Uuid::new_v4());
    app.create(&a).await;
    app.create(&c).await;
    let missing = Uuid::new_v4();
    let admin = app.admin();
    let body = json!({"user_ids": [a, missing, c, a]});
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&admin),
            Some(&body),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["count"], 2);
    assert_eq!(v["cache_hits"], 0);
    assert_eq!(v["cache_misses"], 3, "distinct ids: {v}");
    let profiles = v["profiles"].as_array().unwrap();
    assert_eq!(profiles[0]["user_id"], a.to_string());
    assert_eq!(profiles[1]["user_id"], c.to_string());
    assert_eq!(profiles[0]["first_name"], "太郎");

    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&admin),
            Some(&body),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["count"], 2);
    assert_eq!(v["cache_hits"], 3, "{v}");
    assert_eq!(v["cache_misses"], 0);
    // A batch fill serves single reads too.
    let r = app.get(&format!("/api/v1/profiles/{c}"), &admin).await;
    assert_eq!(x_cache(&r), "hit");

    let too_many: Vec<Uuid> = (0..1001).map(|_| Uuid::new_v4()).collect();
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&admin),
            Some(&json!({ "user_ids": too_many })),
        )
        .await;
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&admin),
            Some(&json!({"user_ids": [a, "x"]})),
        )
        .await;
    expect_detail(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&app.token(&a, false)),
            Some(&body),
        )
        .await;
    expect_detail(r, StatusCode::FORBIDDEN).await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&admin),
            Some(&json!({"user_ids": []})),
        )
        .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"profiles": [], "count": 0, "cache_hits": 0, "cache_misses": 0})
    );
    app.stop().await;
}

async fn own_profile_routes(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let me = app.token(&user, false);
    let r = app.get("/api/v1/profile", &me).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&r), "miss");
    assert_eq!(
        r.json::<Value>().await.unwrap()["user_id"],
        user.to_string()
    );
    assert_eq!(x_cache(&app.get("/api/v1/profile", &me).await), "hit");

    let r = app
        .call(
            Method::PUT,
            "/api/v1/profile",
            Some(&me),
            Some(&json!({"address": "大阪府大阪市北区梅田1-1"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    let r = app.get("/api/v1/profile", &me).await;
    assert_eq!(x_cache(&r), "miss");
    assert_eq!(
        r.json::<Value>().await.unwrap()["address"],
        "大阪府大阪市北区梅田1-1"
    );

    let nobody = app.token(&Uuid::new_v4(), false);
    expect_detail(
        app.get("/api/v1/profile", &nobody).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let r = app.call(Method::GET, "/api/v1/profile", None, None).await;
    expect_detail(r, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

async fn oversized_body_is_413(b: Backend) {
    let app = TestApp::start(b).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let big = json!({"address": "x".repeat(70 * 1024)});
    let r = put(&app, &user, "", big).await;
    expect_detail(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&app.admin()),
            Some(&json!({"user_ids": vec!["00000000-0000-0000-0000-000000000000"; 2000]})),
        )
        .await;
    expect_detail(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    app.stop().await;
}
