//! Shared by the HTTP-level tests: a server started in-process on port 0
//! against either PostgreSQL + the machine's Redis (a database and a key
//! namespace of its own) or SQLite (a temporary file) + the memory store.
//!
//! Environment: `KURA_TEST_PG` (default `postgres://postgres@127.0.0.1:5432`)
//! and `KURA_TEST_REDIS` (default `redis://127.0.0.1:6379`).

#![allow(dead_code, missing_docs)]

pub mod feed;
pub mod wal;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kura_server::{AuthConfig, Config, Server};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

/// Which system of record and cache a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL + the machine's Redis.
    PgRedis,
    /// SQLite in a temporary file + the embedded memory store.
    SqliteMemory,
}

pub fn pg_base() -> String {
    std::env::var("KURA_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn redis_url() -> String {
    std::env::var("KURA_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn random_suffix() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The address of the shared PostgreSQL (what a `FaultProxy` forwards to).
pub fn pg_addr() -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let base = pg_base();
    let rest = base.split_once("://").map_or(base.as_str(), |(_, r)| r);
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("KURA_TEST_PG {base:?} names no host:port"))
}

/// A PostgreSQL database created for one test and dropped after it.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("kura_t_{}", random_suffix());
        let admin = format!("{}/postgres", pg_base());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("connect to postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create test database");
        pool.close().await;
        let url = format!("{}/{name}", pg_base());
        TestDb { name, url }
    }

    /// The database's URL through a proxy listening on `addr`.
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let base = pg_base();
        let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", &base));
        let user = rest.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        format!(
            "{scheme}://{}{addr}/{}",
            user.unwrap_or_default(),
            self.name
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = format!("{}/postgres", pg_base());
        // Drop runs outside async: a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub server: Option<Server>,
    pub url: String,
    pub http: reqwest::Client,
    pub secret: String,
    pub namespace: String,
    pub redis_url: Option<String>,
    pub backend: Backend,
    pub db: Option<TestDb>,
    pub tmp: Option<tempfile::TempDir>,
}

/// The configuration a test server starts from.
pub fn base_config(secret: &str) -> Config {
    let mut c = Config::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.namespace = format!("t_{}", random_suffix());
    c.auth = AuthConfig::hs256(secret);
    c.pool.max_connections = 5;
    c.shutdown_grace = Duration::from_secs(5);
    // No relay unless a test asks for one (tests/feed.rs): its steps and
    // their Redis calls would run under every test's own counts.
    c.feed.mode = kura_server::config::FeedMode::Off;
    c
}

impl TestApp {
    pub async fn start(backend: Backend) -> TestApp {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let secret = format!("secret-{}", random_suffix());
        let mut config = base_config(&secret);
        let (mut db, mut tmp) = (None, None);
        match backend {
            Backend::PgRedis => {
                let d = TestDb::create().await;
                config.database_url = Some(d.url.clone());
                config.redis_url = Some(redis_url());
                db = Some(d);
            }
            Backend::SqliteMemory => {
                let t = tempfile::tempdir().expect("tempdir");
                config.database_url =
                    Some(format!("sqlite:{}", t.path().join("kura.db").display()));
                tmp = Some(t);
            }
        }
        tweak(&mut config);
        let namespace = config.namespace.clone();
        let redis_url = config.redis_url.clone();
        let server = kura_server::serve(config).await.expect("server starts");
        TestApp {
            url: server.url(),
            server: Some(server),
            http: reqwest::Client::new(),
            secret,
            namespace,
            redis_url,
            backend,
            db,
            tmp,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    /// An HS256 token for `sub`.
    pub fn token(&self, sub: &Uuid, admin: bool) -> String {
        token_with(
            &self.secret,
            &json!({
                "sub": sub.to_string(),
                "exp": now() + 600,
                "roles": if admin { json!(["admin"]) } else { json!([]) },
            }),
        )
    }

    pub fn admin(&self) -> String {
        self.token(&Uuid::new_v4(), true)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.expect("request")
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.call(Method::GET, path, Some(token), None).await
    }

    /// Creates a profile as an admin and returns it.
    pub async fn create(&self, user_id: &Uuid) -> Value {
        let r = self
            .call(
                Method::POST,
                "/api/v1/profiles",
                Some(&self.admin()),
                Some(&json!({
                    "user_id": user_id,
                    "first_name": "太郎",
                    "last_name": "山田",
                    "name": "山田 太郎",
                    "email": "taro@example.jp",
                    "phone": "090-1234-5678",
                    "address": "東京都千代田区丸の内1-1-1",
                })),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json().await.expect("profile json")
    }

    /// The profile key of a user in this test's namespace.
    pub fn key(&self, user_id: &Uuid) -> String {
        format!("{}:profile:{user_id}", self.namespace)
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let url = self.redis_url.as_ref().expect("a redis-backed test");
        redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    pub async fn redis_get(&self, key: &str) -> Option<String> {
        let mut c = self.redis().await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    pub async fn redis_ttl(&self, key: &str) -> i64 {
        let mut c = self.redis().await;
        redis::cmd("TTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Runs one statement straight on the test's database, not through
    /// kura; returns the rows affected.
    pub async fn direct_sql(&self, stmt: &str) -> u64 {
        self.try_direct_sql(stmt).await.expect("direct statement")
    }

    /// [`TestApp::direct_sql`], with the database's refusal as an error.
    pub async fn try_direct_sql(&self, stmt: &str) -> Result<u64, String> {
        let q = sqlx::AssertSqlSafe(stmt.to_owned());
        match self.backend {
            Backend::PgRedis => {
                let url = &self.db.as_ref().expect("pg").url;
                let pool = sqlx::PgPool::connect(url).await.expect("connect");
                let r = sqlx::query(q).execute(&pool).await;
                pool.close().await;
                r.map(|d| d.rows_affected()).map_err(|e| e.to_string())
            }
            Backend::SqliteMemory => {
                let path = self.tmp.as_ref().expect("sqlite").path().join("kura.db");
                let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display()))
                    .await
                    .expect("connect");
                let r = sqlx::query(q).execute(&pool).await;
                pool.close().await;
                r.map(|d| d.rows_affected()).map_err(|e| e.to_string())
            }
        }
    }

    /// Stops the server and removes this test's keys from Redis.
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
        if let Some(url) = &self.redis_url {
            cleanup_namespace(url, &self.namespace).await;
        }
    }
}

/// Deletes every key of a test namespace (values and counters).
pub async fn cleanup_namespace(url: &str, ns: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut keys: Vec<String> = vec![format!("metrics:{ns}:hits"), format!("metrics:{ns}:misses")];
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{ns}:*"))
            .arg("COUNT")
            .arg(500)
            .query_async(&mut c)
            .await
            .unwrap_or((0, Vec::new()));
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A profile answer without its `cached_at` (what a write answers).
pub fn without_cached_at(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("cached_at");
    }
    v
}

/// An HS256 token with these claims.
pub fn token_with(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The RSA key the JWKS tests sign with, and its public modulus
/// (base64url) for the JWKS document.
pub const RSA_PEM: &str = include_str!("test_rsa_key.pem");
pub const RSA_N: &str = "23wgC5QbKTC8zt88ZCKJxZlvvBsiTXGRLr-8qmwHsFn5z48uAst5vsbyULPw4aJQB43BAmFrgytSIdMGFefsIEFfKaF1pRUKZKULGfc6RCX_HVGUFtycNSP8tyTEvQHquZxJK-BSeTSLzccHjLfiFDk0-GGhadlbfP7FVDxN6jDQ6a9C3uJ3uxGCP7-JAEGNWNzcQFlQFbuSEH__ZsuIGaEv1W2OWBTZNAFY2Xrh2Zrk3SI6iNA306yu5QbUWebtOZtsd-ooG8H8DEGg06LHvrkIpId6wDssV2x5dkFZiyLN5P3HjvT15yTAWL87AnskmGfctjcDAW6iBncTY76mfQ";

/// An RS256 token signed with [`RSA_PEM`].
pub fn rs256_token(kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &h,
        claims,
        &EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// The `X-Cache` header of a response.
pub fn x_cache(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Asserts a status and a `{"detail": "..."}` body; returns the detail.
pub async fn expect_detail(r: reqwest::Response, status: StatusCode) -> String {
    assert_eq!(r.status(), status, "unexpected status");
    let v: Value = r.json().await.expect("json error body");
    v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {v}"))
        .to_owned()
}

/// Runs one async test body against both backends, as two tests.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod pg_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::PgRedis).await;
                }
            )*
        }
        mod sqlite_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::SqliteMemory).await;
                }
            )*
        }
    };
}
