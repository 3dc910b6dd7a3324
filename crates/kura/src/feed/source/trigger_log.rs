//! The SQL that makes a database write its own invalidation log.
//!
//! One log table per database ([`log_table_sql`]) is shared by every fed
//! table; each fed table gets triggers ([`TriggerSpec::install_sql`]) that
//! append a row to it in the same transaction as the change, so no writer
//! can change a row without the change reaching the log.
//!
//! | backend | what a fed table gets |
//! |---|---|
//! | PostgreSQL | `BEFORE UPDATE` row trigger: the version goes up when the UPDATE did not raise it; `AFTER INSERT OR UPDATE OR DELETE` row trigger: appends `(kind, id, version or NULL)`; `AFTER ... FOR EACH STATEMENT` trigger: `pg_notify('kura_invalidation', '')`, which PostgreSQL folds into one notification per transaction, unless a busy relay polls anyway (`kura_feed_relay`) |
//! | SQLite | `AFTER INSERT`, `AFTER UPDATE` and `AFTER DELETE` triggers append to the log; the `AFTER UPDATE` one first raises the version when the UPDATE did not (recursive triggers are off by default, so that inner UPDATE fires nothing) |
//!
//! An UPDATE that changes the id logs the old id as deleted and the new one
//! with its version. All statements are idempotent (`CREATE ... IF NOT
//! EXISTS`, `CREATE OR REPLACE FUNCTION`, `DROP TRIGGER IF EXISTS` before
//! each `CREATE TRIGGER`): installing twice is the same as once, and
//! installing again after an upgrade replaces the triggers. Object names are
//! derived from the table: `kura_feed_<table>_{bump,log,notify}` on
//! PostgreSQL, `kura_feed_<table>_{insert,update,delete}` on SQLite.
//!
//! The log table is found through the writer's `search_path` on PostgreSQL
//! (install it in the schema writers use, `public` by default).
//!
//! # Examples
//!
//! ```
//! use kura::Kind;
//! use kura::feed::{Backend, TriggerSpec, log_table_sql};
//!
//! # fn main() -> Result<(), kura::feed::SqlError> {
//! let spec = TriggerSpec::new("profiles", Kind::new("profile"))?
//!     .id_column("user_id")?
//!     .version_column("version")?;
//! let script = format!(
//!     "{}{}",
//!     log_table_sql(Backend::Postgres),
//!     spec.install_sql(Backend::Postgres)
//! );
//! assert!(script.contains("CREATE TRIGGER kura_feed_profiles_log"));
//! # Ok(()) }
//! ```

use crate::key::Kind;

/// The log table every fed table appends to.
pub const LOG_TABLE: &str = "kura_invalidation_log";

/// The table that remembers kinds whose backlog overflowed (see
/// [`crate::feed::Relay`]).
pub const STATE_TABLE: &str = "kura_feed_state";

/// The one-row table mirroring the fleet position (see
/// [`crate::feed::ChangeSource::save_position`]).
pub const POSITION_TABLE: &str = "kura_feed_position";

/// The one-row table (PostgreSQL) where a busy relay says until when it
/// steps at a short interval; the `NOTIFY` trigger skips its wake-up
/// meanwhile (see [`crate::feed::ChangeSource::polling`]).
pub const RELAY_TABLE: &str = "kura_feed_relay";

/// The `LISTEN` channel the PostgreSQL triggers notify.
pub const CHANNEL: &str = "kura_invalidation";

/// The longest table name accepted: the derived object names
/// (`kura_feed_<table>_notify`) must stay within PostgreSQL's 63 bytes,
/// which would otherwise truncate them silently (and two long tables could
/// then share a trigger function).
pub const MAX_TABLE_LEN: usize = 63 - "kura_feed__notify".len();

/// The longest column name accepted (PostgreSQL's identifier limit).
pub const MAX_COLUMN_LEN: usize = 63;

/// A database the SQL is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// PostgreSQL 13 or later (`xid8`, `pg_current_xact_id`).
    Postgres,
    /// SQLite 3.
    Sqlite,
}

/// Why a [`TriggerSpec`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SqlError {
    /// A table or column name is not a plain lowercase identifier.
    #[error("{what} {value:?} must match [a-z_][a-z0-9_]*")]
    BadIdentifier {
        /// Which name was rejected.
        what: &'static str,
        /// The rejected text.
        value: String,
    },
    /// A name is longer than the derived object names allow.
    #[error("{what} {value:?} is longer than {max} bytes")]
    TooLong {
        /// Which name was rejected.
        what: &'static str,
        /// The rejected text.
        value: String,
        /// The limit.
        max: usize,
    },
    /// The kind's name cannot be written to the log (see [`Kind`]).
    #[error("kind name {0:?} must match [a-z0-9_]+")]
    BadKind(String),
    /// The id and version columns are the same column.
    #[error("the id and version columns are both {0:?}")]
    SameColumn(String),
}

fn identifier(what: &'static str, value: &str, max: usize) -> Result<String, SqlError> {
    let mut bytes = value.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(SqlError::BadIdentifier {
            what,
            value: value.to_owned(),
        });
    }
    if value.len() > max {
        return Err(SqlError::TooLong {
            what,
            value: value.to_owned(),
            max,
        });
    }
    Ok(value.to_owned())
}

/// The log table (and the overflow state table) for `backend`; idempotent.
///
/// PostgreSQL: `seq BIGSERIAL PRIMARY KEY, kind TEXT, entity_id TEXT,
/// version BIGINT NULL (NULL: deleted), txid XID8 DEFAULT
/// pg_current_xact_id(), committed_at TIMESTAMPTZ DEFAULT clock_timestamp()`,
/// indexed on `(txid, seq)`: a reader takes the rows of finished
/// transactions by `txid`, not by `seq` (see [`crate::feed`]).
///
/// SQLite: `seq INTEGER PRIMARY KEY AUTOINCREMENT, kind, entity_id, version
/// NULL, committed_at INTEGER` (Unix milliseconds). SQLite commits one
/// writer at a time, so `seq` order is commit order.
///
/// Both: `kura_feed_state (kind TEXT PRIMARY KEY, cut, overflowed_at)`: the
/// kinds whose backlog overflowed, each with the position below which its
/// unapplied rows may be deleted (see [`crate::feed::ChangeSource::mark_overflow`]);
/// `kura_feed_position (id, position, updated_at)`: one row (`id` TRUE on
/// PostgreSQL, 1 on SQLite) mirroring the fleet position.
///
/// PostgreSQL also: `kura_feed_relay (id, polling_until)`, one row: until
/// when a busy relay steps at a short interval, so that the triggers skip
/// their `NOTIFY` (see [`crate::feed::ChangeSource::polling`]).
#[must_use]
pub fn log_table_sql(backend: Backend) -> String {
    log_table_statements(backend).join(";\n") + ";\n"
}

/// [`log_table_sql`] as separate statements, for drivers that run one at a
/// time.
#[must_use]
pub fn log_table_statements(backend: Backend) -> Vec<String> {
    match backend {
        Backend::Postgres => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {LOG_TABLE} (\n  \
                 seq BIGSERIAL PRIMARY KEY,\n  \
                 kind TEXT NOT NULL,\n  \
                 entity_id TEXT NOT NULL,\n  \
                 version BIGINT NULL,\n  \
                 txid XID8 NOT NULL DEFAULT pg_current_xact_id(),\n  \
                 committed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()\n)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {LOG_TABLE}_txid ON {LOG_TABLE} (txid, seq)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {STATE_TABLE} (\n  \
                 kind TEXT PRIMARY KEY,\n  \
                 cut XID8 NOT NULL,\n  \
                 overflowed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()\n)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {POSITION_TABLE} (\n  \
                 id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),\n  \
                 position XID8 NOT NULL,\n  \
                 updated_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()\n)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {RELAY_TABLE} (\n  \
                 id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),\n  \
                 polling_until TIMESTAMPTZ NOT NULL\n)"
            ),
        ],
        Backend::Sqlite => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {LOG_TABLE} (\n  \
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,\n  \
                 kind TEXT NOT NULL,\n  \
                 entity_id TEXT NOT NULL,\n  \
                 version INTEGER NULL,\n  \
                 committed_at INTEGER NOT NULL DEFAULT ({SQLITE_NOW_MS})\n)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {LOG_TABLE}_committed_at ON {LOG_TABLE} (committed_at)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {STATE_TABLE} (\n  \
                 kind TEXT PRIMARY KEY,\n  \
                 cut INTEGER NOT NULL,\n  \
                 overflowed_at INTEGER NOT NULL DEFAULT ({SQLITE_NOW_MS})\n)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {POSITION_TABLE} (\n  \
                 id INTEGER PRIMARY KEY CHECK (id = 1),\n  \
                 position INTEGER NOT NULL,\n  \
                 updated_at INTEGER NOT NULL DEFAULT ({SQLITE_NOW_MS})\n)"
            ),
        ],
    }
}

/// Drops the log and state tables (after every fed table's triggers were
/// removed with [`TriggerSpec::remove_sql`]; a trigger left behind would
/// then fail its writes).
#[must_use]
pub fn drop_log_table_sql(backend: Backend) -> String {
    let _ = backend;
    format!(
        "DROP TABLE IF EXISTS {LOG_TABLE};\nDROP TABLE IF EXISTS {STATE_TABLE};\n\
         DROP TABLE IF EXISTS {POSITION_TABLE};\nDROP TABLE IF EXISTS {RELAY_TABLE};\n"
    )
}

/// The current time in Unix milliseconds, in SQLite.
const SQLITE_NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// One fed table: its name, the cache [`Kind`] its rows are cached as, the
/// column holding the entity id (the id of the cache key) and the version
/// column.
///
/// The version column must be an integer that orders the row's versions
/// (kura's `version`); the triggers keep it rising on every UPDATE, so a
/// writer that does not know about it still orders correctly.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct TriggerSpec {
    table: String,
    kind: Kind,
    id_column: String,
    version_column: String,
}

impl TriggerSpec {
    /// A table cached as `kind`, with columns `id` and `version` (change
    /// them with [`TriggerSpec::id_column`] and
    /// [`TriggerSpec::version_column`]).
    ///
    /// # Errors
    ///
    /// [`SqlError`] when the table name is not `[a-z_][a-z0-9_]*` of at most
    /// [`MAX_TABLE_LEN`] bytes, or the kind's name is not a valid key part.
    pub fn new(table: &str, kind: Kind) -> Result<Self, SqlError> {
        let table = identifier("table", table, MAX_TABLE_LEN)?;
        kind.validate()
            .map_err(|_| SqlError::BadKind(kind.name().to_owned()))?;
        Ok(Self {
            table,
            kind,
            id_column: "id".to_owned(),
            version_column: "version".to_owned(),
        })
    }

    /// The column holding the entity id.
    ///
    /// # Errors
    ///
    /// [`SqlError`] for a name that is not a plain identifier, or that is the
    /// version column.
    pub fn id_column(mut self, column: &str) -> Result<Self, SqlError> {
        self.id_column = identifier("id column", column, MAX_COLUMN_LEN)?;
        self.distinct()
    }

    /// The version column.
    ///
    /// # Errors
    ///
    /// [`SqlError`] for a name that is not a plain identifier, or that is the
    /// id column.
    pub fn version_column(mut self, column: &str) -> Result<Self, SqlError> {
        self.version_column = identifier("version column", column, MAX_COLUMN_LEN)?;
        self.distinct()
    }

    fn distinct(self) -> Result<Self, SqlError> {
        if self.id_column == self.version_column {
            return Err(SqlError::SameColumn(self.id_column));
        }
        Ok(self)
    }

    /// The table.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The cache kind (its name is what the log's `kind` column holds).
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The id column.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id_column
    }

    /// The version column.
    #[must_use]
    pub fn version(&self) -> &str {
        &self.version_column
    }

    fn name(&self, what: &str) -> String {
        format!("kura_feed_{}_{what}", self.table)
    }

    /// The script installing the triggers on `backend` (after
    /// [`log_table_sql`]); idempotent.
    #[must_use]
    pub fn install_sql(&self, backend: Backend) -> String {
        self.install_statements(backend).join(";\n") + ";\n"
    }

    /// [`TriggerSpec::install_sql`] as separate statements.
    #[must_use]
    pub fn install_statements(&self, backend: Backend) -> Vec<String> {
        match backend {
            Backend::Postgres => self.install_postgres(),
            Backend::Sqlite => self.install_sqlite(),
        }
    }

    /// The script removing what [`TriggerSpec::install_sql`] installed
    /// (the shared log table stays: see [`drop_log_table_sql`]); idempotent.
    #[must_use]
    pub fn remove_sql(&self, backend: Backend) -> String {
        self.remove_statements(backend).join(";\n") + ";\n"
    }

    /// [`TriggerSpec::remove_sql`] as separate statements.
    #[must_use]
    pub fn remove_statements(&self, backend: Backend) -> Vec<String> {
        let t = &self.table;
        match backend {
            Backend::Postgres => ["bump", "log", "notify"]
                .iter()
                .flat_map(|w| {
                    [
                        format!("DROP TRIGGER IF EXISTS {} ON \"{t}\"", self.name(w)),
                        format!("DROP FUNCTION IF EXISTS {}()", self.name(w)),
                    ]
                })
                .collect(),
            Backend::Sqlite => ["insert", "update", "delete"]
                .iter()
                .map(|w| format!("DROP TRIGGER IF EXISTS {}", self.name(w)))
                .collect(),
        }
    }

    fn install_postgres(&self) -> Vec<String> {
        let (t, id, v, kind) = (
            &self.table,
            &self.id_column,
            &self.version_column,
            self.kind.name(),
        );
        let (bump, log, notify) = (self.name("bump"), self.name("log"), self.name("notify"));
        let append = |row: &str, version: &str| {
            format!(
                "INSERT INTO {LOG_TABLE} (kind, entity_id, version) \
                 VALUES ('{kind}', {row}.\"{id}\"::text, {version});"
            )
        };
        vec![
            // A writer that does not know the version column leaves it as
            // it was (or sets it lower): the row still gets a newer version,
            // so the cache's version rule orders this change after the
            // previous one.
            format!(
                "CREATE OR REPLACE FUNCTION {bump}() RETURNS trigger LANGUAGE plpgsql AS $kura$\n\
                 BEGIN\n  \
                 IF NEW.\"{v}\" IS NULL OR NEW.\"{v}\" <= OLD.\"{v}\" THEN\n    \
                 NEW.\"{v}\" := COALESCE(OLD.\"{v}\", 0) + 1;\n  \
                 END IF;\n  \
                 RETURN NEW;\n\
                 END\n$kura$"
            ),
            format!(
                "CREATE OR REPLACE FUNCTION {log}() RETURNS trigger LANGUAGE plpgsql AS $kura$\n\
                 BEGIN\n  \
                 IF TG_OP = 'DELETE' THEN\n    {del_old}\n    RETURN NULL;\n  END IF;\n  \
                 IF TG_OP = 'UPDATE' AND NEW.\"{id}\" IS DISTINCT FROM OLD.\"{id}\" THEN\n    \
                 {del_old}\n  END IF;\n  \
                 {put_new}\n  \
                 RETURN NULL;\n\
                 END\n$kura$",
                del_old = append("OLD", "NULL"),
                put_new = append("NEW", &format!("NEW.\"{v}\"")),
            ),
            // One notification per transaction at most: PostgreSQL folds
            // identical notifications of a transaction into one. None while
            // a busy relay steps at a short interval anyway: a NOTIFY takes
            // a database-wide lock at commit, which serializes the commits
            // of a write-heavy database. It is only a wake-up: the relay
            // also polls.
            format!(
                "CREATE OR REPLACE FUNCTION {notify}() RETURNS trigger LANGUAGE plpgsql AS $kura$\n\
                 BEGIN\n  \
                 IF NOT EXISTS (SELECT 1 FROM {RELAY_TABLE} WHERE polling_until > clock_timestamp()) THEN\n    \
                 PERFORM pg_notify('{CHANNEL}', '');\n  \
                 END IF;\n  \
                 RETURN NULL;\nEND\n$kura$"
            ),
            format!("DROP TRIGGER IF EXISTS {bump} ON \"{t}\""),
            format!(
                "CREATE TRIGGER {bump} BEFORE UPDATE ON \"{t}\" \
                 FOR EACH ROW EXECUTE FUNCTION {bump}()"
            ),
            format!("DROP TRIGGER IF EXISTS {log} ON \"{t}\""),
            format!(
                "CREATE TRIGGER {log} AFTER INSERT OR UPDATE OR DELETE ON \"{t}\" \
                 FOR EACH ROW EXECUTE FUNCTION {log}()"
            ),
            format!("DROP TRIGGER IF EXISTS {notify} ON \"{t}\""),
            format!(
                "CREATE TRIGGER {notify} AFTER INSERT OR UPDATE OR DELETE ON \"{t}\" \
                 FOR EACH STATEMENT EXECUTE FUNCTION {notify}()"
            ),
        ]
    }

    fn install_sqlite(&self) -> Vec<String> {
        let (t, id, v, kind) = (
            &self.table,
            &self.id_column,
            &self.version_column,
            self.kind.name(),
        );
        let append = |row: &str, version: &str| {
            format!(
                "INSERT INTO {LOG_TABLE} (kind, entity_id, version) \
                 VALUES ('{kind}', CAST({row}.\"{id}\" AS TEXT), {version});"
            )
        };
        // The version the row has after the bump below.
        let new_version = format!(
            "CASE WHEN NEW.\"{v}\" IS NULL OR NEW.\"{v}\" <= OLD.\"{v}\" \
             THEN COALESCE(OLD.\"{v}\", 0) + 1 ELSE NEW.\"{v}\" END"
        );
        let (ins, upd, del) = (
            self.name("insert"),
            self.name("update"),
            self.name("delete"),
        );
        vec![
            format!("DROP TRIGGER IF EXISTS {ins}"),
            format!(
                "CREATE TRIGGER {ins} AFTER INSERT ON \"{t}\" FOR EACH ROW BEGIN\n  {}\nEND",
                append("NEW", &format!("NEW.\"{v}\""))
            ),
            format!("DROP TRIGGER IF EXISTS {upd}"),
            // One trigger for the bump and the log rows, so the logged
            // version does not depend on the order SQLite fires triggers in.
            format!(
                "CREATE TRIGGER {upd} AFTER UPDATE ON \"{t}\" FOR EACH ROW BEGIN\n  \
                 UPDATE \"{t}\" SET \"{v}\" = COALESCE(OLD.\"{v}\", 0) + 1 \
                 WHERE \"{id}\" = NEW.\"{id}\" AND (NEW.\"{v}\" IS NULL OR NEW.\"{v}\" <= OLD.\"{v}\");\n  \
                 INSERT INTO {LOG_TABLE} (kind, entity_id, version) \
                 SELECT '{kind}', CAST(OLD.\"{id}\" AS TEXT), NULL WHERE NEW.\"{id}\" IS NOT OLD.\"{id}\";\n  \
                 {}\nEND",
                append("NEW", &new_version)
            ),
            format!("DROP TRIGGER IF EXISTS {del}"),
            format!(
                "CREATE TRIGGER {del} AFTER DELETE ON \"{t}\" FOR EACH ROW BEGIN\n  {}\nEND",
                append("OLD", "NULL")
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        assert!(TriggerSpec::new("profiles", Kind::new("profile")).is_ok());
        for bad in ["", "Profiles", "1abc", "a-b", "a b", "p\"; drop", "é"] {
            assert!(
                matches!(
                    TriggerSpec::new(bad, Kind::new("profile")),
                    Err(SqlError::BadIdentifier { .. })
                ),
                "{bad:?}"
            );
        }
        let long = "t".repeat(MAX_TABLE_LEN + 1);
        assert!(matches!(
            TriggerSpec::new(&long, Kind::new("profile")),
            Err(SqlError::TooLong { .. })
        ));
        let spec = TriggerSpec::new("profiles", Kind::new("profile")).unwrap();
        assert!(spec.clone().id_column("user id").is_err());
        assert_eq!(
            spec.clone().id_column("version"),
            Err(SqlError::SameColumn("version".into()))
        );
        assert!(matches!(
            TriggerSpec::new("t", Kind::new("Bad'kind")),
            Err(SqlError::BadKind(_))
        ));
    }

    #[test]
    fn derived_names_fit_postgres_identifiers() {
        let t = "t".repeat(MAX_TABLE_LEN);
        let spec = TriggerSpec::new(&t, Kind::new("profile")).unwrap();
        assert!(spec.name("notify").len() <= 63);
        assert!(spec.name("insert").len() <= 63);
    }
}
