//! Depthwise convolution (one kernel per channel), NCHW: the part of a mobile net where the
//! bounds bookkeeping of a general kernel costs more than the arithmetic. Three paths, by the
//! size of the zero-padded input plane, for square 3×3 / 5×5 kernels with stride 1 or 2:
//! * up to 32×32: [`dw_lanes`], 8 channels at once, interleaved, one vector op per tap;
//! * up to 128×128: [`dw_padded`], blocks of 8 outputs of a row, stride 2 split into even
//!   and odd columns;
//! * anything else (other kernels, dilation, larger planes): [`dw_rows`], row-wise.
//!
//! All tested against [`super::reference::conv2d`] (`tests/kernels.rs`).

use super::{clamp, for_each_chunk, ConvShape, Kernels, MulAdd, PostOp, Weights};

/// Depthwise conv on one sample, whole blocks of channels per thread.
#[inline(always)]
pub fn depthwise(k: &Kernels, s: &ConvShape, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    let plane = s.oh() * s.ow();
    // Whole channels per task, about four tasks per thread.
    let work = s.macs();
    let per_task = s.c_out.div_ceil(super::tasks_for(work)).next_multiple_of(LANES);
    for_each_chunk(&mut y[..s.c_out * plane], per_task * plane, work, |t, out| {
        (k.depthwise)(s, w, t * per_task, x, out, post)
    });
}

/// Channels `c0 ..` of a depthwise conv: `x` is the whole input, `out` holds the output planes
/// of this block of channels.
#[inline(always)]
pub fn depthwise_channels_inline<M: MulAdd>(
    s: &ConvShape,
    w: Weights,
    c0: usize,
    x: &[f32],
    out: &mut [f32],
    post: &PostOp,
) {
    let (plane_in, plane_out) = (s.h * s.w, s.oh() * s.ow());
    let (ph, pw) = (s.h + s.pad[0] + s.pad[2], s.w + s.pad[1] + s.pad[3]);
    let square = s.dh == 1 && s.dw == 1 && s.kh == s.kw && s.sh == s.sw && matches!((s.kh, s.sh), (3 | 5, 1 | 2));
    // Direct calls below, not function pointers, so each instance is compiled with the
    // enclosing ISA's features.
    if square && ph * pw <= DW_LANES_MAX {
        let mut buf = [0.0f32; DW_LANES_MAX * LANES];
        let mut obuf = [0.0f32; DW_LANES_MAX * LANES];
        for (g, o) in out.chunks_mut(plane_out * LANES).enumerate() {
            let c = c0 + g * LANES;
            match (s.kh, s.sh) {
                (3, 1) => dw_lanes::<3, 1, M>(s, w, c, x, &mut buf, &mut obuf, o, post),
                (3, 2) => dw_lanes::<3, 2, M>(s, w, c, x, &mut buf, &mut obuf, o, post),
                (5, 1) => dw_lanes::<5, 1, M>(s, w, c, x, &mut buf, &mut obuf, o, post),
                _ => dw_lanes::<5, 2, M>(s, w, c, x, &mut buf, &mut obuf, o, post),
            }
        }
    } else if square && ph * pw <= DW_PAD_MAX / 4 {
        dw_padded_channels::<{ DW_PAD_MAX / 4 }, M>(s, w, c0, x, out, post);
    } else if square && ph * pw <= DW_PAD_MAX {
        dw_padded_channels::<DW_PAD_MAX, M>(s, w, c0, x, out, post);
    } else {
        for (i, o) in out.chunks_exact_mut(plane_out).enumerate() {
            let c = c0 + i;
            dw_rows::<M>(s, w, c, &x[c * plane_in..(c + 1) * plane_in], o, post);
        }
    }
}

/// Channels `c0 ..` through [`dw_padded`] with stack buffers of `N` floats (sized to the
/// plane, so that small planes do not pay for zeroing a large buffer). One zeroed buffer per
/// block: only the interior is rewritten per channel, so the padding stays zero.
#[inline(always)]
fn dw_padded_channels<const N: usize, M: MulAdd>(
    s: &ConvShape,
    w: Weights,
    c0: usize,
    x: &[f32],
    out: &mut [f32],
    post: &PostOp,
) {
    let (plane_in, plane_out) = (s.h * s.w, s.oh() * s.ow());
    let (ph, pw) = (s.h + s.pad[0] + s.pad[2], s.w + s.pad[1] + s.pad[3]);
    let mut buf = [0.0f32; N];
    let mut phased = [0.0f32; N];
    let pad = &mut buf[..ph * pw];
    for (i, o) in out.chunks_exact_mut(plane_out).enumerate() {
        let c = c0 + i;
        let xin = &x[c * plane_in..(c + 1) * plane_in];
        for (y, row) in xin.chunks_exact(s.w).enumerate() {
            pad[(y + s.pad[0]) * pw + s.pad[1]..][..s.w].copy_from_slice(row);
        }
        match (s.kh, s.sh) {
            (3, 1) => dw_padded::<3, 1, M>(s, w, c, pad, &mut phased, o, post),
            (3, 2) => dw_padded::<3, 2, M>(s, w, c, pad, &mut phased, o, post),
            (5, 1) => dw_padded::<5, 1, M>(s, w, c, pad, &mut phased, o, post),
            _ => dw_padded::<5, 2, M>(s, w, c, pad, &mut phased, o, post),
        }
    }
}

/// Channels computed together by [`dw_lanes`]: one 256-bit vector of f32.
const LANES: usize = 8;
/// Largest zero-padded plane (floats per channel) that [`dw_lanes`] takes: 32 × 32.
const DW_LANES_MAX: usize = 1024;

/// Tiny planes (a mobile net's last stages: 12×12 down to 3×3 with hundreds of channels):
/// `LANES` channels at once, interleaved as `[position][lane]`, so that every tap is one
/// vector multiply-add whatever the stride, and rows shorter than a vector cost nothing extra.
/// `out` holds the output planes of up to `LANES` channels starting at `c0`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dw_lanes<const K: usize, const S: usize, M: MulAdd>(
    s: &ConvShape,
    w: Weights,
    c0: usize,
    x: &[f32],
    buf: &mut [f32; DW_LANES_MAX * LANES],
    obuf: &mut [f32; DW_LANES_MAX * LANES],
    out: &mut [f32],
    post: &PostOp,
) {
    let (oh, ow) = (s.oh(), s.ow());
    let (plane_in, plane_out) = (s.h * s.w, oh * ow);
    let pw = s.w + s.pad[1] + s.pad[3];
    let ph = s.h + s.pad[0] + s.pad[2];
    let n = out.len() / plane_out;
    // The caller zeroed `buf` once; only the interior is written here, so the padding stays
    // zero across groups (lanes past `n` hold stale inputs whose outputs are never stored).
    let buf = &mut buf[..ph * pw * LANES];
    let planes: [&[f32]; LANES] = core::array::from_fn(|l| {
        let c = c0 + l.min(n - 1);
        &x[c * plane_in..(c + 1) * plane_in]
    });
    // Position-major, so each store writes LANES consecutive floats.
    for y in 0..s.h {
        let base = (y + s.pad[0]) * pw + s.pad[1];
        for xx in 0..s.w {
            let d = &mut buf[(base + xx) * LANES..][..LANES];
            for l in 0..LANES {
                d[l] = planes[l][y * s.w + xx];
            }
        }
    }
    let mut wk = [[0.0f32; LANES]; 25];
    let (mut mul, mut add) = ([0.0f32; LANES], [0.0f32; LANES]);
    for l in 0..n {
        let c = c0 + l;
        for (t, lanes) in wk[..K * K].iter_mut().enumerate() {
            lanes[l] = w.get(c, c * K * K + t);
        }
        (mul[l], add[l]) = (post.mul[c], post.add[c]);
    }
    for oy in 0..oh {
        for ox in 0..ow {
            let mut acc = [0.0f32; LANES];
            for ky in 0..K {
                let row = &buf[((oy * S + ky) * pw + ox * S) * LANES..][..K * LANES];
                for kx in 0..K {
                    let (wv, xv) = (&wk[ky * K + kx], &row[kx * LANES..(kx + 1) * LANES]);
                    for l in 0..LANES {
                        acc[l] = M::mul_add(wv[l], xv[l], acc[l]);
                    }
                }
            }
            let res = &mut obuf[(oy * ow + ox) * LANES..][..LANES];
            for l in 0..LANES {
                res[l] = clamp(acc[l] * mul[l] + add[l], post.lo, post.hi);
            }
        }
    }
    // Channel-major again, each channel's plane written consecutively.
    for (l, plane) in out.chunks_exact_mut(plane_out).enumerate() {
        for (pos, o) in plane.iter_mut().enumerate() {
            *o = obuf[pos * LANES + l];
        }
    }
}

/// [`depthwise_channels_inline`] compiled for the baseline ISA.
pub fn depthwise_channels(s: &ConvShape, w: Weights, c0: usize, x: &[f32], out: &mut [f32], post: &PostOp) {
    depthwise_channels_inline::<super::Plain>(s, w, c0, x, out, post)
}

/// Largest zero-padded input plane (floats) that [`dw_padded`] copies to the stack (twice,
/// with the stride-2 split): 64 KB each, e.g. 128 × 128. Larger planes take [`dw_rows`].
const DW_PAD_MAX: usize = 16384;

/// Mid-size planes, `K × K` taps, stride `S` (1 or 2), no dilation, on the zero-padded plane
/// `pad` (`ph × pw`): blocks of `LANES` outputs of a row, each tap one vector multiply-add.
/// With stride 2 the padded rows are first split into even and odd columns (`phased`), so
/// that every tap reads consecutive inputs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dw_padded<const K: usize, const S: usize, M: MulAdd>(
    s: &ConvShape,
    w: Weights,
    c: usize,
    pad: &[f32],
    phased: &mut [f32],
    out: &mut [f32],
    post: &PostOp,
) {
    let (oh, ow) = (s.oh(), s.ow());
    let pw = s.w + s.pad[1] + s.pad[3];
    let half = pw.div_ceil(2);
    let src: &[f32] = if S == 1 {
        pad
    } else {
        let phased = &mut phased[..pad.len()];
        for (d, r) in phased.chunks_exact_mut(pw).zip(pad.chunks_exact(pw)) {
            let (even, odd) = d.split_at_mut(half);
            for (j, e) in even.iter_mut().enumerate() {
                *e = r[2 * j];
            }
            for (j, o) in odd.iter_mut().enumerate() {
                *o = r[2 * j + 1];
            }
        }
        phased
    };
    // Start of the inputs of tap (ky, kx) for output (oy, 0); output ox reads index + ox.
    let tap = |oy: usize, ky: usize, kx: usize| {
        let row = (oy * S + ky) * pw;
        if S == 1 {
            row + kx
        } else {
            row + (kx % 2) * half + kx / 2
        }
    };
    let mut wk = [[0.0f32; K]; K];
    for (t, v) in wk.iter_mut().flatten().enumerate() {
        *v = w.get(c, c * K * K + t);
    }
    let (mul, add) = (post.mul[c], post.add[c]);
    for (oy, orow) in out[..oh * ow].chunks_exact_mut(ow).enumerate() {
        // Every tap of every output lies inside the padded plane (ConvShape::out_hw).
        let taps: [[&[f32]; K]; K] =
            core::array::from_fn(|ky| core::array::from_fn(|kx| &src[tap(oy, ky, kx)..][..ow]));
        let (blocks, tail) = orow.as_chunks_mut::<LANES>();
        for (b, ob) in blocks.iter_mut().enumerate() {
            let mut acc = [0.0f32; LANES];
            for ky in 0..K {
                for kx in 0..K {
                    let (wv, x) = (wk[ky][kx], &taps[ky][kx][b * LANES..(b + 1) * LANES]);
                    for l in 0..LANES {
                        acc[l] = M::mul_add(wv, x[l], acc[l]);
                    }
                }
            }
            for l in 0..LANES {
                ob[l] = clamp(acc[l] * mul + add, post.lo, post.hi);
            }
        }
        let done = blocks.len() * LANES;
        for (i, o) in tail.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for ky in 0..K {
                for kx in 0..K {
                    acc = M::mul_add(wk[ky][kx], taps[ky][kx][done + i], acc);
                }
            }
            *o = clamp(acc * mul + add, post.lo, post.hi);
        }
    }
}

/// Any depthwise geometry: for each output row and tap, the range of output columns whose
/// input column lies inside the image is computed once, so the inner loop is a plain
/// strided multiply-add.
#[inline(always)]
fn dw_rows<M: MulAdd>(s: &ConvShape, w: Weights, c: usize, xin: &[f32], out: &mut [f32], post: &PostOp) {
    let (oh, ow) = (s.oh(), s.ow());
    let taps = s.kh * s.kw;
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
                let wv = if wk.is_empty() { w.get(c, c * taps + ky * s.kw + kx) } else { wk[ky * s.kw + kx] };
                // ix = ox*sw + kx*dw - pl must lie in [0, w).
                let off = (kx * s.dw) as isize - s.pad[1] as isize;
                let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(s.sw) };
                let hi = if (s.w as isize) <= off { 0 } else { ((s.w as isize - off) as usize).div_ceil(s.sw).min(ow) };
                if lo >= hi {
                    continue;
                }
                let src = &irow[((lo * s.sw) as isize + off) as usize..];
                if s.sw == 1 {
                    for (o, &v) in orow[lo..hi].iter_mut().zip(src) {
                        *o = M::mul_add(wv, v, *o);
                    }
                } else {
                    for (o, &v) in orow[lo..hi].iter_mut().zip(src.iter().step_by(s.sw)) {
                        *o = M::mul_add(wv, v, *o);
                    }
                }
            }
        }
        for o in orow.iter_mut() {
            *o = clamp(*o * mul + add, post.lo, post.hi);
        }
    }
}
