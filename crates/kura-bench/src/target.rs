//! The target: URL parsing, the loopback-only guard, and address resolution.

use std::net::{IpAddr, SocketAddr};

use hyper::Uri;
use hyper::header::HeaderValue;

use crate::BenchError;

/// Where requests go.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The address every worker connects to.
    pub(crate) addr: SocketAddr,
    /// The `Host` header (HTTP/1.1 requires it; hyper's connection-level client does not add it).
    pub(crate) host: HeaderValue,
    /// Path prefix from the base URL, without a trailing slash ("" for none).
    pub(crate) base_path: String,
}

fn invalid(url: &str, reason: impl Into<String>) -> BenchError {
    BenchError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

/// Whether `host` (as written in a URL, IPv6 in brackets) names this machine without a lookup.
fn host_is_loopback_name(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            bare.eq_ignore_ascii_case("localhost")
                || bare.to_ascii_lowercase().ends_with(".localhost")
        }
    }
}

/// Parses `url` and resolves it. Unless `allow_remote`, the host must be a loopback address or
/// `localhost`, checked before any lookup or connection, and every address it resolves to
/// must be loopback too.
pub(crate) async fn resolve(url: &str, allow_remote: bool) -> Result<Target, BenchError> {
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| invalid(url, e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(invalid(
                url,
                format!("scheme {other:?} is not supported, use http://"),
            ));
        }
        None => {
            return Err(invalid(
                url,
                "expected an absolute URL such as http://127.0.0.1:8080",
            ));
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| invalid(url, "missing host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid(
            url,
            "credentials in the URL are not supported; use --token or --header",
        ));
    }
    let host = authority.host();
    if !allow_remote && !host_is_loopback_name(host) {
        return Err(BenchError::RemoteTarget {
            host: host.to_owned(),
        });
    }
    let port = authority.port_u16().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|source| BenchError::Resolve {
                host: host.to_owned(),
                source,
            })?
            .collect(),
    };
    if !allow_remote
        && let Some(remote) = addrs.iter().find(|a| !a.ip().to_canonical().is_loopback())
    {
        return Err(BenchError::RemoteTarget {
            host: format!("{host} ({})", remote.ip()),
        });
    }
    // Prefer IPv4: "localhost" often lists ::1 first while servers bind 127.0.0.1 only.
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| BenchError::Resolve {
            host: host.to_owned(),
            source: std::io::Error::other("no addresses"),
        })?;
    let host_header =
        HeaderValue::from_str(authority.as_str()).map_err(|e| invalid(url, e.to_string()))?;
    let base_path = uri.path().trim_end_matches('/').to_owned();
    if uri.query().is_some() {
        return Err(invalid(
            url,
            "put the query string in --query, not in --url",
        ));
    }
    Ok(Target {
        addr,
        host: host_header,
        base_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_loopback_targets() {
        for (url, addr) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://127.1.2.3:81", "127.1.2.3:81"),
            ("http://[::1]:8080", "[::1]:8080"),
            ("http://127.0.0.1", "127.0.0.1:80"),
        ] {
            let t = resolve(url, false).await.unwrap();
            assert_eq!(t.addr, addr.parse::<SocketAddr>().unwrap(), "{url}");
        }
        let t = resolve("http://localhost:9/", false).await.unwrap();
        assert!(t.addr.ip().is_loopback());
        assert_eq!(t.host, "localhost:9");
        assert_eq!(t.base_path, "");
        let t = resolve("http://127.0.0.1:9/prefix/", false).await.unwrap();
        assert_eq!(t.base_path, "/prefix");
    }

    #[tokio::test]
    async fn refuses_remote_targets_without_the_flag() {
        for url in [
            "http://10.1.2.3",
            "http://10.1.2.3:8080/api",
            "http://192.168.0.1:80",
            "http://[2001:db8::1]:80",
            "http://example.com",
            "http://localhost.example.com",
            "http://0.0.0.0:8080",
        ] {
            let err = resolve(url, false).await.unwrap_err();
            assert!(
                matches!(err, BenchError::RemoteTarget { .. }),
                "{url}: {err}"
            );
            assert!(err.to_string().contains("--allow-remote"));
        }
        // With the flag, a literal address needs no lookup and is accepted.
        let t = resolve("http://10.1.2.3:8080", true).await.unwrap();
        assert_eq!(t.addr, "10.1.2.3:8080".parse::<SocketAddr>().unwrap());
    }

    #[tokio::test]
    async fn rejects_malformed_urls() {
        for url in [
            "127.0.0.1:8080",
            "https://127.0.0.1",
            "ftp://127.0.0.1",
            "http://user:pw@127.0.0.1",
            "http://127.0.0.1/?x=1",
            "not a url",
        ] {
            let err = resolve(url, false).await.unwrap_err();
            assert!(matches!(err, BenchError::InvalidUrl { .. }), "{url}: {err}");
        }
    }
}
