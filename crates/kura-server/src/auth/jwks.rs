//! The JWKS of RS256 verification: fetched, refreshed on a schedule, keys
//! by `kid` (see [`crate::auth`] for the rules).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, Jwk, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse,
};

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

pub(super) struct Jwks {
    pub(super) url: String,
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
    pub(super) fn new(
        url: String,
        min_interval: Duration,
        max_interval: Duration,
    ) -> anyhow::Result<Self> {
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

    pub(super) fn generation(&self) -> u64 {
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
    pub(super) async fn refresh_if_due(&self) {
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

    pub(super) async fn key(&self, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        if let Some(k) = self.lookup(kid) {
            return Some(k);
        }
        self.refresh().await;
        self.lookup(kid)
    }

    /// Refetches the set unless it was fetched within the minimum interval.
    pub(super) async fn refresh(&self) {
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
