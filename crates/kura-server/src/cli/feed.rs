//! `kura feed sql` and `kura feed status`.

use anyhow::Context as _;

use super::{FeedCommand, FeedCommandArgs, FeedSqlArgs, FeedStatusArgs, SqlDialect, SqlMode};
use crate::app::open_cache;
use crate::config::Config;
use crate::db::Db;
use crate::db::feed::{FeedSource, SqlFeedLog, WalSource, wal_names};
use crate::ops::feed::{Plan, plan, relay, relay_over, status_of, wal_source};

/// `kura feed`.
///
/// # Errors
///
/// When the database cannot be reached or the output cannot be written.
pub async fn command(args: FeedCommandArgs) -> anyhow::Result<()> {
    match args.command {
        FeedCommand::Status(a) => status(a).await,
        FeedCommand::Sql(a) => sql(&a),
    }
}

fn sql(args: &FeedSqlArgs) -> anyhow::Result<()> {
    let backend = match args.backend {
        SqlDialect::Postgres => kura::feed::Backend::Postgres,
        SqlDialect::Sqlite => kura::feed::Backend::Sqlite,
    };
    let mut out = String::new();
    if args.mode == SqlMode::Wal {
        anyhow::ensure!(
            backend == kura::feed::Backend::Postgres,
            "the WAL feed needs PostgreSQL"
        );
        let names = wal_names(&args.namespace);
        if args.remove {
            out.push_str(&format!(
                "DROP PUBLICATION IF EXISTS \"{names}\";\n\
                 SELECT pg_drop_replication_slot('{names}');\n"
            ));
        } else {
            for st in crate::db::feed::wal::publication_sql(&names, &crate::db::feed::wal_tables())
            {
                out.push_str(&st);
                out.push_str(";\n");
            }
            out.push_str(&format!(
                "SELECT pg_create_logical_replication_slot('{names}', 'pgoutput');\n"
            ));
        }
        print!("{out}");
        return Ok(());
    }
    if !args.remove {
        out.push_str(&kura::feed::log_table_sql(backend));
    }
    for spec in crate::db::feed::fed_tables()? {
        out.push_str(&if args.remove {
            spec.remove_sql(backend)
        } else {
            spec.install_sql(backend)
        });
    }
    print!("{out}");
    Ok(())
}

async fn status(args: FeedStatusArgs) -> anyhow::Result<()> {
    let mut config = Config::default();
    config.apply_db(&args.db);
    config.apply_cache(&args.cache);
    if config.redis_url.is_none() {
        eprintln!(
            "note: no REDIS_URL; the position and lease shown are of a memory store of this command's own"
        );
    }
    let db = Db::connect(config.database_url.as_deref(), config.pool)
        .await
        .context("connecting to the database")?;
    let (cache, _) = open_cache(&config)?;
    let wal = plan(&db, &config.feed).await? == Plan::Wal;
    let relay = if wal {
        let url = config.database_url.as_deref().unwrap_or_default();
        relay_over(
            wal_source(&db, url, &config.namespace, &config.feed)?,
            &db,
            &cache,
            &config.feed,
        )
    } else {
        let log = SqlFeedLog::new(db.clone());
        anyhow::ensure!(
            log.exists().await?,
            "the database has no invalidation log (run `kura migrate`)"
        );
        relay(&db, &cache, &config.feed)
    };
    let s = status_of(&relay).await?;
    let slot_lag = match relay.log() {
        FeedSource::Wal(w) => slot_lag(w).await,
        FeedSource::Log(_) => None,
    };
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
        println!(
            "invalidation feed ({}, {})",
            db.backend(),
            relay.log().mode()
        );
        if let Some(bytes) = slot_lag {
            println!("  slot lag     {bytes} bytes of WAL kept");
        }
        println!(
            "  position     {}",
            or_none(s.position.map(|p| p.to_string()))
        );
        println!("  watermark    {}", s.watermark);
        println!("  backlog      {} entries", s.backlog);
        println!("  lag          {} ms", s.lag_ms);
        println!("  relaying     {}", or_none(s.relaying.clone()));
        if !s.overflowed.is_empty() {
            println!(
                "  overflowed   {} (cleared once the cache is reachable)",
                s.overflowed.join(", ")
            );
        }
        if !s.store_reachable {
            println!("  cache        unreachable (position from the database's mirror)");
        }
    }
    db.close().await;
    Ok(())
}

async fn slot_lag(w: &WalSource) -> Option<u64> {
    w.lag_bytes().await.ok().flatten()
}
