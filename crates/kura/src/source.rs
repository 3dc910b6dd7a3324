//! The system of record: what a cache-aside read loads from.

use std::future::Future;

use serde::{Serialize, de::DeserializeOwned};

/// A value with a version that every update of its row increases.
///
/// kura orders writes by this number: a write-through update or a fill never
/// replaces a cached value with an older one. Rows without a version can
/// return 0; updates of such values should use invalidation.
pub trait Versioned {
    /// The row version (monotonic per row, below 2^63).
    fn version(&self) -> u64;

    /// The moment the value stops being valid, for values that end at a
    /// fixed time (a revoked token ends at its `exp`). Its cache entry's TTL
    /// is then at most the time left, and a value already past it is not
    /// cached at all. `None` (the default): the type's TTL alone applies.
    fn expires_at(&self) -> Option<std::time::SystemTime> {
        None
    }

    /// The value's tags (see [`crate::tags`]): [`crate::Cache::invalidate_tag`]
    /// of any of them stops the cached copy being served. Each must pass
    /// [`crate::tags::validate_tag`]; a value with a bad tag is served but not
    /// cached. None by default.
    fn tags(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The bounds a cached value needs.
pub trait CacheValue:
    Versioned + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
{
}

impl<T> CacheValue for T where
    T: Versioned + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
{
}

/// The database a [`CacheAside`](crate::CacheAside) reads through.
///
/// # Examples
///
/// ```
/// use std::collections::HashMap;
/// use kura::{Source, Versioned};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct Row { id: String, version: u64 }
/// impl Versioned for Row { fn version(&self) -> u64 { self.version } }
///
/// struct Db(HashMap<String, Row>);
///
/// impl Source for Db {
///     type Value = Row;
///     type Error = std::io::Error;
///     async fn load(&self, id: &str) -> Result<Option<Row>, std::io::Error> {
///         Ok(self.0.get(id).cloned())
///     }
/// }
/// ```
pub trait Source: Send + Sync + 'static {
    /// The cached value type.
    type Value: CacheValue;
    /// The source's error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Loads one value; `Ok(None)` when it does not exist.
    fn load(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Self::Value>, Self::Error>> + Send;

    /// Loads many values in one query where the source can; returns the
    /// found ones with their ids. The default loads one at a time.
    fn load_many(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<(String, Self::Value)>, Self::Error>> + Send {
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(v) = self.load(id).await? {
                    out.push((id.clone(), v));
                }
            }
            Ok(out)
        }
    }
}
