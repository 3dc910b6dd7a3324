use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use kura::coalesce::Coalescer;
use kura::{CacheAside, QueuedCache, WriteThrough};

use futures::future::BoxFuture;

use super::repo::{NewSession, Revocation, Session};
use crate::auth::{Admission, Caller, LEEWAY_SECS, Refused};
use crate::db::{Db, DbError};

/// The shortest a session revocation lasts: the seed's session TTL (the
/// access token's lifetime), so that tokens of the session not seen yet
/// are covered too.
pub const SESSION_REVOCATION_MIN: Duration = Duration::from_secs(3600);

/// How often coalesced session activity is written.
pub const TOUCH_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Sessions with activity pending at which a flush starts at once.
const TOUCH_MAX_PENDING: usize = 10_000;

/// How often expired revocations and sessions are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The cache id of a token id (`jti` or `sid`) under `prefix`: `<prefix>-<id>`
/// when the id uses only the key alphabet, else `<prefix>x-<hex>` (ids
/// are at most [`crate::auth::MAX_TOKEN_ID_LEN`] bytes, so both fit
/// a key).
#[must_use]
pub fn key_id(prefix: &str, raw: &str) -> String {
    let plain = raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain && !raw.is_empty() {
        format!("{prefix}-{raw}")
    } else {
        let mut s = format!("{prefix}x-");
        for b in raw.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

fn now_unix() -> i64 {
    Utc::now().timestamp()
}

fn now_ms(epoch: std::time::Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// What was revoked, as the revoke call answers it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Revoked {
    /// `jti` or `sid`.
    pub scope: String,
    /// The token or session id.
    pub id: String,
    /// Until when it stays revoked, seconds since the epoch.
    pub expires_at: i64,
}

impl From<Revocation> for Revoked {
    fn from(r: Revocation) -> Self {
        Self {
            scope: r.scope,
            id: r.token_id,
            expires_at: r.expires_at,
        }
    }
}

/// The database as the source of the blacklist's entries.
#[derive(Debug, Clone)]
pub struct RevocationSource(pub Db);

impl kura::Source for RevocationSource {
    type Value = Revocation;
    type Error = DbError;

    async fn load(&self, id: &str) -> Result<Option<Revocation>, DbError> {
        self.0.revocation(id).await
    }
}

/// The database as the source of the sessions' entries.
#[derive(Debug, Clone)]
pub struct SessionSource(pub Db);

impl kura::Source for SessionSource {
    type Value = Session;
    type Error = DbError;

    async fn load(&self, id: &str) -> Result<Option<Session>, DbError> {
        self.0.session(id).await
    }
}

/// Counts kept for tests and the logs.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Requests of a session recorded for a `last_seen` write.
    pub touches: AtomicU64,
    /// Statements that wrote coalesced session activity.
    pub touch_writes: AtomicU64,
    /// Sessions created.
    pub sessions_created: AtomicU64,
}

/// Why a revocation was not confirmed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    /// The database could not record it.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Recorded in the database, but the cache could not be told and no
    /// invalidation feed carries revocations to the other instances: they
    /// may accept the token until this instance's pending invalidation is
    /// replayed (once it reaches Redis again).
    #[error("the revocation is recorded, but the cache could not be told")]
    NotApplied,
}

/// Revocation checks and sessions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tokens {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Db,
    revoked: CacheAside<RevocationSource>,
    revoked_writes: WriteThrough,
    sessions: CacheAside<SessionSource>,
    session_writes: WriteThrough,
    touches: Coalescer<String, (DateTime<Utc>, i64)>,
    flush_now: tokio::sync::Notify,
    check: bool,
    /// Whether the invalidation feed carries `revocations` to the cache.
    fed: bool,
    max_sessions: u32,
    stats: TokenStats,
    /// The clock of [`Checked::at_ms`].
    epoch: std::time::Instant,
}

fn later(old: &mut (DateTime<Utc>, i64), new: (DateTime<Utc>, i64)) {
    old.0 = old.0.max(new.0);
    old.1 = old.1.max(new.1);
}

impl Tokens {
    /// Revocations and sessions over `db` and `cache`; `check` says
    /// whether requests are checked against the revocations, `fed` whether
    /// the invalidation feed relays the `revocations` table.
    #[must_use]
    pub fn new(db: Db, cache: &QueuedCache, check: bool, fed: bool, max_sessions: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                revoked: cache.aside(crate::registry::BLACKLIST, RevocationSource(db.clone())),
                revoked_writes: cache.write_through(crate::registry::BLACKLIST),
                sessions: cache.aside(crate::registry::SESSION, SessionSource(db.clone())),
                session_writes: cache.write_through(crate::registry::SESSION),
                db,
                touches: Coalescer::new(TOUCH_MAX_PENDING),
                flush_now: tokio::sync::Notify::new(),
                check,
                fed,
                max_sessions: max_sessions.max(1),
                stats: TokenStats::default(),
                epoch: std::time::Instant::now(),
            }),
        }
    }

    /// What the blacklist's and the sessions' near caches hold, by type.
    #[must_use]
    pub fn near_stats(&self) -> Vec<(&'static str, kura::near::NearStats)> {
        let i = &self.inner;
        [
            (crate::registry::BLACKLIST.name(), i.revoked.near_stats()),
            (crate::registry::SESSION.name(), i.sessions.near_stats()),
        ]
        .into_iter()
        .filter_map(|(k, s)| Some((k, s?)))
        .collect()
    }

    /// The counts kept so far.
    #[must_use]
    pub fn stats(&self) -> &TokenStats {
        &self.inner.stats
    }

    /// Admits a verified caller: refuses a revoked token, then records the
    /// request in its session (creating the session on its first request).
    ///
    /// # Errors
    ///
    /// [`Refused::Revoked`] for a revoked token or session;
    /// [`Refused::Unknown`] when neither the cache nor the database can
    /// say.
    pub async fn admit(&self, caller: &Caller, user_agent: Option<&str>) -> Result<(), Refused> {
        let i = &self.inner;
        if i.check && (caller.jti.is_some() || caller.sid.is_some()) {
            self.check(caller).await?;
        }
        if let Some(sid) = &caller.sid {
            self.observe(caller, sid, user_agent).await;
        }
        Ok(())
    }

    /// Whether `caller`'s token passes the revocation check (not revoked,
    /// and its status known), without recording anything for its session:
    /// what the rate limiter asks before counting a request.
    pub async fn passes_check(&self, caller: &Caller) -> bool {
        let i = &self.inner;
        !(i.check && (caller.jti.is_some() || caller.sid.is_some()))
            || self.check(caller).await.is_ok()
    }

    /// Refuses a revoked token, or one whose status cannot be known; notes
    /// a valid answer that came from the cache (see [`Checked`]).
    async fn check(&self, caller: &Caller) -> Result<(), Refused> {
        let i = &self.inner;
        let c = &caller.checked;
        // Taken before the reads: an invalidation during them changes it.
        let stamp = i.revoked.near_stamp().map(kura::near::Stamp::to_u64);
        let lifetime = i
            .revoked
            .near_max_lifetime()
            .unwrap_or_default()
            .as_millis() as u64;
        if let Some(s) = stamp {
            if c.stamp.load(Ordering::Acquire) == s
                && now_ms(i.epoch).saturating_sub(c.at_ms.load(Ordering::Acquire)) < lifetime
            {
                return Ok(());
            }
        }
        let mut cached = true;
        if let Some(jti) = &caller.jti {
            cached &= self.refuse_if_revoked(&key_id("jti", jti)).await?;
        }
        if let Some(sid) = &caller.sid {
            cached &= self.refuse_if_revoked(&key_id("sid", sid)).await?;
        }
        if let (Some(s), true) = (stamp, cached) {
            c.at_ms.store(now_ms(i.epoch), Ordering::Release);
            c.stamp.store(s, Ordering::Release);
        }
        Ok(())
    }

    /// Refuses a revoked id; `Ok(true)` when the "not revoked" answer came
    /// from the cache (a marker the store tracks), `Ok(false)` when it was
    /// loaded.
    async fn refuse_if_revoked(&self, id: &str) -> Result<bool, Refused> {
        match self.inner.revoked.get(id).await {
            Ok(f) if f.is_found() => Err(Refused::Revoked),
            Ok(f) => Ok(f.status() == kura::Status::Hit),
            Err(e) => {
                tracing::error!(error = %e, "revocation status unknown");
                Err(Refused::Unknown)
            }
        }
    }

    /// A session's request: recorded for the coalesced `last_seen` write;
    /// the first one creates the session.
    async fn observe(&self, caller: &Caller, sid: &str, user_agent: Option<&str>) {
        let i = &self.inner;
        let key = key_id("sid", sid);
        let exp = i64::try_from(caller.exp).unwrap_or(i64::MAX);
        // Once seen, a session stays known for this token: its end is a
        // revocation, which the check above refuses.
        let noted = caller.checked.session_known.load(Ordering::Acquire);
        let known = noted
            || match i.sessions.get(&key).await {
                Ok(f) => f.is_found(),
                Err(e) => {
                    // The session list is bookkeeping: its trouble does not fail
                    // the request.
                    tracing::warn!(error = %e, "session lookup failed");
                    return;
                }
            };
        if known {
            caller.checked.session_known.store(true, Ordering::Release);
            i.stats.touches.fetch_add(1, Ordering::Relaxed);
            if i.touches.record(key, (Utc::now(), exp), later) {
                i.flush_now.notify_one();
            }
            return;
        }
        let new = NewSession {
            key_id: &key,
            sid,
            user_sub: &caller.sub,
            expires_at: exp,
            user_agent: user_agent.map(|u| &u[..u.len().min(512)]),
            // The session's revocation has the same cache id.
            revocation_key: &key,
        };
        match i.db.create_session(&new).await {
            Ok(created) => {
                // A cached "not found" goes, whether this request or a
                // concurrent one made the row.
                let _ = i.session_writes.invalidate(&key).await;
                if created.is_some() {
                    i.stats.sessions_created.fetch_add(1, Ordering::Relaxed);
                    self.enforce_cap(&caller.sub).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "session not recorded"),
        }
    }

    /// Revokes the oldest sessions of `user_sub` past the cap.
    async fn enforce_cap(&self, user_sub: &str) {
        match self
            .inner
            .db
            .sessions_over_cap(user_sub, self.inner.max_sessions)
            .await
        {
            Ok(over) => {
                for (_, s) in over {
                    if let Err(e) = self.revoke_session(&s.sid, None).await {
                        tracing::warn!(error = %e, "session over the cap not revoked");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "session cap not checked"),
        }
    }

    /// Revokes the token `jti` until `exp` (seconds since the epoch) plus
    /// [`LEEWAY_SECS`], as long as verification would admit it; `None`
    /// when it is past that already (nothing is stored).
    ///
    /// # Errors
    ///
    /// [`RevokeError::Db`] when the database cannot record it;
    /// [`RevokeError::NotApplied`] when it is recorded but other instances
    /// cannot be told yet.
    pub async fn revoke_token(&self, jti: &str, exp: i64) -> Result<Option<Revoked>, RevokeError> {
        let until = exp.saturating_add(LEEWAY_SECS as i64);
        if until <= now_unix() {
            return Ok(None);
        }
        let key = key_id("jti", jti);
        let r = self.inner.db.revoke(&key, "jti", jti, until).await?;
        self.applied(self.inner.revoked_writes.invalidate(&key).await)?;
        Ok(Some(r.into()))
    }

    /// Whether a revocation's invalidation reached the cache, or the feed
    /// will carry it there; a deferred one stays pending (replayed by the
    /// library) either way.
    fn applied(&self, r: Result<kura::WriteOutcome, kura::Error>) -> Result<(), RevokeError> {
        match r {
            Ok(kura::WriteOutcome::Deferred) if !self.inner.fed => {
                tracing::warn!(
                    "revocation recorded, but the cache cannot be reached and no feed carries it: \
                     other instances may accept the token until the pending invalidation is replayed"
                );
                Err(RevokeError::NotApplied)
            }
            _ => Ok(()),
        }
    }

    /// Revokes every token of session `sid`, until the latest of: the
    /// session's known expiry and `exp` (each plus [`LEEWAY_SECS`]), and
    /// [`SESSION_REVOCATION_MIN`] from now; deletes the session. Returns the revocation and the deleted
    /// session, if there was one.
    ///
    /// # Errors
    ///
    /// As [`Tokens::revoke_token`] (the session is deleted either way).
    pub async fn revoke_session(
        &self,
        sid: &str,
        exp: Option<i64>,
    ) -> Result<(Revoked, Option<Session>), RevokeError> {
        let i = &self.inner;
        let key = key_id("sid", sid);
        let known = i.db.session(&key).await?;
        let leeway = LEEWAY_SECS as i64;
        let until = [
            known.as_ref().map(|s| s.expires_at.saturating_add(leeway)),
            exp.map(|e| e.saturating_add(leeway)),
            Some(now_unix() + SESSION_REVOCATION_MIN.as_secs() as i64),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_default();
        let r = i.db.revoke(&key, "sid", sid, until).await?;
        let invalidated = i.revoked_writes.invalidate(&key).await;
        let deleted = i.db.delete_session(&key).await?;
        i.touches.forget(&key);
        let _ = i.session_writes.invalidate(&key).await;
        self.applied(invalidated)?;
        Ok((r.into(), deleted))
    }

    /// The session `sid`, if it exists (for ownership checks).
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn session(&self, sid: &str) -> Result<Option<Session>, DbError> {
        self.inner.db.session(&key_id("sid", sid)).await
    }

    /// The unexpired sessions of `user_sub`, oldest first, with this
    /// process's activity not yet written.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn sessions_of(&self, user_sub: &str) -> Result<Vec<Session>, DbError> {
        let mut list = self.inner.db.sessions_of(user_sub).await?;
        for s in &mut list {
            if let Some((seen, exp)) = self.inner.touches.peek(&key_id("sid", &s.sid)) {
                s.last_seen = s.last_seen.max(seen);
                s.expires_at = s.expires_at.max(exp);
            }
        }
        Ok(list)
    }

    /// Writes the coalesced session activity now; returns the sessions
    /// written. A failed write is kept for the next flush.
    ///
    /// # Errors
    ///
    /// [`DbError`] when the write failed.
    pub async fn flush(&self) -> Result<u64, DbError> {
        let i = &self.inner;
        let batch = i.touches.take();
        if batch.is_empty() {
            return Ok(0);
        }
        let rows: Vec<(String, DateTime<Utc>, i64)> = batch
            .iter()
            .map(|(k, (seen, exp))| (k.clone(), *seen, *exp))
            .collect();
        match i.db.touch_sessions(&rows).await {
            Ok(n) => {
                i.stats.touch_writes.fetch_add(1, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                i.touches.restore(batch, later);
                Err(e)
            }
        }
    }

    /// Runs the background work until `stop` resolves: the coalesced
    /// `last_seen` writes (every [`TOUCH_FLUSH_EVERY`], or at once when
    /// many sessions are pending) and the pruning of expired revocations
    /// and sessions; flushes once more at the end.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(TOUCH_FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {}
                () = self.inner.flush_now.notified() => {}
            }
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "session activity not written: kept for the next flush");
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                match self.inner.db.prune_tokens().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(rows = n, "expired revocations and sessions pruned"),
                    Err(e) => tracing::warn!(error = %e, "pruning revocations failed"),
                }
            }
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "session activity lost at shutdown");
        }
    }
}

/// The checks every request's caller passes ([`crate::auth::Gate`]).
impl Admission for Tokens {
    fn admit<'a>(
        &'a self,
        caller: &'a Caller,
        user_agent: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Refused>> {
        Box::pin(Tokens::admit(self, caller, user_agent))
    }

    fn passes<'a>(&'a self, caller: &'a Caller) -> BoxFuture<'a, bool> {
        Box::pin(self.passes_check(caller))
    }
}
