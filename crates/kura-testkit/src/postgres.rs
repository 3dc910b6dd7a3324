//! A throwaway PostgreSQL cluster owned by one test: `initdb` in a
//! temporary directory, started on a free port with the settings the test
//! asks for (`wal_level = logical`, …), stopped by its pid. Never the
//! shared server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::free_port;

/// Where Debian installs PostgreSQL 15's server programs.
const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL cluster the test owns, on `127.0.0.1` on a free port, run
/// by the `postgres` user when the test runs as root (PostgreSQL refuses
/// root). Dropping it stops the server (immediate shutdown) and removes the
/// directory.
#[derive(Debug)]
pub struct PgServer {
    dir: TempDir,
    port: u16,
    settings: Vec<(String, String)>,
}

fn as_postgres(program: &str) -> Command {
    let path = format!("{BIN}/{program}");
    // PostgreSQL refuses to run as root: `id -u` says who we are.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

impl PgServer {
    /// Whether this machine has the server programs.
    #[must_use]
    pub fn available() -> bool {
        Path::new(BIN).join("initdb").exists()
    }

    /// A new cluster with `settings` (`("wal_level", "logical")`, …),
    /// started and accepting connections.
    ///
    /// # Panics
    ///
    /// When `initdb` or the start fails (the log is in the message).
    #[must_use]
    pub fn start(settings: &[(&str, &str)]) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("kura-pg-")
            .tempdir()
            .expect("temp dir");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let out = as_postgres("initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = PgServer {
            dir,
            port: free_port(),
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        s.restart();
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again), with its settings; waits until it
    /// accepts connections.
    ///
    /// # Panics
    ///
    /// When it does not start within 30 s.
    pub fn restart(&mut self) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        for (k, v) in &self.settings {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let log = self.dir.path().join("server.log");
        let out = as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(["-o", &opts, "-w", "-t", "30", "start"])
            .stdout(Stdio::null())
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "PostgreSQL did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL not accepting");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's pid (`postmaster.pid`'s first line).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`).
    pub fn stop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL of database `db` as the `postgres` superuser.
    #[must_use]
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's log.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.data().join("postmaster.pid").exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
