//! What a run measured, merged from the workers, and how it is printed.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Lowest latency the histograms track: one microsecond.
const HIST_LOW_US: u64 = 1;

/// Values of the `X-Cache` response header, as counted by the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XCache {
    Hit = 0,
    Miss = 1,
    Stale = 2,
    Bypass = 3,
    Other = 4,
    None = 5,
}

impl XCache {
    pub(crate) const COUNT: usize = 6;

    /// Classifies a header value without allocating (case-insensitive).
    pub(crate) fn classify(value: Option<&[u8]>) -> XCache {
        let Some(v) = value else {
            return XCache::None;
        };
        let v = v.trim_ascii();
        if v.eq_ignore_ascii_case(b"hit") {
            XCache::Hit
        } else if v.eq_ignore_ascii_case(b"miss") {
            XCache::Miss
        } else if v.eq_ignore_ascii_case(b"stale") {
            XCache::Stale
        } else if v.eq_ignore_ascii_case(b"bypass") {
            XCache::Bypass
        } else {
            XCache::Other
        }
    }
}

/// Counts of one one-second interval, per worker and merged.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IntervalCounts {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) hits: u64,
    pub(crate) with_x_cache: u64,
}

/// What one worker measured; merged into a [`Report`] at the end.
#[derive(Debug)]
pub(crate) struct WorkerStats {
    pub(crate) latency_us: Histogram<u64>,
    /// Indexed by status code (hyper only produces 100..=999).
    pub(crate) statuses: Box<[u64; 1000]>,
    pub(crate) errors: u64,
    pub(crate) timeouts: u64,
    pub(crate) x_cache: [u64; XCache::COUNT],
    pub(crate) intervals: Vec<IntervalCounts>,
    pub(crate) warmup_requests: u64,
}

impl WorkerStats {
    pub(crate) fn new(max_latency: Duration) -> WorkerStats {
        let high = u64::try_from(max_latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(HIST_LOW_US * 2);
        WorkerStats {
            latency_us: Histogram::new_with_bounds(HIST_LOW_US, high, 3)
                .expect("histogram bounds are valid"),
            statuses: Box::new([0; 1000]),
            errors: 0,
            timeouts: 0,
            x_cache: [0; XCache::COUNT],
            intervals: Vec::new(),
            warmup_requests: 0,
        }
    }

    fn interval(&mut self, second: usize) -> &mut IntervalCounts {
        if self.intervals.len() <= second {
            self.intervals.resize(second + 1, IntervalCounts::default());
        }
        &mut self.intervals[second]
    }

    pub(crate) fn record_response(
        &mut self,
        status: u16,
        x_cache: XCache,
        latency: Duration,
        second: usize,
    ) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(us.max(HIST_LOW_US));
        if let Some(n) = self.statuses.get_mut(usize::from(status)) {
            *n += 1;
        }
        self.x_cache[x_cache as usize] += 1;
        let iv = self.interval(second);
        iv.requests += 1;
        if x_cache != XCache::None {
            iv.with_x_cache += 1;
            if x_cache == XCache::Hit {
                iv.hits += 1;
            }
        }
    }

    pub(crate) fn record_failure(&mut self, timeout: bool, second: usize) {
        if timeout {
            self.timeouts += 1;
        } else {
            self.errors += 1;
        }
        let iv = self.interval(second);
        iv.requests += 1;
        iv.errors += 1;
    }

    pub(crate) fn merge(&mut self, other: &WorkerStats) {
        self.latency_us
            .add(&other.latency_us)
            .expect("all workers use the same histogram bounds");
        for (a, b) in self.statuses.iter_mut().zip(other.statuses.iter()) {
            *a += b;
        }
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        for (a, b) in self.x_cache.iter_mut().zip(other.x_cache) {
            *a += b;
        }
        if self.intervals.len() < other.intervals.len() {
            self.intervals
                .resize(other.intervals.len(), IntervalCounts::default());
        }
        for (a, b) in self.intervals.iter_mut().zip(&other.intervals) {
            a.requests += b.requests;
            a.errors += b.errors;
            a.hits += b.hits;
            a.with_x_cache += b.with_x_cache;
        }
        self.warmup_requests += other.warmup_requests;
    }
}

/// Latency percentiles of the answered requests, in milliseconds (recorded with microsecond
/// resolution, 3 significant digits). All zero when nothing was answered.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Latency {
    /// Smallest.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// How many responses carried each `X-Cache` value (case-insensitive).
#[derive(Serialize, Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct XCacheMix {
    /// `X-Cache: hit`.
    pub hit: u64,
    /// `X-Cache: miss`.
    pub miss: u64,
    /// `X-Cache: stale` (served from a stale value).
    pub stale: u64,
    /// `X-Cache: bypass` (the cache was skipped).
    pub bypass: u64,
    /// Any other value.
    pub other: u64,
    /// No `X-Cache` header.
    pub none: u64,
}

impl XCacheMix {
    /// Responses that carried an `X-Cache` header.
    #[must_use]
    pub fn with_header(&self) -> u64 {
        self.hit + self.miss + self.stale + self.bypass + self.other
    }

    /// Hits over responses with an `X-Cache` header; `None` when there were none.
    #[must_use]
    pub fn hit_ratio(&self) -> Option<f64> {
        ratio(self.hit, self.with_header())
    }
}

/// One second of the measured run.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Interval {
    /// Seconds since measuring began (this interval covers `[second, second + 1)`).
    pub second: u64,
    /// Requests that completed (answered, failed or timed out) in the interval.
    pub requests: u64,
    /// Transport errors and timeouts among them.
    pub errors: u64,
    /// Responses with `X-Cache: hit`.
    pub hits: u64,
    /// Responses with any `X-Cache` header.
    pub with_x_cache: u64,
    /// `hits / with_x_cache`; `None` when no response had the header.
    pub hit_ratio: Option<f64>,
}

/// Why the run stopped.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StopReason {
    /// The `--duration` (or the default/cap) elapsed.
    Duration,
    /// `--requests` requests were sent.
    Requests,
    /// Ctrl-C stopped the run early.
    Interrupted,
}

/// The result of a run: what [`run`](crate::run) prints, as a table or as JSON.
#[derive(Serialize, Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// Method and URL template, e.g. `GET http://127.0.0.1:8080/api/v1/profiles/{id}`.
    pub target: String,
    /// Id distribution, e.g. `zipf(s=1) over 1000 ids`.
    pub distribution: String,
    /// Concurrent workers (connections).
    pub concurrency: usize,
    /// Fixed request rate (open loop), or `None` for a closed loop.
    pub rate: Option<f64>,
    /// Requests sent during the warm-up (not counted anywhere else).
    pub warmup_requests: u64,
    /// Measured requests: responses + transport errors + timeouts.
    pub requests: u64,
    /// Requests answered with an HTTP status (any status).
    pub responses: u64,
    /// Measuring time in seconds.
    pub duration_secs: f64,
    /// `requests / duration_secs`.
    pub throughput: f64,
    /// Latency of the answered requests.
    pub latency_ms: Latency,
    /// Responses per HTTP status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that failed below HTTP (connect refused, connection reset, malformed reply).
    pub errors: u64,
    /// Requests that took longer than `--timeout`.
    pub timeouts: u64,
    /// Responses per `X-Cache` value.
    pub x_cache: XCacheMix,
    /// Hits over responses with an `X-Cache` header, over the whole run.
    pub hit_ratio: Option<f64>,
    /// Requests and hit ratio per second.
    pub intervals: Vec<Interval>,
    /// Why the run stopped.
    pub stopped_by: StopReason,
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Everything a report needs besides the merged worker counts.
pub(crate) struct RunInfo {
    pub(crate) target: String,
    pub(crate) distribution: String,
    pub(crate) concurrency: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) elapsed: Duration,
    pub(crate) stopped_by: StopReason,
}

impl Report {
    pub(crate) fn build(stats: &WorkerStats, info: RunInfo) -> Report {
        let h = &stats.latency_us;
        let latency_ms = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                min: ms(h.min()),
                mean: h.mean() / 1000.0,
                p50: ms(h.value_at_quantile(0.5)),
                p90: ms(h.value_at_quantile(0.9)),
                p99: ms(h.value_at_quantile(0.99)),
                p999: ms(h.value_at_quantile(0.999)),
                max: ms(h.max()),
            }
        };
        let statuses: BTreeMap<u16, u64> = stats
            .statuses
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(code, &n)| (u16::try_from(code).expect("index below 1000"), n))
            .collect();
        let responses: u64 = statuses.values().sum();
        let requests = responses + stats.errors + stats.timeouts;
        let x = &stats.x_cache;
        let x_cache = XCacheMix {
            hit: x[XCache::Hit as usize],
            miss: x[XCache::Miss as usize],
            stale: x[XCache::Stale as usize],
            bypass: x[XCache::Bypass as usize],
            other: x[XCache::Other as usize],
            none: x[XCache::None as usize],
        };
        let secs = info.elapsed.as_secs_f64();
        Report {
            target: info.target,
            distribution: info.distribution,
            concurrency: info.concurrency,
            rate: info.rate,
            warmup_requests: stats.warmup_requests,
            requests,
            responses,
            duration_secs: secs,
            throughput: if secs > 0.0 {
                requests as f64 / secs
            } else {
                0.0
            },
            latency_ms,
            statuses,
            errors: stats.errors,
            timeouts: stats.timeouts,
            hit_ratio: x_cache.hit_ratio(),
            x_cache,
            intervals: stats
                .intervals
                .iter()
                .enumerate()
                .map(|(i, iv)| Interval {
                    second: i as u64,
                    requests: iv.requests,
                    errors: iv.errors,
                    hits: iv.hits,
                    with_x_cache: iv.with_x_cache,
                    hit_ratio: ratio(iv.hits, iv.with_x_cache),
                })
                .collect(),
            stopped_by: info.stopped_by,
        }
    }

    /// The report as pretty-printed JSON.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }
}

fn percent(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

/// The human-readable table.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_owned(),
        };
        writeln!(f, "target      {}", self.target)?;
        writeln!(
            f,
            "load        {}, concurrency {}, {mode}",
            self.distribution, self.concurrency
        )?;
        let stopped = match self.stopped_by {
            StopReason::Duration => "duration reached",
            StopReason::Requests => "request count reached",
            StopReason::Interrupted => "interrupted",
        };
        writeln!(
            f,
            "requests    {} in {:.2} s = {:.1} req/s  ({stopped}; {} warm-up requests not counted)",
            self.requests, self.duration_secs, self.throughput, self.warmup_requests
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        )?;
        let mut statuses = String::new();
        for (code, n) in &self.statuses {
            let _ = write!(statuses, "{code}: {n}  ");
        }
        if statuses.is_empty() {
            statuses.push('-');
        }
        writeln!(f, "status      {}", statuses.trim_end())?;
        writeln!(
            f,
            "failures    transport errors {}  timeouts {}",
            self.errors, self.timeouts
        )?;
        let x = &self.x_cache;
        writeln!(
            f,
            "x-cache     hit {}  miss {}  stale {}  bypass {}  other {}  none {}",
            x.hit, x.miss, x.stale, x.bypass, x.other, x.none
        )?;
        writeln!(
            f,
            "hit ratio   {} of {} responses with X-Cache",
            percent(self.hit_ratio),
            x.with_header()
        )?;
        if !self.intervals.is_empty() {
            writeln!(
                f,
                "{:>8} {:>10} {:>8} {:>10}",
                "second", "requests", "errors", "hit ratio"
            )?;
            for iv in &self.intervals {
                writeln!(
                    f,
                    "{:>8} {:>10} {:>8} {:>10}",
                    iv.second,
                    iv.requests,
                    iv.errors,
                    percent(iv.hit_ratio)
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_x_cache_values() {
        assert_eq!(XCache::classify(None), XCache::None);
        assert_eq!(XCache::classify(Some(b"hit")), XCache::Hit);
        assert_eq!(XCache::classify(Some(b"HIT")), XCache::Hit);
        assert_eq!(XCache::classify(Some(b" Miss ")), XCache::Miss);
        assert_eq!(XCache::classify(Some(b"stale")), XCache::Stale);
        assert_eq!(XCache::classify(Some(b"bypass")), XCache::Bypass);
        assert_eq!(XCache::classify(Some(b"hit-ish")), XCache::Other);
        assert_eq!(XCache::classify(Some(b"")), XCache::Other);
    }

    fn info() -> RunInfo {
        RunInfo {
            target: "GET http://127.0.0.1:1/{id}".into(),
            distribution: "hot over 1 id".into(),
            concurrency: 2,
            rate: None,
            elapsed: Duration::from_secs(2),
            stopped_by: StopReason::Duration,
        }
    }

    #[test]
    fn merges_workers_and_computes_ratios() {
        let max = Duration::from_secs(10);
        let mut a = WorkerStats::new(max);
        a.record_response(200, XCache::Hit, Duration::from_millis(1), 0);
        a.record_response(200, XCache::Miss, Duration::from_millis(3), 0);
        a.record_failure(true, 1);
        let mut b = WorkerStats::new(max);
        b.record_response(404, XCache::None, Duration::from_micros(10), 1);
        b.record_response(200, XCache::Hit, Duration::from_millis(2), 1);
        b.record_failure(false, 1);
        b.warmup_requests = 5;
        a.merge(&b);
        let r = Report::build(&a, info());
        assert_eq!(r.requests, 6);
        assert_eq!(r.responses, 4);
        assert_eq!(r.errors, 1);
        assert_eq!(r.timeouts, 1);
        assert_eq!(r.warmup_requests, 5);
        assert_eq!(r.statuses, BTreeMap::from([(200, 3), (404, 1)]));
        assert_eq!(r.x_cache.hit, 2);
        assert_eq!(r.x_cache.none, 1);
        assert_eq!(r.hit_ratio, Some(2.0 / 3.0));
        assert!((r.throughput - 3.0).abs() < 1e-9);
        assert_eq!(r.intervals.len(), 2);
        assert_eq!(r.intervals[0].hit_ratio, Some(0.5));
        assert_eq!(r.intervals[1].requests, 4);
        assert_eq!(r.intervals[1].errors, 2);
        assert_eq!(r.intervals[1].hit_ratio, Some(1.0));
        assert!(r.latency_ms.min >= 0.009 && r.latency_ms.min <= 0.011);
        assert!(r.latency_ms.max >= 2.99 && r.latency_ms.max <= 3.01);
        assert!(r.latency_ms.p50 <= r.latency_ms.p99);

        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["statuses"]["200"], 3);
        assert_eq!(json["stopped_by"], "duration");
        assert_eq!(json["x_cache"]["hit"], 2);
        let table = r.to_string();
        assert!(table.contains("200: 3  404: 1"), "{table}");
        assert!(table.contains("hit ratio   66.7%"), "{table}");
    }

    #[test]
    fn empty_run_reports_zeros() {
        let r = Report::build(&WorkerStats::new(Duration::from_secs(1)), info());
        assert_eq!(r.requests, 0);
        assert_eq!(r.latency_ms, Latency::default());
        assert_eq!(r.hit_ratio, None);
        assert!(r.to_string().contains("status      -"));
    }
}
