//! The fast path: convolution as im2col + packed GEMM, a depthwise kernel whose inner loop has
//! no bounds or padding tests, and an 8-lane int8 dot product for linear layers.
//! Each is property-tested against [`super::reference`].

use super::gemm::{gemm_packed, pack_a, pack_b, packed_a_len, packed_b_len};
use super::{for_each_chunk, ConvShape, Kernels, PostOp, Weights};

/// Scratch floats [`conv2d`] needs for this shape with these kernels.
pub fn conv_scratch_len(s: &ConvShape, k: &Kernels) -> usize {
    if !k.fast || s.is_depthwise() {
        return 0;
    }
    let kk = s.cin_g() * s.kh * s.kw;
    let n = s.oh() * s.ow();
    packed_a_len(s.cout_g(), kk, k.micro.mr) + packed_b_len(kk, n, k.micro.nr)
}

/// True when the conv reads its input as a plain `[c][h*w]` matrix (1×1, stride 1, no pad).
fn is_pointwise(s: &ConvShape) -> bool {
    s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.pad == [0; 4]
}

/// One sample: `x` is `[c_in][h][w]`, `y` is `[c_out][oh][ow]`.
pub fn conv2d(
    k: &Kernels,
    s: &ConvShape,
    w: Weights,
    x: &[f32],
    y: &mut [f32],
    post: &PostOp,
    scratch: &mut [f32],
) {
    if s.is_depthwise() {
        return depthwise(s, w, x, y, post);
    }
    let (mr, nr) = (k.micro.mr, k.micro.nr);
    let kk = s.cin_g() * s.kh * s.kw;
    let n = s.oh() * s.ow();
    let m = s.cout_g();
    let (a, rest) = scratch.split_at_mut(packed_a_len(m, kk, mr));
    let b = &mut rest[..packed_b_len(kk, n, nr)];
    let plane = s.h * s.w;
    for g in 0..s.groups {
        let xg = &x[g * s.cin_g() * plane..(g + 1) * s.cin_g() * plane];
        if is_pointwise(s) {
            pack_b(xg, kk, n, plane, nr, b);
        } else {
            im2col_packed(s, xg, nr, b);
        }
        pack_a(w, g * m, m, kk, mr, a);
        gemm_packed(
            &k.micro,
            m,
            n,
            kk,
            a,
            b,
            &mut y[g * m * n..(g + 1) * m * n],
            post,
            g * m,
        );
    }
}

/// im2col of one group written straight into `nr`-wide B panels: row `(ci, ky, kx)`, column
/// `oy * ow + ox`; taps in the padding are zero.
fn im2col_packed(s: &ConvShape, xg: &[f32], nr: usize, dst: &mut [f32]) {
    let (oh, ow) = (s.oh(), s.ow());
    let n = oh * ow;
    let kk = s.cin_g() * s.kh * s.kw;
    let panel_len = kk * nr;
    // Zero the lanes past n in the last panel once; every other slot is written below.
    let last = n / nr;
    if n % nr != 0 {
        dst[last * panel_len..(last + 1) * panel_len].fill(0.0);
    }
    let mut row = 0;
    for ci in 0..s.cin_g() {
        let plane = &xg[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let base = row * nr;
                let mut col = 0;
                for oy in 0..oh {
                    let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                    let inside_y = iy >= 0 && (iy as usize) < s.h;
                    for ox in 0..ow {
                        let ix = (ox * s.sw + kx * s.dw) as isize - s.pad[1] as isize;
                        let v = if inside_y && ix >= 0 && (ix as usize) < s.w {
                            plane[iy as usize * s.w + ix as usize]
                        } else {
                            0.0
                        };
                        dst[(col / nr) * panel_len + base + col % nr] = v;
                        col += 1;
                    }
                }
                row += 1;
            }
        }
    }
}

/// Depthwise conv (one kernel per channel), channels split across threads. For each output
/// row and tap, the range of output columns whose input column is inside the image is computed
/// once, so the inner loop is a plain strided multiply-add.
fn depthwise(s: &ConvShape, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    let (oh, ow) = (s.oh(), s.ow());
    let taps = s.kh * s.kw;
    let plane_in = s.h * s.w;
    for_each_chunk(&mut y[..s.c_out * oh * ow], oh * ow, |c, out| {
        let xin = &x[c * plane_in..(c + 1) * plane_in];
        let mut wk = [0.0f32; 64];
        let wk: &mut [f32] = if taps <= 64 { &mut wk[..taps] } else { &mut [] };
        for (t, v) in wk.iter_mut().enumerate() {
            *v = w.get(c, c * taps + t);
        }
        let (mul, add) = (post.mul[c], post.add[c]);
        for oy in 0..oh {
            let orow = &mut out[oy * ow..(oy + 1) * ow];
            orow.fill(0.0);
            for ky in 0..s.kh {
                let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                if iy < 0 || iy as usize >= s.h {
                    continue;
                }
                let irow = &xin[iy as usize * s.w..(iy as usize + 1) * s.w];
                for kx in 0..s.kw {
                    let wv = if wk.is_empty() {
                        w.get(c, c * taps + ky * s.kw + kx)
                    } else {
                        wk[ky * s.kw + kx]
                    };
                    // ix = ox*sw + kx*dw - pl must lie in [0, w).
                    let off = (kx * s.dw) as isize - s.pad[1] as isize;
                    let lo = if off >= 0 {
                        0
                    } else {
                        ((-off) as usize).div_ceil(s.sw)
                    };
                    let hi = if (s.w as isize) <= off {
                        0
                    } else {
                        (((s.w as isize - off) as usize).div_ceil(s.sw)).min(ow)
                    };
                    if lo >= hi {
                        continue;
                    }
                    let start = (lo * s.sw) as isize + off;
                    let src = &irow[start as usize..];
                    if s.sw == 1 {
                        for (o, &v) in orow[lo..hi].iter_mut().zip(src) {
                            *o += wv * v;
                        }
                    } else {
                        for (o, &v) in orow[lo..hi].iter_mut().zip(src.iter().step_by(s.sw)) {
                            *o += wv * v;
                        }
                    }
                }
            }
            for o in orow.iter_mut() {
                *o = (*o * mul + add).max(post.lo).min(post.hi);
            }
        }
    });
}

/// `y[o] = post(w[o] · x)` for one sample, output rows split across threads.
pub fn linear(in_f: usize, out_f: usize, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    let rows_per_task = out_f.div_ceil(super::threads() * 4).max(16);
    for_each_chunk(&mut y[..out_f], rows_per_task, |t, ys| {
        for (i, yo) in ys.iter_mut().enumerate() {
            let o = t * rows_per_task + i;
            let acc = match w {
                Weights::I8 { q, scale } => scale[o] * dot_i8(&q[o * in_f..(o + 1) * in_f], x),
                Weights::F32(wf) => dot_f32(&wf[o * in_f..(o + 1) * in_f], x),
            };
            *yo = post.apply(o, acc);
        }
    });
}

/// Eight independent lanes so the compiler can vectorise without reassociating one sum.
#[inline]
fn dot_i8(q: &[i8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (qc, qr) = q.as_chunks::<8>();
    let (xc, xr) = x[..q.len()].as_chunks::<8>();
    for (a, b) in qc.iter().zip(xc) {
        for l in 0..8 {
            acc[l] += a[l] as f32 * b[l];
        }
    }
    let tail: f32 = qr.iter().zip(xr).map(|(&a, &b)| a as f32 * b).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline]
fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (wc, wr) = w.as_chunks::<8>();
    let (xc, xr) = x[..w.len()].as_chunks::<8>();
    for (a, b) in wc.iter().zip(xc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let tail: f32 = wr.iter().zip(xr).map(|(&a, &b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}
