//! The command-line flags of `kura bench`.

use std::path::PathBuf;
use std::time::Duration;

use crate::BenchError;

/// The run length when neither `--duration` nor `--requests` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// The longest run (and warm-up) accepted: every run must stop by itself.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// The most requests one run may send (after warm-up).
pub const MAX_REQUESTS: u64 = 100_000_000;

/// The most concurrent connections one run may open.
pub const MAX_CONCURRENCY: usize = 10_000;

/// HTTP method of the generated requests.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HttpMethod {
    /// `GET` (no body).
    #[default]
    Get,
    /// `PUT` with the `--body` template as a JSON body.
    Put,
}

impl HttpMethod {
    pub(crate) fn to_hyper(self) -> hyper::Method {
        match self {
            HttpMethod::Get => hyper::Method::GET,
            HttpMethod::Put => hyper::Method::PUT,
        }
    }
}

/// How the id of each request is chosen from the id list.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Dist {
    /// Always the first id: one hot key.
    Hot,
    /// Every id equally likely.
    Uniform,
    /// Zipf over the ids in list order (the first is the most popular), with exponent
    /// `--zipf-exponent`: a realistic skew where a few keys get most of the traffic.
    #[default]
    Zipf,
}

/// Flags of `kura bench`. Every value flag can also be set by an environment variable
/// `KURA_BENCH_<FLAG>` (the token only by `KURA_BENCH_TOKEN` or `--token`).
///
/// The service binary flattens this into its `bench` subcommand; tests and other callers can
/// build it with [`BenchArgs::from_args`].
#[derive(clap::Args, Debug, Clone)]
// Flattening applies the struct's doc comment to the enclosing command; this text replaces it.
#[command(
    about = "Load-test a kura service over HTTP: throughput, latency percentiles, statuses, \
             X-Cache mix and hit ratio over time",
    long_about = None
)]
#[non_exhaustive]
pub struct BenchArgs {
    /// Base URL of the service (http only). Must be a loopback address unless --allow-remote.
    #[arg(long, env = "KURA_BENCH_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Request path template; `{id}` is replaced by the sampled id (percent-encoded) and
    /// `{rand4}` by four random digits.
    #[arg(long, env = "KURA_BENCH_PATH", default_value = "/api/v1/profiles/{id}")]
    pub path: String,

    /// HTTP method.
    #[arg(
        long,
        env = "KURA_BENCH_METHOD",
        value_enum,
        ignore_case = true,
        default_value_t
    )]
    pub method: HttpMethod,

    /// JSON body template for PUT (same placeholders as --path, `{id}` inserted as is).
    #[arg(
        long,
        env = "KURA_BENCH_BODY",
        default_value = r#"{"phone":"080-{rand4}-{rand4}"}"#
    )]
    pub body: String,

    /// Query string appended to the path (without `?`), e.g. `strategy=through`.
    #[arg(long, env = "KURA_BENCH_QUERY")]
    pub query: Option<String>,

    /// Bearer token sent as `Authorization: Bearer <TOKEN>`.
    #[arg(long, env = "KURA_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Extra request header `Name: value`; repeatable.
    #[arg(long = "header", value_name = "K:V")]
    pub headers: Vec<String>,

    /// File with one id per line (blank lines and lines starting with `#` are skipped).
    #[arg(long, env = "KURA_BENCH_IDS_FILE", conflicts_with = "id")]
    pub ids_file: Option<PathBuf>,

    /// A single id to request.
    #[arg(long, env = "KURA_BENCH_ID")]
    pub id: Option<String>,

    /// Id distribution.
    #[arg(long, env = "KURA_BENCH_DIST", value_enum, default_value_t)]
    pub dist: Dist,

    /// Exponent of the Zipf distribution (0 = uniform; larger = more skewed).
    #[arg(long, env = "KURA_BENCH_ZIPF_EXPONENT", default_value_t = 1.0)]
    pub zipf_exponent: f64,

    /// How long to measure, after the warm-up (e.g. 500ms, 10s, 2m). Defaults to 10s, or to
    /// the 1 h cap when --requests is given; at most 1 h.
    #[arg(long, env = "KURA_BENCH_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// How many requests to measure, after the warm-up (at most 100,000,000). The run stops at
    /// whichever of --duration and --requests comes first.
    #[arg(long, env = "KURA_BENCH_REQUESTS")]
    pub requests: Option<u64>,

    /// Concurrent workers, each with its own keep-alive connection.
    #[arg(long, env = "KURA_BENCH_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,

    /// Warm-up before measuring; its requests are sent but not recorded.
    #[arg(long, env = "KURA_BENCH_WARMUP", value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,

    /// Per-request timeout; a request that takes longer counts as a timeout.
    #[arg(long, env = "KURA_BENCH_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub timeout: Duration,

    /// Fixed request rate in requests per second across all workers (open loop). Without it,
    /// each worker sends its next request as soon as the previous one is answered.
    #[arg(long, env = "KURA_BENCH_RATE")]
    pub rate: Option<f64>,

    /// Random seed for id sampling and `{rand4}`, for repeatable request sequences.
    #[arg(long, env = "KURA_BENCH_SEED")]
    pub seed: Option<u64>,

    /// Allow targets that are not on this machine.
    #[arg(long)]
    pub allow_remote: bool,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Also write the JSON report to this file.
    #[arg(long, env = "KURA_BENCH_OUT")]
    pub out: Option<PathBuf>,
}

// Parser for `BenchArgs::from_args`: a command of its own around the flattened flags. (A doc
// comment here would become the command's help text.)
#[derive(clap::Parser, Debug)]
#[command(name = "bench")]
struct Standalone {
    #[command(flatten)]
    args: BenchArgs,
}

impl BenchArgs {
    /// Parses flags as they would follow `kura bench` (without the program name), with the
    /// environment variables applied as on the command line.
    ///
    /// # Examples
    ///
    /// ```
    /// let args = kura_bench::BenchArgs::from_args(["--id", "42", "--requests", "100"]).unwrap();
    /// assert_eq!(args.requests, Some(100));
    /// ```
    ///
    /// # Errors
    ///
    /// clap's error for unknown or malformed flags.
    pub fn from_args<I, T>(args: I) -> Result<BenchArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser as _;
        let argv = std::iter::once(std::ffi::OsString::from("bench"))
            .chain(args.into_iter().map(Into::into));
        Standalone::try_parse_from(argv).map(|s| s.args)
    }

    /// The measuring time this run is bounded by: `--duration`, else 10 s, or the 1 h cap when
    /// only `--requests` is given.
    #[must_use]
    pub fn effective_duration(&self) -> Duration {
        match (self.duration, self.requests) {
            (Some(d), _) => d,
            (None, Some(_)) => MAX_DURATION,
            (None, None) => DEFAULT_DURATION,
        }
    }

    /// The number of measured requests this run is bounded by: `--requests`, else the cap.
    #[must_use]
    pub fn effective_requests(&self) -> u64 {
        self.requests.unwrap_or(MAX_REQUESTS)
    }

    /// Checks ranges and bounds that clap cannot express.
    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        let invalid = |flag, reason: String| Err(BenchError::InvalidArgument { flag, reason });
        let duration = self.effective_duration();
        if duration.is_zero() || duration > MAX_DURATION {
            return invalid(
                "--duration",
                format!("must be > 0 and at most 1h, got {duration:?}"),
            );
        }
        if self.warmup > MAX_DURATION {
            return invalid(
                "--warmup",
                format!("must be at most 1h, got {:?}", self.warmup),
            );
        }
        if self.timeout.is_zero() || self.timeout > MAX_DURATION {
            return invalid(
                "--timeout",
                format!("must be > 0 and at most 1h, got {:?}", self.timeout),
            );
        }
        match self.requests {
            Some(0) => return invalid("--requests", "must be at least 1".into()),
            Some(n) if n > MAX_REQUESTS => {
                return invalid(
                    "--requests",
                    format!("must be at most {MAX_REQUESTS}, got {n}"),
                );
            }
            _ => {}
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return invalid(
                "--concurrency",
                format!(
                    "must be between 1 and {MAX_CONCURRENCY}, got {}",
                    self.concurrency
                ),
            );
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return invalid("--rate", format!("must be a positive number, got {rate}"));
        }
        Ok(())
    }
}

/// Parses a duration such as `500ms`, `10s`, `2m`, `1h`, `1.5s` or `250us`; a bare number is
/// seconds.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use kura_bench::parse_duration;
///
/// assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
/// assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
/// ```
///
/// # Errors
///
/// [`BenchError::InvalidDuration`] for anything else, including negative values.
pub fn parse_duration(text: &str) -> Result<Duration, BenchError> {
    let bad = || BenchError::InvalidDuration(text.to_owned());
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration(" 7s ").unwrap(), Duration::from_secs(7));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "",
            "s",
            "ms",
            "-1s",
            "10x",
            "1.2.3s",
            "ten seconds",
            "5 parsecs",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let a = BenchArgs::from_args(Vec::<String>::new()).unwrap();
        assert_eq!(a.url, "http://127.0.0.1:8080");
        assert_eq!(a.path, "/api/v1/profiles/{id}");
        assert_eq!(a.method, HttpMethod::Get);
        assert_eq!(a.body, r#"{"phone":"080-{rand4}-{rand4}"}"#);
        assert_eq!(a.concurrency, 64);
        assert_eq!(a.warmup, Duration::from_secs(2));
        assert_eq!(a.timeout, Duration::from_secs(5));
        assert_eq!(a.dist, Dist::Zipf);
        assert!((a.zipf_exponent - 1.0).abs() < f64::EPSILON);
        assert!(!a.allow_remote && !a.json);
        a.validate().unwrap();
    }

    #[test]
    fn there_is_always_a_bound() {
        let a = BenchArgs::from_args(Vec::<String>::new()).unwrap();
        assert_eq!(a.effective_duration(), DEFAULT_DURATION);
        assert_eq!(a.effective_requests(), MAX_REQUESTS);

        let a = BenchArgs::from_args(["--requests", "5"]).unwrap();
        assert_eq!(a.effective_duration(), MAX_DURATION);
        assert_eq!(a.effective_requests(), 5);

        let a = BenchArgs::from_args(["--requests", "5", "--duration", "1s"]).unwrap();
        assert_eq!(a.effective_duration(), Duration::from_secs(1));

        for flags in [
            &["--duration", "2h"][..],
            &["--duration", "0s"],
            &["--requests", "0"],
            &["--requests", "100000001"],
            &["--warmup", "61m"],
            &["--timeout", "0ms"],
            &["--concurrency", "0"],
            &["--rate", "0"],
            &["--rate=-5"],
        ] {
            let a = BenchArgs::from_args(flags.iter().copied()).unwrap();
            assert!(a.validate().is_err(), "{flags:?} accepted");
        }
    }

    #[test]
    fn parses_every_flag() {
        let a = BenchArgs::from_args([
            "--url",
            "http://localhost:9000",
            "--path",
            "/p/{id}",
            "--method",
            "PUT",
            "--body",
            "{}",
            "--query",
            "strategy=through",
            "--token",
            "t0k",
            "--header",
            "X-A: 1",
            "--header",
            "X-B:2",
            "--id",
            "7",
            "--dist",
            "hot",
            "--zipf-exponent",
            "1.3",
            "--duration",
            "500ms",
            "--requests",
            "10",
            "--concurrency",
            "3",
            "--warmup",
            "0s",
            "--timeout",
            "100ms",
            "--rate",
            "50",
            "--seed",
            "9",
            "--allow-remote",
            "--json",
            "--out",
            "/tmp/x.json",
        ])
        .unwrap();
        assert_eq!(a.method, HttpMethod::Put);
        assert_eq!(a.headers, vec!["X-A: 1", "X-B:2"]);
        assert_eq!(a.dist, Dist::Hot);
        assert_eq!(a.duration, Some(Duration::from_millis(500)));
        assert_eq!(a.rate, Some(50.0));
        assert!(a.allow_remote && a.json);
        a.validate().unwrap();
    }

    #[test]
    fn ids_file_and_id_conflict() {
        assert!(BenchArgs::from_args(["--id", "1", "--ids-file", "f"]).is_err());
    }
}
