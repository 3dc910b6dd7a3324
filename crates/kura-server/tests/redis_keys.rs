//! What the service leaves in Redis, read with a plain Redis client: the
//! profile key and its TTL after a miss, and the key after each write
//! strategy.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, x_cache};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_caches_the_profile_json_with_the_seed_ttl() {
    let app = TestApp::start(Backend::PgRedis).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let key = app.key(&user);
    assert_eq!(
        app.redis_get(&key).await,
        None,
        "nothing cached before a read"
    );

    let r = app
        .get(&format!("/api/v1/profiles/{user}"), &app.admin())
        .await;
    assert_eq!(x_cache(&r), "miss");
    let profile: Value = r.json().await.unwrap();

    let raw = app.redis_get(&key).await.expect("cached after a miss");
    assert!(raw.contains("太郎"), "UTF-8, not \\u escapes: {raw}");
    let mut cached: Value = serde_json::from_str(&raw).unwrap();
    let cached_at = cached["cached_at"].as_str().expect("cached_at").to_owned();
    chrono::DateTime::parse_from_rfc3339(&cached_at).expect("cached_at is RFC 3339");
    assert_eq!(cached["_v"], 1, "the row version");
    let obj = cached.as_object_mut().unwrap();
    obj.remove("cached_at");
    obj.remove("_v");
    // The answer's `cached_at` is the envelope's, to the millisecond.
    let answered = profile["cached_at"].as_str().unwrap();
    assert_eq!(answered[..23], cached_at[..23], "{answered} vs {cached_at}");
    assert_eq!(
        cached,
        support::without_cached_at(profile),
        "the cached value is the profile JSON"
    );

    let ttl = app.redis_ttl(&key).await;
    assert!((270..=330).contains(&ttl), "TTL 300 s ± 10 %: {ttl}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_strategy_leaves_the_key_right() {
    let app = TestApp::start(Backend::PgRedis).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let key = app.key(&user);
    let owner = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    let put = |strategy: &'static str, body: Value| {
        let app = &app;
        let owner = owner.clone();
        let path = path.clone();
        async move {
            let r = app
                .call(
                    Method::PUT,
                    &format!("{path}?strategy={strategy}"),
                    Some(&owner),
                    Some(&body),
                )
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<Value>().await.unwrap()
        }
    };

    // invalidate: the key is deleted after the commit.
    app.get(&path, &owner).await;
    assert!(app.redis_get(&key).await.is_some());
    put("invalidate", json!({"first_name": "次郎"})).await;
    assert_eq!(app.redis_get(&key).await, None, "invalidated");

    // through: the cached value is replaced by the committed version.
    app.get(&path, &owner).await;
    let v2 = put("through", json!({"first_name": "三郎"})).await;
    assert_eq!(v2["version"], 3);
    let raw = app.redis_get(&key).await.expect("still cached");
    let cached: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(cached["_v"], 3);
    assert_eq!(cached["first_name"], "三郎");
    let ttl = app.redis_ttl(&key).await;
    assert!(ttl > 0 && ttl <= 660, "the update keeps a TTL: {ttl}");

    // through on a key that is not cached leaves it to the next read.
    app.call(
        Method::DELETE,
        &format!("/api/v1/admin/cache/users/{user}"),
        Some(&app.admin()),
        None,
    )
    .await;
    put("through", json!({"first_name": "四郎"})).await;
    assert_eq!(app.redis_get(&key).await, None);
    let r = app.get(&path, &owner).await;
    assert_eq!(x_cache(&r), "miss");
    assert_eq!(r.json::<Value>().await.unwrap()["first_name"], "四郎");

    // behind: the value (with a TTL) and a pending copy without TTL, in the
    // same envelope, until a flusher has the row in the database.
    let v5 = put("behind", json!({"first_name": "五郎"})).await;
    assert_eq!(v5["version"], 5);
    let raw = app.redis_get(&key).await.expect("cached");
    let cached: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        (cached["_v"].clone(), cached["first_name"].clone()),
        (json!(5), json!("五郎"))
    );
    let pending_key = format!("{}:~p:profile:{user}", app.namespace);
    assert_eq!(app.redis_get(&pending_key).await, Some(raw));
    assert_eq!(app.redis_ttl(&pending_key).await, -1, "no TTL");
    assert!(app.redis_ttl(&key).await > 0);

    // delete: the key goes.
    let r = app.call(Method::DELETE, &path, Some(&owner), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.redis_get(&key).await, None);
    app.stop().await;
}
