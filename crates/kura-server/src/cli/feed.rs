//! `kura feed sql` and `kura feed status`.

use anyhow::Context as _;

use super::{FeedCommand, FeedCommandArgs, FeedSqlArgs, FeedStatusArgs, SqlDialect};
use crate::app::open_cache;
use crate::config::Config;
use crate::db::Db;
use crate::db::feed::SqlFeedLog;
use crate::ops::feed::{relay, status_of};

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
    let log = SqlFeedLog::new(db.clone());
    anyhow::ensure!(
        log.exists().await?,
        "the database has no invalidation log (run `kura migrate`)"
    );
    let (cache, _) = open_cache(&config)?;
    let relay = relay(&db, &cache, &config.feed);
    let s = status_of(&relay).await?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
        println!("invalidation feed ({})", db.backend());
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
