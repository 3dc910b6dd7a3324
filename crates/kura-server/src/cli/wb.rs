//! `kura flush` and `kura wb status`.

use std::time::Duration;

use anyhow::Context as _;
use kura::Source;
use kura::strategy::write_behind::FlushReport;

use super::{FlushArgs, WbArgs, WbCommand, WbStatusArgs};
use crate::app::{App, open_cache};
use crate::config::Config;
use crate::ops::write_behind::{check_durability, describe, queue_status};
use crate::profiles::Profile;

/// The reader `kura wb status` builds its queue handle on: it only names
/// the queue and never loads.
struct NoSource;

impl Source for NoSource {
    type Value = Profile;
    type Error = std::convert::Infallible;

    async fn load(&self, _id: &str) -> Result<Option<Profile>, std::convert::Infallible> {
        Ok(None)
    }
}

/// `kura flush`.
///
/// # Errors
///
/// When the database or the cache cannot be opened, or (`--once`) the
/// cache server cannot be reached.
pub async fn flush(args: FlushArgs) -> anyhow::Result<()> {
    let mut config = Config::default();
    config.apply_db(&args.db);
    config.apply_cache(&args.cache);
    config.wb = args.wb.config();
    if config.redis_url.is_none() {
        eprintln!(
            "note: no REDIS_URL; this command flushes a memory store of its own, which holds no queued writes of a running server"
        );
    }
    let app = App::open(&config).await?;
    let service = app.service.clone();
    check_durability(service.write_behind(), app.memory_store).await;
    if args.once {
        let mut f = service.flusher().block(Duration::from_millis(200));
        let mut total = FlushReport::default();
        loop {
            let r = f
                .flush_once(true)
                .await
                .context("reading the write-behind queue")?;
            total += r;
            if r.entries == 0 {
                break;
            }
        }
        println!("{}", describe(&total));
        let s = queue_status(service.write_behind(), 0).await?;
        println!(
            "queue now: {} queued ({} taken by other flushers), {} dead letters",
            s.depth, s.in_flight, s.dead_letters
        );
    } else {
        let flushers =
            crate::app::flushers::Flushers::start(&service, config.wb.flushers.max(1), &config);
        super::signal::shutdown_signal().await;
        tracing::info!("stopping: finishing the batches in hand");
        let total = flushers.stop(Duration::from_secs(30)).await;
        tracing::info!("{}", describe(&total));
    }
    service.db().close().await;
    Ok(())
}

/// `kura wb …`.
///
/// # Errors
///
/// When the cache server cannot be reached.
pub async fn wb(args: WbArgs) -> anyhow::Result<()> {
    match args.command {
        WbCommand::Status(a) => status(a).await,
    }
}

async fn status(args: WbStatusArgs) -> anyhow::Result<()> {
    let mut config = Config::default();
    config.apply_cache(&args.cache);
    if config.redis_url.is_none() {
        eprintln!(
            "note: no REDIS_URL; this command reads a memory store of its own, which holds no queued writes of a running server"
        );
    }
    let (cache, _) = open_cache(&config)?;
    let wb = cache.behind(crate::registry::PROFILE, NoSource);
    let s = queue_status(&wb, args.dead_letters)
        .await
        .context("reading the write-behind queue")?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    println!("write-behind queue {}", wb.queue().stream);
    println!("  queued        {}", s.depth);
    println!(
        "  oldest        {:.3} s (the flush lag)",
        s.oldest_age_ms as f64 / 1000.0
    );
    println!("  being applied {}", s.in_flight);
    println!("  dead letters  {}", s.dead_letters);
    for d in &s.recent_dead_letters {
        println!(
            "    {}  user {} version {}: {}",
            d.entry_id, d.id, d.version, d.error
        );
    }
    Ok(())
}
