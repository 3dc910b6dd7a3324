//! Bearer tokens: HS256, RS256 against a JWKS, and every way a token is
//! refused (401) or not allowed (403).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, TestApp, expect_detail, now, rs256_token, token_with};
use uuid::Uuid;

fn b64(s: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in s.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_tokens_are_checked() {
    let app = TestApp::start(Backend::SqliteMemory).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let path = format!("/api/v1/profiles/{user}");

    let r = app.call(Method::GET, &path, None, None).await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        expect_detail(r, StatusCode::UNAUTHORIZED).await,
        "missing bearer token"
    );
    let r = app
        .http
        .get(format!("{}{path}", app.url))
        .header("authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    expect_detail(r, StatusCode::UNAUTHORIZED).await;

    let claims = |exp: u64| json!({"sub": user.to_string(), "exp": exp, "roles": []});
    let cases = [
        ("garbage", "not.a.token".to_owned(), "invalid token"),
        (
            "expired",
            token_with(&app.secret, &claims(now() - 3600)),
            "token expired",
        ),
        (
            "wrong secret",
            token_with("another-secret", &claims(now() + 600)),
            "invalid token",
        ),
        (
            "no exp",
            token_with(&app.secret, &json!({"sub": user.to_string()})),
            "invalid token",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(claims(now() + 600).to_string().as_bytes())
            ),
            "invalid token",
        ),
        (
            "RS256 where HS256 is configured",
            rs256_token(None, &claims(now() + 600)),
            "invalid token",
        ),
        (
            "roles not an array",
            token_with(
                &app.secret,
                &json!({"sub": user.to_string(), "exp": now() + 600, "roles": "admin"}),
            ),
            "invalid token",
        ),
    ];
    for (what, token, want) in cases {
        let r = app.get(&path, &token).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(
            expect_detail(r, StatusCode::UNAUTHORIZED).await,
            want,
            "{what}"
        );
    }

    // Valid: owner and admin; someone else is forbidden.
    assert_eq!(
        app.get(&path, &app.token(&user, false)).await.status(),
        StatusCode::OK
    );
    assert_eq!(app.get(&path, &app.admin()).await.status(), StatusCode::OK);
    let stranger = app.token(&Uuid::new_v4(), false);
    expect_detail(app.get(&path, &stranger).await, StatusCode::FORBIDDEN).await;
    // Admin routes need the role.
    let r = app
        .get("/api/v1/admin/cache/metrics", &app.token(&user, false))
        .await;
    expect_detail(r, StatusCode::FORBIDDEN).await;
    let r = app
        .call(Method::DELETE, "/api/v1/admin/cache/profiles", None, None)
        .await;
    expect_detail(r, StatusCode::UNAUTHORIZED).await;
    // A subject that is not a user id cannot have an own profile.
    let svc = token_with(
        &app.secret,
        &json!({"sub": "billing-service", "exp": now() + 600}),
    );
    expect_detail(
        app.get("/api/v1/profile", &svc).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    expect_detail(app.get(&path, &svc).await, StatusCode::FORBIDDEN).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.auth.issuer = Some("https://auth.example.jp".into());
        c.auth.audience = Some("kura".into());
    })
    .await;
    let user = Uuid::new_v4();
    app.create_with_token(&user).await;
    let path = format!("/api/v1/profiles/{user}");
    let tok = |iss: Option<&str>, aud: Option<&str>| {
        let mut c = json!({"sub": user.to_string(), "exp": now() + 600});
        if let Some(i) = iss {
            c["iss"] = json!(i);
        }
        if let Some(a) = aud {
            c["aud"] = json!(a);
        }
        token_with(&app.secret, &c)
    };
    let ok = tok(Some("https://auth.example.jp"), Some("kura"));
    assert_eq!(app.get(&path, &ok).await.status(), StatusCode::OK);
    for (what, t) in [
        ("no iss", tok(None, Some("kura"))),
        ("no aud", tok(Some("https://auth.example.jp"), None)),
        ("wrong iss", tok(Some("https://evil.example"), Some("kura"))),
        (
            "wrong aud",
            tok(Some("https://auth.example.jp"), Some("other")),
        ),
    ] {
        let r = app.get(&path, &t).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
    app.stop().await;
}

impl TestApp {
    /// Creates a profile with an admin token carrying the configured
    /// issuer and audience.
    async fn create_with_token(&self, user: &Uuid) {
        let admin = token_with(
            &self.secret,
            &json!({"sub": Uuid::new_v4().to_string(), "exp": now() + 600, "roles": ["admin"],
                    "iss": "https://auth.example.jp", "aud": "kura"}),
        );
        let r = self
            .call(
                Method::POST,
                "/api/v1/profiles",
                Some(&admin),
                Some(&json!({"user_id": user})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
}

/// A JWKS endpoint on port 0 with one signing key, counting its fetches.
async fn jwks_server(kid: &'static str) -> (String, Arc<AtomicUsize>) {
    jwks_serving(json!({"keys": [{
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
        "n": support::RSA_N, "e": "AQAB",
    }]}))
    .await
}

/// A JWKS endpoint on port 0 serving `doc`, counting its fetches.
async fn jwks_serving(doc: Value) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            h.fetch_add(1, Ordering::SeqCst);
            let d = doc.clone();
            async move { axum::Json(d) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/jwks.json"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_against_a_jwks() {
    let (jwks, fetches) = jwks_server("key-1").await;
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.auth.jwt_secret = None;
        c.auth.jwks_url = Some(jwks);
        c.auth.jwks_min_refresh = std::time::Duration::from_millis(500);
    })
    .await;
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched at start-up");
    let user = Uuid::new_v4();
    let admin = rs256_token(
        Some("key-1"),
        &json!({"sub": Uuid::new_v4().to_string(), "exp": now() + 600, "roles": ["admin"]}),
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles",
            Some(&admin),
            Some(&json!({"user_id": user})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let path = format!("/api/v1/profiles/{user}");
    let owner = rs256_token(
        Some("key-1"),
        &json!({"sub": user.to_string(), "exp": now() + 600}),
    );
    assert_eq!(app.get(&path, &owner).await.status(), StatusCode::OK);
    // Without kid, the only key of the set is used.
    let no_kid = rs256_token(None, &json!({"sub": user.to_string(), "exp": now() + 600}));
    assert_eq!(app.get(&path, &no_kid).await.status(), StatusCode::OK);

    // Unknown kid: one refetch once the interval has passed, then
    // rate-limited.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    for _ in 0..5 {
        let t = rs256_token(
            Some("key-2"),
            &json!({"sub": user.to_string(), "exp": now() + 600}),
        );
        expect_detail(app.get(&path, &t).await, StatusCode::UNAUTHORIZED).await;
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "unknown kids refetch at most once per interval"
    );

    // HS256 is not accepted by a JWKS-only server, even signed with the
    // public modulus as the secret.
    let forged = token_with(
        support::RSA_N,
        &json!({"sub": user.to_string(), "exp": now() + 600, "roles": ["admin"]}),
    );
    expect_detail(app.get(&path, &forged).await, StatusCode::UNAUTHORIZED).await;
    let expired = rs256_token(
        Some("key-1"),
        &json!({"sub": user.to_string(), "exp": now() - 3600}),
    );
    let d = expect_detail(app.get(&path, &expired).await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(d, "token expired");
    let v: Value = app.get(&path, &owner).await.json().await.unwrap();
    assert_eq!(v["user_id"], user.to_string());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_before_their_nbf_are_refused() {
    let app = TestApp::start(Backend::SqliteMemory).await;
    let user = Uuid::new_v4();
    app.create(&user).await;
    let path = format!("/api/v1/profiles/{user}");
    let tok = |nbf: u64| {
        token_with(
            &app.secret,
            &json!({"sub": user.to_string(), "exp": now() + 7200, "nbf": nbf}),
        )
    };
    let r = app.get(&path, &tok(now() + 3600)).await;
    assert_eq!(
        expect_detail(r, StatusCode::UNAUTHORIZED).await,
        "token not yet valid"
    );
    // Within the clock-skew leeway, and in the past: valid.
    assert_eq!(
        app.get(&path, &tok(now() + 5)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.get(&path, &tok(now() - 60)).await.status(),
        StatusCode::OK
    );
    let not_a_time = token_with(
        &app.secret,
        &json!({"sub": user.to_string(), "exp": now() + 600, "nbf": "soon"}),
    );
    expect_detail(app.get(&path, &not_a_time).await, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_not_published_for_rs256_signatures_do_not_verify() {
    let key = |extra: Value| {
        let mut k = json!({"kty": "RSA", "n": support::RSA_N, "e": "AQAB"});
        for (f, v) in extra.as_object().unwrap() {
            k[f] = v.clone();
        }
        k
    };
    let (jwks, _) = jwks_serving(json!({"keys": [
        key(json!({"kid": "sig", "use": "sig", "alg": "RS256"})),
        key(json!({"kid": "bare"})),
        key(json!({"kid": "enc", "use": "enc"})),
        key(json!({"kid": "enc-alg", "use": "enc", "alg": "RSA-OAEP"})),
        key(json!({"kid": "rs512", "use": "sig", "alg": "RS512"})),
        key(json!({"kid": "ps256", "alg": "PS256"})),
        key(json!({"kid": "ops-encrypt", "key_ops": ["encrypt", "wrapKey"]})),
        key(json!({"kid": "ops-verify", "key_ops": ["verify"]})),
    ]}))
    .await;
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.auth.jwt_secret = None;
        c.auth.jwks_url = Some(jwks);
    })
    .await;
    let user = Uuid::new_v4();
    let admin = rs256_token(
        Some("sig"),
        &json!({"sub": Uuid::new_v4().to_string(), "exp": now() + 600, "roles": ["admin"]}),
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles",
            Some(&admin),
            Some(&json!({"user_id": user})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let path = format!("/api/v1/profiles/{user}");
    let claims = json!({"sub": user.to_string(), "exp": now() + 600});
    for (kid, want) in [
        ("sig", StatusCode::OK),
        ("bare", StatusCode::OK),
        ("ops-verify", StatusCode::OK),
        ("enc", StatusCode::UNAUTHORIZED),
        ("enc-alg", StatusCode::UNAUTHORIZED),
        ("rs512", StatusCode::UNAUTHORIZED),
        ("ps256", StatusCode::UNAUTHORIZED),
        ("ops-encrypt", StatusCode::UNAUTHORIZED),
    ] {
        let r = app.get(&path, &rs256_token(Some(kid), &claims)).await;
        assert_eq!(r.status(), want, "key {kid}");
    }
    app.stop().await;

    // A set whose only key is for encryption has no key for tokens
    // without `kid`.
    let (jwks, _) = jwks_serving(json!({"keys": [key(json!({"kid": "enc", "use": "enc"}))]})).await;
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.auth.jwt_secret = None;
        c.auth.jwks_url = Some(jwks);
    })
    .await;
    let r = app.get(&path, &rs256_token(None, &claims)).await;
    expect_detail(r, StatusCode::UNAUTHORIZED).await;
    app.stop().await;
}

/// A JWKS endpoint on port 0 whose document can be changed, answered with
/// `cache_control` (when given), counting its fetches.
async fn jwks_changing(
    doc: Value,
    cache_control: Option<&'static str>,
) -> (String, Arc<std::sync::Mutex<Value>>, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let current = Arc::new(std::sync::Mutex::new(doc));
    let (h, c) = (hits.clone(), current.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            h.fetch_add(1, Ordering::SeqCst);
            let d = c.lock().unwrap().clone();
            async move {
                let mut r = axum::response::IntoResponse::into_response(axum::Json(d));
                if let Some(cc) = cache_control {
                    r.headers_mut().insert("cache-control", cc.parse().unwrap());
                }
                r
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/jwks.json"), current, hits)
}

/// A key removed from the JWKS stops verifying tokens once the set is
/// refreshed, which happens on a schedule (here the document's
/// `Cache-Control: max-age=1`), not only when a token names an unknown key;
/// a token verified before is not taken on trust after the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_from_the_jwks_stops_verifying() {
    let key = json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "key-1",
                     "n": support::RSA_N, "e": "AQAB"});
    let (jwks, doc, fetches) = jwks_changing(json!({"keys": [key]}), Some("max-age=1")).await;
    let app = TestApp::start_with(Backend::SqliteMemory, |c| {
        c.auth.jwt_secret = None;
        c.auth.jwks_url = Some(jwks);
        c.auth.jwks_min_refresh = std::time::Duration::from_millis(200);
    })
    .await;
    let user = Uuid::new_v4();
    let admin = rs256_token(
        Some("key-1"),
        &json!({"sub": Uuid::new_v4().to_string(), "exp": now() + 600, "roles": ["admin"]}),
    );
    let r = app
        .call(
            Method::POST,
            "/api/v1/profiles",
            Some(&admin),
            Some(&json!({"user_id": user})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let path = format!("/api/v1/profiles/{user}");
    assert_eq!(app.get(&path, &admin).await.status(), StatusCode::OK);
    // The key is rotated out.
    *doc.lock().unwrap() = json!({"keys": []});
    let removed = std::time::Instant::now();
    loop {
        let s = app.get(&path, &admin).await.status();
        if s == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(s, StatusCode::OK);
        assert!(
            removed.elapsed() < std::time::Duration::from_secs(5),
            "the removed key still verifies after {:?} ({} fetches)",
            removed.elapsed(),
            fetches.load(Ordering::SeqCst)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        removed.elapsed() < std::time::Duration::from_millis(2500),
        "{:?}",
        removed.elapsed()
    );
    app.stop().await;
}
