//! A 3 × 3 stride-1 conv's weight gradient with output positions in the 16 lanes of AVX-512
//! ([`super::super::WgradRowsFn`]). GEMResNet18's first stage has 20 channels: as the
//! micro-kernel's lanes (16 + 16) they leave 12 of 32 idle, and its weight gradient ran at a
//! third of the micro-kernel's rate. Positions fill every lane but the few past a row's end.

use super::super::WgradRows;
use core::arch::x86_64::*;

/// One input channel's nine taps against two output channels, every row's positions of each
/// of `samples` samples, added into `acc` (see [`super::super::WgradRowsFn`]). A row's last
/// vector loads the gradient under a mask when the row is not whole vectors wide: the lanes
/// past its end are zero. Only reachable through the table that `available` builds after
/// checking AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(super) fn rows(
    g: WgradRows,
    samples: usize,
    x: &[f32],
    x_stride: usize,
    off: &[usize; 9],
    d: [&[f32]; 2],
    d_stride: usize,
    acc: &mut [[f32; 16]; 18],
) {
    if samples == 0 || g.rows == 0 || g.width == 0 {
        return;
    }
    let vectors = g.width.div_ceil(16);
    let last = (samples - 1) * x_stride + (g.rows - 1) * g.x_row;
    let reach = last + off.iter().max().map_or(0, |&o| o) + 16 * vectors;
    let d_reach = (samples - 1) * d_stride + (g.rows - 1) * g.d_row + g.width;
    assert!(x.len() >= reach && d[0].len() >= d_reach && d[1].len() >= d_reach);
    // SAFETY: every load below stays inside `x`, `d[0]` and `d[1]` (asserted above; the
    // gradient's lanes past a row's end are masked off, not read), and AVX-512F is present
    // (the only way here is the table `available` builds after checking it).
    unsafe { rows_avx512(g, samples, x.as_ptr(), x_stride, off, [d[0].as_ptr(), d[1].as_ptr()], d_stride, acc) }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(
    g: WgradRows,
    samples: usize,
    x: *const f32,
    x_stride: usize,
    off: &[usize; 9],
    d: [*const f32; 2],
    d_stride: usize,
    acc: &mut [[f32; 16]; 18],
) {
    // SAFETY (whole body): the caller guarantees, for every sample and row, `off[t] +
    // 16·⌈width/16⌉` floats at `x + b·x_stride + r·x_row` for every tap and `width` at `d[h] +
    // b·d_stride + r·d_row`; `acc` is 18 rows of 16.
    unsafe {
        let full = g.width / 16;
        let tail: __mmask16 = ((1u32 << (g.width % 16)) - 1) as __mmask16;
        let mut a: [__m512; 18] = core::array::from_fn(|i| _mm512_loadu_ps(acc[i].as_ptr()));
        macro_rules! taps_at {
            ($xr:expr, $y0:expr, $y1:expr) => {{
                let (xr, y0, y1) = ($xr, $y0, $y1);
                for (t, &o) in off.iter().enumerate() {
                    let xv = _mm512_loadu_ps(xr.add(o));
                    a[t] = _mm512_fmadd_ps(xv, y0, a[t]);
                    a[9 + t] = _mm512_fmadd_ps(xv, y1, a[9 + t]);
                }
            }};
        }
        for b in 0..samples {
            for r in 0..g.rows {
                let xr = x.add(b * x_stride + r * g.x_row);
                let (d0, d1) = (d[0].add(b * d_stride + r * g.d_row), d[1].add(b * d_stride + r * g.d_row));
                for v in 0..full {
                    let p = v * 16;
                    taps_at!(xr.add(p), _mm512_loadu_ps(d0.add(p)), _mm512_loadu_ps(d1.add(p)));
                }
                if tail != 0 {
                    let p = full * 16;
                    taps_at!(xr.add(p), _mm512_maskz_loadu_ps(tail, d0.add(p)), _mm512_maskz_loadu_ps(tail, d1.add(p)));
                }
            }
        }
        for (row, v) in acc.iter_mut().zip(&a) {
            _mm512_storeu_ps(row.as_mut_ptr(), *v);
        }
    }
}
