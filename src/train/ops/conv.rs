//! Convolution over a batch: forward through the kernel table, backward by hand.
//!
//! Backward per sample and group, with `col = im2col(x)` (`K × P`, `K = c_in/g · kh · kw`,
//! `P = oh · ow`): `dW += dY · colᵀ` and `dx = col2im(Wᵀ · dY)`. Depthwise convs (one input
//! channel per group) use direct loops instead: their per-group GEMMs would have `K ≤ 25`
//! and one row. Weight gradients accumulate over the batch in sample order, so they do not
//! depend on threading.

use crate::kernels::matmul::{matmul, Mat};
use crate::kernels::{reference, ConvShape, Kernels, PostOp, Weights};

/// `y = conv(x) + bias` for `batch` samples.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    k: &Kernels,
    s: &ConvShape,
    w: Weights,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (xl, yl) = (s.c_in * s.h * s.w, s.c_out * s.oh() * s.ow());
    let ones = vec![1.0f32; s.c_out];
    let zeros = vec![0.0f32; s.c_out];
    let post = PostOp { mul: &ones, add: bias.unwrap_or(&zeros), lo: f32::NEG_INFINITY, hi: f32::INFINITY };
    let need = crate::kernels::fast::conv_scratch_len(s, k);
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    for b in 0..batch {
        let (xs, ys) = (&x[b * xl..(b + 1) * xl], &mut y[b * yl..(b + 1) * yl]);
        if k.fast {
            (k.conv2d)(k, s, w, xs, ys, &post, scratch);
        } else {
            reference::conv2d(s, w, xs, ys, &post);
        }
    }
}

/// The weights as f32 (a copy for int8).
pub fn dense(w: Weights<'_>) -> std::borrow::Cow<'_, [f32]> {
    match w {
        Weights::F32(v) => std::borrow::Cow::Borrowed(v),
        Weights::Masked(m) => {
            let mut v = vec![0.0f32; m.base.len()];
            for (o, row) in v.chunks_exact_mut(m.row_len.max(1)).enumerate() {
                m.row_into(o, 0, row);
            }
            std::borrow::Cow::Owned(v)
        }
        Weights::I8 { q, scale } => {
            let per = q.len() / scale.len().max(1);
            std::borrow::Cow::Owned(
                q.chunks(per.max(1)).zip(scale).flat_map(|(r, &sc)| r.iter().map(move |&v| v as f32 * sc)).collect(),
            )
        }
    }
}

/// Gradients of [`forward`]: adds `∂L/∂x` into `dx`, `∂L/∂W` into `dw` and `∂L/∂b` into `db`
/// (each only when asked for) given `dy = ∂L/∂y`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    k: &Kernels,
    s: &ConvShape,
    w: Weights,
    x: &[f32],
    dy: &[f32],
    batch: usize,
    mut dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let (p, xl, yl) = (s.oh() * s.ow(), s.c_in * s.h * s.w, s.c_out * s.oh() * s.ow());
    if let Some(db) = db {
        for b in 0..batch {
            for (c, d) in db.iter_mut().enumerate() {
                *d += dy[b * yl + c * p..b * yl + (c + 1) * p].iter().sum::<f32>();
            }
        }
    }
    if dx.is_none() && dw.is_none() {
        return;
    }
    let wf = dense(w);
    if s.cin_g() == 1 && s.cout_g() == 1 {
        // Samples in parallel, each with its own kernel-gradient partial, summed in sample
        // order afterwards: the result does not depend on the thread count.
        use rayon::prelude::*;
        let wl = wf.len();
        // Depthwise kernels are small (channels × taps), so a partial per sample is cheap.
        let mut partial = vec![0.0f32; batch * wl];
        let run = |b: usize, dxb: Option<&mut [f32]>, dwb: &mut [f32]| {
            depthwise_backward(s, &wf, &x[b * xl..(b + 1) * xl], &dy[b * yl..(b + 1) * yl], dxb, Some(dwb))
        };
        let work = batch * s.c_in * s.h * s.w * s.kh * s.kw;
        let parallel = work >= crate::kernels::PAR_MIN_WORK && rayon::current_num_threads() > 1;
        match (dx.as_deref_mut(), parallel) {
            (Some(dx), true) => dx[..batch * xl]
                .par_chunks_mut(xl)
                .zip(partial.par_chunks_mut(wl))
                .enumerate()
                .for_each(|(b, (dxb, dwb))| run(b, Some(dxb), dwb)),
            (Some(dx), false) => {
                for (b, (dxb, dwb)) in dx[..batch * xl].chunks_mut(xl).zip(partial.chunks_mut(wl)).enumerate() {
                    run(b, Some(dxb), dwb);
                }
            }
            (None, true) => partial.par_chunks_mut(wl).enumerate().for_each(|(b, dwb)| run(b, None, dwb)),
            (None, false) => {
                for (b, dwb) in partial.chunks_mut(wl).enumerate() {
                    run(b, None, dwb);
                }
            }
        }
        if let Some(dw) = dw {
            for p in partial.chunks_exact(wl) {
                for (d, v) in dw.iter_mut().zip(p) {
                    *d += v;
                }
            }
        }
        return;
    }
    let kk = s.cin_g() * s.kh * s.kw;
    COLS.with(|cell| {
        let mut cols = cell.borrow_mut();
        let (col, dcol, dwt) = &mut *cols;
        col.resize(kk * p, 0.0);
        dcol.resize(kk * p, 0.0);
        dwt.resize(kk * s.cout_g(), 0.0);
        backward_groups(k, s, &wf, x, dy, batch, dx, dw, &mut col[..kk * p], &mut dcol[..kk * p], dwt);
    });
}

std::thread_local! {
    /// im2col buffers of the backward pass, kept per thread between calls.
    #[allow(clippy::type_complexity)]
    static COLS: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

#[allow(clippy::too_many_arguments)]
fn backward_groups(
    k: &Kernels,
    s: &ConvShape,
    wf: &[f32],
    x: &[f32],
    dy: &[f32],
    batch: usize,
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
    col: &mut [f32],
    dcol: &mut [f32],
    dwt: &mut [f32],
) {
    let (p, xl, yl) = (s.oh() * s.ow(), s.c_in * s.h * s.w, s.c_out * s.oh() * s.ow());
    let (cin_g, cout_g) = (s.cin_g(), s.cout_g());
    let kk = cin_g * s.kh * s.kw;
    let plane = s.h * s.w;
    // Wᵀ per group, transposed once per call rather than once per sample.
    let wt: Vec<f32> = if dx.is_some() {
        (0..s.groups)
            .flat_map(|g| {
                let wg = &wf[g * cout_g * kk..(g + 1) * cout_g * kk];
                (0..kk).flat_map(move |r| (0..cout_g).map(move |o| wg[o * kk + r]))
            })
            .collect()
    } else {
        Vec::new()
    };
    for b in 0..batch {
        for g in 0..s.groups {
            let xg = &x[b * xl + g * cin_g * plane..][..cin_g * plane];
            let dyg = &dy[b * yl + g * cout_g * p..][..cout_g * p];
            let pointwise = s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.pad == [0; 4];
            if let Some(dw) = dw.as_deref_mut() {
                let colm = if pointwise {
                    xg
                } else {
                    im2col(s, xg, col);
                    &*col
                };
                // dW_gᵀ (K × cout_g) = col (K × P) · dY_gᵀ (P × cout_g): A is read in place and
                // only the small dY is packed (packing colᵀ instead cost 17 % of a GEMResNet step).
                let tmp = &mut dwt[..kk * cout_g];
                matmul(k, Mat::rows(colm, kk, p), Mat::t(dyg, cout_g, p), tmp, false);
                let dwg = &mut dw[g * cout_g * kk..][..cout_g * kk];
                for (r, row) in tmp.chunks_exact(cout_g).enumerate() {
                    for (o, &v) in row.iter().enumerate() {
                        dwg[o * kk + r] += v;
                    }
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                let dxg = &mut dx[b * xl + g * cin_g * plane..][..cin_g * plane];
                let wtg = Mat::rows(&wt[g * cout_g * kk..(g + 1) * cout_g * kk], kk, cout_g);
                if pointwise {
                    matmul(k, wtg, Mat::rows(dyg, cout_g, p), dxg, true);
                } else {
                    matmul(k, wtg, Mat::rows(dyg, cout_g, p), dcol, false);
                    col2im_add(s, dcol, dxg);
                }
            }
        }
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

/// `col[(ci, ky, kx)][oy * ow + ox]` for one group.
fn im2col(s: &ConvShape, xg: &[f32], col: &mut [f32]) {
    let (p, sw) = (s.oh() * s.ow(), s.sw);
    col.fill(0.0);
    for_each_run(s, s.cin_g(), |r, c, i, n| {
        let dst = &mut col[r * p + c..][..n];
        if sw == 1 {
            dst.copy_from_slice(&xg[i..i + n]);
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = xg[i + j * sw];
            }
        }
    });
}

/// The adjoint of [`im2col`]: scatters `dcol` back onto the input, adding.
fn col2im_add(s: &ConvShape, dcol: &[f32], dxg: &mut [f32]) {
    let (p, sw) = (s.oh() * s.ow(), s.sw);
    for_each_run(s, s.cin_g(), |r, c, i, n| {
        let src = &dcol[r * p + c..][..n];
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

/// Depthwise backward for one sample: channel `c`'s kernel `w[c]` (`kh × kw`). For each tap
/// the range of output columns that read inside the image is computed once, so the inner loops
/// run over plain slices (stride 1) without per-element checks.
fn depthwise_backward(
    s: &ConvShape,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
) {
    let (oh, ow, plane, taps) = (s.oh(), s.ow(), s.h * s.w, s.kh * s.kw);
    for c in 0..s.c_in {
        let (xc, dyc) = (&x[c * plane..(c + 1) * plane], &dy[c * oh * ow..(c + 1) * oh * ow]);
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let t = c * taps + ky * s.kw + kx;
                let wv = w[t];
                let off = (kx * s.dw) as isize - s.pad[1] as isize;
                let lo = if off >= 0 { 0 } else { ((-off) as usize).div_ceil(s.sw) };
                let hi = if (s.w as isize) > off { ((s.w as isize - off) as usize).div_ceil(s.sw).min(ow) } else { 0 };
                if lo >= hi {
                    continue;
                }
                let n = hi - lo;
                let mut acc = 0.0f32;
                for oy in 0..oh {
                    let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                    if iy < 0 || iy as usize >= s.h {
                        continue;
                    }
                    let i0 = iy as usize * s.w + ((lo * s.sw) as isize + off) as usize;
                    let g = &dyc[oy * ow + lo..][..n];
                    if s.sw == 1 {
                        let xs = &xc[i0..i0 + n];
                        acc += g.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
                        if let Some(dx) = dx.as_deref_mut() {
                            for (d, &gv) in dx[c * plane + i0..][..n].iter_mut().zip(g) {
                                *d += gv * wv;
                            }
                        }
                    } else {
                        for (j, &gv) in g.iter().enumerate() {
                            acc += gv * xc[i0 + j * s.sw];
                        }
                        if let Some(dx) = dx.as_deref_mut() {
                            for (j, &gv) in g.iter().enumerate() {
                                dx[c * plane + i0 + j * s.sw] += gv * wv;
                            }
                        }
                    }
                }
                if let Some(dw) = dw.as_deref_mut() {
                    dw[t] += acc;
                }
            }
        }
    }
}
