//! The load itself: one task per worker, each with one keep-alive HTTP/1.1 connection.
//!
//! Everything a request needs that does not change is built once in [`Plan`]; per request a
//! worker only samples an id, expands the path into a reused buffer and clones the prepared
//! headers. Each worker records into its own histogram and counters, merged once at the end,
//! so workers share nothing on the hot path but two atomic counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderMap, HeaderName};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::report::{WorkerStats, XCache};
use crate::sampler::IdSampler;
use crate::target::Target;
use crate::template::Template;

/// Pause after a failed connect, so a closed port does not turn the run into a busy loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// How late a timer may fire (Tokio's timer has millisecond granularity) without the delay
/// being charged to the request in an open loop.
const TIMER_SLACK: Duration = Duration::from_millis(2);

static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The body of each request.
#[derive(Debug, Clone)]
pub(crate) enum BodyPlan {
    /// No body (GET).
    Empty,
    /// The same bytes every time (cloning `Bytes` only bumps a reference count).
    Fixed(Bytes),
    /// Expanded per request.
    Template(Template),
}

/// What every request of the run is made of, prepared once.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) target: Target,
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    /// Base path + `--path` + `?--query`.
    pub(crate) path: Template,
    pub(crate) body: BodyPlan,
    pub(crate) sampler: IdSampler,
    pub(crate) timeout: Duration,
    pub(crate) rate: Option<f64>,
    pub(crate) max_requests: u64,
    /// Upper bound of the latency histograms.
    pub(crate) max_latency: Duration,
}

/// When the phases of the run begin and end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// Warm-up begins (and the open-loop schedule starts).
    pub(crate) start: Instant,
    /// Measuring begins.
    pub(crate) measure_start: Instant,
    /// Measuring ends: requests still in flight are abandoned.
    pub(crate) deadline: Instant,
}

/// State the workers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) plan: Plan,
    pub(crate) clock: Clock,
    /// Measured requests claimed so far (may overshoot `max_requests` by the workers that
    /// found the bound reached).
    pub(crate) claimed: AtomicU64,
    /// Next slot of the open-loop schedule.
    pub(crate) tickets: AtomicU64,
}

/// A keep-alive connection; dropping it closes the socket, even with a request in flight.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The driver would otherwise wait forever for a reply the run no longer wants.
        self.driver.abort();
    }
}

#[derive(Debug)]
enum ExchangeError {
    Connect,
    Http,
}

async fn connect(target: &Target) -> Result<Conn, ExchangeError> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|_| ExchangeError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| ExchangeError::Connect)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::trace!(error = %e, "bench connection ended");
        }
    });
    Ok(Conn { sender, driver })
}

/// Sends one request on the worker's connection (opening it if needed) and reads the whole
/// response, so the connection can carry the next one.
async fn exchange(
    conn: &mut Option<Conn>,
    target: &Target,
    req: Request<Full<Bytes>>,
) -> Result<(u16, XCache), ExchangeError> {
    if conn.as_ref().is_none_or(|c| c.sender.is_closed()) {
        *conn = None;
        *conn = Some(connect(target).await?);
    }
    let sender = &mut conn.as_mut().expect("connected above").sender;
    sender.ready().await.map_err(|_| ExchangeError::Http)?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|_| ExchangeError::Http)?;
    let status = response.status().as_u16();
    let x_cache = XCache::classify(response.headers().get(&X_CACHE).map(|v| v.as_bytes()));
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(|_| ExchangeError::Http)?;
    }
    Ok((status, x_cache))
}

/// Runs one worker until a bound or `stop` ends the run.
pub(crate) async fn worker(
    shared: Arc<Shared>,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> WorkerStats {
    let plan = &shared.plan;
    let clock = shared.clock;
    let mut stats = WorkerStats::new(plan.max_latency);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut conn: Option<Conn> = None;
    let mut path = String::with_capacity(128);
    let mut body = String::new();
    // One timer for the whole run rather than one per request.
    let deadline = tokio::time::sleep_until(clock.deadline);
    tokio::pin!(deadline);

    loop {
        if *stop.borrow() {
            break;
        }
        let started = match plan.rate {
            None => Instant::now(),
            Some(rate) => {
                let slot = shared.tickets.fetch_add(1, Ordering::Relaxed);
                let at = clock.start + Duration::from_secs_f64(slot as f64 / rate);
                if at >= clock.deadline {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = &mut deadline => break,
                    _ = stop.changed() => break,
                }
                // Latency counts from the scheduled time, so a backlog shows up in it; a
                // wake-up only as late as the timer's granularity is not the service's doing.
                let now = Instant::now();
                if now.saturating_duration_since(at) <= TIMER_SLACK {
                    now
                } else {
                    at
                }
            }
        };
        if started >= clock.deadline {
            break;
        }
        let measured = started >= clock.measure_start;
        if measured && shared.claimed.fetch_add(1, Ordering::Relaxed) >= plan.max_requests {
            break;
        }

        let id = plan.sampler.sample(&mut rng);
        plan.path.expand_into(&mut path, id, &mut rng);
        let Ok(uri) = Uri::try_from(path.as_str()) else {
            // Only ids that make no valid path get here; the path template was checked.
            if measured {
                stats.record_failure(false, second(clock, Instant::now()));
            }
            continue;
        };
        let body = match &plan.body {
            BodyPlan::Empty => Full::new(Bytes::new()),
            BodyPlan::Fixed(bytes) => Full::new(bytes.clone()),
            BodyPlan::Template(t) => {
                t.expand_into(&mut body, id, &mut rng);
                Full::new(Bytes::copy_from_slice(body.as_bytes()))
            }
        };
        let mut req = Request::new(body);
        *req.method_mut() = plan.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = plan.headers.clone();

        let outcome = tokio::select! {
            outcome = tokio::time::timeout(plan.timeout, exchange(&mut conn, &plan.target, req)) => outcome,
            // In flight at the end of the run: neither answered nor failed, so not counted.
            () = &mut deadline => break,
            _ = stop.changed() => break,
        };
        let ended = Instant::now();
        if !measured {
            stats.warmup_requests += 1;
        }
        match outcome {
            Ok(Ok((status, x_cache))) => {
                if measured {
                    stats.record_response(status, x_cache, ended - started, second(clock, ended));
                }
            }
            Ok(Err(e)) => {
                conn = None;
                if measured {
                    stats.record_failure(false, second(clock, ended));
                }
                if matches!(e, ExchangeError::Connect) {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                }
            }
            Err(_elapsed) => {
                // The connection's state is unknown mid-exchange: start afresh.
                conn = None;
                if measured {
                    stats.record_failure(true, second(clock, ended));
                }
            }
        }
    }
    stats
}

/// The one-second interval an instant falls in. A completion noticed just after the deadline
/// (the task was scheduled late) belongs to the last interval, not to one of its own.
fn second(clock: Clock, at: Instant) -> usize {
    let last = clock
        .deadline
        .saturating_duration_since(clock.measure_start)
        .saturating_sub(Duration::from_nanos(1));
    let since = at.saturating_duration_since(clock.measure_start).min(last);
    usize::try_from(since.as_secs()).unwrap_or(usize::MAX)
}
