//! Just enough RESP2 to drive a Redis server from tests, so harnesses and their own tests need
//! no Redis client crate (and can talk through a [`FaultProxy`](crate::FaultProxy) byte by byte).
//!
//! # Examples
//!
//! ```no_run
//! use kura_testkit::resp::{Reply, RespConn};
//!
//! # async fn demo(addr: std::net::SocketAddr) -> std::io::Result<()> {
//! let mut conn = RespConn::connect(addr).await?;
//! assert_eq!(conn.command(&["PING"]).await?, Reply::Simple("PONG".into()));
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The RESP `PING` command as raw bytes.
pub const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// The raw reply to [`PING`].
pub const PONG: &[u8] = b"+PONG\r\n";

/// A decoded RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// `+OK`-style status line.
    Simple(String),
    /// `-ERR ...` error line (returned as a value, not as an `Err`, so tests can assert on it).
    Error(String),
    /// `:<n>` integer.
    Integer(i64),
    /// `$<len>` bulk string; `None` for the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `*<n>` array; `None` for the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as UTF-8 text when it is a status, error or non-null bulk string.
    #[must_use]
    pub fn as_text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) | Reply::Error(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
#[must_use]
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One connection to a Redis server speaking RESP2, one command at a time.
#[derive(Debug)]
pub struct RespConn {
    stream: BufReader<TcpStream>,
}

impl RespConn {
    /// Connects to `addr`.
    ///
    /// # Errors
    ///
    /// Any connect error.
    pub async fn connect(addr: SocketAddr) -> io::Result<RespConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RespConn {
            stream: BufReader::new(stream),
        })
    }

    /// Sends one command and reads its reply.
    ///
    /// # Errors
    ///
    /// I/O errors, an unexpected end of stream, or a malformed reply
    /// ([`io::ErrorKind::InvalidData`]). A Redis error reply is `Ok(Reply::Error(..))`.
    pub async fn command(&mut self, args: &[&str]) -> io::Result<Reply> {
        self.stream.get_mut().write_all(&encode(args)).await?;
        self.read_reply().await
    }

    /// Reads one reply (for pipelined or pushed replies).
    ///
    /// # Errors
    ///
    /// As for [`command`](Self::command).
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.stream).await
    }

    /// The underlying stream, for tests that need to write raw bytes.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        self.stream.get_mut()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn read_line(r: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with("\r\n") {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_len(s: &str) -> io::Result<i64> {
    s.parse::<i64>()
        .map_err(|_| invalid(format!("bad RESP length {s:?}")))
}

// Boxed because arrays nest: an async fn cannot recurse into itself directly.
fn read_reply(
    r: &mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Reply>> + Send + '_>> {
    Box::pin(async move {
        let line = read_line(r).await?;
        let (kind, rest) = line
            .split_at_checked(1)
            .ok_or_else(|| invalid("empty line"))?;
        match kind {
            "+" => Ok(Reply::Simple(rest.to_owned())),
            "-" => Ok(Reply::Error(rest.to_owned())),
            ":" => Ok(Reply::Integer(parse_len(rest)?)),
            "$" => {
                let len = parse_len(rest)?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let len = usize::try_from(len).map_err(|_| invalid("bulk length"))?;
                let mut buf = vec![0; len + 2];
                r.read_exact(&mut buf).await?;
                buf.truncate(len);
                Ok(Reply::Bulk(Some(buf)))
            }
            "*" => {
                let len = parse_len(rest)?;
                if len < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(1024));
                for _ in 0..len {
                    items.push(read_reply(r).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            other => Err(invalid(format!("unknown RESP type {other:?}"))),
        }
    })
}

/// Connects to `addr`, sends a raw `PING` and checks for `+PONG`.
///
/// # Errors
///
/// Any I/O error, or [`io::ErrorKind::InvalidData`] when the server answers something else
/// (for example `-LOADING` while it replays its AOF).
pub async fn ping(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(PING).await?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    // Replies can arrive split across reads; keep reading until a full line is here.
    while !buf[..got].ends_with(b"\r\n") {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
        if got == buf.len() {
            break;
        }
    }
    if &buf[..got] == PONG {
        Ok(())
    } else {
        Err(invalid(String::from_utf8_lossy(&buf[..got]).into_owned()))
    }
}

/// Connects to `addr`, sends one command and returns its reply (for one-off admin commands).
///
/// # Errors
///
/// As for [`RespConn::command`], plus connect errors.
pub async fn command(addr: SocketAddr, args: &[&str]) -> io::Result<Reply> {
    RespConn::connect(addr).await?.command(args).await
}

/// The value of `field` in an `INFO`- or `CLUSTER INFO`-style `key:value` text.
#[must_use]
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}
