//! Reference kernels: direct loops, one sample at a time, NCHW.
//!
//! These are the definition of what each op computes. They are kept simple on purpose and
//! serve as the fallback (`EDGECL_FORCE_GENERIC=1`) and as the oracle of the fast kernels'
//! property tests. The element-wise and pooling ops here are also what the fast path uses:
//! they are memory-bound and already run at the speed of a copy.

// Index loops on purpose: each kernel reads like its formula.
#![allow(clippy::needless_range_loop)]

use super::{ConvShape, PostOp, Weights};

/// `y[co][oy][ox] = post(sum over ci in group, ky, kx of w * x)`; `x` is `[c_in][h][w]`,
/// `y` is `[c_out][oh][ow]`.
pub fn conv2d(s: &ConvShape, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    let (oh, ow) = (s.oh(), s.ow());
    let (cin_g, cout_g) = (s.cin_g(), s.cout_g());
    for co in 0..s.c_out {
        let g = co / cout_g;
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0.0f32;
                for ci in 0..cin_g {
                    let c = g * cin_g + ci;
                    for ky in 0..s.kh {
                        let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                        if iy < 0 || iy >= s.h as isize {
                            continue;
                        }
                        for kx in 0..s.kw {
                            let ix = (ox * s.sw + kx * s.dw) as isize - s.pad[1] as isize;
                            if ix < 0 || ix >= s.w as isize {
                                continue;
                            }
                            let wi = ((co * cin_g + ci) * s.kh + ky) * s.kw + kx;
                            acc += w.get(co, wi) * x[(c * s.h + iy as usize) * s.w + ix as usize];
                        }
                    }
                }
                y[(co * oh + oy) * ow + ox] = post.apply(co, acc);
            }
        }
    }
}

/// `y[o] = post(sum_i w[o][i] * x[i])` for one sample.
pub fn linear(in_f: usize, out_f: usize, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    for o in 0..out_f {
        let mut acc = 0.0f32;
        for i in 0..in_f {
            acc += w.get(o, o * in_f + i) * x[i];
        }
        y[o] = post.apply(o, acc);
    }
}

/// Per-channel affine + clamp on `[c][plane]` (a batch norm that follows no conv).
pub fn channel_affine(c: usize, plane: usize, x: &[f32], y: &mut [f32], post: &PostOp) {
    for ch in 0..c {
        let r = ch * plane..(ch + 1) * plane;
        for (yo, &xi) in y[r.clone()].iter_mut().zip(&x[r]) {
            *yo = post.apply(ch, xi);
        }
    }
}

/// `y = clamp(x, lo, hi)` (ReLU, ReLU6).
pub fn clamp(x: &[f32], y: &mut [f32], lo: f32, hi: f32) {
    for (yo, &xi) in y.iter_mut().zip(x) {
        *yo = super::clamp(xi, lo, hi);
    }
}

/// `y = clamp(a + b, lo, hi)`.
pub fn add(a: &[f32], b: &[f32], y: &mut [f32], lo: f32, hi: f32) {
    for ((yo, &ai), &bi) in y.iter_mut().zip(a).zip(b) {
        *yo = super::clamp(ai + bi, lo, hi);
    }
}

/// Pooling geometry for one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    /// top, left, bottom, right
    pub pad: [usize; 4],
    pub count_include_pad: bool,
}

impl PoolShape {
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let ph = self.h + self.pad[0] + self.pad[2];
        let pw = self.w + self.pad[1] + self.pad[3];
        if ph < self.kh || pw < self.kw {
            return None;
        }
        Some(((ph - self.kh) / self.sh + 1, (pw - self.kw) / self.sw + 1))
    }
}

/// Max (`max = true`) or average pooling; padding never wins a max.
pub fn pool(s: &PoolShape, max: bool, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = s.out_hw().unwrap_or((0, 0));
    for c in 0..s.c {
        let plane = &x[c * s.h * s.w..(c + 1) * s.h * s.w];
        for oy in 0..oh {
            let y0 = (oy * s.sh) as isize - s.pad[0] as isize;
            let (ya, yb) = (y0.max(0) as usize, ((y0 + s.kh as isize).min(s.h as isize)).max(0) as usize);
            for ox in 0..ow {
                let x0 = (ox * s.sw) as isize - s.pad[1] as isize;
                let (xa, xb) = (x0.max(0) as usize, ((x0 + s.kw as isize).min(s.w as isize)).max(0) as usize);
                let mut m = f32::NEG_INFINITY;
                let mut sum = 0.0f32;
                for iy in ya..yb {
                    for &v in &plane[iy * s.w + xa..iy * s.w + xb] {
                        m = m.max(v);
                        sum += v;
                    }
                }
                let count = if s.count_include_pad {
                    s.kh * s.kw
                } else {
                    (yb.saturating_sub(ya) * xb.saturating_sub(xa)).max(1)
                };
                y[(c * oh + oy) * ow + ox] = if max { m } else { sum / count as f32 };
            }
        }
    }
}

/// Mean over each channel's plane: `[c][plane] -> [c]`.
pub fn global_avg_pool(c: usize, plane: usize, x: &[f32], y: &mut [f32]) {
    for ch in 0..c {
        let s: f32 = x[ch * plane..(ch + 1) * plane].iter().sum();
        y[ch] = s / plane as f32;
    }
}
