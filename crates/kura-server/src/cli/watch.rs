//! `kura stats --watch`: a live terminal view of one or more running
//! instances, from their `/metrics`.
//!
//! Every interval it scrapes each `--url`, sums the series over the
//! instances and shows, for the last interval: requests per second and
//! their p99 (from `http_requests_total` and
//! `http_request_duration_seconds`), the hit ratio and loads per second per
//! type (`cache_hits_total`, `cache_misses_total`, `cache_bypass_total`,
//! `cache_loads_total`, `cache_load_errors_total`), the L1 hit ratio
//! (`cache_l1_*`), the write-behind depth and oldest write, and the feed
//! lag. An instance that does not answer is shown as down and left out of
//! the sums.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One sample: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series name.
    pub name: String,
    /// Its labels, in order.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `k`.
    #[must_use]
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text format (comments skipped, malformed lines
/// ignored).
#[must_use]
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let Some((name, rest)) = head.split_once('{') else {
        return Some(Sample {
            name: head.trim().to_owned(),
            labels: Vec::new(),
            value,
        });
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_owned(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// What one refresh shows, computed from two scrapes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Instances that answered, of all asked.
    pub up: usize,
    /// Instances asked.
    pub instances: usize,
    /// Requests per second.
    pub req_per_s: f64,
    /// p99 of the requests answered in the interval, seconds (`None`: no
    /// request).
    pub p99: Option<f64>,
    /// Per type: (hit ratio or `None` without reads, reads/s, loads/s,
    /// load errors/s).
    pub types: Vec<(String, Option<f64>, f64, f64, f64)>,
    /// Per type: L1 hit ratio.
    pub l1: Vec<(String, f64)>,
    /// Write-behind queue depth (all types, all instances).
    pub wb_depth: f64,
    /// Age of the oldest queued write, seconds.
    pub wb_oldest: f64,
    /// Invalidation feed lag, seconds (`None`: no relay reports one).
    pub feed_lag: Option<f64>,
}

fn sum_by<'a>(samples: &'a [Sample], name: &str, key: &str) -> HashMap<&'a str, f64> {
    let mut out: HashMap<&str, f64> = HashMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        *out.entry(s.label(key).unwrap_or("")).or_default() += s.value;
    }
    out
}

fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

fn max_of(samples: &[Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .reduce(f64::max)
}

/// The view of the interval between `before` and `now` (samples of all
/// instances), `secs` long.
#[must_use]
pub fn view(before: &[Sample], now: &[Sample], secs: f64) -> View {
    let secs = secs.max(1e-3);
    let rate = |name: &str| ((total(now, name) - total(before, name)) / secs).max(0.0);
    let mut v = View {
        req_per_s: rate("http_requests_total"),
        ..View::default()
    };
    // p99 over all routes from the bucket deltas.
    let buckets = |s: &[Sample]| {
        let mut b: HashMap<String, f64> = HashMap::new();
        for x in s
            .iter()
            .filter(|x| x.name == "http_request_duration_seconds_bucket")
        {
            *b.entry(x.label("le").unwrap_or("").to_owned()).or_default() += x.value;
        }
        b
    };
    let (b0, b1) = (buckets(before), buckets(now));
    let mut delta: Vec<(f64, f64)> = b1
        .iter()
        .filter_map(|(le, n)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, n - b0.get(le).copied().unwrap_or(0.0)))
        })
        .collect();
    delta.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Some(&(_, all)) = delta.last() {
        if all > 0.0 {
            v.p99 = delta
                .iter()
                .find(|(_, n)| *n >= all * 0.99)
                .map(|(b, _)| *b);
        }
    }
    let d = |name: &str| {
        let (a, b) = (
            sum_by(before, name, "cache_type"),
            sum_by(now, name, "cache_type"),
        );
        b.into_iter()
            .map(|(k, x)| {
                (
                    k.to_owned(),
                    ((x - a.get(k).copied().unwrap_or(0.0)) / secs).max(0.0),
                )
            })
            .collect::<HashMap<String, f64>>()
    };
    let (hits, misses, bypass, loads, errors) = (
        d("cache_hits_total"),
        d("cache_misses_total"),
        d("cache_bypass_total"),
        d("cache_loads_total"),
        d("cache_load_errors_total"),
    );
    let mut kinds: Vec<&String> = hits.keys().chain(misses.keys()).collect();
    kinds.sort();
    kinds.dedup();
    for k in kinds {
        let get = |m: &HashMap<String, f64>| m.get(k).copied().unwrap_or(0.0);
        let reads = get(&hits) + get(&misses) + get(&bypass);
        v.types.push((
            k.clone(),
            (reads > 0.0).then(|| get(&hits) / reads),
            reads,
            get(&loads),
            get(&errors),
        ));
    }
    let (l1h, l1m) = (d("cache_l1_hits_total"), d("cache_l1_misses_total"));
    let mut l1: Vec<(String, f64)> = l1h
        .iter()
        .filter_map(|(k, h)| {
            let all = h + l1m.get(k).copied().unwrap_or(0.0);
            (all > 0.0).then(|| (k.clone(), h / all))
        })
        .collect();
    l1.sort_by(|a, b| a.0.cmp(&b.0));
    v.l1 = l1;
    v.wb_depth = total(now, "cache_wb_queue_depth");
    v.wb_oldest = max_of(now, "cache_wb_oldest_age_seconds").unwrap_or(0.0);
    v.feed_lag = max_of(now, "cache_feed_lag_seconds");
    v
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "—".to_owned(), |r| format!("{:.1} %", r * 100.0))
}

/// The screen for a view.
#[must_use]
pub fn render(v: &View, urls: &[String], at: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kura stats --watch   {at}   instances up {}/{}",
        v.up, v.instances
    );
    for u in urls {
        let _ = writeln!(s, "  {u}");
    }
    let _ = writeln!(s);
    let p99 = v.p99.map_or_else(
        || "—".to_owned(),
        |p| {
            if p.is_finite() {
                format!("≤ {:.2} ms", p * 1e3)
            } else {
                "> 5 s".to_owned()
            }
        },
    );
    let _ = writeln!(s, "requests   {:>10.0} req/s    p99 {p99}", v.req_per_s);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<14} {:>10} {:>12} {:>10} {:>12}",
        "type", "hit ratio", "reads/s", "loads/s", "errors/s"
    );
    for (k, ratio, reads, loads, errors) in &v.types {
        let _ = writeln!(
            s,
            "{k:<14} {:>10} {reads:>12.0} {loads:>10.1} {errors:>12.1}",
            pct(*ratio)
        );
    }
    if !v.l1.is_empty() {
        let _ = writeln!(s);
        for (k, r) in &v.l1 {
            let _ = writeln!(s, "L1 {k:<11} {:>10}", pct(Some(*r)));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "write-behind   depth {:.0}   oldest {:.1} s",
        v.wb_depth, v.wb_oldest
    );
    let _ = writeln!(
        s,
        "feed           lag {}",
        v.feed_lag
            .map_or_else(|| "—".to_owned(), |l| format!("{:.3} s", l))
    );
    s
}

/// Scrapes every URL's `/metrics`: the samples of those that answered,
/// and how many did.
pub async fn scrape(client: &reqwest::Client, urls: &[String]) -> (Vec<Sample>, usize) {
    let mut all = Vec::new();
    let mut up = 0;
    for u in urls {
        let url = format!("{}/metrics", u.trim_end_matches('/'));
        let text = match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        if let Some(t) = text {
            up += 1;
            all.extend(parse(&t));
        }
    }
    (all, up)
}

/// Runs the view: refreshes every `interval` until interrupted, or after
/// `iterations` refreshes when given.
///
/// # Errors
///
/// When the HTTP client cannot be built.
pub async fn run(
    urls: &[String],
    interval: Duration,
    iterations: Option<u64>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(interval.max(Duration::from_millis(500)))
        .build()?;
    let (mut before, _) = scrape(&client, urls).await;
    let mut at = Instant::now();
    let mut n = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let (now, up) = scrape(&client, urls).await;
        let mut v = view(&before, &now, at.elapsed().as_secs_f64());
        at = Instant::now();
        v.up = up;
        v.instances = urls.len();
        let stamp = chrono::Utc::now().format("%H:%M:%S").to_string();
        // Clear the screen, cursor home, then the view.
        print!("\x1b[2J\x1b[H{}", render(&v, urls, &stamp));
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        before = now;
        n += 1;
        if iterations.is_some_and(|i| n >= i) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = r#"# HELP cache_hits_total x
cache_hits_total{cache_type="profile"} 100
cache_misses_total{cache_type="profile"} 10
cache_loads_total{cache_type="profile"} 10
http_requests_total{route="/api/v1/profiles/{user_id}",method="GET",status="200",cache="hit"} 100
http_request_duration_seconds_bucket{route="/a",le="0.001"} 90
http_request_duration_seconds_bucket{route="/a",le="0.01"} 100
http_request_duration_seconds_bucket{route="/a",le="+Inf"} 100
cache_wb_queue_depth{cache_type="profile"} 3
cache_feed_lag_seconds 0.02
"#;
    const T1: &str = r#"cache_hits_total{cache_type="profile"} 280
cache_misses_total{cache_type="profile"} 30
cache_loads_total{cache_type="profile"} 30
http_requests_total{route="/api/v1/profiles/{user_id}",method="GET",status="200",cache="hit"} 300
http_request_duration_seconds_bucket{route="/a",le="0.001"} 190
http_request_duration_seconds_bucket{route="/a",le="0.01"} 300
http_request_duration_seconds_bucket{route="/a",le="+Inf"} 300
cache_wb_queue_depth{cache_type="profile"} 5
cache_feed_lag_seconds 0.04
"#;

    #[test]
    fn parses_labels_with_braces_and_escapes() {
        let s = parse(r#"m{route="/a/{id}",x="q\"uote"} 2.5"#);
        assert_eq!(s[0].name, "m");
        assert_eq!(s[0].label("route"), Some("/a/{id}"));
        assert_eq!(s[0].label("x"), Some("q\"uote"));
        assert_eq!(s[0].value, 2.5);
        assert_eq!(parse("plain 3")[0].value, 3.0);
        assert!(parse("broken{x=1} 2").is_empty());
    }

    #[test]
    fn rates_ratios_and_p99_over_an_interval() {
        let v = view(&parse(T0), &parse(T1), 2.0);
        assert_eq!(v.req_per_s, 100.0);
        // 200 requests in the interval: 100 at ≤ 1 ms, 100 at ≤ 10 ms.
        assert_eq!(v.p99, Some(0.01));
        let (k, ratio, reads, loads, _) = &v.types[0];
        assert_eq!(k, "profile");
        assert_eq!(*ratio, Some(0.9));
        assert_eq!((*reads, *loads), (100.0, 10.0));
        assert_eq!((v.wb_depth, v.feed_lag), (5.0, Some(0.04)));
        let screen = render(&v, &["http://a".into()], "12:00:00");
        assert!(screen.contains("90.0 %"), "{screen}");
        assert!(screen.contains("≤ 10.00 ms"), "{screen}");
    }
}
