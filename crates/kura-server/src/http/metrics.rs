//! Per-route HTTP request metrics: `http_requests_total` by route, method,
//! status and `X-Cache`, and `http_request_duration_seconds` (a histogram)
//! by route, method and `X-Cache`.
//!
//! Recorded by the request timeout layer (one layer for both, so that
//! recording adds no service of its own to every route) into a fixed table
//! of atomics made when the router is built (one slot per route template × method × status ×
//! outcome): a request costs a clock read at each end, one map lookup of
//! its route template and a few atomic adds — no boxing, no allocation, no
//! registry lookup. The table is rendered in the Prometheus text format
//! after the recorder's own series on `/metrics`. Only slots that were
//! used are written out.
//!
//! Requests that match no route count as route `unmatched`; statuses kura
//! does not answer count as `other`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::MatchedPath;
use axum::http::{Method, Request};
use axum::response::Response;

use super::X_CACHE;

/// The methods counted on their own (others: `OTHER`).
const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "OTHER"];

/// The statuses counted on their own (others: `other`).
const STATUSES: [u16; 15] = [
    200, 201, 204, 400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 503, 504,
];

/// The `X-Cache` values (`none`: the answer has no header).
const OUTCOMES: [&str; 5] = ["hit", "miss", "stale", "bypass", "none"];

/// Histogram bounds in seconds (the recorder's own, from a hit to 5 s).
const BOUNDS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// The route label of requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// One latency histogram; its count is the sum of the matching request
/// counters (one atomic fewer per request).
#[derive(Default)]
struct Hist {
    buckets: [AtomicU64; BOUNDS.len()],
    sum_ns: AtomicU64,
}

/// The table the layer records into. See the module docs.
pub struct HttpMetrics {
    routes: Vec<&'static str>,
    index: HashMap<&'static str, usize>,
    /// `[route][method][status + other][outcome]`.
    counts: Box<[AtomicU64]>,
    /// `[route][method][outcome]`.
    hists: Box<[Hist]>,
}

impl std::fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetrics")
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

const N_STATUS: usize = STATUSES.len() + 1;

impl HttpMetrics {
    /// A table for these route templates, kept for the life of the process
    /// (a server's requests then carry a plain reference to it, not a
    /// reference count: about 100 KiB per server started).
    #[must_use]
    pub fn leaked(routes: &[&'static str]) -> &'static Self {
        Box::leak(Box::new(Self::new(routes)))
    }

    /// A table for these route templates (as the router names them, e.g.
    /// `/api/v1/profiles/{user_id}`).
    #[must_use]
    pub fn new(routes: &[&'static str]) -> Self {
        let mut all: Vec<&'static str> = routes.to_vec();
        all.push(UNMATCHED);
        all.dedup();
        let index = all.iter().enumerate().map(|(i, r)| (*r, i)).collect();
        let n = all.len() * METHODS.len();
        Self {
            counts: (0..n * N_STATUS * OUTCOMES.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            hists: (0..n * OUTCOMES.len()).map(|_| Hist::default()).collect(),
            routes: all,
            index,
        }
    }

    fn route(&self, path: Option<&MatchedPath>) -> usize {
        path.and_then(|p| self.index.get(p.as_str()).copied())
            .unwrap_or(self.routes.len() - 1)
    }

    fn record(&self, route: usize, method: usize, status: u16, outcome: usize, secs: f64) {
        let s = STATUSES
            .iter()
            .position(|&x| x == status)
            .unwrap_or(STATUSES.len());
        let rm = route * METHODS.len() + method;
        self.counts[(rm * N_STATUS + s) * OUTCOMES.len() + outcome].fetch_add(1, Ordering::Relaxed);
        let h = &self.hists[rm * OUTCOMES.len() + outcome];
        if let Some(b) = BOUNDS.iter().position(|&b| secs <= b) {
            h.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        h.sum_ns.fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }

    /// Requests of one route, method and outcome, over all statuses.
    fn count(&self, rm: usize, outcome: usize) -> u64 {
        (0..N_STATUS)
            .map(|s| {
                self.counts[(rm * N_STATUS + s) * OUTCOMES.len() + outcome].load(Ordering::Relaxed)
            })
            .sum()
    }

    /// Appends the table in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let mut lines = String::new();
        for (r, route) in self.routes.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                let rm = r * METHODS.len() + m;
                for s in 0..N_STATUS {
                    for (o, outcome) in OUTCOMES.iter().enumerate() {
                        let n = self.counts[(rm * N_STATUS + s) * OUTCOMES.len() + o]
                            .load(Ordering::Relaxed);
                        if n > 0 {
                            let status = STATUSES
                                .get(s)
                                .map_or_else(|| "other".to_owned(), ToString::to_string);
                            let _ = writeln!(
                                lines,
                                "http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\",cache=\"{outcome}\"}} {n}"
                            );
                        }
                    }
                }
            }
        }
        if lines.is_empty() {
            return;
        }
        out.push_str("# HELP http_requests_total HTTP requests answered, by route template, method, status and X-Cache.\n");
        out.push_str("# TYPE http_requests_total counter\n");
        out.push_str(&lines);
        out.push_str("# HELP http_request_duration_seconds Time to answer an HTTP request, by route template, method and X-Cache.\n");
        out.push_str("# TYPE http_request_duration_seconds histogram\n");
        for (r, route) in self.routes.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                for (o, outcome) in OUTCOMES.iter().enumerate() {
                    let rm = r * METHODS.len() + m;
                    let h = &self.hists[rm * OUTCOMES.len() + o];
                    let count = self.count(rm, o);
                    if count == 0 {
                        continue;
                    }
                    let labels =
                        format!("route=\"{route}\",method=\"{method}\",cache=\"{outcome}\"");
                    let mut cumulative = 0;
                    for (b, bound) in BOUNDS.iter().enumerate() {
                        cumulative += h.buckets[b].load(Ordering::Relaxed);
                        let _ = writeln!(
                            out,
                            "http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                        );
                    }
                    let _ = writeln!(
                        out,
                        "http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}"
                    );
                    let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
                    let _ = writeln!(out, "http_request_duration_seconds_sum{{{labels}}} {sum}");
                    let _ = writeln!(
                        out,
                        "http_request_duration_seconds_count{{{labels}}} {count}"
                    );
                }
            }
        }
    }
}

/// Where a request goes in the table: its route and method, read from the
/// request as routed (the route template is in its extensions).
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    route: usize,
    method: usize,
}

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::PUT => 1,
        Method::POST => 2,
        Method::DELETE => 3,
        _ => 4,
    }
}

impl HttpMetrics {
    /// The slot of a request about to be handled.
    pub fn slot<B>(&self, req: &Request<B>) -> Slot {
        Slot {
            route: self.route(req.extensions().get::<MatchedPath>()),
            method: method_index(req.method()),
        }
    }

    /// Records an answer: its status, `X-Cache` and the time since
    /// `started`.
    pub fn answered(&self, slot: Slot, r: &Response, started: Instant) {
        let outcome = match r.headers().get(X_CACHE).map(|v| v.as_bytes()) {
            Some(b"hit") => 0,
            Some(b"miss") => 1,
            Some(b"stale") => 2,
            Some(b"bypass") => 3,
            _ => 4,
        };
        self.record(
            slot.route,
            slot.method,
            r.status().as_u16(),
            outcome,
            started.elapsed().as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_used_slots_as_prometheus_text() {
        let t = HttpMetrics::new(&["/a/{id}", "/b"]);
        t.record(0, 0, 200, 0, 0.000_3);
        t.record(0, 0, 200, 0, 0.002);
        t.record(1, 2, 418, 4, 9.0);
        t.record(2, 4, 404, 4, 0.0);
        let mut out = String::new();
        t.render(&mut out);
        assert!(
            out.contains(
                r#"http_requests_total{route="/a/{id}",method="GET",status="200",cache="hit"} 2"#
            ),
            "{out}"
        );
        assert!(out.contains(
            r#"http_requests_total{route="/b",method="POST",status="other",cache="none"} 1"#
        ));
        assert!(out.contains(
            r#"http_requests_total{route="unmatched",method="OTHER",status="404",cache="none"} 1"#
        ));
        assert!(out.contains(r#"http_request_duration_seconds_bucket{route="/a/{id}",method="GET",cache="hit",le="0.0005"} 1"#));
        assert!(out.contains(r#"http_request_duration_seconds_bucket{route="/a/{id}",method="GET",cache="hit",le="0.0025"} 2"#));
        assert!(out.contains(r#"http_request_duration_seconds_bucket{route="/b",method="POST",cache="none",le="+Inf"} 1"#));
        assert!(out.contains(r#"http_request_duration_seconds_bucket{route="/b",method="POST",cache="none",le="5"} 0"#));
        assert!(out.contains(
            r#"http_request_duration_seconds_count{route="/a/{id}",method="GET",cache="hit"} 2"#
        ));
        assert_eq!(out.matches("# TYPE").count(), 2);
        assert!(!out.contains("PUT"), "unused slots are not written");
        let empty = HttpMetrics::new(&["/a"]);
        let mut none = String::new();
        empty.render(&mut none);
        assert!(none.is_empty());
    }
}
