//! Choosing which id each request addresses.

use std::sync::Arc;

use rand::Rng;

use crate::{BenchError, Dist};

#[derive(Debug, Clone)]
enum Kind {
    Hot,
    Uniform,
    /// Cumulative probabilities of the ids in order; the last is 1.0.
    Zipf(Arc<[f64]>),
}

/// Picks ids for requests according to a [`Dist`]: always the first (`hot`), any with equal
/// probability (`uniform`), or Zipf-distributed by position in the list (`zipf`: the id at
/// position `k`, counted from 1, is chosen with probability proportional to `1 / k^s`).
///
/// Sampling is `O(1)` for `hot` and `uniform` and a binary search over a precomputed
/// cumulative table for `zipf`; cloning shares the ids and the table.
///
/// # Examples
///
/// ```
/// use kura_bench::{Dist, IdSampler};
///
/// let ids = (1..=100).map(|i| i.to_string()).collect();
/// let sampler = IdSampler::new(ids, Dist::Zipf, 1.0).unwrap();
/// let mut rng = rand::rng();
/// let id = sampler.sample(&mut rng);
/// assert!((1..=100).contains(&id.parse::<u32>().unwrap()));
/// ```
#[derive(Debug, Clone)]
pub struct IdSampler {
    ids: Arc<[Box<str>]>,
    kind: Kind,
}

impl IdSampler {
    /// A sampler over `ids` (in the order given, which matters for `zipf`).
    ///
    /// # Errors
    ///
    /// [`BenchError::NoIds`] when `ids` is empty; [`BenchError::InvalidArgument`] when the
    /// Zipf exponent is negative or not finite.
    pub fn new(ids: Vec<String>, dist: Dist, zipf_exponent: f64) -> Result<IdSampler, BenchError> {
        if ids.is_empty() {
            return Err(BenchError::NoIds);
        }
        let kind = match dist {
            Dist::Hot => Kind::Hot,
            Dist::Uniform => Kind::Uniform,
            Dist::Zipf => {
                if !zipf_exponent.is_finite() || zipf_exponent < 0.0 {
                    return Err(BenchError::InvalidArgument {
                        flag: "--zipf-exponent",
                        reason: format!("must be a finite number >= 0, got {zipf_exponent}"),
                    });
                }
                Kind::Zipf(zipf_cdf(ids.len(), zipf_exponent))
            }
        };
        Ok(IdSampler {
            ids: ids.into_iter().map(String::into_boxed_str).collect(),
            kind,
        })
    }

    /// The number of ids.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always `false`: a sampler has at least one id.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The position of the next id in the list.
    pub fn sample_index<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        match &self.kind {
            Kind::Hot => 0,
            Kind::Uniform => rng.random_range(0..self.ids.len()),
            Kind::Zipf(cdf) => {
                let u: f64 = rng.random();
                // First position whose cumulative probability exceeds u; the clamp covers
                // rounding in the last entries.
                cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
            }
        }
    }

    /// The next id.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> &str {
        &self.ids[self.sample_index(rng)]
    }

    /// The id at position `index`.
    ///
    /// # Panics
    ///
    /// When `index >= self.len()`.
    #[must_use]
    pub fn id(&self, index: usize) -> &str {
        &self.ids[index]
    }
}

fn zipf_cdf(n: usize, s: f64) -> Arc<[f64]> {
    let mut cdf = Vec::with_capacity(n);
    let mut total = 0.0;
    for k in 1..=n {
        total += (k as f64).powf(-s);
        cdf.push(total);
    }
    for c in &mut cdf {
        *c /= total;
    }
    if let Some(last) = cdf.last_mut() {
        *last = 1.0;
    }
    cdf.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("id{i}")).collect()
    }

    fn counts(sampler: &IdSampler, draws: usize) -> Vec<usize> {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut counts = vec![0; sampler.len()];
        for _ in 0..draws {
            counts[sampler.sample_index(&mut rng)] += 1;
        }
        counts
    }

    #[test]
    fn hot_always_picks_the_first_id() {
        let s = IdSampler::new(ids(10), Dist::Hot, 1.0).unwrap();
        let c = counts(&s, 1000);
        assert_eq!(c[0], 1000);
        assert_eq!(s.sample(&mut rand::rng()), "id0");
    }

    #[test]
    fn uniform_covers_every_id_evenly() {
        let s = IdSampler::new(ids(10), Dist::Uniform, 1.0).unwrap();
        let c = counts(&s, 100_000);
        for n in c {
            assert!((9_000..11_000).contains(&n), "{n}");
        }
    }

    #[test]
    fn zipf_is_skewed_towards_the_head() {
        let s = IdSampler::new(ids(1000), Dist::Zipf, 1.0).unwrap();
        let c = counts(&s, 200_000);
        // With s = 1 and n = 1000, P(first) = 1/H(1000) ≈ 0.134 and P(k) ≈ P(first)/k.
        let first = c[0] as f64 / 200_000.0;
        assert!((0.12..0.15).contains(&first), "{first}");
        assert!(c[0] as f64 > 1.5 * c[1] as f64, "{} vs {}", c[0], c[1]);
        assert!(
            c[0] > 50 * c[499].max(1),
            "first {} median {}",
            c[0],
            c[499]
        );
        assert!(c.iter().sum::<usize>() == 200_000);
    }

    #[test]
    fn zipf_exponent_zero_is_uniform() {
        let s = IdSampler::new(ids(4), Dist::Zipf, 0.0).unwrap();
        for n in counts(&s, 40_000) {
            assert!((9_000..11_000).contains(&n), "{n}");
        }
    }

    #[test]
    fn single_id_and_bad_input() {
        let s = IdSampler::new(ids(1), Dist::Zipf, 1.2).unwrap();
        assert_eq!(counts(&s, 100), vec![100]);
        assert!(matches!(
            IdSampler::new(Vec::new(), Dist::Uniform, 1.0),
            Err(BenchError::NoIds)
        ));
        assert!(IdSampler::new(ids(3), Dist::Zipf, -1.0).is_err());
        assert!(IdSampler::new(ids(3), Dist::Zipf, f64::NAN).is_err());
    }
}
