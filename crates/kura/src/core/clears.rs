//! How the cache applies clears and tag invalidations ([`crate::tags`]):
//! the check of a value read against the stamps, the epoch a load records,
//! whether a fill may be written, and the bump of a clear. This process's
//! copy of the stamps is [`crate::consistency::stamps`].

use crate::error::Error;
use crate::key::Kind;

use super::CacheInner;

impl CacheInner {
    /// Whether a value of `kind` in `bytes` may be served; reads the
    /// stamps when this process's copy cannot be trusted. `None` when they
    /// cannot be read (the caller answers from the source).
    pub(crate) async fn admits(&self, kind: &Kind, bytes: &[u8]) -> Option<bool> {
        if let Some(ok) = self.stamps.admits_now(&*self.store, kind.name(), bytes) {
            return Some(ok);
        }
        let read = self.call(None, self.store.stamps(self.stamps.key()));
        match self.stamps.current(&*self.store, read).await {
            Ok(t) => Some(t.admits(kind.name(), &crate::codec::peek_meta(bytes))),
            Err(e) => {
                tracing::debug!(error = %e, "stamps unreadable: answering from the source");
                None
            }
        }
    }

    /// The epoch a load starting now records: the trusted copy's, read
    /// first when the copy cannot be trusted (a process that never read the
    /// hash would otherwise stamp its first fills with 0, and every reader
    /// that knows a past clear would refuse them). When the hash cannot be
    /// read, the last copy's: the fill then goes to a store that is likely
    /// unreachable too, and an older epoch only makes its value refused
    /// sooner.
    pub(crate) async fn load_epoch(&self) -> u64 {
        if let Some(t) = self.stamps.cached(&*self.store) {
            return t.epoch;
        }
        let read = self.call(None, self.store.stamps(self.stamps.key()));
        match self.stamps.current(&*self.store, read).await {
            Ok(t) => t.epoch,
            Err(_) => self.stamps.last().epoch,
        }
    }

    /// Whether a value of `kind` with `tags`, loaded from `epoch`, may be
    /// written: not when this process already knows a clear that covers it.
    pub(crate) fn writable(&self, kind: &Kind, epoch: u64, tags: &[String]) -> bool {
        self.stamps.last().admits_tags(kind.name(), epoch, tags)
    }

    /// Bumps the stamps hash's `field` (one step, see [`crate::tags`]) and
    /// applies it in this process before returning; returns the epoch.
    pub(crate) async fn bump(&self, field: &str) -> Result<u64, Error> {
        let key = self.stamps.key().to_owned();
        let held = self.stamps.last().epoch;
        let epoch = self
            .call(None, self.store.bump_stamp(&key, field, held))
            .await
            .map_err(Error::Unavailable)?;
        // No read that starts now joins a load that began before.
        self.epochs.bump_all();
        self.stamps.changed_here();
        // Read back now, so this process's next reads need not.
        let read = self.call(None, self.store.stamps(&key));
        let _ = self.stamps.current(&*self.store, read).await;
        Ok(epoch)
    }
}
