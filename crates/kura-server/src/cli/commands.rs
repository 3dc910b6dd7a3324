//! What each `kura` command does.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};

use super::signal::shutdown_signal;
use super::{InvalidateArgs, MigrateArgs, SeedArgs, StatsArgs, TokenArgs, WarmArgs};
use crate::app::{App, Server, open_cache, serve_app};
use crate::auth::sign_hs256;
use crate::config::{Config, ServeArgs};
use crate::db::Db;

/// How many profiles `serve --demo` creates in an empty database.
pub const DEMO_PROFILES: u64 = 1000;

async fn run_until_signal(server: Server) -> anyhow::Result<()> {
    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
    server.shutdown().await
}

/// `kura serve`.
///
/// # Errors
///
/// When the service cannot start.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::from_args(&args);
    if args.demo {
        return demo(config).await;
    }
    if config.redis_url.is_none() {
        tracing::info!("no REDIS_URL: using the embedded in-process cache");
    }
    config.auth.jwks_min_refresh = Duration::from_secs(30);
    let app = App::open(&config).await?;
    let server = serve_app(app, &config).await?;
    run_until_signal(server).await
}

/// `kura serve --demo`: embedded SQLite and memory store, demo data, a
/// fresh secret and a `curl` line to paste.
async fn demo(mut config: Config) -> anyhow::Result<()> {
    config.database_url = None;
    config.redis_url = None;
    if config.listen.ip().is_unspecified() {
        config.listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    config.auth.jwt_secret = Some(secret.clone());
    config.auth.jwks_url = None;
    let app = App::open(&config).await?;
    let db = app.service.db().clone();
    if db.count().await? == 0 {
        let s = crate::profiles::seed::seed(&db, DEMO_PROFILES, 42, |_| {}).await?;
        tracing::info!(inserted = s.inserted, "demo profiles created");
    }
    let user = db
        .active_user_ids(Utc::now() - Duration::from_secs(365 * 86_400), 1)
        .await?
        .into_iter()
        .next()
        .context("the demo database has no profile with a last login")?;
    let admin = uuid::Uuid::new_v4();
    let token = sign_hs256(
        &secret,
        &admin.to_string(),
        true,
        Duration::from_secs(86_400),
        None,
    )?;
    let server = serve_app(app, &config).await?;
    let url = server.url();
    println!();
    println!(
        "kura demo on {url} (SQLite ./{}, in-process cache)",
        crate::db::DEFAULT_SQLITE_FILE
    );
    println!();
    println!("Run this twice: the first answer says `x-cache: miss`, the second `x-cache: hit`.");
    println!();
    println!("  curl -si -H 'Authorization: Bearer {token}' {url}/api/v1/profiles/{user}");
    println!();
    println!(
        "Hit rate: curl -s -H 'Authorization: Bearer {token}' {url}/api/v1/admin/cache/metrics"
    );
    println!("API:      {url}/openapi.json    Metrics: {url}/metrics    Stop: Ctrl-C");
    let _ = std::io::stdout().flush();
    run_until_signal(server).await
}

/// `kura migrate`.
///
/// # Errors
///
/// When the database cannot be reached or migrated.
pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let db = Db::connect(args.db.database_url.as_deref(), args.db.pool()).await?;
    let feed = crate::config::FeedConfig {
        mode: args.invalidation_feed,
        ..crate::config::FeedConfig::default()
    };
    let plan = crate::ops::feed::plan(&db, &feed).await?;
    let before = db.migrate_schema().await?;
    let (plan, done) = crate::ops::feed::prepare(&db, plan, &feed, &args.namespace, true).await?;
    match before {
        0 => println!("schema: up to date ({})", db.backend()),
        n => println!("schema: {n} migrations applied ({})", db.backend()),
    }
    let installed: Vec<&String> = done.iter().filter(|d| !d.contains("schema")).collect();
    let mode = if plan == crate::ops::feed::Plan::Wal {
        "wal"
    } else {
        "log"
    };
    if installed.is_empty() {
        let what = if mode == "wal" {
            "publication and slot"
        } else {
            "triggers"
        };
        println!("invalidation feed ({mode}): {what} up to date");
    } else {
        let list: Vec<&str> = installed.iter().map(|s| s.as_str()).collect();
        println!("invalidation feed ({mode}): {}", list.join("; "));
    }
    db.close().await;
    Ok(())
}

/// `kura seed`.
///
/// # Errors
///
/// When the database fails or the id file cannot be written.
pub async fn seed(args: SeedArgs) -> anyhow::Result<()> {
    let db = Db::connect(args.db.database_url.as_deref(), args.db.pool()).await?;
    db.migrate().await?;
    let started = std::time::Instant::now();
    let bar = ProgressBar::new(args.profiles);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} profiles {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let s =
        crate::profiles::seed::seed(&db, args.profiles, args.seed, |done| bar.set_position(done))
            .await?;
    bar.finish_and_clear();
    if let Some(path) = &args.ids_out {
        let mut out = String::with_capacity(s.user_ids.len() * 37);
        for id in &s.user_ids {
            out.push_str(&id.hyphenated().to_string());
            out.push('\n');
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "seeded {} profiles ({} new) into {} in {:.2?}",
        s.user_ids.len(),
        s.inserted,
        db.backend(),
        started.elapsed()
    );
    db.close().await;
    Ok(())
}

fn cache_config(cache: &crate::config::CacheArgs) -> Config {
    let mut c = Config::default();
    c.apply_cache(cache);
    c
}

fn memory_note(cache: &crate::config::CacheArgs) {
    if cache.redis_url.is_none() {
        eprintln!(
            "note: no REDIS_URL; this command used a memory store of its own, which a running server does not share"
        );
    }
}

/// `kura warm`.
///
/// # Errors
///
/// When the database or the cache server cannot be reached.
pub async fn warm(args: WarmArgs) -> anyhow::Result<()> {
    memory_note(&args.cache);
    let mut config = cache_config(&args.cache);
    config.apply_db(&args.db);
    let app = App::open(&config).await?;
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} warmed {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let w = app
        .service
        .warm(
            args.limit,
            args.since_days,
            Some(Box::new(move |p, total| {
                b.set_length(total);
                b.set_position(p.seen);
                b.set_message(format!("({} cached, {} skipped)", p.cached, p.skipped));
            })),
        )
        .await?;
    bar.finish_and_clear();
    if w.locked_out {
        println!("another instance is warming the cache: nothing done");
    } else {
        println!(
            "cached {} profiles ({} seen, {} skipped, {} failed)",
            w.cached, w.progress.seen, w.progress.skipped, w.progress.failed
        );
    }
    app.service.db().close().await;
    Ok(())
}

/// `kura invalidate`.
///
/// # Errors
///
/// When the cache server cannot be reached or the pattern is malformed.
pub async fn invalidate(args: InvalidateArgs) -> anyhow::Result<()> {
    memory_note(&args.cache);
    let (cache, _) = open_cache(&cache_config(&args.cache))?;
    if let Some(user) = args.user {
        let r = cache
            .invalidate_entity(
                &user.hyphenated().to_string(),
                &crate::registry::user_kinds(),
            )
            .await?;
        anyhow::ensure!(!r.deferred, "cache server unavailable");
        println!("deleted {} entries of user {user}", r.deleted);
    } else if let Some(glob) = &args.pattern {
        let n = cache
            .invalidate_glob(glob, &crate::registry::user_kinds())
            .await?;
        println!("deleted {n} entries matching {glob}");
    } else if let Some(tag) = &args.tag {
        let c = cache.invalidate_tag(tag).await?;
        println!("cleared every value tagged {tag} (epoch {})", c.epoch);
    } else {
        let c = cache.clear(crate::registry::PROFILE).await?;
        let n = cache.sweep(crate::registry::PROFILE, c.epoch).await?;
        println!(
            "cleared every cached profile (epoch {}; {n} removed from the cache)",
            c.epoch
        );
    }
    Ok(())
}

/// `kura stats`.
///
/// # Errors
///
/// When the output cannot be written.
pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    if args.watch {
        return super::watch::run(&args.urls, args.interval, args.iterations).await;
    }
    memory_note(&args.cache);
    let config = cache_config(&args.cache);
    let (cache, _) = open_cache(&config)?;
    let reachable = cache.ping().await.is_ok();
    let s = cache.stats().await;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "cache {}:{}",
            if config.redis_url.is_some() {
                "redis"
            } else {
                "memory"
            },
            config.namespace
        );
        println!("  hits      {}", s.hits);
        println!("  misses    {}", s.misses);
        println!("  total     {}", s.total);
        println!("  hit rate  {:.2} %", s.hit_rate);
    }
    if !reachable {
        eprintln!("warning: the cache server did not answer; counts are this process's only");
    }
    Ok(())
}

/// `kura token`.
///
/// # Errors
///
/// When the secret is empty or signing fails.
pub fn token(args: &TokenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.jwt_secret.is_empty(), "KURA_JWT_SECRET is empty");
    let t = sign_hs256(
        &args.jwt_secret,
        &args.sub.hyphenated().to_string(),
        args.admin,
        Duration::from_secs(args.ttl),
        args.sid.as_deref(),
    )?;
    println!("{t}");
    Ok(())
}
