//! A throwaway `redis-server` process owned by one test.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_port, resp};

/// How long [`RedisServer::start`] and [`RedisServer::restart`] wait for `PING` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many fresh ports [`RedisServer::start`] tries when another process wins the race for
/// the port [`free_port`] returned.
const START_ATTEMPTS: usize = 5;

const LOG_FILE: &str = "redis.log";
const STDIO_FILE: &str = "stdio.log";
const SENTINEL_CONF: &str = "sentinel.conf";

/// Options for [`RedisServer::start_with`].
///
/// # Examples
///
/// ```
/// let mut opts = kura_testkit::RedisOptions::default();
/// opts.appendonly = true;
/// opts.extra_args = vec!["--maxmemory".into(), "10mb".into()];
/// ```
#[derive(Default, Clone, Debug)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Turns on the append-only file with `appendfsync always`, so every acknowledged write
    /// survives [`RedisServer::stop`] + [`RedisServer::restart`]. Off by default: without it a
    /// restart comes back empty, like a cache node that lost its memory.
    pub appendonly: bool,
    /// Extra command-line arguments for `redis-server`, appended after the defaults (so they
    /// win), e.g. `["--maxmemory", "10mb"]`.
    pub extra_args: Vec<String>,
}

impl RedisOptions {
    /// Options with the append-only file turned on.
    #[must_use]
    pub fn appendonly(mut self, on: bool) -> Self {
        self.appendonly = on;
        self
    }

    /// Adds extra `redis-server` arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A `redis-server` child process the test owns, listening on `127.0.0.1` on a free port, with
/// its data directory and log in a fresh temporary directory.
///
/// Dropping it kills the process and removes the directory.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() {
/// let mut redis = kura_testkit::RedisServer::start().await;
/// let url = redis.url(); // "redis://127.0.0.1:<port>"
/// redis.stop().await; // a crash: SIGKILL
/// redis.restart().await; // same port, same directory
/// # let _ = url;
/// # }
/// ```
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    pid: u32,
    child: Option<Child>,
    opts: RedisOptions,
    /// Set for a Sentinel: the initial `sentinel.conf` (Sentinel rewrites it as it learns).
    sentinel_conf: Option<String>,
    // Dropped last (after the process is dead), which removes the directory.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server without persistence on a free port and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// When `redis-server` cannot be spawned or does not answer within 10 s; the message
    /// includes the tail of the server's log.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default()).await
    }

    /// Starts a server with `opts` on a free port and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// As for [`start`](Self::start).
    pub async fn start_with(opts: RedisOptions) -> RedisServer {
        RedisServer::launch(opts, None).await
    }

    /// Starts a Sentinel whose initial configuration is `conf` (`sentinel monitor ...` lines).
    pub(crate) async fn start_sentinel(conf: String) -> RedisServer {
        RedisServer::launch(RedisOptions::default(), Some(conf)).await
    }

    async fn launch(opts: RedisOptions, sentinel_conf: Option<String>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("kura-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut server = RedisServer {
            port: 0,
            pid: 0,
            child: None,
            opts,
            sentinel_conf,
            dir,
        };
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(failure) => {
                    kill_and_reap(&mut server.child.take());
                    // Another process took the port between free_port and the bind: try again.
                    let busy = failure.contains("Address already in use");
                    last_failure = failure;
                    if !busy {
                        break;
                    }
                }
            }
        }
        panic!("redis-server did not start: {last_failure}");
    }

    /// `redis://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on (the same across restarts).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The process id of the current (or, after [`stop`](Self::stop), the last) process.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's working directory (AOF, RDB, logs).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running: started, not stopped, and not exited by itself.
    #[must_use]
    pub fn is_running(&self) -> bool {
        // /proc rather than try_wait, so this needs no `&mut`: an exited but unreaped child
        // shows as a zombie ("Z").
        self.child.is_some()
            && std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"))
    }

    /// The last lines of the server's log and of its stdout/stderr, for failure messages.
    #[must_use]
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// Kills the process with SIGKILL and waits for it to exit: a crash, not a clean shutdown
    /// (no final RDB save, no AOF rewrite). Does nothing when it is not running.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The wait after SIGKILL is short but blocking, so keep it off the async worker.
            let _ = tokio::task::spawn_blocking(move || {
                let _ = child.kill();
                child.wait()
            })
            .await;
        }
    }

    /// Starts the server again on the same port and directory (so the AOF, when enabled, is
    /// replayed) and waits until it answers `PING`. Stops the running process first, if any.
    ///
    /// # Panics
    ///
    /// When the server does not come back within 10 s (for example because another process
    /// took the port meanwhile); the message includes the tail of the log.
    pub async fn restart(&mut self) {
        self.stop().await;
        // The kernel may still hold the old listening socket for a moment after the kill.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(failure) if failure.contains("Address already in use") => {
                    if Instant::now() >= deadline {
                        panic!("redis-server did not restart: {failure}");
                    }
                    if let Some(mut child) = self.child.take() {
                        kill_and_reap_one(&mut child);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(failure) => panic!("redis-server did not restart: {failure}"),
            }
        }
    }

    fn command(&self) -> Result<Command, String> {
        let dir = self.dir.path();
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(dir);
        if let Some(conf) = &self.sentinel_conf {
            // Sentinel insists on a writable config file, given first; it is written once and
            // then kept, because Sentinel records what it learned there across restarts.
            let path = dir.join(SENTINEL_CONF);
            if !path.exists() {
                std::fs::write(&path, conf).map_err(|e| format!("write {SENTINEL_CONF}: {e}"))?;
            }
            cmd.arg(path).arg("--sentinel");
        }
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--protected-mode", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join(LOG_FILE));
        if self.sentinel_conf.is_none() {
            // No RDB snapshots: the only persistence a test gets is the AOF it asks for.
            cmd.args(["--save", ""])
                .args([
                    "--appendonly",
                    if self.opts.appendonly { "yes" } else { "no" },
                ])
                .args(["--appendfsync", "always"])
                // Replicas (cluster, sentinel, or a test's own) sync at once instead of after
                // the default 5 s wait for more replicas to share one transfer.
                .args(["--repl-diskless-sync-delay", "0"]);
        }
        cmd.args(&self.opts.extra_args);
        Ok(cmd)
    }

    /// Spawns the process and waits for `PING`; on failure returns a description with the log.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let stdio = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(STDIO_FILE))
            .map_err(|e| format!("open {STDIO_FILE}: {e}"))?;
        let stderr = stdio
            .try_clone()
            .map_err(|e| format!("clone {STDIO_FILE}: {e}"))?;
        let child = self
            .command()?
            .stdin(Stdio::null())
            .stdout(stdio)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it on PATH?): {e}"))?;
        self.pid = child.id();
        self.child = Some(child);
        tracing::debug!(port = self.port, pid = self.pid, "redis-server spawned");

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "process exited with {status} on port {}\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            match tokio::time::timeout(Duration::from_secs(1), resp::ping(self.addr())).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "PING timed out".into(),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no PONG within {READY_TIMEOUT:?} on port {} (last: {last_error})\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(c) = child.as_mut() {
        kill_and_reap_one(c);
    }
}

fn kill_and_reap_one(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Blocking here is brief: SIGKILL cannot be ignored, so the wait only reaps.
        kill_and_reap(&mut self.child);
    }
}

/// The last lines of the server log and of the captured stdout/stderr in `dir`.
pub(crate) fn log_tail(dir: &Path) -> String {
    const LINES: usize = 30;
    let mut out = String::new();
    for name in [LOG_FILE, STDIO_FILE] {
        let path: PathBuf = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        let _ = writeln!(
            out,
            "--- {} (last {} lines) ---",
            path.display(),
            tail.len()
        );
        for line in tail {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}
