//! [`FeedSource`]: the trigger log or the WAL, as one [`ChangeSource`] for
//! the relay.

use std::time::Duration;

use kura::feed::{ChangeSource, FeedEvent};

use super::{SqlFeedLog, WalSource};
use crate::db::DbError;

/// Where the relay reads the database's changes.
#[derive(Debug)]
pub enum FeedSource {
    /// The trigger log (`--invalidation-feed log`; SQLite always).
    Log(SqlFeedLog),
    /// PostgreSQL's WAL (`--invalidation-feed wal`).
    Wal(WalSource),
}

impl FeedSource {
    /// `log` or `wal`.
    #[must_use]
    pub fn mode(&self) -> &'static str {
        match self {
            FeedSource::Log(_) => "log",
            FeedSource::Wal(_) => "wal",
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            FeedSource::Log($s) => $e,
            FeedSource::Wal($s) => $e,
        }
    };
}

impl ChangeSource for FeedSource {
    type Error = DbError;

    async fn watermark(&self) -> Result<u64, DbError> {
        each!(self, s => s.watermark().await)
    }

    async fn read(
        &self,
        from: u64,
        to: u64,
        after: Option<(u64, i64)>,
        limit: usize,
    ) -> Result<Vec<(u64, FeedEvent)>, DbError> {
        each!(self, s => s.read(from, to, after, limit).await)
    }

    async fn oldest(&self) -> Result<Option<u64>, DbError> {
        each!(self, s => s.oldest().await)
    }

    async fn backlog(&self, from: u64) -> Result<u64, DbError> {
        each!(self, s => s.backlog(from).await)
    }

    async fn release(&self, below: u64, before_ms: i64, limit: usize) -> Result<u64, DbError> {
        each!(self, s => s.release(below, before_ms, limit).await)
    }

    async fn wait(&self, timeout: Duration) {
        each!(self, s => s.wait(timeout).await);
    }

    async fn overflowed(&self) -> Result<Vec<(String, u64)>, DbError> {
        each!(self, s => s.overflowed().await)
    }

    async fn mark_overflow(&self, kinds: &[String], cut: u64) -> Result<(), DbError> {
        each!(self, s => s.mark_overflow(kinds, cut).await)
    }

    async fn clear_overflow(&self, kinds: &[(String, u64)]) -> Result<(), DbError> {
        each!(self, s => s.clear_overflow(kinds).await)
    }

    async fn prune_overflowed(&self, limit: usize) -> Result<u64, DbError> {
        each!(self, s => s.prune_overflowed(limit).await)
    }

    async fn save_position(&self, position: u64) -> Result<(), DbError> {
        each!(self, s => s.save_position(position).await)
    }

    async fn saved_position(&self) -> Result<Option<u64>, DbError> {
        each!(self, s => s.saved_position().await)
    }

    async fn polling(&self, window: Duration) -> Result<bool, DbError> {
        each!(self, s => s.polling(window).await)
    }

    async fn lead(&self, leading: bool) {
        each!(self, s => s.lead(leading).await);
    }

    fn regressions(&self) -> bool {
        each!(self, s => s.regressions())
    }
}
