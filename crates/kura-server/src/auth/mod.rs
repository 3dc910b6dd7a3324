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
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, header};
use futures::future::BoxFuture;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use self::jwks::Jwks;
use crate::config::AuthConfig;

mod jwks;

/// Clock-skew leeway of `exp` and `nbf`, in seconds: a token is accepted
/// until `exp` + this, so a revocation lasts that long too
/// ([`crate::tokens`]).
pub const LEEWAY_SECS: u64 = 30;

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

/// Why a verified caller may not do what it asks (403, or 422 when the
/// token's subject is not a user id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// Not the owner of the resource, nor an admin.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The token subject is not a user id (UUID).
    #[error("the token subject is not a user id (UUID)")]
    NotAUser,
}

/// Why a verified token was refused by its admission checks
/// ([`Admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The token or its session is revoked (401).
    #[error("token revoked")]
    Revoked,
    /// Neither the cache nor the database can say whether it is revoked
    /// (503).
    #[error("the token's revocation status cannot be checked now")]
    Unknown,
}

/// Why a request has no caller: its token does not verify, or its
/// admission refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The token is missing or does not verify.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The token verified but was refused.
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// The checks a verified caller passes before its request runs: the
/// revocation check and the session bookkeeping, implemented by
/// [`crate::tokens::Tokens`]. A trait so that token verification (here)
/// and the HTTP extractor ([`crate::http::extract`]) need not know the
/// token store.
pub trait Admission: Send + Sync + std::fmt::Debug {
    /// Admits `caller` (its request carries `user_agent`), or refuses it.
    fn admit<'a>(
        &'a self,
        caller: &'a Caller,
        user_agent: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Refused>>;

    /// Whether `caller` would be admitted, recording nothing (what the
    /// rate limiter asks before counting a request).
    fn passes<'a>(&'a self, caller: &'a Caller) -> BoxFuture<'a, bool>;
}

/// Verification and admission of a request's bearer token: what makes a
/// [`Caller`].
#[derive(Debug)]
pub struct Gate {
    /// Token verification.
    pub auth: Auth,
    /// The checks after it.
    pub admission: Arc<dyn Admission>,
}

impl Gate {
    /// The caller of a request with `headers`.
    ///
    /// # Errors
    ///
    /// [`GateError`]: no token, a token that does not verify, or one its
    /// admission refused.
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Caller, GateError> {
        let token = bearer(headers).ok_or(AuthError::Missing)?;
        let caller = self.auth.verify(token).await?;
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok());
        self.admission.admit(&caller, user_agent).await?;
        Ok(caller)
    }

    /// The verified caller of a request that would be admitted, without
    /// recording anything; `None` for any other request.
    pub async fn admissible(&self, headers: &HeaderMap) -> Option<Caller> {
        let caller = self.auth.verify(bearer(headers)?).await.ok()?;
        self.admission.passes(&caller).await.then_some(caller)
    }
}

/// What the last revocation check of a token found, kept with the
/// verified token ([`Claimed::checked`]): the blacklist's near cache stamp
/// it was taken under and when. A later request of the same token skips
/// the check while the stamp is unchanged (no invalidation of any
/// blacklist key reached this process since, and the stream is live) and
/// the check is younger than the near cache's entry lifetime — the rule an
/// L1 entry lives by, without the L1 lookup. A session's existence is
/// noted the same way, once. Written and read by [`crate::tokens`].
#[derive(Debug, Default)]
pub struct Checked {
    /// The near-cache stamp of the last check (0: none).
    pub stamp: AtomicU64,
    /// When, in ms of the checker's clock.
    pub at_ms: AtomicU64,
    /// Whether the token's session is known to exist.
    pub session_known: AtomicBool,
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
    pub checked: Checked,
}

impl Claimed {
    /// Allows the owner of `user_id` and admins.
    ///
    /// # Errors
    ///
    /// [`Denied::Forbidden`].
    pub fn may_access(&self, user_id: &Uuid) -> Result<(), Denied> {
        if self.admin || self.user_id.as_ref() == Some(user_id) {
            Ok(())
        } else {
            Err(Denied::Forbidden("not allowed to access this profile"))
        }
    }

    /// Allows admins only.
    ///
    /// # Errors
    ///
    /// [`Denied::Forbidden`].
    pub fn require_admin(&self) -> Result<(), Denied> {
        if self.admin {
            Ok(())
        } else {
            Err(Denied::Forbidden("admin role required"))
        }
    }

    /// The caller's own user id.
    ///
    /// # Errors
    ///
    /// [`Denied::NotAUser`] when `sub` is not a UUID.
    pub fn own_id(&self) -> Result<Uuid, Denied> {
        self.user_id.ok_or(Denied::NotAUser)
    }
}

/// The token of an `Authorization: Bearer …` header, if there is one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
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
            checked: Checked::default(),
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
