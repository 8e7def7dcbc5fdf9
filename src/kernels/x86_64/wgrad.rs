//! A 3 × 3 stride-1 conv's weight gradient with output positions in the 16 lanes of AVX-512
//! ([`super::super::WgradRowsFn`]). GEMResNet18's first stage has 20 channels: as the
//! micro-kernel's lanes (16 + 16) they leave 12 of 32 idle, and its weight gradient ran at a
//! third of the micro-kernel's rate. Positions fill every lane but the few past a row's end.

use core::arch::x86_64::*;

/// One input channel's nine taps against two output channels, `vectors` × 16 positions of
/// each of `samples` samples, added into `acc` (see [`super::super::WgradRowsFn`]). Only
/// reachable through the table that `available` builds after checking AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(super) fn rows(
    vectors: usize,
    samples: usize,
    x: &[f32],
    x_stride: usize,
    off: &[usize; 9],
    d: [&[f32]; 2],
    d_stride: usize,
    acc: &mut [[f32; 16]; 18],
) {
    let n = vectors * 16;
    if samples == 0 {
        return;
    }
    let reach = (samples - 1) * x_stride + off.iter().max().map_or(0, |&o| o) + n;
    let d_reach = (samples - 1) * d_stride + n;
    assert!(x.len() >= reach && d[0].len() >= d_reach && d[1].len() >= d_reach);
    // SAFETY: every load below stays inside `x`, `d[0]` and `d[1]` (asserted above), and
    // AVX-512F is present (the only way here is the table `available` builds after checking it).
    unsafe { rows_avx512(vectors, samples, x.as_ptr(), x_stride, off, [d[0].as_ptr(), d[1].as_ptr()], d_stride, acc) }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(
    vectors: usize,
    samples: usize,
    x: *const f32,
    x_stride: usize,
    off: &[usize; 9],
    d: [*const f32; 2],
    d_stride: usize,
    acc: &mut [[f32; 16]; 18],
) {
    // SAFETY (whole body): the caller guarantees, for every sample, `off[t] + 16·vectors`
    // floats at `x + b·x_stride` for every tap and `16·vectors` at `d[h] + b·d_stride`; `acc`
    // is 18 rows of 16.
    unsafe {
        let mut a: [__m512; 18] = core::array::from_fn(|i| _mm512_loadu_ps(acc[i].as_ptr()));
        for b in 0..samples {
            let xb = x.add(b * x_stride);
            let taps: [*const f32; 9] = core::array::from_fn(|t| xb.add(off[t]));
            let (d0, d1) = (d[0].add(b * d_stride), d[1].add(b * d_stride));
            for v in 0..vectors {
                let p = v * 16;
                let (y0, y1) = (_mm512_loadu_ps(d0.add(p)), _mm512_loadu_ps(d1.add(p)));
                for (t, tap) in taps.iter().enumerate() {
                    let xv = _mm512_loadu_ps(tap.add(p));
                    a[t] = _mm512_fmadd_ps(xv, y0, a[t]);
                    a[9 + t] = _mm512_fmadd_ps(xv, y1, a[9 + t]);
                }
            }
        }
        for (row, v) in acc.iter_mut().zip(&a) {
            _mm512_storeu_ps(row.as_mut_ptr(), *v);
        }
    }
}
