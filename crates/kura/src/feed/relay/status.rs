//! What the feed looks like from outside: [`FeedStatus`] for `kura feed
//! status` (reads the source), [`RelayHealth`] for health checks (reads the
//! cache only: what the relaying instance last measured).

use super::*;

/// The state of the feed, for `kura feed status` and health checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct FeedStatus {
    /// The fleet position (`None`: none held yet, or unknown while the
    /// store is unreachable and none is mirrored in the database).
    pub position: Option<u64>,
    /// The database's watermark now.
    pub watermark: u64,
    /// Rows at or past the position.
    pub backlog: u64,
    /// Age of the oldest row not yet applied, in milliseconds (0 when
    /// caught up).
    pub lag_ms: u64,
    /// The instance holding the fleet lease (its name, not its token), if
    /// any.
    pub relaying: Option<String>,
    /// Kinds with a recorded overflow, to be cleared.
    pub overflowed: Vec<String>,
    /// Whether the store answered.
    pub store_reachable: bool,
}

/// The backlog and lag as the relaying instance last measured them, and
/// when (published in the store at most once per poll interval, for health
/// checks that must not query the database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Observed {
    /// Rows at or past the position.
    pub backlog: u64,
    /// Age of the oldest row not yet applied, in milliseconds.
    pub lag_ms: u64,
    /// When it was measured, Unix milliseconds.
    pub at_ms: i64,
}

/// The feed as [`Relay::health`] reads it from the store alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RelayHealth {
    /// The last measurement of the relaying instance; `None` when none was
    /// published within the last ten poll intervals (no instance relays,
    /// or none reaches both the database and the store).
    pub observed: Option<Observed>,
    /// The instance holding the fleet lease (its name, not its token).
    pub relaying: Option<String>,
}

impl<L: ChangeSource> Relay<L> {
    /// The feed as the store knows it: the relaying instance's last
    /// measurement and its name. One store round trip, no database
    /// statement: what a health check asks at any rate.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store does not answer.
    pub async fn health(&self) -> Result<RelayHealth, StoreError> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let got = self
            .store(
                inner.cache.inner.op_timeout,
                store.get_many(&[&inner.observed_key, inner.lease.key()]),
            )
            .await
            .map_err(|e| match e {
                FeedError::Store(e) => e,
                FeedError::Log(_) => StoreError::unavailable(),
            })?;
        let text = |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        let observed = got.first().and_then(text).and_then(|t| {
            let mut parts = t.split(' ');
            Some(Observed {
                backlog: parts.next()?.parse().ok()?,
                lag_ms: parts.next()?.parse().ok()?,
                at_ms: parts.next()?.parse().ok()?,
            })
        });
        let relaying = got
            .get(1)
            .and_then(text)
            .map(|h| instance_of(&h).to_owned());
        Ok(RelayHealth { observed, relaying })
    }

    /// The state of the feed. Works while the store is unreachable (the
    /// position then comes from the database's mirror).
    ///
    /// # Errors
    ///
    /// [`FeedError::Log`] when the database fails.
    pub async fn status(&self) -> Result<FeedStatus, FeedError<L::Error>> {
        let inner = &*self.inner;
        let store = inner.cache.store();
        let op = inner.cache.inner.op_timeout;
        let log = &inner.log;
        let watermark = log.watermark().await.map_err(FeedError::Log)?;
        let overflowed = log
            .overflowed()
            .await
            .map_err(FeedError::Log)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let got = tokio::time::timeout(op * 4, async {
            let pos = store.get(&inner.position_key, None).await?;
            let holder = store.get(inner.lease.key(), None).await?;
            Ok::<_, StoreError>((pos, holder))
        })
        .await
        .unwrap_or(Err(StoreError::timeout()));
        let (position, relaying, store_reachable) = match got {
            Ok((pos, holder)) => (
                pos.as_ref().and_then(parse_position),
                holder.map(|h| instance_of(&String::from_utf8_lossy(&h)).to_owned()),
                true,
            ),
            Err(_) => (
                log.saved_position().await.map_err(FeedError::Log)?,
                None,
                false,
            ),
        };
        let (backlog, lag_ms) = self.observe(position.unwrap_or(0)).await?;
        Ok(FeedStatus {
            position,
            watermark,
            backlog,
            lag_ms,
            relaying,
            overflowed,
            store_reachable,
        })
    }
}
