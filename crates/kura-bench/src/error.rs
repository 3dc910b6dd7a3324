//! Errors of `kura bench`'s set-up. Failures of single requests during a run are not errors:
//! they are counted in the [`Report`](crate::Report).

use std::path::PathBuf;

/// Why a benchmark could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The target is not on this machine and `--allow-remote` was not given.
    #[error(
        "refusing to load {host}: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed \
         without --allow-remote"
    )]
    RemoteTarget {
        /// The host named in `--url` (or an address it resolved to).
        host: String,
    },
    /// `--url` is not an absolute `http://` URL.
    #[error("invalid --url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A duration flag could not be parsed.
    #[error("invalid duration {0:?}: expected a number with a unit, such as 500ms, 10s, 2m or 1h")]
    InvalidDuration(String),
    /// A flag is out of range or malformed.
    #[error("invalid {flag}: {reason}")]
    InvalidArgument {
        /// The flag, e.g. `--concurrency`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// The ids file could not be read.
    #[error("cannot read ids file {path}: {source}")]
    IdsFile {
        /// The file given to `--ids-file`.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The request template uses `{id}` but no ids were given.
    #[error(
        "the request template uses {{id}}: give --id ID or --ids-file FILE (with at least one id)"
    )]
    NoIds,
    /// The target host name could not be resolved.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host named in `--url`.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
}
