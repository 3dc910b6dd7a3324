//! Tracing spans around the cache steps, compiled in only with the `spans`
//! feature (the service's `otel` feature turns it on): without it the
//! macros below expand to the bare future, so the steps cost nothing more.
//!
//! | span | around | fields |
//! |---|---|---|
//! | `cache.read` | a [`crate::CacheAside`] read | `cache.type`, `cache.outcome` (hit, miss, stale, bypass), `cache.layer` (l1, l2) |
//! | `cache.lease_wait` | one wait for another caller's fill | `cache.type` |
//! | `cache.load` | a load from the source | `cache.type` |
//! | `cache.fill` | the fill after a load | `cache.type` |
//! | `cache.write` | a write-through invalidation or update | `cache.type`, `cache.op` |
//! | `cache.flush` | one write-behind flush step | `cache.type` |

/// `$fut` inside a span named `$name` with the given fields (`spans`
/// feature), or `$fut` itself. One expression, so that temporaries of
/// `$fut` live to the end of the statement that awaits it.
#[cfg(feature = "spans")]
macro_rules! in_span {
    ($fut:expr, $name:literal $(, $($field:tt)*)?) => {
        tracing::Instrument::instrument($fut, tracing::info_span!($name $(, $($field)*)?))
    };
}

/// `$fut` itself (the `spans` feature is off).
#[cfg(not(feature = "spans"))]
macro_rules! in_span {
    ($fut:expr, $name:literal $(, $($field:tt)*)?) => {
        $fut
    };
}

pub(crate) use in_span;
