//! `--rate-limit CLASS=N/PERIOD`: the `RateLimit-*` headers, 429 with
//! `Retry-After` and a `detail` past the limit, per subject and class, the
//! routes that are never limited, and one limit shared by two instances.

mod support;

use kura_server::config::RateLimitSetting;
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Backend, TestApp};
use uuid::Uuid;

fn limits(c: &mut kura_server::Config) {
    c.rate_limits = vec![
        "read=5/1h".parse::<RateLimitSetting>().unwrap(),
        "write=2/1h".parse::<RateLimitSetting>().unwrap(),
    ];
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn limits_per_subject_and_class(b: Backend) {
    let app = TestApp::start_with(b, limits).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let token = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    for left in (0..5).rev() {
        let r = app.get(&path, &token).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "ratelimit-limit").as_deref(), Some("5"));
        assert_eq!(header(&r, "ratelimit-remaining"), Some(left.to_string()));
        let reset: u64 = header(&r, "ratelimit-reset").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&reset), "reset {reset}");
    }
    let r = app.get(&path, &token).await;
    let retry: u64 = header(&r, "retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(
        (1..=721).contains(&retry),
        "retry after {retry} s (one request per 720 s)"
    );
    assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some("0"));
    let detail = support::expect_detail(r, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(
        detail.contains("rate limit exceeded") && detail.contains("5/1h"),
        "{detail}"
    );
    // Writes count apart; another subject is not limited by this one.
    for _ in 0..2 {
        let r = app
            .call(
                Method::PUT,
                &path,
                Some(&token),
                Some(&json!({"first_name": "x"})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = app
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(&json!({"first_name": "y"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let other = app.admin();
    let r = app.get(&path, &other).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some("4"));
    // Never limited: no token (401), health, and an unconfigured class.
    let r = app.call(Method::GET, &path, None, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for _ in 0..10 {
        let r = app.call(Method::GET, "/healthz", None, None).await;
        assert!(header(&r, "ratelimit-limit").is_none());
    }
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles/batch",
            Some(&token),
            Some(&json!({"user_ids": [user]})),
        )
        .await;
    assert_ne!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        header(&r, "ratelimit-limit").is_none(),
        "batch is not configured"
    );
    app.stop().await;
}

/// N concurrent requests of one subject over HTTP: exactly the limit is
/// admitted, the rest answer 429.
async fn exactly_the_limit_under_concurrency(b: Backend) {
    let app = TestApp::start_with(b, limits).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let token = app.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    let answers = futures::future::join_all((0..40).map(|_| app.get(&path, &token))).await;
    let ok = answers
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .count();
    let limited = answers
        .iter()
        .filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        (ok, limited),
        (5, 35),
        "read=5/1h under 40 concurrent requests"
    );
    app.stop().await;
}

/// Requests of a revoked token (answered 401) do not count against its
/// subject: a stolen, then revoked, token cannot use up the owner's quota.
async fn revoked_tokens_do_not_count(b: Backend) {
    let app = TestApp::start_with(b, limits).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let path = format!("/api/v1/profiles/{user}");
    let token_with_jti = || {
        support::token_with(
            &app.secret,
            &json!({"sub": user.to_string(), "exp": support::now() + 600,
                    "jti": Uuid::new_v4().simple().to_string()}),
        )
    };
    let stolen = token_with_jti();
    let r = app
        .call(Method::POST, "/api/v1/auth/revoke", Some(&stolen), None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    for _ in 0..10 {
        let r = app.get(&path, &stolen).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&r, "ratelimit-remaining"), None, "not counted");
    }
    let owner = token_with_jti();
    let r = app.get(&path, &owner).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some("4"));
    app.stop().await;
}

both_backends!(
    limits_per_subject_and_class,
    exactly_the_limit_under_concurrency,
    revoked_tokens_do_not_count,
);

/// Two instances on one Redis share a subject's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_limit() {
    let a = TestApp::start_with(Backend::PgRedis, limits).await;
    let db_url = a.db.as_ref().unwrap().url.clone();
    let (ns, secret) = (a.namespace.clone(), a.secret.clone());
    let b = TestApp::start_with(Backend::PgRedis, |c| {
        limits(c);
        c.database_url = Some(db_url);
        c.namespace = ns;
        c.auth = kura_server::AuthConfig::hs256(&secret);
    })
    .await;
    let user = Uuid::new_v4();
    a.create(&user).await;
    let token = a.token(&user, false);
    let path = format!("/api/v1/profiles/{user}");
    let mut ok = 0;
    for i in 0..12 {
        let app = if i % 2 == 0 { &a } else { &b };
        if app.get(&path, &token).await.status() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 5, "5/1h across both instances");
    b.stop().await;
    a.stop().await;
}
