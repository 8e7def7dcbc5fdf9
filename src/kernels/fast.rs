//! The fast path's drivers: convolution as im2col + packed GEMM (depthwise convs go to
//! [`super::depthwise`]), and an 8-lane int8 dot product for linear layers. Each is
//! property-tested against [`super::reference`].

use super::gemm::{a_scratch_len, gemm_packed, pack_b, packed_b_len};
use super::{for_each_chunk, ConvShape, Kernels, Masked, PostOp, Weights};

/// Scratch floats [`conv2d`] needs for this shape with these kernels.
pub fn conv_scratch_len(s: &ConvShape, k: &Kernels) -> usize {
    if !k.fast || s.is_depthwise() {
        return 0;
    }
    let kk = s.cin_g() * s.kh * s.kw;
    let n = s.oh() * s.ow();
    a_scratch_len(kk, k.micro.mr) + packed_b_len(kk, n, k.micro.nr)
}

/// True when the conv reads its input as a plain `[c][h*w]` matrix (1×1, stride 1, no pad).
fn is_pointwise(s: &ConvShape) -> bool {
    s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.pad == [0; 4]
}

/// One sample: `x` is `[c_in][h][w]`, `y` is `[c_out][oh][ow]`. Compiled for the baseline ISA;
/// per-ISA tables compile [`conv2d_inline`] again with more features enabled.
pub fn conv2d(k: &Kernels, s: &ConvShape, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp, scratch: &mut [f32]) {
    conv2d_inline(k, s, w, x, y, post, scratch)
}

/// [`linear_inline`] compiled for the baseline ISA.
pub fn linear(k: &Kernels, in_f: usize, out_f: usize, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    linear_inline(k, in_f, out_f, w, x, y, post)
}

/// The body of [`conv2d`], inlined into each ISA's instance.
#[inline(always)]
pub fn conv2d_inline(
    k: &Kernels,
    s: &ConvShape,
    w: Weights,
    x: &[f32],
    y: &mut [f32],
    post: &PostOp,
    scratch: &mut [f32],
) {
    if s.is_depthwise() {
        return super::depthwise::depthwise(k, s, w, x, y, post);
    }
    let nr = k.micro.nr;
    let kk = s.cin_g() * s.kh * s.kw;
    let n = s.oh() * s.ow();
    let m = s.cout_g();
    let (b, a) = scratch.split_at_mut(packed_b_len(kk, n, nr));
    let plane = s.h * s.w;
    for g in 0..s.groups {
        let xg = &x[g * s.cin_g() * plane..(g + 1) * s.cin_g() * plane];
        if is_pointwise(s) {
            pack_b(xg, kk, n, plane, nr, b);
        } else {
            im2col_packed(s, xg, nr, b);
        }
        gemm_packed(k, m, n, kk, w, g * m, b, &mut y[g * m * n..(g + 1) * m * n], post, a);
    }
}

/// im2col of one group written straight into `nr`-wide B panels: row `(ci, ky, kx)`, column
/// `oy * ow + ox`; taps in the padding are zero.
#[inline(always)]
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
    let mut tmp = [0.0f32; IM2COL_CHUNK];
    let mut row = 0;
    for ci in 0..s.cin_g() {
        let plane = &xg[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                // Input column of output column ox: ox * sw + off; inside the image for ox in
                // [lo, hi), computed once per tap.
                let off = (kx * s.dw) as isize - s.pad[1] as isize;
                let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(s.sw).min(ow) };
                let hi = if (s.w as isize) <= off { 0 } else { ((s.w as isize - off) as usize).div_ceil(s.sw).min(ow) };
                // Column `col` goes to panel `col / nr`, lane `col % nr`: tracked as a running
                // offset instead of a division per element.
                let (mut at, mut lane) = (row * nr, 0);
                for oy in 0..oh {
                    let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                    let src = (iy >= 0 && (iy as usize) < s.h).then(|| &plane[iy as usize * s.w..][..s.w]);
                    // A chunk of the output row gathered on the stack, then copied into the
                    // panels in runs of up to `nr`.
                    for x0 in (0..ow).step_by(IM2COL_CHUNK) {
                        let t = &mut tmp[..IM2COL_CHUNK.min(ow - x0)];
                        let (l, h) = (lo.clamp(x0, x0 + t.len()) - x0, hi.clamp(x0, x0 + t.len()) - x0);
                        match src {
                            Some(src) if l < h => {
                                t[..l].fill(0.0);
                                t[h..].fill(0.0);
                                let first = (((x0 + l) * s.sw) as isize + off) as usize;
                                let taps = &src[first..=first + (h - l - 1) * s.sw];
                                match s.sw {
                                    1 => t[l..h].copy_from_slice(taps),
                                    // Pairs, so that the compiler vectorises the stride.
                                    2 => {
                                        let (pairs, last) = taps.as_chunks::<2>();
                                        for (v, p) in t[l..h].iter_mut().zip(pairs) {
                                            *v = p[0];
                                        }
                                        if let [x] = last {
                                            t[h - 1] = *x;
                                        }
                                    }
                                    _ => {
                                        for (v, &x) in t[l..h].iter_mut().zip(taps.iter().step_by(s.sw)) {
                                            *v = x;
                                        }
                                    }
                                }
                            }
                            _ => t.fill(0.0),
                        }
                        let mut i = 0;
                        while i < t.len() {
                            let run = (nr - lane).min(t.len() - i);
                            dst[at + lane..][..run].copy_from_slice(&t[i..i + run]);
                            (i, lane) = (i + run, lane + run);
                            if lane == nr {
                                lane = 0;
                                at += panel_len;
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Output columns [`im2col_packed`] gathers on the stack at a time.
const IM2COL_CHUNK: usize = 256;

/// Depthwise conv (one kernel per channel), channels split across threads. For each output
/// row and tap, the range of output columns whose input column is inside the image is computed
/// once, so the inner loop is a plain strided multiply-add.
/// `y[o] = post(w[o] · x)` for one sample, output rows split across threads.
#[inline(always)]
pub fn linear_inline(k: &Kernels, in_f: usize, out_f: usize, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    let work = in_f * out_f;
    let rows_per_task = out_f.div_ceil(super::tasks_for(work)).max(16);
    for_each_chunk(&mut y[..out_f], rows_per_task, work, |t, ys| {
        (k.linear_rows)(t * rows_per_task, in_f, w, x, ys, post)
    });
}

/// Rows `first ..` of a linear layer, one per element of `ys`.
#[inline(always)]
pub fn linear_rows_inline(first: usize, in_f: usize, w: Weights, x: &[f32], ys: &mut [f32], post: &PostOp) {
    for (i, yo) in ys.iter_mut().enumerate() {
        let o = first + i;
        let acc = match w {
            Weights::I8 { q, scale } => scale[o] * dot_i8(&q[o * in_f..(o + 1) * in_f], x),
            Weights::F32(wf) => dot_f32(&wf[o * in_f..(o + 1) * in_f], x),
            Weights::Masked(m @ Masked { base: Weights::I8 { q, scale }, overlay: None, .. }) => {
                // SupSup: the mask's bits multiply straight into the int8 dot product.
                let start = o * in_f;
                scale[o] * dot_i8_masked(&q[start..start + in_f], m.mask, start, x)
            }
            Weights::Masked(m) => {
                // The row in L1-sized segments through the stack.
                let mut seg = [0.0f32; 256];
                let mut acc = 0.0;
                for j0 in (0..in_f).step_by(256) {
                    let d = &mut seg[..256.min(in_f - j0)];
                    m.row_into(o, j0, d);
                    acc += dot_f32(d, &x[j0..]);
                }
                acc
            }
        };
        *yo = post.apply(o, acc);
    }
}

/// [`linear_rows_inline`] compiled for the baseline ISA.
pub fn linear_rows(first: usize, in_f: usize, w: Weights, x: &[f32], ys: &mut [f32], post: &PostOp) {
    linear_rows_inline(first, in_f, w, x, ys, post)
}

/// Eight independent lanes so the compiler can vectorise without reassociating one sum.
#[inline(always)]
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

/// [`dot_i8`] over the weights whose bit (from bit `start` of `mask`) is set: each group of
/// 8 lanes is multiplied by its bits as floats, no branch.
#[inline(always)]
fn dot_i8_masked(q: &[i8], mask: &[u32], start: usize, x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (qc, qr) = q.as_chunks::<8>();
    let (xc, xr) = x[..q.len()].as_chunks::<8>();
    for (g, (a, b)) in qc.iter().zip(xc).enumerate() {
        let bits = super::bits32(mask, start + g * 8);
        for l in 0..8 {
            acc[l] += a[l] as f32 * ((bits >> l) & 1) as f32 * b[l];
        }
    }
    let bits = super::bits32(mask, start + qc.len() * 8);
    let tail: f32 = qr.iter().zip(xr).enumerate().map(|(l, (&a, &b))| a as f32 * ((bits >> l) & 1) as f32 * b).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
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
