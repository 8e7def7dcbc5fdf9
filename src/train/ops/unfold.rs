//! The unfolded input of a conv (im2col) and its adjoint (col2im), for the products of
//! [`super::conv`]: row `(ci, ky, kx)` of the unfolded input holds, for every output position,
//! the input that tap reads (zero in the padding).

use crate::kernels::matmul::{copy_short, zero_short};
use crate::kernels::ConvShape;

/// The unfolded input of group `g` of `nbs` samples `x` (`[nbs][c_in][h][w]`): `col` is
/// `K × nbs·P`, sample `b`'s columns at `b·P`.
pub(super) fn im2col_chunk(s: &ConvShape, x: &[f32], g: usize, nbs: usize, col: &mut [f32]) {
    let (xl, plane, p) = (s.c_in * s.h * s.w, s.h * s.w, s.oh() * s.ow());
    let ld = nbs * p;
    for b in 0..nbs {
        let xg = &x[b * xl + g * s.cin_g() * plane..][..s.cin_g() * plane];
        im2col(s, xg, col, ld, b * p);
    }
}

/// The adjoint of [`im2col_chunk`]: adds `dcol` onto group `g` of the samples' `dx`.
pub(super) fn col2im_chunk(s: &ConvShape, dcol: &[f32], g: usize, nbs: usize, dx: &mut [f32]) {
    let (xl, plane, p) = (s.c_in * s.h * s.w, s.h * s.w, s.oh() * s.ow());
    let ld = nbs * p;
    for b in 0..nbs {
        let dxg = &mut dx[b * xl + g * s.cin_g() * plane..][..s.cin_g() * plane];
        col2im_add(s, dcol, ld, b * p, dxg);
    }
}

/// Calls `f(row, first output column, first input index, count)` for every run of taps of
/// the unfolded input that lie inside the image: `count` output columns starting at the given
/// one read inputs `start, start + sw, …` (taps in the padding are zero and have no input).
#[inline(always)]
fn for_each_run(s: &ConvShape, cin_g: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let (oh, ow) = (s.oh(), s.ow());
    let mut row = 0;
    for ci in 0..cin_g {
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                // Output columns whose input column `ox·sw + kx·dw − pad` lies in [0, w).
                let off = (kx * s.dw) as isize - s.pad[1] as isize;
                let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(s.sw) };
                let hi = if (s.w as isize) > off { ((s.w as isize - off) as usize).div_ceil(s.sw).min(ow) } else { 0 };
                for oy in 0..oh {
                    let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                    if iy < 0 || iy as usize >= s.h || lo >= hi {
                        continue;
                    }
                    let ix0 = (lo * s.sw) as isize + off;
                    f(row, oy * ow + lo, (ci * s.h + iy as usize) * s.w + ix0 as usize, hi - lo);
                }
                row += 1;
            }
        }
    }
}

/// `col[(ci, ky, kx) * ld + off + oy * ow + ox]` for one group of one sample; taps in the
/// padding are zero. Each output row of each tap is written once: zeros, the run inside the
/// image, zeros (zero-filling whole rows first and copying over them cost a memset per row).
fn im2col(s: &ConvShape, xg: &[f32], col: &mut [f32], ld: usize, off: usize) {
    let (oh, ow, sw) = (s.oh(), s.ow(), s.sw);
    let mut r = 0;
    for ci in 0..s.cin_g() {
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let xoff = (kx * s.dw) as isize - s.pad[1] as isize;
                let lo = if xoff >= 0 { 0 } else { ((-xoff) as usize).div_ceil(sw).min(ow) };
                let hi = if (s.w as isize) > xoff { ((s.w as isize - xoff) as usize).div_ceil(sw).min(ow) } else { 0 };
                let hi = hi.max(lo);
                for oy in 0..oh {
                    let dst = &mut col[r * ld + off + oy * ow..][..ow];
                    let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                    if iy < 0 || iy as usize >= s.h || lo == hi {
                        zero_short(dst);
                        continue;
                    }
                    zero_short(&mut dst[..lo]);
                    zero_short(&mut dst[hi..]);
                    let i = (ci * s.h + iy as usize) * s.w + ((lo * sw) as isize + xoff) as usize;
                    let run = &mut dst[lo..hi];
                    if sw == 1 {
                        copy_short(run, &xg[i..i + run.len()]);
                    } else {
                        for (j, d) in run.iter_mut().enumerate() {
                            *d = xg[i + j * sw];
                        }
                    }
                }
                r += 1;
            }
        }
    }
}

/// The adjoint of [`im2col`]: scatters `dcol` back onto the input, adding.
fn col2im_add(s: &ConvShape, dcol: &[f32], ld: usize, off: usize, dxg: &mut [f32]) {
    let sw = s.sw;
    for_each_run(s, s.cin_g(), |r, c, i, n| {
        let src = &dcol[r * ld + off + c..][..n];
        if sw == 1 {
            for (d, &v) in dxg[i..i + n].iter_mut().zip(src) {
                *d += v;
            }
        } else {
            for (j, &v) in src.iter().enumerate() {
                dxg[i + j * sw] += v;
            }
        }
    });
}
