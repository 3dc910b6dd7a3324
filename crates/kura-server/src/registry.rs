//! The one registry of the types this service caches: each type is defined
//! here once (its name and key shape, its TTL and policies, its table in
//! the database and how the invalidation feed names it, its near-cache
//! default), and every list of types the service needs (the TTL table, the
//! `--near-cache` / `--eager-refresh` names, the fed tables and kinds, a
//! user's kinds, the metrics labels) is derived from [`TYPES`].
//!
//! Adding a cached type is one entry in [`TYPES`] (and its constant), plus
//! its table (a migration) and the code that serves it.
//!
//! The library ([`kura`]) knows no application type: [`kura::Kind`] is a
//! mechanism (a name and a key shape) and [`kura::TtlPolicy`] starts empty.

use std::time::Duration;

use kura::{Adaptive, Kind, TtlPolicy, TypePolicy};
use uuid::Uuid;

/// User profiles: `cache:profile:<user_id>`.
pub const PROFILE: Kind = Kind::new("profile");
/// User settings: `cache:settings:<user_id>`.
pub const SETTINGS: Kind = Kind::new("settings");
/// User preferences: `cache:preferences:<user_id>`.
pub const PREFERENCES: Kind = Kind::new("preferences");
/// Sessions: `cache:session:<session key>`.
pub const SESSION: Kind = Kind::new("session");
/// The token blacklist (revoked tokens and sessions):
/// `cache:blacklist:<id>`; each entry ends with its token.
pub const BLACKLIST: Kind = Kind::new("blacklist");

/// The cache key id of a user: the lowercase hyphenated UUID, written into
/// a stack buffer (no allocation on the read path).
#[must_use]
pub fn user_key_id<'b>(id: &Uuid, buf: &'b mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &'b str {
    id.hyphenated().encode_lower(buf)
}

/// How the invalidation feed sees a type's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// The table.
    pub table: &'static str,
    /// The column the cache key's id comes from.
    pub id_column: &'static str,
    /// The version column.
    pub version_column: &'static str,
}

/// Who a type's entries belong to, for the entity-wide operations
/// (`DELETE /api/v1/profiles/{user_id}`, `kura invalidate --user`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Keyed by the user id: removed with the user.
    User,
    /// Keyed by something else (a token or session id).
    Other,
}

/// One cached type.
#[derive(Debug, Clone, Copy)]
pub struct CachedType {
    /// The kind: its name (TTL policy, metrics label) and key shape.
    pub kind: Kind,
    /// Its caching policy by default (`--ttl`, `--max-stale`,
    /// `--eager-refresh` and the load timeouts change it).
    pub policy: TypePolicy,
    /// Its table, when the invalidation feed covers it.
    pub fed: Option<Fed>,
    /// Entries of one user, or not.
    pub owner: Owner,
    /// Near-cache entries it gets by default in the serving process (`None`:
    /// off unless `--near-cache` turns it on).
    pub near_default: Option<u64>,
    /// Whether `--near-cache`, `--eager-refresh` and the load timeouts may
    /// name it.
    pub configurable: bool,
}

const fn secs(s: u64) -> TypePolicy {
    TypePolicy::new(Duration::from_secs(s))
}

/// The seed's adaptive rule: more than 10 reads in an hour → twice the TTL
/// (600 s for profiles).
pub const HOT: Adaptive = Adaptive::new(10, Duration::from_secs(3600), Duration::from_secs(600));

/// Near-cache entries of the token kinds (`blacklist`, `session`) unless
/// `--near-cache` sets them: they are checked on every request.
pub const DEFAULT_TOKEN_NEAR_ENTRIES: u64 = 100_000;

/// Every type the service caches, each once.
pub const TYPES: &[CachedType] = &[
    CachedType {
        kind: PROFILE,
        policy: secs(300).adaptive(HOT),
        fed: Some(Fed {
            table: "profiles",
            id_column: "user_id",
            version_column: "version",
        }),
        owner: Owner::User,
        near_default: None,
        configurable: true,
    },
    CachedType {
        kind: SETTINGS,
        policy: secs(1800),
        fed: Some(Fed {
            table: "settings",
            id_column: "user_id",
            version_column: "version",
        }),
        owner: Owner::User,
        near_default: None,
        configurable: true,
    },
    CachedType {
        kind: PREFERENCES,
        policy: secs(1800),
        fed: Some(Fed {
            table: "preferences",
            id_column: "user_id",
            version_column: "version",
        }),
        owner: Owner::User,
        near_default: None,
        configurable: true,
    },
    CachedType {
        kind: BLACKLIST,
        // Each entry's TTL is its token's remaining lifetime; this is only
        // the bound of an entry without one. "Not revoked" is kept as long
        // as a revocation: a revocation removes it at once (and the feed
        // covers the table), and a token seen once keeps being checked from
        // the cache through a database outage.
        policy: secs(3600).absent_ttl(Duration::from_secs(3600)),
        fed: Some(Fed {
            table: "revocations",
            id_column: "key_id",
            version_column: "version",
        }),
        owner: Owner::Other,
        near_default: Some(DEFAULT_TOKEN_NEAR_ENTRIES),
        configurable: true,
    },
    CachedType {
        kind: SESSION,
        policy: secs(3600),
        fed: None,
        owner: Owner::Other,
        near_default: Some(DEFAULT_TOKEN_NEAR_ENTRIES),
        configurable: true,
    },
];

/// The seed's TTLs of types this service does not cache but whose names it
/// keeps (`rate_limit`: the rate limiter's keys; `document_meta`: the
/// seed's document metadata, not served by this service).
const OTHER_TTLS: &[(&str, u64)] = &[("rate_limit", 3600), ("document_meta", 600)];

/// The registered type named `name`.
#[must_use]
pub fn named(name: &str) -> Option<&'static CachedType> {
    TYPES.iter().find(|t| t.kind.name() == name)
}

/// The kind named `name`, if registered.
#[must_use]
pub fn kind_named(name: &str) -> Option<Kind> {
    named(name).map(|t| t.kind)
}

/// The names `--near-cache`, `--eager-refresh` and the load timeouts
/// accept.
#[must_use]
pub fn configurable_names() -> Vec<&'static str> {
    TYPES
        .iter()
        .filter(|t| t.configurable)
        .map(|t| t.kind.name())
        .collect()
}

/// The kinds of one user's entries (profile, settings, preferences).
#[must_use]
pub fn user_kinds() -> Vec<Kind> {
    TYPES
        .iter()
        .filter(|t| t.owner == Owner::User)
        .map(|t| t.kind)
        .collect()
}

/// The kinds the invalidation feed relays.
#[must_use]
pub fn fed_kinds() -> Vec<Kind> {
    TYPES
        .iter()
        .filter(|t| t.fed.is_some())
        .map(|t| t.kind)
        .collect()
}

/// The fed tables with their kinds.
#[must_use]
pub fn fed_tables() -> Vec<(Kind, Fed)> {
    TYPES
        .iter()
        .filter_map(|t| Some((t.kind, t.fed?)))
        .collect()
}

/// The TTL table of the registered types (before flags change it).
#[must_use]
pub fn ttl_policy() -> TtlPolicy {
    let mut p = TtlPolicy::default();
    for t in TYPES {
        p.set(t.kind.name(), t.policy);
    }
    for (name, s) in OTHER_TTLS {
        p.set(name, secs(*s));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_valid() {
        let mut names: Vec<&str> = TYPES.iter().map(|t| t.kind.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TYPES.len());
        for t in TYPES {
            t.kind.validate().unwrap();
        }
    }

    #[test]
    fn the_seed_table() {
        let p = ttl_policy();
        for (t, s) in [
            ("profile", 300),
            ("session", 3600),
            ("rate_limit", 3600),
            ("document_meta", 600),
            ("settings", 1800),
            ("preferences", 1800),
            ("other", 300),
        ] {
            assert_eq!(p.get(t).ttl, Duration::from_secs(s), "{t}");
        }
        assert_eq!(p.get("profile").adaptive, Some(HOT));
        assert!(p.get("session").adaptive.is_none());
        assert_eq!(p.get("blacklist").absent_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn derived_lists() {
        assert_eq!(user_kinds(), vec![PROFILE, SETTINGS, PREFERENCES]);
        assert_eq!(fed_kinds(), vec![PROFILE, SETTINGS, PREFERENCES, BLACKLIST]);
        assert_eq!(kind_named("session"), Some(SESSION));
        assert_eq!(kind_named("nope"), None);
    }
}
