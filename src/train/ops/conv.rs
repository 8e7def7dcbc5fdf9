//! Convolution over a batch: forward through the kernel table or batched GEMMs, backward by
//! hand.
//!
//! Non-depthwise convs work on chunks of samples ([`chunk_samples`]), chunks in parallel.
//! With `col = im2col(x)` of a chunk (`K × nb·P`, `K = c_in/g · kh · kw`, `P = oh · ow`, sample
//! `b`'s columns at `b·P`), each of `y = W · col`, `dWᵀ = col · dYᵀ` and `dcol = Wᵀ · dY` is one
//! GEMM over every position of the chunk (per sample, the late layers' GEMMs had 16 columns
//! and the weight gradient a `k` of 16), and `dx += col2im(dcol)`. Depthwise convs (one input
//! channel per group) use direct loops instead: their per-group GEMMs would have `K ≤ 25`
//! and one row. Weight gradients are summed per chunk and the chunks in order, and chunks
//! depend on the shape and batch only, so results do not depend on threading.
//!
//! A one-group conv whose weights come with a sparse form (a SupSup mask, [`SparseW`]) runs
//! its forward pass and, at stride 1, its input gradient as direct sparse convolutions
//! ([`sparse_conv`]); at other strides the input gradient is a sparse product over im2col's
//! columns. The weight gradient is dense (every score needs its gradient); for a one-group
//! conv with enough input channels and output positions it is read from the input's stride
//! phases in place, with no im2col ([`wgrad::weight_grad`]), masked or not; for a 3 × 3
//! stride-1 conv of many channels on a small plane it is taken by Winograd's minimal
//! filtering ([`winograd::weight_grad`]).

use super::dot8;
use super::sparse::SparseW;
use super::sparse_conv;
use super::unfold::{col2im_chunk, im2col_chunk};
use super::wgrad;
use super::winograd;
use crate::kernels::gemm::packed_b_len;
use crate::kernels::matmul::{gemm_cols, gemm_cols_unpacked, pack_bt_cols, Cols};
use crate::kernels::sparse::Runs;
use crate::kernels::{depthwise, reference, ConvShape, Kernels, PostOp, Store, Weights};

/// `y = conv(x) + bias` for `batch` samples. Depthwise convs (and the reference kernels) run
/// per sample through the kernel table; every other conv runs over chunks of samples, each
/// chunk one GEMM `W · col` over all its samples' output positions (see [`chunk_samples`]),
/// chunks in parallel. Each output is one micro-kernel sum over the whole `K` either way.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    k: &Kernels,
    s: &ConvShape,
    w: Weights,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    sp: Option<&SparseW>,
) {
    forward_clamped(k, s, w, bias, None, x, batch, y, sp)
}

/// [`forward`], then `y = clamp(y, lo, hi)` when `clamp` is `Some((lo, hi))`: a ReLU or ReLU6
/// that reads only this conv, fused into it. The dense products clamp in their epilogue, with
/// no pass of their own; the sparse and per-sample paths clamp their output in place.
#[allow(clippy::too_many_arguments)]
pub fn forward_clamped(
    k: &Kernels,
    s: &ConvShape,
    w: Weights,
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    sp: Option<&SparseW>,
) {
    let (xl, yl) = (s.c_in * s.h * s.w, s.c_out * s.oh() * s.ow());
    if let Some(sp) = sparse_for(s, sp) {
        sparse_conv::forward(k, s, sp, bias, &x[..batch * xl], batch, &mut y[..batch * yl]);
        if let Some((lo, hi)) = clamp {
            super::act::clamp_in_place(&mut y[..batch * yl], lo, hi);
        }
        return;
    }
    if k.fast && !s.is_depthwise() {
        return forward_batched(k, s, &dense(w), bias, clamp, &x[..batch * xl], batch, &mut y[..batch * yl]);
    }
    let ones = vec![1.0f32; s.c_out];
    let zeros = vec![0.0f32; s.c_out];
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let post = PostOp { mul: &ones, add: bias.unwrap_or(&zeros), lo, hi };
    let need = crate::kernels::fast::conv_scratch_len(s, k);
    if k.fast {
        // Samples in parallel, each with its thread's scratch.
        for_each_chunk(batch, 1, batch * s.macs(), Some(y), yl, None, 0, |_, b, _, ys, _| {
            let ys = ys.expect("output sample");
            FWD_SCRATCH.with_borrow_mut(|sc| {
                if sc.len() < need {
                    sc.resize(need, 0.0);
                }
                (k.conv2d)(k, s, w, &x[b * xl..(b + 1) * xl], ys, &post, sc)
            })
        });
        return;
    }
    for b in 0..batch {
        reference::conv2d(s, w, &x[b * xl..(b + 1) * xl], &mut y[b * yl..(b + 1) * yl], &post);
    }
}

/// Floats of one chunk's unfolded input ([`chunk_samples`] keeps `K × columns` near this:
/// 1 MB, so that a chunk's operands stay in L2/L3 and per-thread buffers stay small).
const CHUNK_FLOATS: usize = 1 << 18;

/// Chunks of the batch whose partial weight gradients [`wgrad::weight_grad`] sums in
/// order: enough for the threads, and few partials to keep and add (a chunk per im2col
/// buffer's worth of samples made 64 partials of GEMResNet18's first stage, one per sample).
const WEIGHT_GRAD_CHUNKS: usize = 8;

/// Samples per chunk of the batched conv: as many as keep `K × nb · P` within
/// [`CHUNK_FLOATS`], at least one, and at most a quarter of the batch (so that two threads
/// get work even on the last, smallest layers). It depends on the shape and the batch only,
/// never on the thread count: the weight gradient sums per-chunk partials in chunk order.
pub fn chunk_samples(s: &ConvShape, batch: usize) -> usize {
    let kk = s.cin_g() * s.kh * s.kw;
    let p = s.oh() * s.ow();
    (CHUNK_FLOATS / (kk * p).max(1)).clamp(1, batch.div_ceil(4).max(1))
}

fn is_pointwise(s: &ConvShape) -> bool {
    s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.pad == [0; 4]
}

/// A chunk's index and its pieces of the two buffers of [`for_each_chunk`].
type Job<'a> = (usize, Option<&'a mut [f32]>, Option<&'a mut [f32]>);

/// Runs `f(chunk index, first sample, samples, a, b)` over the batch's chunks, where `a` and
/// `b` are the chunk's pieces of two optional per-sample (`a_len`, `b_len` floats each) and
/// per-chunk (`b_chunk` floats, when not zero) buffers; in parallel when the work is worth it.
#[allow(clippy::too_many_arguments)]
pub(super) fn for_each_chunk<F>(
    batch: usize,
    nb: usize,
    work: usize,
    a: Option<&mut [f32]>,
    a_len: usize,
    b: Option<&mut [f32]>,
    b_len: usize,
    f: F,
) where
    F: Fn(usize, usize, usize, Option<&mut [f32]>, Option<&mut [f32]>) + Sync + Send,
{
    let chunks = batch.div_ceil(nb);
    let mut a_parts: Vec<Option<&mut [f32]>> = match a {
        Some(a) => a[..batch * a_len].chunks_mut(nb * a_len).map(Some).collect(),
        None => (0..chunks).map(|_| None).collect(),
    };
    let mut b_parts: Vec<Option<&mut [f32]>> = match b {
        Some(b) => b.chunks_mut(b_len).take(chunks).map(Some).collect(),
        None => (0..chunks).map(|_| None).collect(),
    };
    let jobs: Vec<Job> = a_parts.drain(..).zip(b_parts.drain(..)).enumerate().map(|(c, (a, b))| (c, a, b)).collect();
    for_each_job(jobs, work, |(c, a, b): Job| {
        let b0 = c * nb;
        f(c, b0, nb.min(batch - b0), a, b)
    });
}

/// Runs `f` on each of `jobs`: on the rayon pool when there is more than one, the pool has
/// more than one thread, and `work` (multiply-adds) is worth it.
pub(super) fn for_each_job<J: Send>(jobs: Vec<J>, work: usize, f: impl Fn(J) + Sync + Send) {
    if jobs.len() > 1 && work >= crate::kernels::PAR_MIN_WORK && crate::kernels::threads() > 1 {
        use rayon::prelude::*;
        jobs.into_par_iter().for_each(f);
    } else {
        jobs.into_iter().for_each(f);
    }
}

/// [`forward_clamped`] for a non-depthwise conv with f32 weights `wf`, over chunks of samples.
#[allow(clippy::too_many_arguments)]
fn forward_batched(
    k: &Kernels,
    s: &ConvShape,
    wf: &[f32],
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) {
    let (p, xl, yl) = (s.oh() * s.ow(), s.c_in * s.h * s.w, s.c_out * s.oh() * s.ow());
    let (cin_g, cout_g) = (s.cin_g(), s.cout_g());
    let kk = cin_g * s.kh * s.kw;
    let plane = s.h * s.w;
    let nb = chunk_samples(s, batch);
    let pointwise = is_pointwise(s);
    let work = batch * s.macs();
    for_each_chunk(batch, nb, work, Some(y), yl, None, 0, |_, b0, nbs, yc, _| {
        let yc = yc.expect("output chunk");
        let xc = &x[b0 * xl..(b0 + nbs) * xl];
        let n = nbs * p;
        COLS.with(|cell| {
            let mut bufs = cell.borrow_mut();
            let Bufs { col, .. } = &mut *bufs;
            for g in 0..s.groups {
                let (b, bcols) = if pointwise {
                    (&xc[g * cin_g * plane..], Cols { per: p, bs: xl, rs: p })
                } else {
                    let colm = sized(col, kk * n);
                    im2col_chunk(s, xc, g, nbs, colm);
                    (&colm[..], Cols::plain(n, n))
                };
                gemm_cols_unpacked(
                    k,
                    cout_g,
                    n,
                    kk,
                    &wf[g * cout_g * kk..(g + 1) * cout_g * kk],
                    kk,
                    b,
                    bcols,
                    &mut yc[g * cout_g * p..],
                    Cols { per: p, bs: yl, rs: p },
                    bias.map(|b| &b[g * cout_g..(g + 1) * cout_g]),
                    clamp,
                    false,
                );
            }
        });
    });
}

/// The sparse form of the weights when it applies to `s`: one group, `W` as `c_out × K`, a
/// non-empty input and output, and a sample's padded planes small enough for the direct
/// convolution's 32-bit tap offsets.
fn sparse_for<'w>(s: &ConvShape, sp: Option<&'w SparseW>) -> Option<&'w SparseW> {
    let sized = s.h * s.w * s.oh() * s.ow() > 0;
    let (rh, rw) = (s.kh * s.dh + s.pad[0] + s.pad[2], s.kw * s.dw + s.pad[1] + s.pad[3]);
    let dims = [s.c_in.max(s.c_out), s.h + rh, s.sh, s.w + rw, s.sw];
    let fits = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some_and(|n| n < u32::MAX as usize / 2);
    sp.filter(|sp| sized && fits && s.groups == 1 && sp.dims() == (s.c_out, s.c_in * s.kh * s.kw))
}

/// `v` grown to at least `n` floats; its first `n`.
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `Wᵀ` per group (`cin_g·kh·kw × cout_g` each): the A operand of the input gradient's
/// product, written into `out` (`w.len()` floats).
pub fn transpose_groups(s: &ConvShape, w: &[f32], out: &mut [f32]) {
    let (cout_g, kk) = (s.cout_g(), s.cin_g() * s.kh * s.kw);
    for (wg, tg) in w.chunks_exact(cout_g * kk).zip(out.chunks_exact_mut(cout_g * kk)) {
        for (o, row) in wg.chunks_exact(kk).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                tg[r * cout_g + o] = v;
            }
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

/// Gradients of [`forward`]: stores `∂L/∂x` into `dx` (added or set, by its [`Store`]), adds
/// `∂L/∂W` into `dw` and `∂L/∂b` into `db` (each only when asked for) given `dy = ∂L/∂y`.
/// `kept_t` is [`transpose_groups`] of the weights, when the caller keeps it (frozen weights:
/// transposing them on every step was 2 % of a Lite0 CLR step).
/// Depthwise convs through the kernel table and pointwise ones set `dx` as they compute it;
/// the others zero it first and add. `x` is read only for `∂L/∂W`: without `dw` it may be
/// empty (the input of a frozen conv kept only as a clamp's mask).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    k: &Kernels,
    s: &ConvShape,
    w: Weights,
    x: &[f32],
    dy: &[f32],
    batch: usize,
    dx: Option<(&mut [f32], Store)>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    sp: Option<&SparseW>,
    kept_t: Option<&[f32]>,
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
        // Samples in parallel, each with its own kernel-gradient partial (only when the kernel
        // is trained), summed in sample order afterwards: the result does not depend on the
        // thread count. Depthwise kernels are small, so a partial per sample is cheap.
        let wl = wf.len();
        let mut partial = if dw.is_some() { vec![0.0f32; batch * wl] } else { Vec::new() };
        let work = batch * s.c_in * s.h * s.w * s.kh * s.kw;
        let part = dw.is_some().then_some(&mut partial[..]);
        let lanes = k.fast && depthwise::backward_supported(s);
        let (dx, store) = added(dx, lanes);
        for_each_chunk(batch, 1, work, dx, xl, part, wl, |_, b, _, dxb, dwb| {
            let xb = if dwb.is_some() { &x[b * xl..(b + 1) * xl] } else { &[][..] };
            let dyb = &dy[b * yl..(b + 1) * yl];
            if lanes {
                DW_SCRATCH.with_borrow_mut(|sc| {
                    sc.resize(sc.len().max(depthwise::backward_scratch_len(s)), 0.0);
                    (k.depthwise_backward)(s, &wf, xb, dyb, dxb.map(|d| (d, store)), dwb, sc)
                })
            } else {
                depthwise_backward(s, &wf, xb, dyb, dxb, dwb)
            }
        });
        if let Some(dw) = dw {
            for p in partial.chunks_exact(wl) {
                for (d, v) in dw.iter_mut().zip(p) {
                    *d += v;
                }
            }
        }
        return;
    }
    let dw = match dw {
        Some(dw) if winograd::preferred(s) => {
            winograd::weight_grad(k, s, x, dy, batch, dw);
            None
        }
        Some(dw) if wgrad::weight_grad_rows_supported(k, s) => {
            wgrad::weight_grad_rows(k, s, x, dy, batch, dw);
            None
        }
        Some(dw) if wgrad::weight_grad_supported(s, k.micro.mr) => {
            wgrad::weight_grad(k, s, x, dy, batch, batch.div_ceil(WEIGHT_GRAD_CHUNKS), dw);
            None
        }
        dw => dw,
    };
    let sp = sparse_for(s, sp);
    if let Some(sp) = sp.filter(|_| sparse_conv::backward_dx_supported(s)) {
        if let Some((dx, store)) = dx {
            sparse_conv::backward_dx(k, s, sp, dy, batch, dx, store);
        }
        if dw.is_some() {
            backward_batched(k, s, &wf, x, dy, batch, None, Store::Add, dw, None, None);
        }
        return;
    }
    let dx = match (dx, sp) {
        (Some((dx, store)), Some(sp)) if sparse_conv::backward_dx_phases_supported(s) => {
            sparse_conv::backward_dx_phases(k, s, sp, dy, batch, dx, store);
            None
        }
        (dx, _) => dx,
    };
    if dx.is_none() && dw.is_none() {
        return;
    }
    // Every path of `backward_batched` sets a gradient as asked (its unfolded ones zero it a
    // chunk at a time first).
    let (dx, store) = added(dx, true);
    backward_batched(k, s, &wf, x, dy, batch, dx, store, dw, sp, kept_t);
}

/// `dx` and how to store into it, for a path that can set it (`sets`) or only add: a buffer
/// to be set is zeroed for the latter.
fn added(dx: Option<(&mut [f32], Store)>, sets: bool) -> (Option<&mut [f32]>, Store) {
    match dx {
        Some((d, Store::Set)) if !sets => {
            d.fill(0.0);
            (Some(d), Store::Add)
        }
        Some((d, st)) => (Some(d), st),
        None => (None, Store::Add),
    }
}

/// Per-thread buffers of the batched conv: the unfolded input of a chunk, its gradient, and a
/// packed GEMM operand; kept between calls.
#[derive(Default)]
struct Bufs {
    col: Vec<f32>,
    dcol: Vec<f32>,
    packed: Vec<f32>,
}

std::thread_local! {
    static COLS: std::cell::RefCell<Bufs> = std::cell::RefCell::new(Bufs::default());
    static DW_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The kernel table's conv scratch for [`forward`]'s per-sample path.
    static FWD_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The transposed weights of [`backward_batched`], on the calling thread.
    static WT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The non-depthwise backward over chunks of samples ([`chunk_samples`]), chunks in parallel.
/// Per chunk and group, with `col` the chunk's unfolded input (`K × nb·P`) and `dY` its
/// output gradient (`cout_g × nb·P`): `dWᵀ = col · dYᵀ` (one GEMM over all the chunk's
/// positions, kept per chunk and summed in chunk order afterwards, so the result does not
/// depend on the thread count) and `dx` stored by `store` from `col2im(Wᵀ · dY)` (for a
/// dense pointwise conv the product is stored straight into `dx`; the others add into the
/// chunk's piece, zeroed first when it is to be set).
#[allow(clippy::too_many_arguments)]
fn backward_batched(
    k: &Kernels,
    s: &ConvShape,
    wf: &[f32],
    x: &[f32],
    dy: &[f32],
    batch: usize,
    dx: Option<&mut [f32]>,
    store: Store,
    dw: Option<&mut [f32]>,
    sp: Option<&SparseW>,
    kept_t: Option<&[f32]>,
) {
    let (p, xl, yl) = (s.oh() * s.ow(), s.c_in * s.h * s.w, s.c_out * s.oh() * s.ow());
    let (cin_g, cout_g, groups) = (s.cin_g(), s.cout_g(), s.groups);
    let kk = cin_g * s.kh * s.kw;
    let plane = s.h * s.w;
    let nr = k.micro.nr;
    let pointwise = is_pointwise(s);
    let nb = chunk_samples(s, batch);
    let chunks = batch.div_ceil(nb);
    let want_dx = dx.is_some();
    // Wᵀ per group (`K × cout_g`), transposed once per call into a buffer kept between calls
    // (collected from iterators, with a fresh allocation, it was 2.5 % of a Lite0 CLR step).
    // A caller whose weights do not change between steps keeps it (`kept_t`).
    let mut wt_buf = WT.take();
    let wt = match (want_dx && sp.is_none(), kept_t) {
        (false, _) => &[][..],
        (true, Some(t)) => t,
        (true, None) => {
            let wt = sized(&mut wt_buf, wf.len());
            transpose_groups(s, wf, wt);
            &wt[..]
        }
    };
    // Per chunk, per group: dWᵀ (`K × cout_g`).
    let part_len = groups * kk * cout_g;
    with_partials(if dw.is_some() { chunks * part_len } else { 0 }, |partial| {
        let work = 2 * batch * s.macs();
        let dyc_cols = Cols { per: p, bs: yl, rs: p };
        for_each_chunk(
            batch,
            nb,
            work,
            dx,
            xl,
            dw.is_some().then_some(&mut *partial),
            part_len,
            |_, b0, nbs, dxc, part| {
                let n = nbs * p;
                let xc = if part.is_some() { &x[b0 * xl..(b0 + nbs) * xl] } else { &[][..] };
                let dyc = &dy[b0 * yl..(b0 + nbs) * yl];
                COLS.with(|cell| {
                    let mut bufs = cell.borrow_mut();
                    let Bufs { col, dcol, packed } = &mut *bufs;
                    let mut dxc = dxc;
                    // The unfolded paths add into the chunk's input gradient: one to be set is
                    // zeroed here, where the adds follow while it is in cache (zeroed whole on
                    // the calling thread first, it was a serial pass over memory).
                    if let (Some(d), Store::Set, false) = (dxc.as_deref_mut(), store, pointwise && sp.is_none()) {
                        d.fill(0.0);
                    }
                    let mut part = part;
                    for g in 0..groups {
                        let dyg = &dyc[g * cout_g * p..];
                        if let Some(part) = part.as_deref_mut() {
                            let colm = sized(col, kk * n);
                            im2col_chunk(s, xc, g, nbs, colm);
                            let bpk = sized(packed, packed_b_len(n, cout_g, nr));
                            pack_bt_cols(dyg, cout_g, n, dyc_cols, nr, bpk);
                            let out = &mut part[g * kk * cout_g..(g + 1) * kk * cout_g];
                            gemm_cols(k, kk, cout_g, n, colm, n, bpk, out, Cols::plain(cout_g, cout_g), None, false);
                        }
                        if let (Some(dxc), Some(sp)) = (dxc.as_deref_mut(), sp) {
                            // One group: dcol = Wᵀ · dY by the sparse product, over the chunk's
                            // output gradient gathered into `cout × nb·P`.
                            let dym = sized(packed, cout_g * n);
                            for (b, dyb) in dyc.chunks_exact(yl).enumerate() {
                                for (co, row) in dyb.chunks_exact(p).enumerate() {
                                    dym[co * n + b * p..][..p].copy_from_slice(row);
                                }
                            }
                            let dcolm = sized(dcol, kk * n);
                            (k.spmm)(sp.wt(), dym, n, Runs::one(n), dcolm, n, Store::Set);
                            col2im_chunk(s, dcolm, g, nbs, dxc);
                        } else if let Some(dxc) = dxc.as_deref_mut() {
                            let wtg = &wt[g * kk * cout_g..(g + 1) * kk * cout_g];
                            if pointwise {
                                let out = &mut dxc[g * cin_g * plane..];
                                gemm_cols_unpacked(
                                    k,
                                    kk,
                                    n,
                                    cout_g,
                                    wtg,
                                    cout_g,
                                    dyg,
                                    dyc_cols,
                                    out,
                                    Cols { per: p, bs: xl, rs: p },
                                    None,
                                    None,
                                    store == Store::Add,
                                );
                            } else {
                                let dcolm = sized(dcol, kk * n);
                                let out = Cols::plain(n, n);
                                gemm_cols_unpacked(
                                    k, kk, n, cout_g, wtg, cout_g, dyg, dyc_cols, dcolm, out, None, None, false,
                                );
                                col2im_chunk(s, dcolm, g, nbs, dxc);
                            }
                        }
                    }
                });
            },
        );
        if let Some(dw) = dw {
            // Chunk partials summed in chunk order, then transposed into dW a row at a time,
            // rows over the threads when dW is large.
            let first = sum_chunks(partial, part_len);
            let rows = |(row, drow): (usize, &mut [f32])| {
                let (g, o) = (row / cout_g, row % cout_g);
                let pg = &first[g * kk * cout_g..(g + 1) * kk * cout_g];
                for (d, pr) in drow.iter_mut().zip(pg.chunks_exact(cout_g)) {
                    *d += pr[o];
                }
            };
            if dw.len() >= crate::kernels::PAR_MIN_WORK / 4 && crate::kernels::threads() > 1 {
                use rayon::prelude::*;
                dw.par_chunks_exact_mut(kk).enumerate().for_each(rows);
            } else {
                dw.chunks_exact_mut(kk).enumerate().for_each(rows);
            }
        }
    });
    WT.set(wt_buf);
}

std::thread_local! {
    /// The weight gradients' per-chunk partials, kept between calls on the calling thread.
    static PARTIALS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `f` with a buffer of `len` floats for a weight gradient's per-chunk partials, kept between
/// calls: a fresh one (up to 5.5 MB for GEMResNet18's last stage) came from the system and was
/// zeroed page by page on every step. It holds what the last call left (NaN in debug builds):
/// each chunk writes all of its partial, or zeroes it first.
pub(super) fn with_partials<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = PARTIALS.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    #[cfg(debug_assertions)]
    buf[..len].fill(f32::NAN);
    let r = f(&mut buf[..len]);
    PARTIALS.set(buf);
    r
}

/// The per-chunk partials (`len` floats each) summed in chunk order into the first, which is
/// returned: a weight gradient's sum that does not depend on which thread ran which chunk.
/// Pieces of the sum go to the threads when the partials are large (each element is still the
/// chunks' sum in chunk order: the same bits).
pub(super) fn sum_chunks(partial: &mut [f32], len: usize) -> &[f32] {
    let (first, rest) = partial.split_at_mut(len);
    let sum = |at: usize, piece: &mut [f32]| {
        for pc in rest.chunks_exact(len) {
            for (a, &v) in piece.iter_mut().zip(&pc[at..]) {
                *a += v;
            }
        }
    };
    const PIECE: usize = 1 << 14;
    if rest.len() >= crate::kernels::PAR_MIN_WORK && crate::kernels::threads() > 1 {
        use rayon::prelude::*;
        first.par_chunks_mut(PIECE).enumerate().for_each(|(i, p)| sum(i * PIECE, p));
    } else {
        sum(0, first);
    }
    first
}

/// Depthwise backward for one sample, row-wise: the reference for [`super::depthwise`] and
/// the path for shapes it does not take (and for the reference kernels). Channel `c`'s kernel
/// `w[c]` (`kh × kw`). For each tap
/// the range of output columns that read inside the image is computed once, so the inner loops
/// run over plain slices without per-element checks; the kernel gradient sums into 8 lanes
/// (a single running sum does not vectorise: measured at half of a Lite0 CLR step), and
/// strided inputs are gathered into a small buffer first.
pub(super) fn depthwise_backward(
    s: &ConvShape,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    mut dx: Option<&mut [f32]>,
    mut dw: Option<&mut [f32]>,
) {
    const GATHER: usize = 64;
    let (oh, ow, plane, taps) = (s.oh(), s.ow(), s.h * s.w, s.kh * s.kw);
    let mut gathered = [0.0f32; GATHER];
    for c in 0..s.c_in {
        let xc = if dw.is_some() { &x[c * plane..(c + 1) * plane] } else { &[][..] };
        let dyc = &dy[c * oh * ow..(c + 1) * oh * ow];
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
                let mut acc = [0.0f32; 8];
                for oy in 0..oh {
                    let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                    if iy < 0 || iy as usize >= s.h {
                        continue;
                    }
                    let i0 = iy as usize * s.w + ((lo * s.sw) as isize + off) as usize;
                    let g = &dyc[oy * ow + lo..][..n];
                    if s.sw == 1 {
                        if dw.is_some() {
                            dot8(&mut acc, g, &xc[i0..i0 + n]);
                        }
                        if let Some(dx) = dx.as_deref_mut() {
                            axpy8(&mut dx[c * plane + i0..][..n], g, wv);
                        }
                    } else {
                        for (j0, gb) in (0..n).step_by(GATHER).zip(g.chunks(GATHER)) {
                            if dw.is_some() {
                                let xs = &mut gathered[..gb.len()];
                                for (j, v) in xs.iter_mut().enumerate() {
                                    *v = xc[i0 + (j0 + j) * s.sw];
                                }
                                dot8(&mut acc, gb, xs);
                            }
                            if let Some(dx) = dx.as_deref_mut() {
                                for (j, &gv) in gb.iter().enumerate() {
                                    dx[c * plane + i0 + (j0 + j) * s.sw] += gv * wv;
                                }
                            }
                        }
                    }
                }
                if let Some(dw) = dw.as_deref_mut() {
                    dw[t] += acc.iter().sum::<f32>();
                }
            }
        }
    }
}

/// `d += g · w`, eight at a time (written as a plain zip, this loop stayed scalar: 16 % of a
/// Lite0 CLR step).
#[inline(always)]
fn axpy8(d: &mut [f32], g: &[f32], w: f32) {
    let (dc, dt) = d.as_chunks_mut::<8>();
    let (gc, gt) = g[..dc.len() * 8 + dt.len()].as_chunks::<8>();
    for (d, g) in dc.iter_mut().zip(gc) {
        for l in 0..8 {
            d[l] += g[l] * w;
        }
    }
    for (d, &g) in dt.iter_mut().zip(gt) {
        *d += g * w;
    }
}
