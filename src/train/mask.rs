//! Supermasks from real-valued scores (ALGORITHMS §1.1): edge-popup per-layer top-k of `|S|`
//! or the threshold-at-zero rule, per-layer densities (uniform or the Erdős–Rényi budget),
//! and the straight-through gradients into the scores.

use bitvec::prelude::{BitSlice, BitVec, Lsb0};

/// How scores become a mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskRule {
    /// Keep the `n − floor((1 − k)·n)` largest `|S|` of each layer; `∂L/∂S = sign(S)·W·∂L/∂W_eff`.
    TopK,
    /// `M = 1[S ≥ 0]`; `∂L/∂S = W·∂L/∂W_eff`.
    Threshold,
}

/// Fraction of weights kept per layer (top-k only).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Density {
    /// The same fraction for every layer.
    Uniform(f64),
    /// `min(0.5, s·(c_out + c_in)/(c_out·c_in·kh·kw))` with the integer knob `s`.
    ErdosRenyi(f64),
}

impl Density {
    /// Kept fraction of a layer with `c_out` outputs and `fan_in = c_in·kh·kw` inputs per output.
    pub fn of_layer(self, c_out: usize, c_in: usize, kernel: usize) -> f64 {
        match self {
            Density::Uniform(k) => k,
            Density::ErdosRenyi(s) => (s * (c_out + c_in) as f64 / (c_out * c_in * kernel) as f64).min(0.5),
        }
    }
}

/// Edge-popup top-k: the `floor((1 − k)·n)` smallest `|S|` get 0, the rest 1. Ties at the
/// threshold are broken by position (earlier entries are dropped first), so the mask is a
/// function of the scores alone.
pub fn top_k(scores: &[f32], density: f64, mask: &mut BitVec<u32, Lsb0>) {
    let n = scores.len();
    // floor((1 − k)·n) as exact arithmetic would give it: 0.7·160 is 111.99999999999999 in
    // binary floating point, and the intended count is 112.
    let drop = (((1.0 - density) * n as f64 + 1e-9).floor() as usize).min(n);
    mask.clear();
    if drop == 0 || drop == n {
        mask.resize(n, drop == 0);
        return;
    }
    let (t, below, equal) = threshold_bits(scores, drop);
    // Entries strictly below the threshold all go; ties at it go in order until `drop` are gone.
    let mut ties = drop - below;
    // The mask built 32 bits at a time into its own words (setting bits one by one was a
    // tenth of an fc1024 step). Bits past `n` in the last word stay 0.
    mask.resize(n, false);
    let words = mask.as_raw_mut_slice();
    if ties == equal {
        // Usually one entry holds the threshold and it goes: keep exactly those above it,
        // without a branch per entry.
        // Fixed-size chunks: each bit's shift is a constant, so the compares vectorise.
        let (chunks, rest) = scores.as_chunks::<32>();
        let above = |w: u32, (j, v): (usize, &f32)| w | u32::from(bits(v) > t) << j;
        for (word, chunk) in words.iter_mut().zip(chunks) {
            *word = chunk.iter().enumerate().fold(0, above);
        }
        if !rest.is_empty() {
            words[chunks.len()] = rest.iter().enumerate().fold(0, above);
        }
        return;
    }
    for (word, chunk) in words.iter_mut().zip(scores.chunks(32)) {
        let mut w = 0u32;
        for (j, v) in chunk.iter().enumerate() {
            let a = v.abs().to_bits();
            let keep = if a > t {
                true
            } else if a == t && ties > 0 {
                ties -= 1;
                false
            } else {
                a == t
            };
            w |= u32::from(keep) << j;
        }
        *word = w;
    }
}

/// The bits `t` of the `drop`-th smallest `|s|` (1-based), how many `|s|` are below `t` and
/// how many equal it. For non-negative floats the bit patterns order as the values do, so
/// bits stand for values throughout.
fn threshold_bits(scores: &[f32], drop: usize) -> (u32, usize, usize) {
    debug_assert!(drop >= 1 && drop <= scores.len());
    BUCKETS.with(|cell| {
        let (spare, bucket) = &mut *cell.borrow_mut();
        band_select(scores, drop, spare, bucket).unwrap_or_else(|| radix_select(scores, drop, spare, bucket))
    })
}

fn bits(s: &f32) -> u32 {
    s.abs().to_bits()
}

/// Scores [`band_select`] samples.
const SAMPLE: usize = 1 << 14;

/// Layers smaller than this go straight to [`radix_select`].
const BAND_MIN: usize = 4 * SAMPLE;

/// Select by a sampled band: a strided sample of [`SAMPLE`] scores gives bounds `lo ≤ hi` that
/// hold the answer's rank with a margin of four standard deviations of a sample quantile;
/// one pass then counts the scores below `lo` and gathers the few in `[lo, hi]`, and the
/// answer is selected among those. `None` when the band missed the rank (a layer whose
/// scores the stride samples badly); the caller then selects exactly another way. This pass
/// compares and counts eight scores at a time, where the radix select's histogram was a
/// dependent scatter per score: 4 ms of a 27 ms fc1024 step.
fn band_select(scores: &[f32], drop: usize, sample: &mut Vec<u32>, band: &mut Vec<u32>) -> Option<(u32, usize, usize)> {
    let n = scores.len();
    if n < BAND_MIN {
        return None;
    }
    sample.clear();
    sample.extend(scores.iter().step_by(n / SAMPLE).map(bits));
    let m = sample.len();
    let q = drop as f64 / n as f64;
    let spread = 4.0 * (m as f64 * q * (1.0 - q)).sqrt() + 4.0;
    let (r_lo, r_hi) = (q * m as f64 - spread, q * m as f64 + spread);
    let lo = if r_lo < 0.0 { 0 } else { *sample.select_nth_unstable(r_lo as usize).1 };
    // Past the first select, ranks above `r_lo` lie after it.
    let hi = match r_hi.ceil() as usize {
        r if r >= m => u32::MAX,
        r => {
            let from = if r_lo < 0.0 { 0 } else { r_lo as usize + 1 };
            *sample[from..].select_nth_unstable(r - from).1
        }
    };
    // Signed compares (SSE2 has no unsigned ones): `|s|`'s bits are at most `i32::MAX`.
    let (lo, hi) = (lo as i32, hi.min(i32::MAX as u32) as i32);
    let mut lanes = [0u32; 8];
    band.clear();
    let (blocks, rest) = scores.as_chunks::<8>();
    for block in blocks {
        let a = block.map(|s| bits(&s) as i32);
        let mut hit = false;
        for l in 0..8 {
            lanes[l] += u32::from(a[l] < lo);
            hit |= lo <= a[l] && a[l] <= hi;
        }
        if hit {
            // Without a branch per entry: each is written, and kept if in the band.
            let (mut kept, mut k) = ([0u32; 8], 0);
            for x in a {
                kept[k & 7] = x as u32;
                k += usize::from(lo <= x && x <= hi);
            }
            band.extend_from_slice(&kept[..k]);
        }
    }
    let mut below = lanes.iter().map(|&c| c as usize).sum::<usize>();
    below += rest.iter().filter(|s| (bits(s) as i32) < lo).count();
    band.extend(rest.iter().map(bits).filter(|&a| lo <= a as i32 && a as i32 <= hi));
    if below >= drop || below + band.len() < drop {
        return None;
    }
    Some(select_in(band, drop - below, below))
}

/// `(t, below, equal)` of the `k`-th smallest of `bucket` (1-based), given that `below`
/// scores outside it are smaller and none outside equal it.
fn select_in(bucket: &mut [u32], k: usize, below: usize) -> (u32, usize, usize) {
    let t = *bucket.select_nth_unstable(k - 1).1;
    let (lt, eq) = bucket.iter().fold((0, 0), |(lt, eq), &x| (lt + usize::from(x < t), eq + usize::from(x == t)));
    (t, below + lt, eq)
}

/// Exact select for any scores: a histogram of the top 16 bits finds the bucket that holds
/// the answer, and only that bucket's entries are selected among (a quickselect over all of
/// a layer's `|s|` was a sixth of an fc1024 step).
fn radix_select(scores: &[f32], drop: usize, hist: &mut Vec<u32>, bucket: &mut Vec<u32>) -> (u32, usize, usize) {
    // |s| has the sign bit clear: 15 high bits remain. Four counts per bucket, entry `i`
    // into count `i mod 4`: scores crowd into a few buckets, and with one count per bucket
    // each increment waits for the one before.
    hist.clear();
    hist.resize(4 << 15, 0);
    let (quads, rest) = scores.as_chunks::<4>();
    for q in quads {
        for (l, s) in q.iter().enumerate() {
            hist[(bits(s) >> 16) as usize * 4 + l] += 1;
        }
    }
    for s in rest {
        hist[(bits(s) >> 16) as usize * 4] += 1;
    }
    let count = |b: usize| hist[b * 4..b * 4 + 4].iter().map(|&c| c as usize).sum::<usize>();
    let mut below = 0usize;
    let mut b = 0;
    while below + count(b) < drop {
        below += count(b);
        b += 1;
    }
    // The bucket's entries, eight scores at a time: a test per entry with a branch was
    // two fifths of `top_k`, and few entries are in the bucket.
    bucket.clear();
    let (blocks, rest) = scores.as_chunks::<8>();
    for block in blocks {
        if block.iter().fold(false, |any, s| any | ((bits(s) >> 16) as usize == b)) {
            bucket.extend(block.iter().map(bits).filter(|&x| (x >> 16) as usize == b));
        }
    }
    bucket.extend(rest.iter().map(bits).filter(|&x| (x >> 16) as usize == b));
    select_in(bucket, drop - below, below)
}

std::thread_local! {
    /// A sample or histogram of `|S|`'s bits and the entries of a band or bucket, kept
    /// between calls.
    static BUCKETS: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `M = 1[S ≥ 0]`.
pub fn threshold(scores: &[f32], mask: &mut BitVec<u32, Lsb0>) {
    mask.clear();
    mask.extend(scores.iter().map(|&s| s >= 0.0));
}

/// `W_eff = W ⊙ M`.
pub fn apply(w: &[f32], mask: &BitSlice<u32, Lsb0>, out: &mut [f32]) {
    use bitvec::field::BitField;
    // 32 bits at a time rather than an iterator over bits.
    for ((o, w), bits) in out.chunks_mut(32).zip(w.chunks(32)).zip(mask.chunks(32)) {
        let word: u32 = bits.load_le();
        for (j, (o, &v)) in o.iter_mut().zip(w).enumerate() {
            *o = if word >> j & 1 == 1 { v } else { 0.0 };
        }
    }
}

/// [`apply`] where `out` holds `w ⊙ old` already (`old`: the previous mask's words, as
/// `mask`'s own, whose bits past its length are 0): only the weights whose bit changed are
/// written. Between two steps few bits change, and rewriting
/// every weight was a twentieth of an fc1024 step.
pub fn apply_changed(w: &[f32], old: &[u32], mask: &BitVec<u32, Lsb0>, out: &mut [f32]) {
    for (i, (&now, &was)) in mask.as_raw_slice().iter().zip(old).enumerate() {
        let mut diff = now ^ was;
        while diff != 0 {
            let j = diff.trailing_zeros() as usize;
            diff &= diff - 1;
            let at = i * 32 + j;
            out[at] = if now >> j & 1 == 1 { w[at] } else { 0.0 };
        }
    }
}

/// Straight-through score gradient into `ds` (overwritten); element-wise, so any piece of a
/// layer can be made alone ([`crate::train::optim::Optimizer::update_with`] makes it as it
/// steps).
pub fn score_grad(rule: MaskRule, scores: &[f32], w: &[f32], dw_eff: &[f32], ds: &mut [f32]) {
    for (((d, &s), &wv), &g) in ds.iter_mut().zip(scores).zip(w).zip(dw_eff) {
        let sign = match rule {
            MaskRule::TopK => {
                if s > 0.0 {
                    1.0
                } else if s < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
            MaskRule::Threshold => 1.0,
        };
        // `0.0 +` turns a −0 into +0, as accumulating into zeroed gradients did.
        *d = 0.0 + sign * wv * g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_magnitudes() {
        let s = [0.1, -0.9, 0.3, -0.2, 0.5, 0.0, 0.8, -0.4, 0.6, 0.7];
        let mut m = BitVec::new();
        top_k(&s, 0.3, &mut m); // drop floor(0.7·10) = 7, keep 3: -0.9, 0.8, 0.7
        let kept: Vec<usize> = m.iter_ones().collect();
        assert_eq!(kept, vec![1, 6, 9]);
        top_k(&s, 1.0, &mut m);
        assert_eq!(m.count_ones(), 10);
        top_k(&s, 0.0, &mut m);
        assert_eq!(m.count_ones(), 0);
        // (1 − 0.3)·160 is 112 exactly, not the 111.99… of binary floating point.
        let many: Vec<f32> = (0..160).map(|i| i as f32).collect();
        top_k(&many, 0.3, &mut m);
        assert_eq!(m.count_ones(), 48);
    }

    /// Both selects against sorting, on scores with many ties, both signs, zeros,
    /// subnormals and values spread over many exponents.
    #[test]
    fn threshold_bits_equals_sorting() {
        let mut r = crate::rng::SplitMix64::new(5);
        let (mut spare, mut bucket) = (Vec::new(), Vec::new());
        let mut banded = 0;
        for n in [1usize, 2, 7, 100, 5000, BAND_MIN, 100_003] {
            let s: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => 0.25,
                    1 => -0.0,
                    2 => f32::from_bits(r.below(1 << 20) as u32),
                    _ => r.uniform(-1.0, 1.0) * 10f32.powi(r.below(8) as i32 - 4),
                })
                .collect();
            let mut sorted: Vec<u32> = s.iter().map(|v| v.abs().to_bits()).collect();
            sorted.sort_unstable();
            for drop in (1..=n).step_by(n.div_ceil(37)).chain([n]) {
                let t = sorted[drop - 1];
                let below = sorted.partition_point(|&x| x < t);
                let equal = sorted.partition_point(|&x| x <= t) - below;
                assert_eq!(threshold_bits(&s, drop), (t, below, equal), "n {n} drop {drop}");
                assert_eq!(radix_select(&s, drop, &mut spare, &mut bucket), (t, below, equal), "n {n} drop {drop}");
                if n >= BAND_MIN {
                    let got = band_select(&s, drop, &mut spare, &mut bucket);
                    assert_eq!(got, Some((t, below, equal)), "n {n} drop {drop}: the band holds the rank");
                    banded += 1;
                }
            }
        }
        assert!(banded >= 70);
    }

    /// A layer whose strided sample is unlike the rest: the band misses, and the radix
    /// select answers.
    #[test]
    fn a_misleading_sample_falls_back_to_the_radix_select() {
        let n = BAND_MIN + 1000;
        let step = n / SAMPLE;
        let s: Vec<f32> =
            (0..n).map(|i| if i % step == 0 { 1.0 + i as f32 * 1e-6 } else { -(i as f32) * 1e-7 }).collect();
        let mut sorted: Vec<u32> = s.iter().map(|v| v.abs().to_bits()).collect();
        sorted.sort_unstable();
        let (mut spare, mut bucket) = (Vec::new(), Vec::new());
        for drop in [n / 2, n / 10] {
            assert_eq!(band_select(&s, drop, &mut spare, &mut bucket), None);
            let t = sorted[drop - 1];
            assert_eq!(threshold_bits(&s, drop), (t, drop - 1, 1));
        }
    }

    /// Against the definition: order entries by (|s|, position) and drop the first ones.
    #[test]
    fn top_k_equals_sorting_by_magnitude_then_position() {
        let mut r = crate::rng::SplitMix64::new(11);
        for n in [1usize, 31, 32, 33, 1000, BAND_MIN + 7] {
            for levels in [3usize, 1 << 20] {
                let s: Vec<f32> = (0..n).map(|_| (r.below(levels) as f32 - levels as f32 / 2.0) * 0.01).collect();
                for density in [0.05, 0.3, 0.5, 0.97] {
                    let mut m = BitVec::new();
                    top_k(&s, density, &mut m);
                    let drop = (((1.0 - density) * n as f64 + 1e-9).floor() as usize).min(n);
                    let mut order: Vec<usize> = (0..n).collect();
                    order.sort_by_key(|&i| (s[i].abs().to_bits(), i));
                    let mut want: BitVec<u32, Lsb0> = BitVec::repeat(true, n);
                    for &i in &order[..drop] {
                        want.set(i, false);
                    }
                    assert_eq!(m, want, "n {n} levels {levels} density {density}");
                }
            }
        }
    }

    #[test]
    fn top_k_breaks_ties_by_position() {
        let s = [0.5f32; 6];
        let mut m = BitVec::new();
        top_k(&s, 0.5, &mut m);
        assert_eq!(m.iter_ones().collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn erdos_renyi_budget_matches_the_formula_and_cap() {
        // 3x3 conv 20 -> 20 with s = 4: 4·40/(20·20·9) = 0.0444…
        assert!((Density::ErdosRenyi(4.0).of_layer(20, 20, 9) - 160.0 / 3600.0).abs() < 1e-7);
        assert_eq!(Density::ErdosRenyi(32.0).of_layer(3, 3, 1), 0.5);
    }

    #[test]
    fn applying_the_changed_bits_equals_applying_the_mask() {
        let mut r = crate::rng::SplitMix64::new(3);
        let n = 1000;
        let w: Vec<f32> = (0..n).map(|_| r.uniform(-1.0, 1.0)).collect();
        let draw = |r: &mut crate::rng::SplitMix64, p: f32| -> BitVec<u32, Lsb0> {
            (0..n).map(|_| r.uniform(0.0, 1.0) < p).collect()
        };
        let old = draw(&mut r, 0.3);
        let mut out = vec![0.0; n];
        apply(&w, &old, &mut out);
        for p in [0.3, 0.05, 0.9] {
            let new = draw(&mut r, p);
            let mut want = vec![7.0; n];
            apply(&w, &new, &mut want);
            let mut got = out.clone();
            apply_changed(&w, old.as_raw_slice(), &new, &mut got);
            assert_eq!(got, want, "density {p}");
        }
    }

    #[test]
    fn straight_through_gradients() {
        let (s, w, g) = ([0.5, -0.5, 0.0], [2.0, 3.0, 4.0], [1.0, 1.0, 1.0]);
        let mut d = [9.0; 3]; // overwritten
        score_grad(MaskRule::TopK, &s, &w, &g, &mut d);
        assert_eq!(d, [2.0, -3.0, 0.0]);
        assert!(d[2].is_sign_positive());
        score_grad(MaskRule::Threshold, &s, &w, &g, &mut d);
        assert_eq!(d, [2.0, 3.0, 4.0]);
    }
}
