//! The depthwise conv's backward (the kernel table's `depthwise_backward` slot).
//!
//! The gradients of the depthwise conv, for training (`train::ops::conv`). Written the way the
//! forward's small-plane path is: a block of [`LANES`] channels is interleaved as
//! `[position][lane]` into zero-padded planes, so every tap at every position is one 8-wide
//! multiply and add for any stride, dilation or plane size, with no bounds inside the loops.
//! (A loop per channel, tap and output row, `train::ops::conv`'s row-wise backward, runs on
//! rows too short to vectorise: it was 45 % of a Lite0 CLR training step, the forward 4 %.)
//! - kernel gradient: `dw[c][t] = Σ_pos dy[c][pos] · xpad[c][pos·s + t·d]`, a row of `KW`
//!   taps at a time with two sets of accumulators (even and odd output columns), so the adds
//!   do not wait on each other;
//! - input gradient: a gather, `dx[c][i] = Σ_t w[c][t] · dy[c][(i + pad − t·d) / s]` over the
//!   taps `t` for which the division is exact, eight positions of a row at a time in registers
//!   with every tap inner. With `p = i + pad`, tap `t` reaches `p` when `t·d ≡ p (mod s)`, from
//!   output `p / s − ⌊t·d / s⌋`; so the input positions fall into `s_h · s_w` phases by `p mod s`,
//!   each with its own taps, and along a row one phase's positions read consecutive outputs.
//!   `dy` is padded by `⌊(k − 1)·d / s⌋` zero rows above and columns to the left for that.
//!   At stride 1 there is one phase with every tap: the forward conv of `dy` with the kernel
//!   flipped. (Before the gather, a scatter `dxpad[pos·s + t·d] += dy[pos] · w[t]` loaded and
//!   stored the plane once per tap: 26 % of a Lite0 CLR training step at stride 1, where the
//!   gather took it to 18 %; at stride 2 it stayed until the phases came.)
//!
//! Each input position sums its taps in tap order from zero, as the scatter did.
//! Plain multiplies and adds (no fused multiply-add), so every instance gives the same bits.
//! Sums run in another order than the row-wise loop's, so the last bits differ from it; it is
//! the reference in `train::ops::tests`.

use super::{DwInner, LANES};
use crate::kernels::{ConvShape, Plain, Store};

type V = [f32; LANES];
const ZERO: V = [0.0; LANES];

/// Whether [`backward_inline`] takes this shape: depthwise, `kh ≤ 7`, `kw ∈ {1, 3, 5, 7}`,
/// strides up to 7 (at most 49 phases), any dilation and padding.
pub fn backward_supported(s: &ConvShape) -> bool {
    let (depthwise, strides) = (s.cin_g() == 1 && s.cout_g() == 1, s.sh <= 7 && s.sw <= 7);
    depthwise && strides && matches!(s.kw, 1 | 3 | 5 | 7) && s.kh <= 7 && s.out_hw().is_some()
}

/// Scratch floats [`backward_inline`] needs, in vectors of [`LANES`]: the output gradient
/// (padded for the gather), the padded input plane, the input gradient's plane, a staging
/// area of one whole input or output plane, and one input row (each of the gather's three
/// with [`GATHER_SLACK`]).
pub fn backward_scratch_len(s: &ConvShape) -> usize {
    let (ph, pw) = (s.h + s.pad[0] + s.pad[2], s.w + s.pad[1] + s.pad[3]);
    let g = GatherPlane::of(s).len().max(s.oh() * s.ow());
    let (plane, oplane) = (s.h * s.w, s.oh() * s.ow());
    (g + ph * pw + plane + plane.max(oplane) + s.w + 3 * GATHER_SLACK) * LANES
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

/// The body of every instance of the depthwise backward (see the module documentation): stores
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
    let (dxp, rest) = rest.split_at_mut(plane + GATHER_SLACK);
    let (stage, rest) = rest.split_at_mut(plane.max(oplane));
    let row = &mut rest[..s.w + GATHER_SLACK];
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
    // Per block: the kernel gradient's sums, the kernels as lanes in tap order and in phase
    // order, and the sums channel by channel (outside the loop, so that these 6 KB are not
    // zeroed for every block).
    let (mut sums, mut lanes, mut wv) = ([ZERO; 49], [ZERO; 49], [ZERO; 49]);
    let mut by_channel = [0.0f32; 49 * LANES];
    let zeros = [0.0f32; 49];
    for c0 in (0..s.c_in).step_by(LANES) {
        let n = LANES.min(s.c_in - c0);
        // Lanes past `n` repeat channel `n − 1`; what they compute is never stored, and in
        // the input gradient their kernel is zero.
        let first = |l: usize, len: usize| (c0 + l.min(n - 1)) * len;
        let planes: [&[f32]; LANES] = core::array::from_fn(|l| &dy[first(l, oplane)..][..oplane]);
        if gather {
            M::interleave_rows(&planes, ow, g_rows, g_cols, &mut g[g_at..], g_ld, stage);
        } else {
            M::interleave(&planes, 0, oplane, g.as_flattened_mut());
        }
        if let Some(dw) = dw.as_deref_mut() {
            let planes: [&[f32]; LANES] = core::array::from_fn(|l| &x[first(l, plane)..][..plane]);
            M::interleave_rows(&planes, s.w, s.h, s.w, &mut xp[s.pad[0] * pw + s.pad[1]..], pw, stage);
            let gd = GradPlane { v: &g[g_at..], ld: g_ld, rows: g_rows, cols: g_cols };
            match s.kw {
                1 => backward_kernel_grad::<M, 1>(s, xp, &gd, pw, &mut sums),
                3 => backward_kernel_grad::<M, 3>(s, xp, &gd, pw, &mut sums),
                5 => backward_kernel_grad::<M, 5>(s, xp, &gd, pw, &mut sums),
                _ => backward_kernel_grad::<M, 7>(s, xp, &gd, pw, &mut sums),
            }
            // One transpose, then one pass over the block's contiguous kernel gradients.
            let sums_by_channel = &mut by_channel[..n * taps];
            M::deinterleave(sums[..taps].as_flattened(), sums_by_channel, taps);
            for (d, v) in dw[c0 * taps..(c0 + n) * taps].iter_mut().zip(sums_by_channel.iter()) {
                *d += v;
            }
        }
        if let Some((dx, store)) = dx.as_mut() {
            // The kernels as lanes by one transpose (written lane by lane, each tap's vector
            // was read back before its stores had landed), then put in phase order.
            let kernels: [&[f32]; LANES] =
                core::array::from_fn(|l| if l < n { &w[(c0 + l) * taps..][..taps] } else { &zeros[..taps] });
            M::interleave(&kernels, 0, taps, lanes[..taps].as_flattened_mut());
            for (&t, wt) in order[..taps].iter().zip(&mut wv) {
                *wt = lanes[t];
            }
            // Row `iy` of the block's input gradient at `dxp[iy · w ..]`, phase by phase; rows
            // in order, as a row's last strip may run into the next.
            for iy in 0..s.h {
                let out = &mut dxp[iy * s.w..];
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
                        gather_row::<M>(g, &from[t0..t1], at, &wv[t0..t1], out, count);
                    } else {
                        gather_row::<M>(g, &from[t0..t1], at, &wv[t0..t1], row, count);
                        for (d, v) in out[ix0..s.w].iter_mut().step_by(s.sw).zip(&row[..count]) {
                            *d = *v;
                        }
                    }
                }
            }
            store_planes::<M>(&dxp[..plane], stage.as_flattened_mut(), dx, *store, c0 * plane, n);
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

/// `acc[i] = Σ_t g[from[t] + at + i] · w[t]` for `i < len`: eight positions at a time in
/// registers ([`DwInner::gather_strip`]). The last one to seven positions are a strip of four
/// or eight too, written in place: `acc` holds `len` rounded up to four (at most
/// [`GATHER_SLACK`] more), and `g` [`GATHER_SLACK`] vectors past the last position read.
/// (One chain of dependent adds ran at a quarter of the speed; strips of two and three, which
/// LLVM's SLP vectoriser reshuffles across lanes, at about a third; copying a short strip
/// out of a buffer called memmove, 11 % of the time on 3×3 planes.)
#[inline(always)]
fn gather_row<M: DwInner>(g: &[V], from: &[usize], at: usize, w: &[V], acc: &mut [V], len: usize) {
    assert!(acc.len() >= len.next_multiple_of(4));
    let mut i = 0;
    while i + 4 < len {
        let out = acc[i..].first_chunk_mut::<8>().expect("acc holds the strip");
        M::gather_strip::<8>(g, from, at + i, w, out);
        i += 8;
    }
    if i < len {
        let out = acc[i..].first_chunk_mut::<4>().expect("acc holds the strip");
        M::gather_strip::<4>(g, from, at + i, w, out);
    }
}

/// Vectors [`gather_row`] may read past the gather's plane, and write past a row's end.
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
        M::grad_rows::<KW>(&xp[ky * s.dh * pw..], s.sh * pw, g.v, g.ld, g.rows, g.cols, s.sw, s.dw, &mut a);
        for kx in 0..KW {
            for l in 0..LANES {
                sums[ky * KW + kx][l] = a[0][kx][l] + a[1][kx][l];
            }
        }
    }
}
