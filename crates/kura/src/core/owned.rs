//! Values the cache owns rather than loads from a source, such as token
//! blacklist entries: [`Cache::put`] and [`Cache::peek`].

use std::time::{Duration, SystemTime};

use serde::{Serialize, de::DeserializeOwned};

use crate::codec;
use crate::error::Error;
use crate::key::Kind;
use crate::policy::TtlPolicy;

use super::Cache;

impl Cache {
    /// Stores a value the cache owns (not loaded from a source), such as a
    /// token blacklist entry, with the type's TTL.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad id, [`Error::Codec`] for a value that is not
    /// a JSON object, [`Error::Unavailable`] when the store cannot be
    /// reached, or while a pattern invalidation of the type is pending (its
    /// replay would delete the value); the caller decides whether that
    /// matters. An invalidation pending for the key itself is applied first.
    pub async fn put<T: Serialize + ?Sized>(
        &self,
        kind: Kind,
        id: &str,
        value: &T,
    ) -> Result<(), Error> {
        let ttl = self
            .inner
            .policy
            .jittered(self.inner.policy.get(kind.name()).ttl);
        self.put_for(kind, id, value, ttl).await
    }

    /// Like [`Cache::put`], with a TTL that ends at `expires_at` (the token
    /// blacklist: the token's remaining lifetime). A moment already past
    /// stores nothing.
    ///
    /// # Errors
    ///
    /// As [`Cache::put`].
    pub async fn put_until<T: Serialize + ?Sized>(
        &self,
        kind: Kind,
        id: &str,
        value: &T,
        expires_at: SystemTime,
    ) -> Result<(), Error> {
        match TtlPolicy::ttl_until(expires_at) {
            Some(ttl) => self.put_for(kind, id, value, ttl).await,
            None => Ok(()),
        }
    }

    async fn put_for<T: Serialize + ?Sized>(
        &self,
        kind: Kind,
        id: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), Error> {
        kind.validate()?;
        let key = self.inner.keys.value_key(&kind, id)?;
        if ttl.is_zero() {
            return Ok(());
        }
        let enc = codec::encode(value, 0, self.inner.max_value_bytes)?;
        // A replay after this write would delete it.
        self.inner
            .apply_pending_of(&kind, &key)
            .await
            .map_err(Error::Unavailable)?;
        self.inner
            .call(None, self.inner.store.set(&key, enc.envelope, ttl))
            .await
            .map_err(Error::Unavailable)
    }

    /// Reads a value stored with [`Cache::put`]; `None` when absent, on a
    /// store error, when the bytes do not decode, or while an invalidation
    /// of the key (or a pattern over its type) is pending.
    ///
    /// # Errors
    ///
    /// [`Error::Key`] for a bad id.
    pub async fn peek<T: DeserializeOwned>(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<Option<T>, Error> {
        let key = self.inner.keys.value_key(&kind, id)?;
        // An invalidation pending for the key deletes its value.
        if self.inner.distrusts(&kind, &key) {
            return Ok(None);
        }
        Ok(
            match self
                .inner
                .call(None, self.inner.store.get(&key, None))
                .await
            {
                Ok(Some(b)) => codec::decode(&b).ok().map(|d| d.value),
                _ => None,
            },
        )
    }
}
