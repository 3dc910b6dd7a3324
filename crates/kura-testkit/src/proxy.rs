//! A fault-injecting TCP proxy.
//!
//! One accept task, one task per client connection. The fault mode lives in a
//! [`tokio::sync::watch`] channel: every connection task waits on it next to its sockets, so a
//! switch takes effect at once on idle and busy connections alike, without polling, and
//! dropping the sender (when the proxy is dropped) ends every task.
//!
//! One-shot actions (reset, heal, a new cut budget) are epoch counters rather than flags,
//! because a watch channel only keeps the latest value: a connection that wakes up after a
//! `blackhole(); heal();` pair still sees that both happened.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a new connection waits for the upstream to accept before the client is reset.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of the buffer each direction reads into.
const CHUNK: usize = 16 * 1024;

#[derive(Clone, Debug, Default)]
struct Mode {
    latency: Duration,
    blackhole: bool,
    refuse: bool,
    /// Downstream byte budget given to every connection, if a cut is armed.
    cut_after: Option<usize>,
    /// Bumped by `blackhole()`.
    blackhole_epoch: u64,
    /// Bumped by `reset()` and `refuse()`.
    reset_epoch: u64,
    /// Bumped by `heal()`.
    heal_epoch: u64,
    /// `blackhole_epoch` as it was at the last `heal()`.
    healed_blackhole_epoch: u64,
    /// Bumped by `cut_after()`.
    cut_epoch: u64,
}

/// A TCP proxy on `127.0.0.1` between a client and an upstream (Redis, PostgreSQL, ...) whose
/// fault mode can be switched at any time, while traffic flows, from the test.
///
/// Each client connection gets its own upstream connection. Faults apply to connections that
/// are open when the switch happens and to those accepted later, until [`heal`](Self::heal).
///
/// Dropping the proxy stops accepting and closes every connection.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use kura_testkit::{FaultProxy, RedisServer};
///
/// # async fn demo() {
/// let redis = RedisServer::start().await;
/// let proxy = FaultProxy::start(redis.addr()).await;
/// proxy.set_latency(Duration::from_millis(20)); // slow network
/// proxy.blackhole(); // partition: nothing gets through, connections stay open
/// proxy.heal(); // transparent again; partitioned connections are closed
/// # }
/// ```
///
/// # Concurrent calls
///
/// All methods take `&self` and may be called from any task or thread while traffic flows;
/// the last call wins for the modes (latency, blackhole, refuse, cut), and every
/// [`reset`](Self::reset) resets the connections open at that moment.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    connections: Arc<AtomicUsize>,
    bytes_up: Arc<AtomicU64>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a transparent proxy to `upstream`, listening on `127.0.0.1` on a free port.
    ///
    /// # Panics
    ///
    /// If the loopback interface cannot be bound.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind the fault proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy local address");
        let (mode, rx) = watch::channel(Mode::default());
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes_up = Arc::new(AtomicU64::new(0));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            rx,
            connections.clone(),
            bytes_up.clone(),
        ));
        tracing::debug!(%addr, %upstream, "fault proxy started");
        FaultProxy {
            addr,
            mode,
            connections,
            bytes_up,
            accept_task,
        }
    }

    /// The address clients connect to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Delays every chunk forwarded, in both directions, by `d` (so a request/response round
    /// trip takes at least `2 * d` more). `Duration::ZERO` removes the delay.
    pub fn set_latency(&self, d: Duration) {
        self.mode.send_modify(|m| m.latency = d);
    }

    /// Partitions the network: connections stay open and new ones are accepted, but nothing
    /// is forwarded either way (what arrives is discarded), so clients only see timeouts.
    pub fn blackhole(&self) {
        self.mode.send_modify(|m| {
            m.blackhole = true;
            m.blackhole_epoch += 1;
        });
    }

    /// Closes every current connection abruptly (TCP RST to the client and the upstream);
    /// new connections are accepted as before.
    pub fn reset(&self) {
        self.mode.send_modify(|m| m.reset_epoch += 1);
    }

    /// Resets every current connection and, until [`heal`](Self::heal), resets each new one
    /// right after accepting it, as a host whose service is down would.
    pub fn refuse(&self) {
        self.mode.send_modify(|m| {
            m.refuse = true;
            m.reset_epoch += 1;
        });
    }

    /// On every connection (open now or accepted later), forwards at most `bytes` more bytes
    /// from the upstream to the client, then closes the connection: a response cut midway.
    ///
    /// The client receives the truncated data followed by end-of-stream.
    pub fn cut_after(&self, bytes: usize) {
        self.mode.send_modify(|m| {
            m.cut_after = Some(bytes);
            m.cut_epoch += 1;
        });
    }

    /// Back to transparent forwarding for new and existing connections: no latency, no
    /// partition, no refusals, no cut. Connections that were partitioned are closed (what
    /// they held is dropped) so their clients reconnect instead of waiting for lost replies.
    pub fn heal(&self) {
        self.mode.send_modify(|m| {
            m.latency = Duration::ZERO;
            m.blackhole = false;
            m.refuse = false;
            m.cut_after = None;
            m.heal_epoch += 1;
            m.healed_blackhole_epoch = m.blackhole_epoch;
        });
    }

    /// The number of client connections currently open through the proxy.
    ///
    /// Connections close asynchronously: after [`reset`](Self::reset) the count drops to its
    /// new value within a few milliseconds, not at once.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The bytes forwarded from clients to the upstream so far, over every
    /// connection: what a test counts to see how much work its client
    /// asked of the server (every statement sent to PostgreSQL, say).
    #[must_use]
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops the listener; the connection tasks end when they see
        // the mode sender (only held here) go away.
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    connections: Arc<AtomicUsize>,
    bytes_up: Arc<AtomicU64>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = mode.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        match accepted {
            Ok((client, peer)) => {
                if mode.borrow().refuse {
                    abort(&client);
                    continue;
                }
                tracing::trace!(%peer, "fault proxy accepted");
                let guard = ConnGuard::new(connections.clone());
                tokio::spawn(connection(
                    client,
                    upstream,
                    mode.clone(),
                    guard,
                    bytes_up.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Keeps [`FaultProxy::connections`] right however a connection task ends.
struct ConnGuard(Arc<AtomicUsize>);

impl ConnGuard {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        ConnGuard(count)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes the next close of `stream` send RST instead of FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both sides finished; close normally.
    Eof,
    /// An I/O error on either socket.
    Error,
    /// `reset()`/`refuse()`, or the proxy was dropped: RST both sides.
    Reset,
    /// `heal()` after a partition: close both sides.
    Healed,
    /// The cut budget ran out: close both sides after the partial data.
    Cut,
}

/// The mode epochs a connection was opened under, so only actions taken after it opened count.
struct Conn {
    reset_epoch: u64,
    heal_epoch: u64,
    blackhole_epoch: u64,
    blackholed_at_open: bool,
}

impl Conn {
    /// Checks the mode after a change; `Some(end)` when the connection must end.
    fn check(&self, mode: &Mode) -> Option<End> {
        if mode.reset_epoch != self.reset_epoch {
            return Some(End::Reset);
        }
        // Partitioned, then healed: the partition was on when the connection opened, or began
        // after it opened and before the last heal.
        let healed = mode.heal_epoch != self.heal_epoch;
        let partitioned_before_heal =
            self.blackholed_at_open || mode.healed_blackhole_epoch != self.blackhole_epoch;
        if healed && partitioned_before_heal {
            return Some(End::Healed);
        }
        None
    }
}

async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    _guard: ConnGuard,
    bytes_up: Arc<AtomicU64>,
) {
    let _ = client.set_nodelay(true);
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let mut server = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%upstream, error = %e, "fault proxy: upstream refused");
            abort(&client);
            return;
        }
        Err(_) => {
            tracing::debug!(%upstream, "fault proxy: upstream connect timed out");
            abort(&client);
            return;
        }
    };
    let _ = server.set_nodelay(true);

    let conn = {
        let m = mode.borrow();
        Conn {
            reset_epoch: m.reset_epoch,
            heal_epoch: m.heal_epoch,
            blackhole_epoch: m.blackhole_epoch,
            blackholed_at_open: m.blackhole,
        }
    };

    let end = {
        let (client_rd, client_wr) = client.split();
        let (server_rd, server_wr) = server.split();
        let mut up = pin!(pump(
            client_rd,
            server_wr,
            &conn,
            mode.clone(),
            false,
            Some(&bytes_up)
        ));
        let mut down = pin!(pump(server_rd, client_wr, &conn, mode.clone(), true, None));
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let (end, is_up) = tokio::select! {
                end = &mut up, if !up_done => (end, true),
                end = &mut down, if !down_done => (end, false),
            };
            if end != End::Eof {
                break end;
            }
            // A half-close: the other direction may still carry a reply.
            if is_up {
                up_done = true;
            } else {
                down_done = true;
            }
            if up_done && down_done {
                break End::Eof;
            }
        }
    };
    tracing::trace!(?end, "fault proxy connection closed");
    if matches!(end, End::Reset | End::Error) {
        abort(&client);
        abort(&server);
    }
}

/// What one direction of a connection tracks between mode changes.
struct PumpState {
    cut_epoch: u64,
    /// Bytes this direction may still forward before the cut; only used downstream.
    budget: Option<usize>,
}

impl PumpState {
    /// Applies the latest mode; `Some(end)` when the connection must end.
    fn apply(&mut self, conn: &Conn, mode: &mut watch::Receiver<Mode>) -> Option<End> {
        if mode.has_changed().is_err() {
            // The proxy was dropped.
            return Some(End::Reset);
        }
        let m = mode.borrow_and_update();
        if let Some(end) = conn.check(&m) {
            return Some(end);
        }
        if m.cut_epoch != self.cut_epoch || m.cut_after.is_none() {
            self.cut_epoch = m.cut_epoch;
            self.budget = m.cut_after;
        }
        None
    }
}

/// Forwards one direction until it ends or the mode ends the connection.
async fn pump(
    mut rd: ReadHalf<'_>,
    mut wr: WriteHalf<'_>,
    conn: &Conn,
    mut mode: watch::Receiver<Mode>,
    downstream: bool,
    counted: Option<&AtomicU64>,
) -> End {
    let mut buf = vec![0u8; CHUNK];
    let mut state = PumpState {
        // Differs from any real epoch, so the first apply() loads the armed cut, if any.
        cut_epoch: u64::MAX,
        budget: None,
    };
    if let Some(end) = state.apply(conn, &mut mode) {
        return end;
    }
    loop {
        let read = tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return End::Reset;
                }
                if let Some(end) = state.apply(conn, &mut mode) {
                    return end;
                }
                continue;
            }
            read = rd.read(&mut buf) => read,
        };
        let n = match read {
            Ok(0) => {
                let _ = wr.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
            Err(_) => return End::Error,
        };

        let latency = mode.borrow().latency;
        if !latency.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(latency) => {}
                // Resets and heals must not wait for the delay to pass.
                changed = mode.changed() => {
                    if changed.is_err() {
                        return End::Reset;
                    }
                    if let Some(end) = state.apply(conn, &mut mode) {
                        return end;
                    }
                    // Any other switch (latency, cut, partition) applies to this chunk now.
                }
            }
        }
        // Switches made while the chunk was in flight apply to it.
        if let Some(end) = state.apply(conn, &mut mode) {
            return end;
        }
        if mode.borrow().blackhole {
            continue;
        }

        let mut len = n;
        let mut exhausted = false;
        if downstream && let Some(left) = state.budget.as_mut() {
            if len >= *left {
                len = *left;
                exhausted = true;
            }
            *left -= len;
        }
        // Written piecewise next to the mode, so a peer that stops reading cannot keep this
        // direction from seeing a reset, a partition or the proxy being dropped.
        let mut written = 0;
        while written < len {
            tokio::select! {
                n = wr.write(&buf[written..len]) => match n {
                    Ok(0) | Err(_) => return End::Error,
                    Ok(n) => {
                        written += n;
                        if let Some(c) = counted {
                            c.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                },
                changed = mode.changed() => {
                    if changed.is_err() {
                        return End::Reset;
                    }
                    if let Some(end) = state.apply(conn, &mut mode) {
                        return end;
                    }
                    if mode.borrow().blackhole {
                        break;
                    }
                }
            }
        }
        if exhausted {
            let _ = wr.flush().await;
            return End::Cut;
        }
    }
}
