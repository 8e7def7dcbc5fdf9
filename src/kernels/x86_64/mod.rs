//! x86-64 micro-kernels, chosen at run time by CPU feature detection.
//!
//! AVX2 + FMA, 6 × 16 tile: 12 ymm accumulators, 2 ymm of B and one broadcast of A per step,
//! the classic register blocking for 16 vector registers. Tested against the generic kernel.
#![allow(unsafe_code)]

use super::MicroKernel;

/// The best micro-kernel this CPU runs, if better than the generic one.
#[cfg(feature = "std")]
pub fn detect() -> Option<MicroKernel> {
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        Some(AVX2_MICRO)
    } else {
        None
    }
}

/// Only reachable through [`detect`], which checked AVX2 and FMA.
pub(crate) const AVX2_MICRO: MicroKernel = MicroKernel {
    name: "x86_64 avx2+fma 6x16",
    mr: 6,
    nr: 16,
    run: micro_6x16,
};

fn micro_6x16(k: usize, a: &[f32], b: &[f32], tile: &mut [f32], accumulate: bool) {
    assert!(a.len() >= k * 6 && b.len() >= k * 16 && tile.len() >= 96);
    // SAFETY: the slices hold what the kernel reads and writes (asserted above), and this
    // function is only reachable through `detect`, which confirmed AVX2 and FMA.
    unsafe { micro_6x16_avx2(k, a.as_ptr(), b.as_ptr(), tile.as_mut_ptr(), accumulate) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn micro_6x16_avx2(
    k: usize,
    a: *const f32,
    b: *const f32,
    tile: *mut f32,
    accumulate: bool,
) {
    use core::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees `a` has 6k, `b` 16k and `tile` 96 floats;
    // every load and store below stays inside those bounds.
    unsafe {
        let mut c = [[_mm256_setzero_ps(); 2]; 6];
        if accumulate {
            for (i, row) in c.iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(tile.add(i * 16));
                row[1] = _mm256_loadu_ps(tile.add(i * 16 + 8));
            }
        }
        let (mut ap, mut bp) = (a, b);
        for _ in 0..k {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (i, row) in c.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(i));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
            ap = ap.add(6);
            bp = bp.add(16);
        }
        for (i, row) in c.iter().enumerate() {
            _mm256_storeu_ps(tile.add(i * 16), row[0]);
            _mm256_storeu_ps(tile.add(i * 16 + 8), row[1]);
        }
    }
}
