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
    mask.resize(n, true);
    if drop == 0 {
        return;
    }
    if drop == n {
        mask.fill(false);
        return;
    }
    // The threshold as the bits of |s|: for non-negative floats the bit patterns order as
    // `total_cmp` does, and integer comparisons are cheaper than `total_cmp` in the selection.
    let t = MAGNITUDES.with(|cell| {
        let mut mag = cell.borrow_mut();
        mag.clear();
        mag.extend(scores.iter().map(|s| s.abs().to_bits()));
        *mag.select_nth_unstable(drop - 1).1
    });
    // Entries strictly below the threshold all go; ties at it go in order until `drop` are gone.
    let below = scores.iter().filter(|s| s.abs().to_bits() < t).count();
    let mut ties = drop - below;
    // The mask built 32 bits at a time (setting bits one by one was a tenth of an fc1024 step).
    let words: Vec<u32> = scores
        .chunks(32)
        .map(|chunk| {
            let mut word = 0u32;
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
                word |= (keep as u32) << j;
            }
            word
        })
        .collect();
    *mask = BitVec::from_vec(words);
    mask.truncate(n);
}

std::thread_local! {
    /// `|S|` of the layer being thresholded, kept between calls (layers reach millions of scores).
    static MAGNITUDES: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
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

/// Straight-through score gradient, added into `ds`.
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
        *d += sign * wv * g;
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
    fn straight_through_gradients() {
        let (s, w, g) = ([0.5, -0.5, 0.0], [2.0, 3.0, 4.0], [1.0, 1.0, 1.0]);
        let mut d = [0.0; 3];
        score_grad(MaskRule::TopK, &s, &w, &g, &mut d);
        assert_eq!(d, [2.0, -3.0, 0.0]);
        let mut d = [0.0; 3];
        score_grad(MaskRule::Threshold, &s, &w, &g, &mut d);
        assert_eq!(d, [2.0, 3.0, 4.0]);
    }
}
