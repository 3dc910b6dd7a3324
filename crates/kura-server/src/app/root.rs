//! Serving: [`serve`] and [`serve_app`] build every part of a running
//! service and start its tasks (the relay, the session flusher, the
//! write-behind flushers, start-up warming, the listeners); [`Server`]
//! stops them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use utoipa::OpenApi;

use super::flushers::Flushers;
use super::router::{ApiDoc, ROUTES, metrics_router, router};
use super::state::{AppState, Shared};
use super::{App, open_cache};
use crate::auth::{Auth, Gate};
use crate::config::Config;
use crate::http::metrics::HttpMetrics;
use crate::http::ratelimit::Limits;
use crate::ops::Ops;
use crate::ops::feed::Feed;
use crate::ops::health::HealthCache;
use crate::ops::write_behind::{check_durability, describe};
use crate::profiles::ProfileService;
use crate::tokens::Tokens;
use crate::userdata::{DocKind, UserData};

/// A listener serving a router until told to stop.
#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Listener {
    async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting and waits up to `grace` for requests in flight.
    async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(r) => r??,
            Err(_) => {
                tracing::warn!(addr = %self.addr, ?grace, "requests still running after the grace period: stopped");
                self.task.abort();
            }
        }
        Ok(())
    }
}

/// `http://<addr>`, with an unspecified address shown as loopback.
fn url_of(mut a: SocketAddr) -> String {
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{a}")
}

/// A running server: its address and a handle to stop it.
#[derive(Debug)]
pub struct Server {
    api: Listener,
    metrics: Option<Listener>,
    state: AppState,
    grace: Duration,
    flushers: Option<Flushers>,
    /// Stops the sessions' background work, and its task.
    tokens: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Server {
    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.api.addr
    }

    /// `http://<addr>`, with an unspecified listen address shown as
    /// loopback.
    #[must_use]
    pub fn url(&self) -> String {
        url_of(self.api.addr)
    }

    /// The address of the `--metrics-listen` listener, when there is one.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr)
    }

    /// `http://<metrics addr>` (as [`Server::url`]), when `/metrics` has a
    /// listener of its own.
    #[must_use]
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_addr().map(url_of)
    }

    /// The service layer (for tests and embedding).
    #[must_use]
    pub fn service(&self) -> &ProfileService {
        &self.state.0.profiles
    }

    /// Revocations and sessions (for tests and embedding).
    #[must_use]
    pub fn tokens(&self) -> &Tokens {
        &self.state.0.tokens
    }

    /// Stops accepting connections, lets requests in flight finish (up to
    /// the configured grace period), stops the write-behind flushers after
    /// their batch in hand, stops the invalidation feed relay, flushes the
    /// cache counters and closes the database pool.
    ///
    /// # Errors
    ///
    /// When the server task failed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let api = self.api.stop(self.grace).await;
        if let Some(m) = self.metrics.take() {
            m.stop(self.grace).await?;
        }
        if let Some(feed) = &self.state.0.ops.feed {
            feed.stop(self.grace).await;
        }
        api?;
        if let Some(f) = self.flushers.take().filter(|f| !f.is_empty()) {
            let r = f.stop(self.grace).await;
            tracing::info!("write-behind flushers stopped: {}", describe(&r));
        }
        if let Some((stop, task)) = self.tokens.take() {
            let _ = stop.send(());
            if tokio::time::timeout(self.grace, task).await.is_err() {
                tracing::warn!("session activity flush still running after the grace period");
            }
        }
        let _ = self.state.0.profiles.cache().flush_metrics().await;
        // A load abandoned by a timed-out request can hold a connection
        // until the next read of its key drives it: don't wait on it.
        if tokio::time::timeout(Duration::from_secs(2), self.state.0.profiles.db().close())
            .await
            .is_err()
        {
            tracing::warn!("database pool closed with connections still in use");
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Opens the database and cache for `config` and starts serving.
///
/// # Errors
///
/// When the database cannot be opened or migrated, the token verification
/// is not configured, or the address cannot be bound.
pub async fn serve(config: Config) -> anyhow::Result<Server> {
    let app = App::open(&config).await?;
    serve_app(app, &config).await
}

/// Starts serving an opened [`App`]: builds the features over its database
/// and cache, the gate of every request, the router, and starts the tasks
/// (the relay, the session activity flush, the write-behind flushers,
/// start-up warming in the background after the listener is bound).
///
/// # Errors
///
/// When the token verification is not configured or the address cannot be
/// bound.
pub async fn serve_app(app: App, config: &Config) -> anyhow::Result<Server> {
    let auth = Auth::new(&config.auth)?;
    auth.prefetch().await;
    let openapi = Bytes::from(ApiDoc::openapi().to_json()?);
    let profiles = Arc::new(app.service);
    let (db, cache) = (profiles.db().clone(), profiles.queued_cache().clone());
    let feed = Feed::open(&db, profiles.cache(), config, app.feed)
        .await?
        .map(Arc::new);
    if let Some(f) = &feed {
        f.set_task(tokio::spawn(f.running())).await;
    }
    let tokens = Tokens::new(
        db.clone(),
        &cache,
        config.revocation,
        feed.is_some(),
        config.max_sessions,
    );
    let userdata = Arc::new(UserData::new(
        db.clone(),
        &cache,
        &config.wb,
        config.write_strategy,
    ));
    let gate = Arc::new(Gate {
        auth,
        admission: Arc::new(tokens.clone()),
    });
    let limits = Limits::new(profiles.cache(), &config.rate_limits, gate.clone());
    let (stop_tokens, tokens_stopped) = oneshot::channel::<()>();
    let tokens_task = tokio::spawn(tokens.clone().run(async move {
        let _ = tokens_stopped.await;
    }));
    let ops = Arc::new(Ops {
        profiles: profiles.clone(),
        userdata: userdata.clone(),
        tokens: tokens.clone(),
        memory_store: app.memory_store,
        openapi,
        feed,
        http_metrics: config.http_metrics.then(|| HttpMetrics::leaked(ROUTES)),
        health: HealthCache::default(),
    });
    let state = AppState(Arc::new(Shared {
        profiles,
        userdata,
        tokens,
        gate,
        ops,
        limits,
    }));
    let api = Listener::bind(config.listen, router(state.clone(), config)).await?;
    let metrics = match config.metrics_listen {
        Some(a) => {
            let m = Listener::bind(a, metrics_router(state.clone(), config)).await?;
            tracing::info!(addr = %m.addr, "serving /metrics");
            Some(m)
        }
        None => None,
    };
    let addr = api.addr;
    let memory_store = state.0.ops.memory_store;
    tracing::info!(%addr, database = db.backend(), cache = if memory_store { "memory" } else { "redis" }, "listening");
    // Any request may ask for `?strategy=behind`, whatever the default
    // strategy and wherever the flushers run: say at start what the queue's
    // store can lose.
    check_durability(state.0.profiles.write_behind(), memory_store).await;
    let mut flushers = Flushers::start(&state.0.profiles, config.wb.flushers, config);
    // One flusher per document queue, with the profile flushers.
    if config.wb.flushers > 0 {
        for kind in [DocKind::Settings, DocKind::Preferences] {
            let f = match config.redis_url.is_some().then(|| open_cache(config)) {
                Some(Ok((cache, _))) => state.0.userdata.flusher_on(kind, &cache),
                _ => state.0.userdata.flusher_on(kind, &cache),
            };
            flushers.spawn(f);
        }
    }
    if config.warm_on_start {
        let service = state.0.profiles.clone();
        let (limit, days) = (config.warm_limit, config.warm_since_days);
        tokio::spawn(async move {
            match service.warm(limit, days, None).await {
                Ok(w) => tracing::info!(
                    cached = w.cached,
                    locked_out = w.locked_out,
                    "start-up warming done"
                ),
                Err(e) => tracing::warn!(error = %e, "start-up warming failed"),
            }
        });
    }
    Ok(Server {
        api,
        metrics,
        state,
        grace: config.shutdown_grace,
        flushers: Some(flushers),
        tokens: Some((stop_tokens, tokens_task)),
    })
}
