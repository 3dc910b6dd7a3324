//! Bearer tokens: HS256 with a shared secret, or RS256 against a JWKS.
//!
//! `exp` is required; `nbf` is checked when present (a token is refused
//! before it, with the same clock-skew leeway as `exp`); `iss` and `aud` are
//! checked when configured; roles come from a `roles` array claim. The
//! algorithm is pinned per key kind, so `alg: none` and algorithm swaps (an
//! RS256 public key used as an HS256 secret) are rejected.
//!
//! Only JWKS keys published for RS256 signatures verify tokens: an RSA key
//! whose `use` (when given) is `sig`, whose `alg` (when given) is `RS256`,
//! and whose `key_ops` (when given) include `verify`. A key published for
//! encryption or another algorithm is skipped, so a token naming it by
//! `kid` is refused.
//!
//! JWKS keys are cached by `kid`. The set is fetched again on a schedule:
//! after `--jwks-refresh` (60 s by default), or after the document's
//! `Cache-Control: max-age` when that is shorter (`no-cache` / `no-store`:
//! after the minimum interval), so a key removed from the set stops
//! verifying within that period — tokens verified earlier included: a
//! change of the set voids the memory of verified tokens. The fetch runs
//! on the first verification past the due time (the requests that arrive
//! meanwhile wait for it, bounded by the 5 s fetch timeout); a failed fetch
//! keeps the last set and is retried after the minimum interval. A token
//! with an unknown `kid` triggers a refetch too, at most once per minimum
//! interval, so a flood of made-up key ids cannot turn into a flood of
//! fetches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, Jwk, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use crate::config::AuthConfig;

/// The role that may act on any user and use the admin routes.
pub const ADMIN_ROLE: &str = "admin";

/// The claims kura reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Roles (`admin`).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    /// Token id: what an individual revocation names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Session id: the session the token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

/// The longest `jti` or `sid` accepted, in bytes (a longer one makes the
/// token invalid: it could not be named by a cache key).
pub const MAX_TOKEN_ID_LEN: usize = 120;

/// Whether `id` can be a token's `jti` or `sid`: 1 to
/// [`MAX_TOKEN_ID_LEN`] bytes.
#[must_use]
pub fn token_id_fits(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_TOKEN_ID_LEN
}

/// Why a token was refused (all answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// Bad signature, algorithm, format or claims.
    #[error("invalid token")]
    Invalid,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` has not come yet.
    #[error("token not yet valid")]
    NotYetValid,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Unauthorized(match e {
            AuthError::Missing => "missing bearer token",
            AuthError::Invalid => "invalid token",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
        })
    }
}

/// A verified caller: shared, so that handing the remembered one to a
/// request is one reference count, and what its checks noted
/// ([`Claimed::checked`]) lasts across the token's requests.
#[derive(Debug, Clone)]
pub struct Caller(Arc<Claimed>);

impl std::ops::Deref for Caller {
    type Target = Claimed;

    fn deref(&self) -> &Claimed {
        &self.0
    }
}

/// What a verified token says, and what was checked about it.
#[derive(Debug)]
pub struct Claimed {
    /// The `sub` claim.
    pub sub: Arc<str>,
    /// `sub` as a user id, when it is a UUID.
    pub user_id: Option<Uuid>,
    /// Whether the caller has the `admin` role.
    pub admin: bool,
    /// The token's `jti`, when it has one.
    pub jti: Option<Arc<str>>,
    /// The token's `sid`, when it has one.
    pub sid: Option<Arc<str>>,
    /// The token's `exp`, seconds since the epoch.
    pub exp: u64,
    /// The last revocation check that found the token valid (see
    /// [`crate::tokens`]).
    pub checked: crate::tokens::Checked,
}

impl Claimed {
    /// Allows the owner of `user_id` and admins.
    ///
    /// # Errors
    ///
    /// [`ApiError::Forbidden`].
    pub fn may_access(&self, user_id: &Uuid) -> Result<(), ApiError> {
        if self.admin || self.user_id.as_ref() == Some(user_id) {
            Ok(())
        } else {
            Err(ApiError::Forbidden("not allowed to access this profile"))
        }
    }

    /// Allows admins only.
    ///
    /// # Errors
    ///
    /// [`ApiError::Forbidden`].
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden("admin role required"))
        }
    }

    /// The caller's own user id.
    ///
    /// # Errors
    ///
    /// [`ApiError::Unprocessable`] when `sub` is not a UUID.
    pub fn own_id(&self) -> Result<Uuid, ApiError> {
        self.user_id.ok_or_else(|| {
            ApiError::Unprocessable("the token subject is not a user id (UUID)".into())
        })
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or(AuthError::Missing)?;
        let caller = state.auth.verify(token).await?;
        state.tokens.admit(&caller, &parts.headers).await?;
        Ok(caller)
    }
}

/// The token of an `Authorization: Bearer …` header, if there is one.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Token verification for the service.
pub struct Auth {
    hs: Option<(DecodingKey, Validation)>,
    jwks: Option<Jwks>,
    rs_validation: Validation,
    verified: VerifiedTokens,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("hs256", &self.hs.is_some())
            .field("jwks", &self.jwks.as_ref().map(|j| &j.url))
            .finish()
    }
}

use crate::tokens::LEEWAY_SECS;
/// How long a verified token is remembered.
const VERIFIED_MAX_AGE_SECS: u64 = 60;
/// Shards of the verified-token memory, and tokens per shard.
const VERIFIED_SHARDS: usize = 16;
const VERIFIED_PER_SHARD: usize = 1024;

/// Tokens verified recently: a repeat request with the same token skips
/// the signature check and claim parsing (most of the cost of auth on the
/// hit path). Keyed by the whole token, so a different token is always
/// verified; entries end at `exp` (plus leeway), after a minute at most,
/// and when the JWKS changes (each entry records the key set's generation).
/// Bounded: a full shard is cleared.
struct VerifiedTokens {
    shards: Box<[Mutex<VerifiedShard>]>,
}

/// Token → (caller, valid until in seconds since the epoch, key set
/// generation).
type VerifiedShard = HashMap<Box<str>, (Caller, u64, u64)>;

impl VerifiedTokens {
    fn new() -> Self {
        Self {
            shards: (0..VERIFIED_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    /// The shard of a token: its last byte is signature text, already
    /// uniformly spread, so no extra hashing is needed to pick it.
    fn shard(&self, token: &str) -> &Mutex<VerifiedShard> {
        let b = token.as_bytes().last().copied().unwrap_or(0);
        &self.shards[usize::from(b) % self.shards.len()]
    }

    fn get(&self, token: &str, now: u64, generation: u64) -> Option<Caller> {
        let shard = self
            .shard(token)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match shard.get(token) {
            Some((c, until, g)) if *until >= now && *g == generation => Some(c.clone()),
            _ => None,
        }
    }

    fn put(&self, token: &str, caller: Caller, until: u64, generation: u64) {
        let mut shard = self
            .shard(token)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shard.len() >= VERIFIED_PER_SHARD {
            shard.clear();
        }
        shard.insert(token.into(), (caller, until, generation));
    }
}

fn validation(alg: Algorithm, cfg: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.set_required_spec_claims(&["exp"]);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        v.required_spec_claims.insert("iss".into());
    }
    match &cfg.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            v.required_spec_claims.insert("aud".into());
        }
        None => v.validate_aud = false,
    }
    v
}

impl Auth {
    /// Verification as configured.
    ///
    /// # Errors
    ///
    /// When neither an HS256 secret nor a JWKS URL is configured.
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Self> {
        if cfg.jwt_secret.is_none() && cfg.jwks_url.is_none() {
            anyhow::bail!(
                "no token verification configured: set KURA_JWT_SECRET (HS256) or KURA_JWKS_URL (RS256), or run `kura serve --demo`"
            );
        }
        let hs = cfg.jwt_secret.as_ref().map(|s| {
            (
                DecodingKey::from_secret(s.as_bytes()),
                validation(Algorithm::HS256, cfg),
            )
        });
        let jwks = match &cfg.jwks_url {
            Some(url) => Some(Jwks::new(
                url.clone(),
                cfg.jwks_min_refresh,
                cfg.jwks_refresh,
            )?),
            None => None,
        };
        Ok(Self {
            hs,
            jwks,
            rs_validation: validation(Algorithm::RS256, cfg),
            verified: VerifiedTokens::new(),
        })
    }

    /// Fetches the JWKS now (start-up), so the first request does not wait.
    pub async fn prefetch(&self) {
        if let Some(j) = &self.jwks {
            j.refresh().await;
        }
    }

    /// Verifies a token.
    ///
    /// # Errors
    ///
    /// [`AuthError::Invalid`], [`AuthError::Expired`] or
    /// [`AuthError::NotYetValid`].
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        // A set past its due time is fetched again first, so that a key
        // removed from it stops verifying remembered tokens too.
        let generation = match &self.jwks {
            Some(j) => {
                j.refresh_if_due().await;
                j.generation()
            }
            None => 0,
        };
        if let Some(c) = self.verified.get(token, now, generation) {
            return Ok(c);
        }
        let claims = match (&self.hs, &self.jwks) {
            // HS256 only: one pass, the header's alg must be HS256.
            (Some((key, v)), None) => decode(token, key, v)?,
            (hs, Some(jwks)) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
                match (header.alg, hs) {
                    (Algorithm::HS256, Some((key, v))) => decode(token, key, v)?,
                    (Algorithm::RS256, _) => {
                        let key = jwks
                            .key(header.kid.as_deref())
                            .await
                            .ok_or(AuthError::Invalid)?;
                        decode(token, &key, &self.rs_validation)?
                    }
                    _ => return Err(AuthError::Invalid),
                }
            }
            (None, None) => return Err(AuthError::Invalid),
        };
        let unfit = |id: &Option<String>| id.as_deref().is_some_and(|i| !token_id_fits(i));
        if unfit(&claims.jti) || unfit(&claims.sid) {
            return Err(AuthError::Invalid);
        }
        let caller = Caller(Arc::new(Claimed {
            user_id: Uuid::parse_str(&claims.sub).ok(),
            admin: claims.roles.iter().any(|r| r == ADMIN_ROLE),
            sub: claims.sub.into(),
            jti: claims.jti.map(Into::into),
            sid: claims.sid.map(Into::into),
            exp: claims.exp,
            checked: crate::tokens::Checked::default(),
        }));
        // Until `exp` (with the validation leeway), at most a minute.
        let until = (claims.exp + LEEWAY_SECS).min(now + VERIFIED_MAX_AGE_SECS);
        self.verified.put(token, caller.clone(), until, generation);
        Ok(caller)
    }
}

fn decode(token: &str, key: &DecodingKey, v: &Validation) -> Result<Claims, AuthError> {
    match jsonwebtoken::decode::<Claims>(token, key, v) {
        Ok(t) => Ok(t.claims),
        Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(AuthError::Expired),
        Err(e) if matches!(e.kind(), ErrorKind::ImmatureSignature) => Err(AuthError::NotYetValid),
        Err(e) => {
            tracing::debug!(error = %e, "token rejected");
            Err(AuthError::Invalid)
        }
    }
}

/// Keys of a JWKS, by `kid`.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<DecodingKey>>,
    /// The key to use for tokens without `kid` when the set has exactly one.
    only: Option<Arc<DecodingKey>>,
    /// The usable keys as published (kid and JWK), to tell a changed set.
    published: Vec<(Option<String>, String)>,
    /// How long the document may be used (`Cache-Control: max-age`;
    /// `Some(0)` for `no-cache` / `no-store`).
    max_age: Option<Duration>,
}

struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_interval: Duration,
    max_interval: Duration,
    /// Milliseconds since `started` at which the set is to be fetched
    /// again (0: now).
    due_ms: AtomicU64,
    started: Instant,
    /// Raised whenever a fetched set differs from the one before.
    generation: AtomicU64,
}

/// The `max-age` of a `Cache-Control` header; zero for `no-cache` and
/// `no-store`.
fn max_age(cache_control: &str) -> Option<Duration> {
    let mut age = None;
    for d in cache_control.split(',').map(str::trim) {
        let d = d.to_ascii_lowercase();
        if d == "no-cache" || d == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            age = v
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age
}

impl Jwks {
    fn new(url: String, min_interval: Duration, max_interval: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            url,
            client,
            keys: RwLock::new(Arc::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            min_interval,
            max_interval: max_interval.max(min_interval),
            due_ms: AtomicU64::new(0),
            started: Instant::now(),
            generation: AtomicU64::new(0),
        })
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn ms_now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn due(&self) -> bool {
        self.ms_now() >= self.due_ms.load(Ordering::Acquire)
    }

    fn set_due_in(&self, d: Duration) {
        self.due_ms
            .store(self.ms_now() + d.as_millis() as u64, Ordering::Release);
    }

    /// Fetches the set if its time has come (one fetch at a time; callers
    /// that wait for it use its result).
    async fn refresh_if_due(&self) {
        if self.due() {
            let _ = self.fetch_now(true).await;
        }
    }

    fn lookup(&self, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        let set = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match kid {
            Some(k) => set.by_kid.get(k).cloned(),
            None => set.only.clone(),
        }
    }

    async fn key(&self, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        if let Some(k) = self.lookup(kid) {
            return Some(k);
        }
        self.refresh().await;
        self.lookup(kid)
    }

    /// Refetches the set unless it was fetched within the minimum interval.
    async fn refresh(&self) {
        self.fetch_now(false).await;
    }

    /// Fetches the set: when `scheduled`, only if it is still due once this
    /// caller has the fetch lock; otherwise unless it was fetched within
    /// the minimum interval.
    async fn fetch_now(&self, scheduled: bool) {
        let mut last = self.last_fetch.lock().await;
        if scheduled && !self.due() {
            return;
        }
        if !scheduled && last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(set) => {
                let next = set
                    .max_age
                    .map_or(self.max_interval, |a| a.min(self.max_interval))
                    .max(self.min_interval);
                let changed = {
                    let old = self
                        .keys
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    old.published != set.published
                };
                if changed {
                    tracing::info!(keys = set.by_kid.len(), url = %self.url, "JWKS loaded");
                }
                *self
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
                if changed {
                    // Tokens verified with the old set are verified again.
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
                self.set_due_in(next);
            }
            Err(e) => {
                tracing::warn!(error = %e, url = %self.url, "JWKS fetch failed: the last set is kept");
                self.set_due_in(self.min_interval);
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<KeySet> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?;
        let cache_for = response
            .headers()
            .get(axum::http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let set: JwkSet = response.json().await?;
        let mut out = KeySet {
            max_age: cache_for,
            ..KeySet::default()
        };
        let mut usable = Vec::new();
        for jwk in &set.keys {
            if let Err(why) = verifies_rs256(jwk) {
                tracing::debug!(kid = ?jwk.common.key_id, why, "JWKS key skipped");
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    let k = Arc::new(k);
                    if let Some(kid) = &jwk.common.key_id {
                        out.by_kid.insert(kid.clone(), k.clone());
                    }
                    out.published.push((
                        jwk.common.key_id.clone(),
                        serde_json::to_string(jwk).unwrap_or_default(),
                    ));
                    usable.push(k);
                }
                Err(e) => tracing::debug!(error = %e, "JWKS key skipped"),
            }
        }
        if usable.len() == 1 {
            out.only = usable.pop();
        }
        Ok(out)
    }
}

/// Whether a JWKS key is published for verifying RS256 signatures (absent
/// `use`, `alg` and `key_ops` say nothing against it).
fn verifies_rs256(jwk: &Jwk) -> Result<(), &'static str> {
    if !matches!(jwk.algorithm, AlgorithmParameters::RSA(_)) {
        return Err("not an RSA key");
    }
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err("not published for signatures (use)"),
    }
    match &jwk.common.key_algorithm {
        None | Some(KeyAlgorithm::RS256) => {}
        Some(_) => return Err("published for another algorithm (alg)"),
    }
    match &jwk.common.key_operations {
        Some(ops) if !ops.contains(&KeyOperations::Verify) => {
            Err("not published for verifying (key_ops)")
        }
        _ => Ok(()),
    }
}

/// Signs an HS256 token for `sub` valid for `ttl` (what `kura token` and
/// `kura serve --demo` print), with a fresh `jti` (so that it can be
/// revoked) and `sid` when given.
///
/// # Errors
///
/// When signing fails.
pub fn sign_hs256(
    secret: &str,
    sub: &str,
    admin: bool,
    ttl: Duration,
    sid: Option<&str>,
) -> anyhow::Result<String> {
    let exp = jsonwebtoken::get_current_timestamp() + ttl.as_secs();
    let claims = Claims {
        sub: sub.to_owned(),
        exp,
        roles: if admin {
            vec![ADMIN_ROLE.to_owned()]
        } else {
            Vec::new()
        },
        iss: None,
        aud: None,
        jti: Some(Uuid::new_v4().simple().to_string()),
        sid: sid.map(str::to_owned),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(max_age("max-age=300"), Some(Duration::from_secs(300)));
        assert_eq!(
            max_age("public, Max-Age=60, must-revalidate"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("max-age=60, no-cache"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
