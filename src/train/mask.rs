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
        for (word, chunk) in words.iter_mut().zip(scores.chunks(32)) {
            *word = chunk.iter().enumerate().fold(0, |w, (j, v)| w | u32::from(v.abs().to_bits() > t) << j);
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
/// how many equal it. For non-negative floats the bit patterns order as the values do, so this is a
/// radix select: a histogram of the top 16 bits finds the bucket that holds the answer, and
/// only that bucket's entries are selected among (a quickselect over all of a layer's `|s|`
/// was a sixth of an fc1024 step).
fn threshold_bits(scores: &[f32], drop: usize) -> (u32, usize, usize) {
    debug_assert!(drop >= 1 && drop <= scores.len());
    let bits = |s: &f32| s.abs().to_bits();
    BUCKETS.with(|cell| {
        let (hist, bucket) = &mut *cell.borrow_mut();
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
        let t = *bucket.select_nth_unstable(drop - below - 1).1;
        let (lt, eq) = bucket.iter().fold((0, 0), |(lt, eq), &x| (lt + usize::from(x < t), eq + usize::from(x == t)));
        (t, below + lt, eq)
    })
}

std::thread_local! {
    /// A histogram of the top bits of `|S|` and the entries of one of its buckets, kept
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

/// Straight-through score gradient into `ds` (overwritten). Element-wise; a large layer is
/// split over the kernel threads (any split gives the same bits).
pub fn score_grad(rule: MaskRule, scores: &[f32], w: &[f32], dw_eff: &[f32], ds: &mut [f32]) {
    let run = |ds: &mut [f32], scores: &[f32], w: &[f32], dw: &[f32]| {
        for (((d, &s), &wv), &g) in ds.iter_mut().zip(scores).zip(w).zip(dw) {
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
    };
    const CHUNK: usize = 1 << 14;
    let n = ds.len();
    crate::kernels::for_each_chunk(ds, CHUNK, n, |i, d| {
        let at = i * CHUNK..i * CHUNK + d.len();
        run(d, &scores[at.clone()], &w[at.clone()], &dw_eff[at])
    });
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

    /// The radix select against sorting, on scores with many ties, both signs, zeros,
    /// subnormals and values spread over many exponents.
    #[test]
    fn threshold_bits_equals_sorting() {
        let mut r = crate::rng::SplitMix64::new(5);
        for n in [1usize, 2, 7, 100, 5000] {
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
                let below = sorted.iter().filter(|&&x| x < t).count();
                let equal = sorted.iter().filter(|&&x| x == t).count();
                assert_eq!(threshold_bits(&s, drop), (t, below, equal), "n {n} drop {drop}");
            }
        }
    }

    /// Against the definition: order entries by (|s|, position) and drop the first ones.
    #[test]
    fn top_k_equals_sorting_by_magnitude_then_position() {
        let mut r = crate::rng::SplitMix64::new(11);
        for n in [1usize, 31, 32, 33, 1000] {
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
        // A layer large enough to be split over threads: the same bits as on one thread.
        let mut r = crate::rng::SplitMix64::new(2);
        let n = 300_000;
        let v = |r: &mut crate::rng::SplitMix64| (0..n).map(|_| r.uniform(-1.0, 1.0)).collect::<Vec<f32>>();
        let (s, w, g) = (v(&mut r), v(&mut r), v(&mut r));
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut d = vec![0.0; n];
            pool.install(|| score_grad(MaskRule::TopK, &s, &w, &g, &mut d));
            d.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(2));
    }
}
