//! Depthwise convolution (one kernel per channel), NCHW: the part of a mobile net where the
//! bounds bookkeeping of a general kernel costs more than the arithmetic. Three paths, by the
//! size of the zero-padded input plane, for square 3×3 / 5×5 kernels with stride 1 or 2:
//! * up to 32×32: [`dw_lanes`], 8 channels at once, interleaved, one vector op per tap;
//! * up to 128×128: [`dw_padded`], blocks of 8 outputs of a row, stride 2 split into even
//!   and odd columns;
//! * anything else (other kernels, dilation, larger planes): [`dw_rows`], row-wise.
//!
//! All tested against [`super::reference::conv2d`] (`tests/kernels.rs`).

use super::{clamp, for_each_chunk, ConvShape, Kernels, MulAdd, Plain, PostOp, Store, Weights};

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
pub fn depthwise_channels_inline<M: DwInner>(
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
    if square && ph * pw <= DW_LANES_MAX / 16 {
        dw_lanes_channels::<{ DW_LANES_MAX / 16 }, M>(s, w, c0, x, out, post);
    } else if square && ph * pw <= DW_LANES_MAX / 4 {
        dw_lanes_channels::<{ DW_LANES_MAX / 4 }, M>(s, w, c0, x, out, post);
    } else if square && ph * pw <= DW_LANES_MAX {
        dw_lanes_channels::<DW_LANES_MAX, M>(s, w, c0, x, out, post);
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

/// Channels `c0 ..` through [`dw_lanes`], blocks of [`LANES`], with stack buffers of `N`
/// positions, sized to the plane (two buffers of 32 × 32 positions, 64 KB, were zeroed per
/// call for planes of 25).
#[inline(always)]
fn dw_lanes_channels<const N: usize, M: DwInner>(
    s: &ConvShape,
    w: Weights,
    c0: usize,
    x: &[f32],
    out: &mut [f32],
    post: &PostOp,
) {
    let mut buf = [[0.0f32; LANES]; N];
    let mut obuf = [[0.0f32; LANES]; N];
    for (g, o) in out.chunks_mut(s.oh() * s.ow() * LANES).enumerate() {
        let c = c0 + g * LANES;
        let (buf, obuf) = (buf.as_flattened_mut(), obuf.as_flattened_mut());
        match (s.kh, s.sh) {
            (3, 1) => dw_lanes::<3, 1, M>(s, w, c, x, buf, obuf, o, post),
            (3, 2) => dw_lanes::<3, 2, M>(s, w, c, x, buf, obuf, o, post),
            (5, 1) => dw_lanes::<5, 1, M>(s, w, c, x, buf, obuf, o, post),
            _ => dw_lanes::<5, 2, M>(s, w, c, x, buf, obuf, o, post),
        }
    }
}

/// Channels `c0 ..` through [`dw_padded`] with stack buffers of `N` floats (sized to the
/// plane, so that small planes do not pay for zeroing a large buffer). One zeroed buffer per
/// block: only the interior is rewritten per channel, so the padding stays zero.
#[inline(always)]
fn dw_padded_channels<const N: usize, M: DwInner>(
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
    let pad = &mut buf[..ph * pw];
    let (half, pl) = (pw.div_ceil(2), s.pad[1]);
    for (i, o) in out.chunks_exact_mut(plane_out).enumerate() {
        let c = c0 + i;
        let xin = &x[c * plane_in..(c + 1) * plane_in];
        for (y, row) in xin.chunks_exact(s.w).enumerate() {
            let d = &mut pad[(y + s.pad[0]) * pw..][..pw];
            if s.sh == 1 {
                d[pl..][..s.w].copy_from_slice(row);
                continue;
            }
            // Stride 2: padded column j goes to the even half (first `half` floats) at j / 2
            // if j is even, else to the odd half at j / 2, in the same pass as the padding.
            let (even, odd) = d.split_at_mut(half);
            let (first, second) = if pl % 2 == 0 {
                (&mut even[pl / 2..], &mut odd[pl / 2..])
            } else {
                (&mut odd[pl / 2..], &mut even[pl.div_ceil(2)..])
            };
            let pairs = row.chunks_exact(2);
            if let [last] = pairs.remainder() {
                first[s.w / 2] = *last;
            }
            for ((a, b), p) in first.iter_mut().zip(second.iter_mut()).zip(pairs) {
                (*a, *b) = (p[0], p[1]);
            }
        }
        match (s.kh, s.sh) {
            (3, 1) => dw_padded::<3, 1, M>(s, w, c, pad, o, post),
            (3, 2) => dw_padded::<3, 2, M>(s, w, c, pad, o, post),
            (5, 1) => dw_padded::<5, 1, M>(s, w, c, pad, o, post),
            _ => dw_padded::<5, 2, M>(s, w, c, pad, o, post),
        }
    }
}

/// Channels computed together by [`dw_lanes`]: one 256-bit vector of f32.
pub const LANES: usize = 8;
/// Largest zero-padded plane (floats per channel) that [`dw_lanes`] takes: 32 × 32.
const DW_LANES_MAX: usize = 1024;

/// Tiny planes (a mobile net's last stages: 12×12 down to 3×3 with hundreds of channels):
/// `LANES` channels at once, interleaved as `[position][lane]`, so that every tap is one
/// vector multiply-add whatever the stride, and rows shorter than a vector cost nothing extra.
/// `out` holds the output planes of up to `LANES` channels starting at `c0`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dw_lanes<const K: usize, const S: usize, M: DwInner>(
    s: &ConvShape,
    w: Weights,
    c0: usize,
    x: &[f32],
    buf: &mut [f32],
    obuf: &mut [f32],
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
        M::interleave(&planes, y * s.w, s.w, &mut buf[base * LANES..(base + s.w) * LANES]);
    }
    let mut wk = [[0.0f32; LANES]; 25];
    let (mut mul, mut add) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut taps = [0.0f32; 25];
    for l in 0..n {
        let c = c0 + l;
        w.run_into(c, c * K * K, &mut taps[..K * K]);
        for (lanes, &v) in wk[..K * K].iter_mut().zip(&taps) {
            lanes[l] = v;
        }
        (mul[l], add[l]) = (post.mul[c], post.add[c]);
    }
    let ep = LanesEpilogue { mul, add, lo: post.lo, hi: post.hi };
    for oy in 0..oh {
        let rows: [&[f32]; K] = core::array::from_fn(|ky| &buf[(oy * S + ky) * pw * LANES..]);
        let orow = &mut obuf[oy * ow * LANES..(oy + 1) * ow * LANES];
        // Strips of LANES_STRIP outputs (independent accumulators, each weight vector loaded
        // once per strip); a partial last strip is computed again from `ow - LANES_STRIP`.
        let mut ox = 0;
        while ox + LANES_STRIP <= ow {
            M::lanes_strip::<K, S, LANES_STRIP>(&rows, &wk, ox, &ep, &mut orow[ox * LANES..(ox + LANES_STRIP) * LANES]);
            ox += LANES_STRIP;
        }
        if ox < ow {
            if ow >= LANES_STRIP {
                let ox = ow - LANES_STRIP;
                M::lanes_strip::<K, S, LANES_STRIP>(&rows, &wk, ox, &ep, &mut orow[ox * LANES..]);
            } else {
                for ox in ox..ow {
                    M::lanes_strip::<K, S, 1>(&rows, &wk, ox, &ep, &mut orow[ox * LANES..(ox + 1) * LANES]);
                }
            }
        }
    }
    // Channel-major again, each channel's plane written consecutively.
    M::deinterleave(&obuf[..plane_out * LANES], out, plane_out);
}

/// [`depthwise_channels_inline`] compiled for the baseline ISA.
pub fn depthwise_channels(s: &ConvShape, w: Weights, c0: usize, x: &[f32], out: &mut [f32], post: &PostOp) {
    depthwise_channels_inline::<super::Plain>(s, w, c0, x, out, post)
}

/// Largest zero-padded input plane (floats) that [`dw_padded`] copies to the stack: 64 KB,
/// e.g. 128 × 128. Larger planes take [`dw_rows`].
const DW_PAD_MAX: usize = 16384;

/// Mid-size planes, `K × K` taps, stride `S` (1 or 2), no dilation, on the zero-padded plane
/// `pad` (`ph × pw`): blocks of `LANES` outputs of a row, each tap one vector multiply-add.
/// With stride 2 every padded row holds its even columns, then its odd ones (written so by
/// [`dw_padded_channels`]), so that every tap reads consecutive inputs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dw_padded<const K: usize, const S: usize, M: DwInner>(
    s: &ConvShape,
    w: Weights,
    c: usize,
    pad: &[f32],
    out: &mut [f32],
    post: &PostOp,
) {
    let (oh, ow) = (s.oh(), s.ow());
    let pw = s.w + s.pad[1] + s.pad[3];
    let half = pw.div_ceil(2);
    let src = pad;
    // Offset in a (phased) row of the input of tap column kx for output column 0; output
    // column ox reads offset + ox.
    let col: [usize; K] = core::array::from_fn(|kx| if S == 1 { kx } else { (kx % 2) * half + kx / 2 });
    let mut wk = [[0.0f32; K]; K];
    w.run_into(c, c * K * K, wk.as_flattened_mut());
    let ep = Epilogue { mul: post.mul[c], add: post.add[c], lo: post.lo, hi: post.hi };
    for (oy, orow) in out[..oh * ow].chunks_exact_mut(ow).enumerate() {
        // Every tap of every output lies inside the padded plane (ConvShape::out_hw).
        let rows: [&[f32]; K] = core::array::from_fn(|ky| &src[(oy * S + ky) * pw..]);
        if ow < LANES {
            for (ox, o) in orow.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for ky in 0..K {
                    for kx in 0..K {
                        acc = M::mul_add(wk[ky][kx], rows[ky][col[kx] + ox], acc);
                    }
                }
                *o = ep.apply(acc);
            }
            continue;
        }
        // Strips of STRIP blocks (independent accumulators, each weight loaded once per strip),
        // then single blocks; a partial last block is computed again from `ow - LANES`: the
        // overlap is written twice with the same values, and no output takes a scalar path.
        let mut o = 0;
        while o + STRIP * LANES <= ow {
            M::strip::<K, STRIP>(&rows, &col, &wk, o, &ep, &mut orow[o..o + STRIP * LANES]);
            o += STRIP * LANES;
        }
        while o + LANES <= ow {
            M::strip::<K, 1>(&rows, &col, &wk, o, &ep, &mut orow[o..o + LANES]);
            o += LANES;
        }
        if o < ow {
            let o = ow - LANES;
            M::strip::<K, 1>(&rows, &col, &wk, o, &ep, &mut orow[o..]);
        }
    }
}

/// Blocks of outputs of a row that [`dw_padded`] computes together.
const STRIP: usize = 4;

/// The post-op of one channel.
pub struct Epilogue {
    pub mul: f32,
    pub add: f32,
    pub lo: f32,
    pub hi: f32,
}

impl Epilogue {
    #[inline(always)]
    pub fn apply(&self, acc: f32) -> f32 {
        clamp(acc * self.mul + self.add, self.lo, self.hi)
    }
}

/// The post-ops of `LANES` interleaved channels.
pub struct LanesEpilogue {
    pub mul: [f32; LANES],
    pub add: [f32; LANES],
    pub lo: f32,
    pub hi: f32,
}

/// Outputs of a row (in positions) that [`dw_lanes`] computes together.
const LANES_STRIP: usize = 4;

/// The innermost loops of the depthwise kernels, one implementation per ISA instance. The
/// provided bodies are portable; an ISA may override them with explicit vector code where the
/// compiler's own vectorisation falls short (it rebuilds overlapping unaligned loads from
/// shuffles, and spills the weights).
pub trait DwInner: MulAdd {
    /// `R` blocks of `LANES` consecutive outputs of one row from offset `o`, written to
    /// `dst[..R * LANES]`: `R` independent accumulators, every tap one vector multiply-add per
    /// block. `rows[ky]` starts at the input row of tap row `ky`; `col[kx]` is the offset of
    /// tap column `kx` in it, so output `o + i` reads `rows[ky][col[kx] + o + i]`.
    #[inline(always)]
    fn strip<const K: usize, const R: usize>(
        rows: &[&[f32]; K],
        col: &[usize; K],
        wk: &[[f32; K]; K],
        o: usize,
        ep: &Epilogue,
        dst: &mut [f32],
    ) {
        let mut acc = [[0.0f32; LANES]; R];
        for ky in 0..K {
            for kx in 0..K {
                let wv = wk[ky][kx];
                let x = &rows[ky][col[kx] + o..][..R * LANES];
                for (a, xb) in acc.iter_mut().zip(x.as_chunks::<LANES>().0) {
                    for l in 0..LANES {
                        a[l] = Self::mul_add(wv, xb[l], a[l]);
                    }
                }
            }
        }
        for (d, a) in dst.as_chunks_mut::<LANES>().0.iter_mut().zip(&acc) {
            for l in 0..LANES {
                d[l] = ep.apply(a[l]);
            }
        }
    }

    /// `R` consecutive output positions from `ox` of one row of interleaved channels (see
    /// [`dw_lanes`]), written to `dst[..R * LANES]`. `rows[ky]` starts at the padded input
    /// row of tap row `ky`; `wk[ky * K + kx]` holds the tap's weight for each lane.
    #[inline(always)]
    fn lanes_strip<const K: usize, const S: usize, const R: usize>(
        rows: &[&[f32]; K],
        wk: &[[f32; LANES]; 25],
        ox: usize,
        ep: &LanesEpilogue,
        dst: &mut [f32],
    ) {
        let mut acc = [[0.0f32; LANES]; R];
        for ky in 0..K {
            let row = &rows[ky][ox * S * LANES..][..((R - 1) * S + K) * LANES];
            for kx in 0..K {
                let wv = &wk[ky * K + kx];
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = &row[(r * S + kx) * LANES..][..LANES];
                    for l in 0..LANES {
                        a[l] = Self::mul_add(wv[l], xv[l], a[l]);
                    }
                }
            }
        }
        for (d, a) in dst.as_chunks_mut::<LANES>().0.iter_mut().zip(&acc) {
            for l in 0..LANES {
                d[l] = clamp(a[l] * ep.mul[l] + ep.add[l], ep.lo, ep.hi);
            }
        }
    }

    /// `R` positions of the backward's gather (see "Backward"): `out[j] = Σ_t g[from[t] + at + j]
    /// · w[t]` lane by lane, taps in order from zero, each a multiply and then an add.
    #[inline(always)]
    fn gather_strip<const R: usize>(
        g: &[[f32; LANES]],
        from: &[usize],
        at: usize,
        w: &[[f32; LANES]],
        out: &mut [[f32; LANES]; R],
    ) {
        let mut a = [[0.0f32; LANES]; R];
        for (&f, wt) in from.iter().zip(w) {
            let src = &g[f + at..][..R];
            for j in 0..R {
                for l in 0..LANES {
                    a[j][l] += src[j][l] * wt[l];
                }
            }
        }
        *out = a;
    }

    /// One output row of the kernel gradient (see "Backward"): `acc[ox % 2][kx] += g[ox] ·
    /// row[ox·sw + kx·dw]` lane by lane for `ox` in order, each a multiply and then an add.
    #[inline(always)]
    fn grad_row<const KW: usize>(
        row: &[[f32; LANES]],
        g: &[[f32; LANES]],
        sw: usize,
        dw: usize,
        acc: &mut [[[f32; LANES]; KW]; 2],
    ) {
        let step = |a: &mut [[f32; LANES]; KW], ox: usize| {
            for kx in 0..KW {
                let xv = &row[ox * sw + kx * dw];
                for l in 0..LANES {
                    a[kx][l] += g[ox][l] * xv[l];
                }
            }
        };
        let [a0, a1] = acc;
        let pairs = g.len() / 2 * 2;
        for ox in (0..pairs).step_by(2) {
            step(a0, ox);
            step(a1, ox + 1);
        }
        if pairs < g.len() {
            step(a0, pairs);
        }
    }

    /// `dst[x * LANES + l] = planes[l][from + x]` for `x < len`.
    #[inline(always)]
    fn interleave(planes: &[&[f32]; LANES], from: usize, len: usize, dst: &mut [f32]) {
        for (x, d) in dst[..len * LANES].as_chunks_mut::<LANES>().0.iter_mut().enumerate() {
            for l in 0..LANES {
                d[l] = planes[l][from + x];
            }
        }
    }

    /// `out[l * plane + pos] = src[pos * LANES + l]` for `pos < plane` and each of the
    /// `out.len() / plane` (at most `LANES`) planes of `out`.
    #[inline(always)]
    fn deinterleave(src: &[f32], out: &mut [f32], plane: usize) {
        for (l, o) in out.chunks_exact_mut(plane).enumerate() {
            for (pos, v) in o.iter_mut().enumerate() {
                *v = src[pos * LANES + l];
            }
        }
    }
}

impl DwInner for Plain {}

#[cfg(feature = "std")]
impl DwInner for super::Fused {}

/// Any depthwise geometry: for each output row and tap, the range of output columns whose
/// input column lies inside the image is computed once, so the inner loop is a plain
/// strided multiply-add.
#[inline(always)]
fn dw_rows<M: MulAdd>(s: &ConvShape, w: Weights, c: usize, xin: &[f32], out: &mut [f32], post: &PostOp) {
    let (oh, ow) = (s.oh(), s.ow());
    let taps = s.kh * s.kw;
    let mut wk = [0.0f32; 64];
    let wk: &mut [f32] = if taps <= 64 { &mut wk[..taps] } else { &mut [] };
    w.run_into(c, c * taps, wk);
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

// ---------------------------------------------------------------------------------------
// Backward
//
// The gradients of the depthwise conv, for training (`train::ops::conv`). Written the way the
// forward's small-plane path is: a block of [`LANES`] channels is interleaved as
// `[position][lane]` into zero-padded planes, so every tap at every position is one 8-wide
// multiply and add for any stride, dilation or plane size, with no bounds inside the loops.
// (A loop per channel, tap and output row, `train::ops::conv`'s row-wise backward, runs on
// rows too short to vectorise: it was 45 % of a Lite0 CLR training step, the forward 4 %.)
// - kernel gradient: `dw[c][t] = Σ_pos dy[c][pos] · xpad[c][pos·s + t·d]`, a row of `KW`
//   taps at a time with two sets of accumulators (even and odd output columns), so the adds
//   do not wait on each other;
// - input gradient: a gather, `dx[c][i] = Σ_t w[c][t] · dy[c][(i + pad − t·d) / s]` over the
//   taps `t` for which the division is exact, eight positions of a row at a time in registers
//   with every tap inner. With `p = i + pad`, tap `t` reaches `p` when `t·d ≡ p (mod s)`, from
//   output `p / s − ⌊t·d / s⌋`; so the input positions fall into `s_h · s_w` phases by `p mod s`,
//   each with its own taps, and along a row one phase's positions read consecutive outputs.
//   `dy` is padded by `⌊(k − 1)·d / s⌋` zero rows above and columns to the left for that.
//   At stride 1 there is one phase with every tap: the forward conv of `dy` with the kernel
//   flipped. (Before the gather, a scatter `dxpad[pos·s + t·d] += dy[pos] · w[t]` loaded and
//   stored the plane once per tap: 26 % of a Lite0 CLR training step at stride 1, where the
//   gather took it to 18 %; at stride 2 it stayed until the phases came.)
// Each input position sums its taps in tap order from zero, as the scatter did.
// Plain multiplies and adds (no fused multiply-add), so every instance gives the same bits.
// Sums run in another order than the row-wise loop's, so the last bits differ from it; it is
// the reference in `train::ops::tests`.

type V = [f32; LANES];
const ZERO: V = [0.0; LANES];

/// Whether [`backward_inline`] takes this shape: depthwise, `kh ≤ 7`, `kw ∈ {1, 3, 5, 7}`,
/// strides up to 7 (at most 49 phases), any dilation and padding.
pub fn backward_supported(s: &ConvShape) -> bool {
    let (depthwise, strides) = (s.cin_g() == 1 && s.cout_g() == 1, s.sh <= 7 && s.sw <= 7);
    depthwise && strides && matches!(s.kw, 1 | 3 | 5 | 7) && s.kh <= 7 && s.out_hw().is_some()
}

/// Scratch floats [`backward_inline`] needs, in vectors of [`LANES`]: the output gradient
/// (padded for the gather, with [`GATHER_SLACK`]), the padded input plane, the input
/// gradient's plane, a staging area of one whole input or output plane, and one input row.
pub fn backward_scratch_len(s: &ConvShape) -> usize {
    let (ph, pw) = (s.h + s.pad[0] + s.pad[2], s.w + s.pad[1] + s.pad[3]);
    let g = GatherPlane::of(s).len().max(s.oh() * s.ow());
    let (plane, oplane) = (s.h * s.w, s.oh() * s.ow());
    (g + GATHER_SLACK + ph * pw + plane + plane.max(oplane) + s.w) * LANES
}

/// The output gradient padded for the gather: `top` zero rows above and `left` columns to
/// the left of `dy`, `rows × cols` of `dy` (the rest lies beyond every input position, so it
/// meets only the zero padding of `x`), as far below and to the right as the input positions
/// reach. Input position `(py, px)` (padded coordinates) reads tap `(ky, kx)` at row
/// `py / sh − ⌊ky·dh / sh⌋ + top`, column `px / sw − ⌊kx·dw / sw⌋ + left`.
struct GatherPlane {
    top: usize,
    left: usize,
    rows: usize,
    cols: usize,
    /// Row length (the leading dimension).
    ld: usize,
    /// Rows.
    height: usize,
}

impl GatherPlane {
    fn of(s: &ConvShape) -> Self {
        let (top, left) = ((s.kh - 1) * s.dh / s.sh, (s.kw - 1) * s.dw / s.sw);
        // Outputs up to the last input position's `p / s` are read.
        let (reach_y, reach_x) = ((s.pad[0] + s.h - 1) / s.sh + 1, (s.pad[1] + s.w - 1) / s.sw + 1);
        GatherPlane {
            top,
            left,
            rows: s.oh().min(reach_y),
            cols: s.ow().min(reach_x),
            ld: left + reach_x,
            height: top + reach_y,
        }
    }

    fn len(&self) -> usize {
        self.ld * self.height
    }
}

/// [`backward_inline`] compiled for the baseline ISA.
pub fn backward(
    s: &ConvShape,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    dx: Option<(&mut [f32], Store)>,
    dw: Option<&mut [f32]>,
    scratch: &mut [f32],
) {
    backward_inline::<Plain>(s, w, x, dy, dx, dw, scratch)
}

/// The body of every instance of the depthwise backward (see "Backward" above): stores
/// `∂L/∂x` into `dx` (added or set) and adds `∂L/∂w` into `dw` (each when given) for one sample with input `x`
/// (`c × h × w`), output gradient `dy` (`c × oh × ow`) and f32 kernels `w` (`c × kh × kw`).
/// `s` must be [`backward_supported`]; `scratch` holds at least [`backward_scratch_len`]
/// floats (any values). `M` moves data between planes and lanes (no arithmetic).
#[inline(always)]
pub fn backward_inline<M: DwInner>(
    s: &ConvShape,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    mut dx: Option<(&mut [f32], Store)>,
    mut dw: Option<&mut [f32]>,
    scratch: &mut [f32],
) {
    let (oh, ow) = (s.oh(), s.ow());
    let (ph, pw) = (s.h + s.pad[0] + s.pad[2], s.w + s.pad[1] + s.pad[3]);
    let (plane, oplane, taps) = (s.h * s.w, oh * ow, s.kh * s.kw);
    // With the input gradient, `g` is `dy` inside its padded gather plane and the kernel
    // gradient reads it there too; otherwise `g` is `dy` as it is.
    let gp = GatherPlane::of(s);
    let gather = dx.is_some();
    let (g_len, g_at, g_ld, g_rows, g_cols) =
        if gather { (gp.len(), gp.top * gp.ld + gp.left, gp.ld, gp.rows, gp.cols) } else { (oplane, 0, ow, oh, ow) };
    let scratch = scratch[..backward_scratch_len(s)].as_chunks_mut::<LANES>().0;
    let (g, rest) = scratch.split_at_mut(g_len + GATHER_SLACK);
    let (xp, rest) = rest.split_at_mut(ph * pw);
    let (dxp, rest) = rest.split_at_mut(plane);
    let (stage, rest) = rest.split_at_mut(plane.max(oplane));
    let row = &mut rest[..s.w];
    // The padding stays zero: the interiors of `g` and `xp` are rewritten for every block.
    if gather {
        g.fill(ZERO);
    }
    if dw.is_some() {
        xp.fill(ZERO);
    }
    // The taps grouped by phase (`(ky·dh mod sh, kx·dw mod sw)`, row-major), in tap order
    // within each: `order[phase[q]..phase[q + 1]]`, each with its read offset in `g` relative
    // to the position's `(py / sh, px / sw)`.
    let (mut order, mut from, mut phase) = ([0usize; 49], [0usize; 49], [0usize; 50]);
    let mut at = 0;
    for (q, (ry, rx)) in (0..s.sh).flat_map(|ry| (0..s.sw).map(move |rx| (ry, rx))).enumerate() {
        phase[q] = at;
        for ky in (0..s.kh).filter(|ky| ky * s.dh % s.sh == ry) {
            for kx in (0..s.kw).filter(|kx| kx * s.dw % s.sw == rx) {
                order[at] = ky * s.kw + kx;
                from[at] = (gp.top - ky * s.dh / s.sh) * gp.ld + gp.left - kx * s.dw / s.sw;
                at += 1;
            }
        }
    }
    let phases = s.sh * s.sw;
    phase[phases] = at;
    // Per block: the kernel gradient's sums and the kernels as lanes in phase order (outside
    // the loop, so that these 3 KB are not zeroed for every block).
    let (mut sums, mut wv) = ([ZERO; 49], [ZERO; 49]);
    for c0 in (0..s.c_in).step_by(LANES) {
        let n = LANES.min(s.c_in - c0);
        // Lanes past `n` repeat channel `n − 1`; what they compute is never stored, and in
        // the input gradient their kernel is zero.
        let first = |l: usize, len: usize| (c0 + l.min(n - 1)) * len;
        let planes: [&[f32]; LANES] = core::array::from_fn(|l| &dy[first(l, oplane)..][..oplane]);
        if gather {
            interleave_rows::<M>(&planes, ow, g_rows, g_cols, &mut g[g_at..], g_ld, stage);
        } else {
            M::interleave(&planes, 0, oplane, g.as_flattened_mut());
        }
        if let Some(dw) = dw.as_deref_mut() {
            let planes: [&[f32]; LANES] = core::array::from_fn(|l| &x[first(l, plane)..][..plane]);
            interleave_rows::<M>(&planes, s.w, s.h, s.w, &mut xp[s.pad[0] * pw + s.pad[1]..], pw, stage);
            let gd = GradPlane { v: &g[g_at..], ld: g_ld, rows: g_rows, cols: g_cols };
            match s.kw {
                1 => backward_kernel_grad::<M, 1>(s, xp, &gd, pw, &mut sums),
                3 => backward_kernel_grad::<M, 3>(s, xp, &gd, pw, &mut sums),
                5 => backward_kernel_grad::<M, 5>(s, xp, &gd, pw, &mut sums),
                _ => backward_kernel_grad::<M, 7>(s, xp, &gd, pw, &mut sums),
            }
            for l in 0..n {
                for t in 0..taps {
                    dw[(c0 + l) * taps + t] += sums[t][l];
                }
            }
        }
        if let Some((dx, store)) = dx.as_mut() {
            for (&t, wt) in order[..taps].iter().zip(&mut wv) {
                for (l, v) in wt.iter_mut().enumerate() {
                    *v = if l < n { w[(c0 + l) * taps + t] } else { 0.0 };
                }
            }
            // Row `iy` of the block's input gradient at `dxp[iy · w ..]`, phase by phase.
            for (iy, out) in dxp.chunks_exact_mut(s.w).enumerate() {
                let py = iy + s.pad[0];
                for rx in 0..s.sw {
                    // The row's positions in this column phase: `ix0, ix0 + sw, …`.
                    let ix0 = (rx + s.sw - s.pad[1] % s.sw) % s.sw;
                    if ix0 >= s.w {
                        continue;
                    }
                    let q = py % s.sh * s.sw + rx;
                    let (t0, t1) = (phase[q], phase[q + 1]);
                    let count = (s.w - ix0).div_ceil(s.sw);
                    let at = py / s.sh * g_ld + (ix0 + s.pad[1]) / s.sw;
                    if s.sw == 1 {
                        gather_row::<M>(g, &from[t0..t1], at, &wv[t0..t1], out);
                    } else {
                        let part = &mut row[..count];
                        gather_row::<M>(g, &from[t0..t1], at, &wv[t0..t1], part);
                        for (d, v) in out[ix0..].iter_mut().step_by(s.sw).zip(part.iter()) {
                            *d = *v;
                        }
                    }
                }
            }
            store_planes::<M>(dxp, stage.as_flattened_mut(), dx, *store, c0 * plane, n);
        }
    }
}

/// Interleaves `rows × cols` of `LANES` planes (row stride `ld`) into `dst`, row `r` at
/// `dst[r · dst_ld ..]`. Rows shorter than two vectors are interleaved as one run through
/// `stage` (the per-row tail is scalar) and copied from there.
#[inline(always)]
fn interleave_rows<M: DwInner>(
    planes: &[&[f32]; LANES],
    ld: usize,
    rows: usize,
    cols: usize,
    dst: &mut [V],
    dst_ld: usize,
    stage: &mut [V],
) {
    if rows == 0 || cols == 0 {
        return;
    }
    if cols >= 2 * LANES {
        for r in 0..rows {
            M::interleave(planes, r * ld, cols, dst[r * dst_ld..][..cols].as_flattened_mut());
        }
    } else {
        let run = (rows - 1) * ld + cols;
        M::interleave(planes, 0, run, stage[..run].as_flattened_mut());
        for r in 0..rows {
            dst[r * dst_ld..][..cols].copy_from_slice(&stage[r * ld..][..cols]);
        }
    }
}

/// `dx[at + l · plane + pos] += src[pos][l]` (or `=`, by `store`) for the `n` lanes, with
/// `plane = src.len()`; `out` is scratch of `n · plane` floats. `src` must not hold −0
/// (a sum that starts from +0 never does), so that setting it directly gives the bits of
/// adding it onto zeros.
#[inline(always)]
fn store_planes<M: DwInner>(src: &[V], out: &mut [f32], dx: &mut [f32], store: Store, at: usize, n: usize) {
    let plane = src.len();
    let dst = &mut dx[at..][..n * plane];
    match store {
        Store::Set => M::deinterleave(src.as_flattened(), dst, plane),
        Store::Add => {
            let out = &mut out[..n * plane];
            M::deinterleave(src.as_flattened(), out, plane);
            for (d, v) in dst.iter_mut().zip(out.iter()) {
                *d += v;
            }
        }
    }
}

/// `acc[i] = Σ_t g[from[t] + at + i] · w[t]`: eight positions at a time in registers
/// ([`DwInner::gather_strip`]). The last one to seven positions are a strip of four or eight
/// too, so `g` must hold [`GATHER_SLACK`] vectors past the last position read (one chain of
/// dependent adds ran at a quarter of the speed; strips of two and three, which LLVM's SLP
/// vectoriser reshuffles across lanes, at about a third).
#[inline(always)]
fn gather_row<M: DwInner>(g: &[V], from: &[usize], at: usize, w: &[V], acc: &mut [V]) {
    let (strips, rest) = acc.as_chunks_mut::<8>();
    let mut i = at;
    for out in strips {
        M::gather_strip::<8>(g, from, i, w, out);
        i += 8;
    }
    if rest.len() > 4 {
        let mut out = [ZERO; 8];
        M::gather_strip::<8>(g, from, i, w, &mut out);
        rest.copy_from_slice(&out[..rest.len()]);
    } else if !rest.is_empty() {
        let mut out = [ZERO; 4];
        M::gather_strip::<4>(g, from, i, w, &mut out);
        rest.copy_from_slice(&out[..rest.len()]);
    }
}

/// Vectors [`gather_row`] may read past the gather's plane.
const GATHER_SLACK: usize = 3;

/// The output gradient as the kernel gradient reads it: `rows × cols` vectors, row `oy` at
/// `v[oy · ld ..]` (`rows`, `cols` may stop short of the output plane, where the rest of `dy`
/// is known to meet only zero padding of `x`).
struct GradPlane<'a> {
    v: &'a [V],
    ld: usize,
    rows: usize,
    cols: usize,
}

/// `sums[ky·KW + kx] = Σ_{oy, ox} g[oy][ox] · xpad[oy·sh + ky·dh][ox·sw + kx·dw]`, lane-wise,
/// with two sets of accumulators (even and odd output columns) so that the adds do not wait
/// on each other.
#[inline(always)]
fn backward_kernel_grad<M: DwInner, const KW: usize>(
    s: &ConvShape,
    xp: &[V],
    g: &GradPlane,
    pw: usize,
    sums: &mut [V; 49],
) {
    for ky in 0..s.kh {
        let mut a = [[ZERO; KW]; 2];
        for oy in 0..g.rows {
            let row = &xp[(oy * s.sh + ky * s.dh) * pw..][..pw];
            M::grad_row::<KW>(row, &g.v[oy * g.ld..][..g.cols], s.sw, s.dw, &mut a);
        }
        for kx in 0..KW {
            for l in 0..LANES {
                sums[ky * KW + kx][l] = a[0][kx][l] + a[1][kx][l];
            }
        }
    }
}
