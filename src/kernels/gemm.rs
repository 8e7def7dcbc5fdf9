//! Packed GEMM: `C[m][n] = post(A[m][k] · B[k][n])`, with A the layer's weights.
//!
//! A is dequantised panel by panel (`mr` rows of `k`, rows past the layer zero) into a small
//! per-thread buffer that stays in L1: a straight, vectorised pass that reads the weights from
//! the file once per call, and where a mask or overlay (later issues) costs nothing extra. The micro-kernel reads `mr` rows at stride `k`,
//! broadcasting one value of each per step, so A needs no transposing pack. (A transposing
//! `[k][mr]` pack was measured at 17 % of a Lite0 forward pass: its stores are scattered.) B is packed in panels of `nr` columns (`[panel][k][nr]`),
//! straight from im2col (see [`super::fast`]) or from a plain matrix. The micro-kernel computes
//! one `mr × nr` tile over the whole `k`; the epilogue applies the per-row [`PostOp`] while the
//! tile is in registers or L1. Rows of C are split across threads; packed A and B are shared.

use super::{Kernels, MicroKernel, PostOp, TileEpilogue, Weights, MAX_MR};

/// Largest `mr * nr` of any micro-kernel (the epilogue's stack tile).
pub const MAX_TILE: usize = 192;

/// The portable micro-kernel, 4 × 8: written so that the compiler keeps the tile in registers.
pub const GENERIC_MICRO: MicroKernel = MicroKernel { name: "generic 4x8", mr: 4, nr: 8, run: micro_4xn::<8> };

/// Its narrow twin ([`super::Kernels::micro_narrow`]), 4 × 4.
pub const GENERIC_NARROW: MicroKernel = MicroKernel { name: "generic 4x4", mr: 4, nr: 4, run: micro_4xn::<4> };

fn micro_4xn<const NR: usize>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ep: &TileEpilogue,
    c: &mut [f32],
    ldc: usize,
) {
    const MR: usize = 4;
    let mut t = [[0.0f32; NR]; MR];
    let rows: [&[f32]; MR] = core::array::from_fn(|i| &a[i * lda..i * lda + k]);
    for (p, bp) in b[..k * NR].chunks_exact(NR).enumerate() {
        for i in 0..MR {
            let av = rows[i][p];
            for j in 0..NR {
                t[i][j] += av * bp[j];
            }
        }
    }
    for (i, row) in t.iter().enumerate() {
        for (d, &v) in c[i * ldc..i * ldc + NR].iter_mut().zip(row) {
            *d = ep.apply(i, v);
        }
    }
}

/// Floats needed for `m × k` of A as rows padded to a multiple of `mr`.
pub fn packed_a_len(m: usize, k: usize, mr: usize) -> usize {
    m.div_ceil(mr) * mr * k
}

/// Floats needed to pack `k × n` of B with panel width `nr`.
pub fn packed_b_len(k: usize, n: usize, nr: usize) -> usize {
    n.div_ceil(nr) * nr * k
}

/// Dequantises rows `row0 .. row0 + m` of the weight matrix (row length `k`) into `dst`
/// (`[m rounded up to mr][k]`); the padding rows are zero.
#[inline(always)]
pub fn pack_a(w: Weights, row0: usize, m: usize, k: usize, mr: usize, dst: &mut [f32]) {
    let dst = &mut dst[..packed_a_len(m, k, mr)];
    let (rows, pad) = dst.split_at_mut(m * k);
    match w {
        Weights::I8 { q, scale } => {
            for (r, d) in rows.chunks_exact_mut(k).enumerate() {
                let s = scale[row0 + r];
                for (o, &v) in d.iter_mut().zip(&q[(row0 + r) * k..(row0 + r + 1) * k]) {
                    *o = v as f32 * s;
                }
            }
        }
        Weights::F32(wf) => rows.copy_from_slice(&wf[row0 * k..(row0 + m) * k]),
        Weights::Masked(mw) => {
            for (r, d) in rows.chunks_exact_mut(k).enumerate() {
                mw.row_into(row0 + r, 0, d);
            }
        }
    }
    pad.fill(0.0);
}

/// Packs a row-major `k × n` matrix (row stride `ld`) into `nr`-wide panels, zero-padded.
#[inline(always)]
pub fn pack_b(src: &[f32], k: usize, n: usize, ld: usize, nr: usize, dst: &mut [f32]) {
    match nr {
        16 => pack_b_fixed::<16>(src, k, n, ld, dst),
        8 => pack_b_fixed::<8>(src, k, n, ld, dst),
        _ => {
            for (q, panel) in dst[..packed_b_len(k, n, nr)].chunks_exact_mut(k * nr).enumerate() {
                pack_b_panel(src, k, n, ld, nr, q, panel);
            }
        }
    }
}

/// [`pack_b`] with the panel width known at compile time: whole panels move as fixed-size
/// arrays, which the compiler turns into a few vector moves (a `copy_from_slice` of a
/// run-time length is a call to `memmove` per 64 bytes, measured at 8-10 % of a forward pass).
#[inline(always)]
fn pack_b_fixed<const NR: usize>(src: &[f32], k: usize, n: usize, ld: usize, dst: &mut [f32]) {
    for (q, panel) in dst[..packed_b_len(k, n, NR)].chunks_exact_mut(k * NR).enumerate() {
        let c0 = q * NR;
        if n - c0 < NR {
            pack_b_panel(src, k, n, ld, NR, q, panel);
            continue;
        }
        for (kk, d) in panel.as_chunks_mut::<NR>().0.iter_mut().enumerate() {
            *d = *src[kk * ld + c0..].first_chunk::<NR>().expect("B holds k rows of n");
        }
    }
}

/// Panel `q` of [`pack_b`], any width.
#[inline(always)]
fn pack_b_panel(src: &[f32], k: usize, n: usize, ld: usize, nr: usize, q: usize, panel: &mut [f32]) {
    let c0 = q * nr;
    let w = nr.min(n - c0);
    for kk in 0..k {
        let d = &mut panel[kk * nr..(kk + 1) * nr];
        d[..w].copy_from_slice(&src[kk * ld + c0..kk * ld + c0 + w]);
        d[w..].fill(0.0);
    }
}

/// Most tasks one GEMM is split into; per-task A-panel scratch is sized for this many.
pub fn max_tasks() -> usize {
    super::threads() * 2
}

/// Scratch floats for the per-task A panels of a GEMM with `k` columns.
pub fn a_scratch_len(k: usize, mr: usize) -> usize {
    max_tasks() * mr * k
}

/// `C = post(W · B)` with `W` rows `row0 .. row0 + m` of a layer's weights and `B` packed
/// (see [`pack_b`]). `c` is `m × n` row-major; row `r` uses weight row and post-op channel
/// `row0 + r`. Row blocks go to threads; each dequantises one `mr × k` panel of weights at a
/// time into its piece of `a_scratch` (L1-resident, not the whole layer into memory) and runs
/// it against every B panel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn gemm_packed(
    kern: &Kernels,
    m: usize,
    n: usize,
    k: usize,
    w: Weights,
    row0: usize,
    b: &[f32],
    c: &mut [f32],
    post: &PostOp,
    a_scratch: &mut [f32],
) {
    let mr = kern.micro.mr;
    let panels = m.div_ceil(mr);
    let work = m * n * k;
    // Whole panels per task; as many tasks as useful and as the scratch allows.
    let tasks = super::tasks_for(work).min(panels).min(a_scratch.len() / (mr * k)).max(1);
    let rows_per_task = panels.div_ceil(tasks) * mr;
    super::for_each_chunk_with(&mut c[..m * n], rows_per_task * n, a_scratch, mr * k, work, |t, cchunk, apanel| {
        (kern.gemm_rows)(&kern.micro, n, k, w, row0 + t * rows_per_task, b, cchunk, post, apanel)
    });
}

/// One block of rows of [`gemm_packed`]: `c` holds the block's rows, `row0` is the weight row
/// and post-op channel of its first row, `apanel` holds `mr × k` floats.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn gemm_rows_inline(
    micro: &MicroKernel,
    n: usize,
    k: usize,
    w: Weights,
    row0: usize,
    b: &[f32],
    c: &mut [f32],
    post: &PostOp,
    apanel: &mut [f32],
) {
    gemm_rows_with(pack_a, micro, n, k, w, row0, b, c, post, apanel)
}

/// A packer of A panels with the signature of [`pack_a`].
pub type PackAFn = fn(Weights, usize, usize, usize, usize, &mut [f32]);

/// [`gemm_rows_inline`] with the A panels packed by `pack` (an ISA's own dequantise-and-mask
/// kernel, same layout and values as [`pack_a`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn gemm_rows_with(
    pack: PackAFn,
    micro: &MicroKernel,
    n: usize,
    k: usize,
    w: Weights,
    row0: usize,
    b: &[f32],
    c: &mut [f32],
    post: &PostOp,
    apanel: &mut [f32],
) {
    let (mr, nr) = (micro.mr, micro.nr);
    let mut tile = [0.0f32; MAX_TILE];
    let tile = &mut tile[..mr * nr];
    let rows = c.len() / n;
    let ap = &mut apanel[..mr * k];
    let mut ep = TileEpilogue { mul: [0.0; MAX_MR], add: [0.0; MAX_MR], lo: post.lo, hi: post.hi };
    for pi in 0..rows.div_ceil(mr) {
        let r0 = pi * mr;
        let m_eff = mr.min(rows - r0);
        pack(w, row0 + r0, m_eff, k, mr, ap);
        let ch = row0 + r0;
        ep.mul[..m_eff].copy_from_slice(&post.mul[ch..ch + m_eff]);
        ep.add[..m_eff].copy_from_slice(&post.add[ch..ch + m_eff]);
        for q in 0..n.div_ceil(nr) {
            let bp = &b[q * nr * k..][..nr * k];
            let c0 = q * nr;
            let n_eff = nr.min(n - c0);
            if m_eff == mr && n_eff == nr {
                (micro.run)(k, ap, k, bp, &ep, &mut c[r0 * n + c0..], n);
                continue;
            }
            // A partial tile: through the stack, then its valid part into C.
            (micro.run)(k, ap, k, bp, &ep, tile, nr);
            for i in 0..m_eff {
                c[(r0 + i) * n + c0..][..n_eff].copy_from_slice(&tile[i * nr..i * nr + n_eff]);
            }
        }
    }
}

/// [`gemm_rows_inline`] compiled for the baseline ISA.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows(
    micro: &MicroKernel,
    n: usize,
    k: usize,
    w: Weights,
    row0: usize,
    b: &[f32],
    c: &mut [f32],
    post: &PostOp,
    apanel: &mut [f32],
) {
    gemm_rows_inline(micro, n, k, w, row0, b, c, post, apanel)
}
