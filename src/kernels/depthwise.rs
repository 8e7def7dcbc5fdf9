//! Depthwise convolution (one kernel per channel), NCHW: the part of a mobile net where the
//! bounds bookkeeping of a general kernel costs more than the arithmetic. Three paths, by the
//! size of the zero-padded input plane, for square 3×3 / 5×5 kernels with stride 1 or 2:
//! * up to 32×32: [`dw_lanes`], 8 channels at once, interleaved, one vector op per tap;
//! * up to 128×128: [`dw_padded`], blocks of 8 outputs of a row, stride 2 split into even
//!   and odd columns;
//! * anything else (other kernels, dilation, larger planes): [`dw_rows`], row-wise.
//!
//! All tested against [`super::reference::conv2d`] (`tests/kernels.rs`). The backward (for
//! training) is in the `backward` submodule.

use super::{clamp, for_each_chunk, ConvShape, Kernels, MulAdd, Plain, PostOp, Weights};

mod backward;
pub use backward::{backward, backward_inline, backward_scratch_len, backward_supported};

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
    let mut scratch = LanesScratch { wk: [[0.0; LANES]; 25], taps: [[0.0; 25]; LANES] };
    for (g, o) in out.chunks_mut(s.oh() * s.ow() * LANES).enumerate() {
        let c = c0 + g * LANES;
        let (buf, obuf, sc) = (buf.as_flattened_mut(), obuf.as_flattened_mut(), &mut scratch);
        match (s.kh, s.sh) {
            (3, 1) => dw_lanes::<3, 1, M>(s, w, c, x, buf, obuf, sc, o, post),
            (3, 2) => dw_lanes::<3, 2, M>(s, w, c, x, buf, obuf, sc, o, post),
            (5, 1) => dw_lanes::<5, 1, M>(s, w, c, x, buf, obuf, sc, o, post),
            _ => dw_lanes::<5, 2, M>(s, w, c, x, buf, obuf, sc, o, post),
        }
    }
}

/// [`dw_lanes`]'s kernels as lanes (`wk[tap][lane]`) and, for weights that are not f32, each
/// lane's kernel as f32: made once per call of [`dw_lanes_channels`], so that they are not
/// zeroed for every block.
struct LanesScratch {
    wk: [[f32; LANES]; 25],
    taps: [[f32; 25]; LANES],
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
    scratch: &mut LanesScratch,
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
    // The kernels as lanes, `wk[t][l]`: a transpose of the block's kernels, read where they
    // are when they are f32 (written lane by lane, they were read back as vectors before
    // the stores had landed, a stall per tap). Lanes past `n` repeat channel `n − 1`.
    let taps = K * K;
    let lane = |l: usize| c0 + l.min(n - 1);
    let kernels: [&[f32]; LANES] = match w {
        Weights::F32(wf) => core::array::from_fn(|l| &wf[lane(l) * taps..][..taps]),
        _ => {
            for (l, t) in scratch.taps.iter_mut().enumerate().take(n) {
                w.run_into(c0 + l, (c0 + l) * taps, &mut t[..taps]);
            }
            let t = &scratch.taps;
            core::array::from_fn(|l| &t[l.min(n - 1)][..taps])
        }
    };
    let wk = &mut scratch.wk;
    M::interleave(&kernels, 0, taps, wk[..taps].as_flattened_mut());
    let (mut mul, mut add) = ([0.0f32; LANES], [0.0f32; LANES]);
    mul[..n].copy_from_slice(&post.mul[c0..c0 + n]);
    add[..n].copy_from_slice(&post.add[c0..c0 + n]);
    let ep = LanesEpilogue { mul, add, lo: post.lo, hi: post.hi };
    for oy in 0..oh {
        let rows: [&[f32]; K] = core::array::from_fn(|ky| &buf[(oy * S + ky) * pw * LANES..]);
        let orow = &mut obuf[oy * ow * LANES..(oy + 1) * ow * LANES];
        // Strips of LANES_STRIP outputs (independent accumulators, each weight vector loaded
        // once per strip); a partial last strip is computed again from `ow - LANES_STRIP`.
        let mut ox = 0;
        while ox + LANES_STRIP <= ow {
            M::lanes_strip::<K, S, LANES_STRIP>(&rows, wk, ox, &ep, &mut orow[ox * LANES..(ox + LANES_STRIP) * LANES]);
            ox += LANES_STRIP;
        }
        if ox < ow {
            if ow >= LANES_STRIP {
                let ox = ow - LANES_STRIP;
                M::lanes_strip::<K, S, LANES_STRIP>(&rows, wk, ox, &ep, &mut orow[ox * LANES..]);
            } else {
                for ox in ox..ow {
                    M::lanes_strip::<K, S, 1>(&rows, wk, ox, &ep, &mut orow[ox * LANES..(ox + 1) * LANES]);
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

    /// `R` positions of the backward's gather (see the `backward` module): `out[j] = Σ_t g[from[t] + at + j]
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

    /// One output row of the kernel gradient (see the `backward` module): `acc[ox % 2][kx] += g[ox] ·
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

    /// [`DwInner::grad_row`] for `rows` output rows in order, into the same sums: row `oy`
    /// of the output gradient is `g[oy · g_ld ..][..cols]`, its input row `x[oy · x_ld ..]`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn grad_rows<const KW: usize>(
        x: &[[f32; LANES]],
        x_ld: usize,
        g: &[[f32; LANES]],
        g_ld: usize,
        rows: usize,
        cols: usize,
        sw: usize,
        dw: usize,
        acc: &mut [[[f32; LANES]; KW]; 2],
    ) {
        for oy in 0..rows {
            Self::grad_row::<KW>(&x[oy * x_ld..], &g[oy * g_ld..][..cols], sw, dw, acc);
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

    /// `dst[r · dst_ld + c][l] = planes[l][r · ld + c]` for `r < rows`, `c < cols`: rows of
    /// `LANES` planes into rows of a wider (zero-padded) plane. `stage` holds at least
    /// `(rows − 1) · ld + cols` vectors (any values).
    #[inline(always)]
    fn interleave_rows(
        planes: &[&[f32]; LANES],
        ld: usize,
        rows: usize,
        cols: usize,
        dst: &mut [[f32; LANES]],
        dst_ld: usize,
        stage: &mut [[f32; LANES]],
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        // Rows shorter than two vectors as one run through `stage` (a row's tail positions
        // are moved one float at a time), then copied row by row.
        if cols >= 2 * LANES {
            for r in 0..rows {
                Self::interleave(planes, r * ld, cols, dst[r * dst_ld..][..cols].as_flattened_mut());
            }
        } else {
            let run = (rows - 1) * ld + cols;
            Self::interleave(planes, 0, run, stage[..run].as_flattened_mut());
            for r in 0..rows {
                dst[r * dst_ld..][..cols].copy_from_slice(&stage[r * ld..][..cols]);
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
