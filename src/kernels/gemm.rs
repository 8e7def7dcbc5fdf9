//! Packed GEMM: `C[m][n] = post(A[m][k] · B[k][n])`, with A the layer's weights.
//!
//! A is packed in panels of `mr` rows (`[panel][k][mr]`), dequantising int8 on the way, so the
//! weights are read from the file exactly once per call and a mask or overlay (later issues)
//! costs nothing beyond this pass. B is packed in panels of `nr` columns (`[panel][k][nr]`),
//! straight from im2col (see [`super::fast`]) or from a plain matrix. The micro-kernel computes
//! one `mr × nr` tile over the whole `k`; the epilogue applies the per-row [`PostOp`] while the
//! tile is in registers or L1. Rows of C are split across threads; packed A and B are shared.

use super::{for_each_chunk, MicroKernel, PostOp, Weights};

/// Largest `mr * nr` of any micro-kernel (the epilogue's stack tile).
pub const MAX_TILE: usize = 128;

/// The portable micro-kernel, 4 × 8: written so that the compiler keeps the tile in registers.
pub const GENERIC_MICRO: MicroKernel = MicroKernel {
    name: "generic 4x8",
    mr: 4,
    nr: 8,
    run: micro_4x8,
};

fn micro_4x8(k: usize, a: &[f32], b: &[f32], tile: &mut [f32], accumulate: bool) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut t = [[0.0f32; NR]; MR];
    if accumulate {
        for (i, row) in t.iter_mut().enumerate() {
            row.copy_from_slice(&tile[i * NR..(i + 1) * NR]);
        }
    }
    for (ap, bp) in a[..k * MR]
        .chunks_exact(MR)
        .zip(b[..k * NR].chunks_exact(NR))
    {
        for i in 0..MR {
            for j in 0..NR {
                t[i][j] += ap[i] * bp[j];
            }
        }
    }
    for (i, row) in t.iter().enumerate() {
        tile[i * NR..(i + 1) * NR].copy_from_slice(row);
    }
}

/// Floats needed to pack `m × k` of A with panel height `mr`.
pub fn packed_a_len(m: usize, k: usize, mr: usize) -> usize {
    m.div_ceil(mr) * mr * k
}

/// Floats needed to pack `k × n` of B with panel width `nr`.
pub fn packed_b_len(k: usize, n: usize, nr: usize) -> usize {
    n.div_ceil(nr) * nr * k
}

/// Packs rows `row0 .. row0 + m` of the weight matrix (row length `k`), dequantised.
/// Rows past `m` in the last panel are zero.
pub fn pack_a(w: Weights, row0: usize, m: usize, k: usize, mr: usize, dst: &mut [f32]) {
    let panels = m.div_ceil(mr);
    for p in 0..panels {
        let panel = &mut dst[p * mr * k..(p + 1) * mr * k];
        for i in 0..mr {
            let r = p * mr + i;
            if r >= m {
                for kk in 0..k {
                    panel[kk * mr + i] = 0.0;
                }
                continue;
            }
            let row = row0 + r;
            let src = row * k..(row + 1) * k;
            match w {
                Weights::I8 { q, scale } => {
                    let s = scale[row];
                    for (kk, &v) in q[src].iter().enumerate() {
                        panel[kk * mr + i] = v as f32 * s;
                    }
                }
                Weights::F32(wf) => {
                    for (kk, &v) in wf[src].iter().enumerate() {
                        panel[kk * mr + i] = v;
                    }
                }
            }
        }
    }
}

/// Packs a row-major `k × n` matrix (row stride `ld`) into `nr`-wide panels, zero-padded.
pub fn pack_b(src: &[f32], k: usize, n: usize, ld: usize, nr: usize, dst: &mut [f32]) {
    for (q, panel) in dst[..packed_b_len(k, n, nr)]
        .chunks_exact_mut(k * nr)
        .enumerate()
    {
        let c0 = q * nr;
        let w = nr.min(n - c0);
        for kk in 0..k {
            let d = &mut panel[kk * nr..(kk + 1) * nr];
            d[..w].copy_from_slice(&src[kk * ld + c0..kk * ld + c0 + w]);
            d[w..].fill(0.0);
        }
    }
}

/// `C = post(A · B)` on packed operands. `c` is `m × n` row-major; row `r` uses post-op
/// channel `post_row0 + r`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed(
    micro: &MicroKernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    post: &PostOp,
    post_row0: usize,
) {
    let (mr, nr) = (micro.mr, micro.nr);
    let panels = m.div_ceil(mr);
    // Rows per task: whole panels, about two tasks per thread for balance.
    let tasks = (super::threads() * 2).min(panels).max(1);
    let rows_per_task = panels.div_ceil(tasks) * mr;
    for_each_chunk(&mut c[..m * n], rows_per_task * n, |t, cchunk| {
        let mut tile = [0.0f32; MAX_TILE];
        let tile = &mut tile[..mr * nr];
        let first_row = t * rows_per_task;
        let rows_here = cchunk.len() / n;
        for pi in 0..rows_here.div_ceil(mr) {
            let r0 = pi * mr;
            let ap = &a[(first_row / mr + pi) * mr * k..][..mr * k];
            let m_eff = mr.min(rows_here - r0);
            for q in 0..n.div_ceil(nr) {
                let bp = &b[q * nr * k..][..nr * k];
                (micro.run)(k, ap, bp, tile, false);
                let c0 = q * nr;
                let n_eff = nr.min(n - c0);
                for i in 0..m_eff {
                    let ch = post_row0 + first_row + r0 + i;
                    let (mul, add) = (post.mul[ch], post.add[ch]);
                    let dst = &mut cchunk[(r0 + i) * n + c0..][..n_eff];
                    for (d, &v) in dst.iter_mut().zip(&tile[i * nr..i * nr + n_eff]) {
                        *d = (v * mul + add).max(post.lo).min(post.hi);
                    }
                }
            }
        }
    });
}
