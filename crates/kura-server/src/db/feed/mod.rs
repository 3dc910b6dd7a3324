//! Where the invalidation feed reads the database's changes: the trigger
//! log installed in the fed tables ([`Db::install_feed`], read by
//! [`SqlFeedLog`] in `log.rs`), or PostgreSQL's WAL through a replication
//! slot and a publication ([`Db::install_wal_feed`], read by [`WalSource`]
//! in `wal.rs`). [`FeedSource`] is either, for the relay.
//!
//! The log table and the triggers that fill it are the library's
//! ([`kura::feed`] generates the SQL; [`Db::migrate`] installs it).

use kura::feed::source::trigger_log::log_table_statements;
use kura::feed::{Backend, TriggerSpec};

use super::sql::{sql, sql_built, sql_native};
use super::{Db, DbError};

mod log;
mod source;
pub mod wal;

pub use log::SqlFeedLog;
pub use source::FeedSource;
pub use wal::{WalSource, WalTarget};

/// The fed tables as the WAL feed maps them (schema `public`).
#[must_use]
pub fn wal_tables() -> Vec<kura::feed::source::wal::WalTable> {
    crate::registry::fed_tables()
        .into_iter()
        .map(|(kind, fed)| kura::feed::source::wal::WalTable {
            schema: "public".to_owned(),
            table: fed.table.to_owned(),
            kind: kind.name().to_owned(),
            id_column: fed.id_column.to_owned(),
        })
        .collect()
}

/// The slot's and the publication's name for a cache namespace:
/// `kura_<namespace>`, lowercased, other characters than letters, digits
/// and `_` made `_` (PostgreSQL's rule for slot names), at most 63 bytes.
#[must_use]
pub fn wal_names(namespace: &str) -> String {
    let mut s = String::from("kura_");
    s.extend(namespace.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c.to_ascii_lowercase()
        } else {
            '_'
        }
    }));
    s.truncate(63);
    s
}

/// What [`Db::install_wal_feed`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalInstalled {
    /// The publication was created or its tables changed.
    pub publication: bool,
    /// The replication slot was created.
    pub slot: bool,
    /// kura's log triggers were removed from the fed tables.
    pub triggers_removed: bool,
}

/// The tables this service feeds to the cache: `profiles`, cached as
/// `profile` under its `user_id`.
///
/// # Errors
///
/// Never for these names; the library validates every identifier.
pub fn fed_tables() -> Result<Vec<TriggerSpec>, DbError> {
    crate::registry::fed_tables()
        .into_iter()
        .map(|(kind, fed)| {
            Ok(TriggerSpec::new(fed.table, kind)?
                .id_column(fed.id_column)?
                .version_column(fed.version_column)?)
        })
        .collect()
}

/// What [`Db::install_feed`] records per fed table, so that a start-up
/// with the same library SQL changes nothing.
const INSTALLED_TABLE: &str = "kura_feed_installed";

/// Serializes concurrent installs (several instances starting at once) on
/// PostgreSQL: `kurafeed` in ASCII.
const INSTALL_LOCK: i64 = 0x6b75_7261_6665_6564;

impl Db {
    /// Prepares the WAL feed (PostgreSQL): checks every fed table can be
    /// fed from the WAL ([`wal::check_tables`]), removes kura's log
    /// triggers from them, makes the publication `names` cover exactly the
    /// fed tables, and, with `make_slot`, creates the replication slot
    /// `names` if missing (`kura migrate`: the WAL is kept from then on; a
    /// serving instance leaves a missing slot to its relay, which makes it
    /// and clears the fed types, since changes may have been missed).
    /// Installs nothing in the fed tables. Idempotent.
    ///
    /// # Errors
    ///
    /// [`DbError::Row`] naming a table that cannot be fed (no primary key,
    /// keyed by another column); [`DbError`] on a database failure.
    pub async fn install_wal_feed(
        &self,
        names: &str,
        make_slot: bool,
    ) -> Result<WalInstalled, DbError> {
        let tables = wal_tables();
        wal::check_tables(self, &tables)
            .await?
            .map_err(DbError::Row)?;
        let mut done = WalInstalled::default();
        let had_triggers = sql(
            "SELECT count(*) AS n FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'kura_feed_%'",
        )
        .fetch_one(self)
        .await?
        .int("n")?;
        if had_triggers > 0 {
            self.remove_feed().await?;
            done.triggers_removed = true;
        }
        let mut want: Vec<String> = tables
            .iter()
            .map(|t| format!("{}.{}", t.schema, t.table))
            .collect();
        want.sort();
        let have = sql(
            "SELECT schemaname || '.' || tablename AS t FROM pg_publication_tables \
             WHERE pubname = $1 ORDER BY 1",
        )
        .bind(names)
        .fetch_all(self)
        .await?
        .iter()
        .map(|r| r.text("t"))
        .collect::<Result<Vec<_>, _>>()?;
        let exists = sql("SELECT count(*) AS n FROM pg_publication WHERE pubname = $1")
            .bind(names)
            .fetch_one(self)
            .await?
            .int("n")?
            > 0;
        if !exists || have != want {
            let mut tx = self.begin().await?;
            sql("SELECT pg_advisory_xact_lock($1)")
                .bind(INSTALL_LOCK)
                .execute(&mut tx)
                .await?;
            for st in wal::publication_sql(names, &tables) {
                sql_native(st).execute(&mut tx).await?;
            }
            tx.commit().await?;
            done.publication = true;
        }
        let slot = sql("SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name = $1")
            .bind(names)
            .fetch_one(self)
            .await?
            .int("n")?;
        if slot == 0 && make_slot {
            match wal::create_slot(self, names).await {
                Ok(_) => done.slot = true,
                // Another instance made it meanwhile.
                Err(e) if e.to_string().contains("already exists") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Removes the WAL feed's publication and slot `names` (a database
    /// going back to the trigger log, or dropped from the fleet).
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure (a slot still being streamed
    /// cannot be dropped).
    pub async fn remove_wal_feed(&self, names: &str) -> Result<(), DbError> {
        sql_native(format!(
            "DROP PUBLICATION IF EXISTS \"{}\"",
            names.replace('"', "\"\"")
        ))
        .execute(self)
        .await?;
        sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(names)
            .fetch_all(self)
            .await?;
        Ok(())
    }

    /// The library's SQL dialect for this database.
    #[must_use]
    pub fn feed_backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Installs the invalidation log and the triggers of [`fed_tables`],
    /// with the SQL the library generates ([`kura::feed::log_table_sql`],
    /// [`TriggerSpec::install_sql`]); returns the tables (re)installed.
    ///
    /// Idempotent, and a no-op when the installed SQL is the library's
    /// and every trigger is in place: re-creating a trigger locks its
    /// table against every read and write (PostgreSQL's `DROP TRIGGER`
    /// takes an `ACCESS EXCLUSIVE` lock, queued behind any long
    /// transaction on it), which a fleet restarting one instance after
    /// another must not do each time. A trigger dropped by hand, or SQL
    /// changed by an upgrade, is installed again.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure; nothing is half-installed (one
    /// transaction).
    pub async fn install_feed(&self) -> Result<Vec<String>, DbError> {
        let backend = self.feed_backend();
        let mut done = Vec::new();
        for spec in fed_tables()? {
            let mut statements = log_table_statements(backend);
            statements.extend(spec.install_statements(backend));
            let script = statements.join(";\n");
            let triggers = statements
                .iter()
                .filter(|s| s.starts_with("CREATE TRIGGER"))
                .count();
            let prefix = format!("kura_feed_{}_%", spec.table());
            let record = format!(
                "CREATE TABLE IF NOT EXISTS {INSTALLED_TABLE} \
                 (name TEXT PRIMARY KEY, script TEXT NOT NULL)"
            );
            let mut tx = self.begin().await?;
            if tx.is_postgres() {
                sql("SELECT pg_advisory_xact_lock($1)")
                    .bind(INSTALL_LOCK)
                    .execute(&mut tx)
                    .await?;
            }
            sql_built(record).execute(&mut tx).await?;
            let have = sql_built(format!(
                "SELECT script FROM {INSTALLED_TABLE} WHERE name = $1"
            ))
            .bind(spec.table())
            .fetch_optional(&mut tx)
            .await?
            .map(|r| r.text("script"))
            .transpose()?;
            // The catalogs differ: the one question asked two ways.
            let present = sql(if tx.is_postgres() {
                "SELECT count(*) AS n FROM pg_trigger WHERE NOT tgisinternal \
                 AND tgrelid = to_regclass($1) AND tgname LIKE $2 AND tgenabled <> 'D'"
            } else {
                "SELECT count(*) AS n FROM sqlite_master WHERE type = 'trigger' \
                 AND tbl_name = $1 AND name LIKE $2"
            })
            .bind(spec.table())
            .bind(prefix.as_str())
            .fetch_one(&mut tx)
            .await?
            .int("n")?;
            let current = have.as_deref() == Some(script.as_str())
                && usize::try_from(present).ok() == Some(triggers);
            if !current {
                for st in &statements {
                    sql_native(st.clone()).execute(&mut tx).await?;
                }
                sql_built(format!(
                    "INSERT INTO {INSTALLED_TABLE} (name, script) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET script = excluded.script"
                ))
                .bind(spec.table())
                .bind(script.as_str())
                .execute(&mut tx)
                .await?;
            }
            tx.commit().await?;
            let installed = !current;
            if installed {
                tracing::debug!(table = spec.table(), backend = ?backend, "invalidation feed triggers installed");
                done.push(spec.table().to_owned());
            }
        }
        Ok(done)
    }

    /// Removes the triggers of [`fed_tables`] and their record (the log
    /// table stays, with what it holds): writes to those tables stop
    /// reaching the log. The next [`Db::migrate`] installs them again.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure.
    pub async fn remove_feed(&self) -> Result<(), DbError> {
        let backend = self.feed_backend();
        for spec in fed_tables()? {
            let mut statements = spec.remove_statements(backend);
            statements.push(format!(
                "DELETE FROM {INSTALLED_TABLE} WHERE name = '{}'",
                spec.table()
            ));
            let mut tx = self.begin().await?;
            if tx.is_postgres() {
                sql("SELECT pg_advisory_xact_lock($1)")
                    .bind(INSTALL_LOCK)
                    .execute(&mut tx)
                    .await?;
            }
            sql_built(format!(
                "CREATE TABLE IF NOT EXISTS {INSTALLED_TABLE} \
                 (name TEXT PRIMARY KEY, script TEXT NOT NULL)"
            ))
            .execute(&mut tx)
            .await?;
            for st in statements {
                sql_native(st).execute(&mut tx).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }
}
