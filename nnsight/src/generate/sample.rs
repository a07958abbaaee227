//! Seeded sampling of the next token: temperature, top-k, top-p, then a draw.

use super::GenerateOptions;

/// SplitMix64 (Steele, Lea and Flood 2014): a small seeded generator, so sampling repeats exactly and leaves
/// libtorch's global generator alone.
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn for_row(seed: u64, row: usize) -> Self {
        let mut r = Rng(seed ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

pub(super) fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64
}

/// Draws a token from one row's logits: temperature, then top-k, then top-p (the order of transformers' logits
/// warpers), then a draw from the softmax of what is left.
pub(super) fn sample(logits: &[f32], o: &GenerateOptions, rng: &mut Rng) -> i64 {
    let t = o.temperature.unwrap_or(1.0);
    let mut x: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    let n = x.len();
    if let Some(k) = o.top_k.filter(|&k| k < n) {
        let mut sorted: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
        let kth = if k <= sorted.len() {
            let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth
        } else {
            f64::NEG_INFINITY
        };
        x.iter_mut().filter(|v| v.is_nan() || **v < kth).for_each(|v| *v = f64::NEG_INFINITY);
    }
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut p: Vec<f64> = x.iter().map(|&v| if v > f64::NEG_INFINITY { (v - max).exp() } else { 0.0 }).collect();
    let mut sum: f64 = p.iter().sum();
    if let Some(top_p) = o.top_p.filter(|&q| q < 1.0) {
        // transformers: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, keep the most
        // likely one.
        let mut order: Vec<usize> = (0..n).filter(|&i| p[i] > 0.0).collect();
        order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)));
        let mut cum = 0.0;
        let last = order.len().saturating_sub(1);
        for (rank, &i) in order.iter().enumerate() {
            cum += p[i] / sum;
            if cum <= 1.0 - top_p && rank < last {
                p[i] = 0.0;
            }
        }
        sum = p.iter().sum();
    }
    let u = rng.next_f64() * sum;
    let mut acc = 0.0;
    let mut chosen = None;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            acc += pi;
            chosen = Some(i);
            if u < acc {
                break;
            }
        }
    }
    chosen.unwrap_or(0) as i64
}
