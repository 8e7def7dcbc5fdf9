//! A tiny, fully specified random number generator. Everything random in edgecl (backbone
//! signs, score initialisation, shuffling, augmentation, permutations) draws from it, so a seed
//! means the same stream on every target and in every release.

/// SplitMix64 (Steele, Lea, Flood 2014): one 64-bit state, one addition and three
/// xor-shift-multiplies per draw.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits of precision (every value exactly representable).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Uniform integer in `0..n` (`n > 0`), by Lemire's multiply-shift; the bias is below
    /// 2^-32 for every `n` edgecl uses.
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// A child stream for a sub-purpose (e.g. per task, per epoch), independent of how many
    /// draws the parent has made.
    pub fn fork(seed: u64, purpose: u64) -> Self {
        let mut r = SplitMix64(seed ^ purpose.wrapping_mul(0xd134_2543_de82_ef95));
        r.next_u64();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[r.below(5)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 900 && c < 1100), "{seen:?}");
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: [u32; 100] = core::array::from_fn(|i| i as u32);
        SplitMix64::new(3).shuffle(&mut v);
        let mut s = v;
        s.sort();
        assert!(s.iter().enumerate().all(|(i, &x)| x == i as u32));
        assert_ne!(v[..10], s[..10]);
    }

    #[test]
    fn next_f32_is_in_unit_interval() {
        let mut r = SplitMix64::new(11);
        assert!((0..10_000).map(|_| r.next_f32()).all(|x| (0.0..1.0).contains(&x)));
    }
}
