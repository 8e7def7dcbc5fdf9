//! (std) General `C = A · B` over strided views, for training: the backward passes need
//! products with transposed operands (`dW = dY · Xᵀ`, `dX = Wᵀ · dY`). Operands are copied into
//! the layouts the packed GEMM reads (A as rows, B as `nr`-wide panels; a copy costs O(mk + kn)
//! against the product's O(mnk)), then [`super::gemm::gemm_packed`] runs with the table's
//! micro-kernel. Every element of C is one micro-kernel sum over the whole `k`, in the same
//! order whatever the thread count, so results do not depend on threading. Packing buffers
//! are kept per thread and reused: allocating them per call made the kernel zero fresh pages
//! for a quarter of a training step (measured with perf on fc1024).

use super::gemm::MAX_TILE;
use super::gemm::{a_scratch_len, gemm_packed, packed_b_len};
use super::{Kernels, PostOp, TileEpilogue, Weights};
use core::ops::Range;
use std::cell::RefCell;
use std::vec::Vec;

#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    a_panels: Vec<f32>,
    tmp: Vec<f32>,
    ones: Vec<f32>,
    zeros: Vec<f32>,
}

std::thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `v` resized to `n` (contents unspecified past what the caller writes).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major `rows × cols` matrix (so this view is `cols × rows`).
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows: cols, cols: rows, rs: 1, cs: cols }
    }
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
    fn is_row_major(&self) -> bool {
        self.cs == 1 && self.rs == self.cols
    }
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major `a.rows × b.cols`.
pub fn matmul(kern: &Kernels, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let c = &mut c[..m * n];
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // Taken out for the call rather than borrowed: the parallel copies below wait on the pool,
    // and a pool thread that waits may run another task that calls this (it then works in a
    // fresh scratch of its own).
    let mut scratch = SCRATCH.take();
    {
        let sc = &mut scratch;
        // The copies below are split over the kernel threads when large (`for_each_chunk`):
        // packing a 1024 × 1024 B on one thread was a tenth of a 2-thread fc1024 step.
        let a_rows: &[f32] = if a.is_row_major() {
            &a.data[..m * k]
        } else {
            let dst = sized(&mut sc.a, m * k);
            // Eight rows at a time: for a transposed A (`rs == 1`) each column step reads
            // eight neighbours (row by row it read one float per cache line, 3 % of an fc1024
            // SupSup step).
            super::for_each_chunk(dst, 8 * k, m * k, |blk, rows| {
                let i0 = blk * 8;
                let nr = rows.len() / k;
                for j in 0..k {
                    for r in 0..nr {
                        rows[r * k + j] = a.at(i0 + r, j);
                    }
                }
            });
            &sc.a[..m * k]
        };
        let nr = kern.micro.nr;
        let bp = sized(&mut sc.b, packed_b_len(k, n, nr));
        super::for_each_chunk(bp, k * nr, k * n, |q, panel| {
            let c0 = q * nr;
            let w = nr.min(n - c0);
            if b.cs == 1 {
                for kk in 0..k {
                    let d = &mut panel[kk * nr..(kk + 1) * nr];
                    let at = kk * b.rs + c0;
                    d[..w].copy_from_slice(&b.data[at..at + w]);
                    d[w..].fill(0.0);
                }
            } else if b.rs == 1 {
                // B is a transposed row-major matrix: its columns are contiguous. Read them
                // straight, write each into its lane of the panel.
                if w < nr {
                    panel.fill(0.0);
                }
                for j in 0..w {
                    let src = &b.data[(c0 + j) * b.cs..][..k];
                    for (kk, &v) in src.iter().enumerate() {
                        panel[kk * nr + j] = v;
                    }
                }
            } else {
                for kk in 0..k {
                    let d = &mut panel[kk * nr..(kk + 1) * nr];
                    for (j, v) in d[..w].iter_mut().enumerate() {
                        *v = b.at(kk, c0 + j);
                    }
                    d[w..].fill(0.0);
                }
            }
        });
        if sc.ones.len() < m {
            sc.ones.resize(m, 1.0);
            sc.zeros.resize(m, 0.0);
        }
        let post = PostOp { mul: &sc.ones[..m], add: &sc.zeros[..m], lo: f32::NEG_INFINITY, hi: f32::INFINITY };
        let ap = sized(&mut sc.a_panels, a_scratch_len(k, kern.micro.mr));
        let bp = &sc.b[..packed_b_len(k, n, nr)];
        if accumulate {
            let tmp = sized(&mut sc.tmp, m * n);
            gemm_packed(kern, m, n, k, Weights::F32(a_rows), 0, bp, tmp, &post, ap);
            let tmp = &*tmp;
            super::for_each_chunk(c, n, m * n, |i, row| {
                for (d, s) in row.iter_mut().zip(&tmp[i * n..]) {
                    *d += s;
                }
            });
        } else {
            gemm_packed(kern, m, n, k, Weights::F32(a_rows), 0, bp, c, &post, ap);
        }
    }
    SCRATCH.set(scratch);
}

/// Where the columns of a product go (or where a packed operand's columns come from): column
/// `j = b * per + p` of row `i` is element `b * bs + i * rs + p`. A batch of `[c][plane]`
/// tensors read as one `c × (batch · plane)` matrix is `{ per: plane, bs: c_total · plane,
/// rs: plane }`; a plain row-major matrix with row stride `ld` is `{ per: n, bs: 0, rs: ld }`.
#[derive(Clone, Copy, Debug)]
pub struct Cols {
    pub per: usize,
    pub bs: usize,
    pub rs: usize,
}

impl Cols {
    /// A row-major matrix of `n` columns with row stride `ld`.
    pub fn plain(n: usize, ld: usize) -> Self {
        Cols { per: n.max(1), bs: 0, rs: ld }
    }
    /// Where element `(i, j)` lies (the tests' reading; the kernels go by [`Cols::runs`]).
    #[cfg(test)]
    fn at(&self, i: usize, j: usize) -> usize {
        let (b, p) = (j / self.per, j % self.per);
        b * self.bs + i * self.rs + p
    }

    /// Columns `c0 .. c0 + n` of row `i` as contiguous runs, each `(offset from c0, index of
    /// its first element, length)`: one division per run, not per element (per element, the
    /// tiles that straddle samples of a 6 × 6 or 3 × 3 plane cost more than their product).
    #[inline(always)]
    fn runs(&self, i: usize, c0: usize, n: usize) -> impl Iterator<Item = (usize, usize, usize)> + use<> {
        let (per, bs, rs) = (self.per, self.bs, self.rs);
        let (mut b, mut p, mut jj) = (c0 / per, c0 % per, 0);
        core::iter::from_fn(move || {
            (jj < n).then(|| {
                let len = (per - p).min(n - jj);
                let run = (jj, b * bs + i * rs + p, len);
                (jj, b, p) = (jj + len, b + 1, 0);
                run
            })
        })
    }
}

/// `dst.copy_from_slice(src)` for the short runs of packing and im2col (a few to a few dozen
/// floats): `copy_from_slice` calls `memmove`, whose per-call cost was 7 % of a GEMResNet
/// training step; eight floats at a time move as one array.
#[inline(always)]
pub fn copy_short(dst: &mut [f32], src: &[f32]) {
    let src = &src[..dst.len()];
    let (dc, dt) = dst.as_chunks_mut::<8>();
    let (sc, st) = src.as_chunks::<8>();
    for (d, s) in dc.iter_mut().zip(sc) {
        *d = *s;
    }
    for (d, s) in dt.iter_mut().zip(st) {
        *d = *s;
    }
}

/// Zeroes a short run without a call to `memset` (see [`copy_short`]).
#[inline(always)]
pub fn zero_short(d: &mut [f32]) {
    let (c, t) = d.as_chunks_mut::<8>();
    for v in c {
        *v = [0.0; 8];
    }
    for v in t {
        *v = 0.0;
    }
}

/// Packs all of `k × n` of B at once with [`pack_b_panels`]: the tests' packing for
/// [`gemm_cols`] (the products pack block by block, through [`gemm_cols_unpacked`]).
#[cfg(test)]
fn pack_b_cols(src: &[f32], k: usize, n: usize, cols: Cols, nr: usize, dst: &mut [f32]) {
    pack_b_panels(src, k, n, cols, nr, 0..n.div_ceil(nr), dst);
}

/// Packs panels `panels` of `k × n` of B, element `(r, j)` in row `r`, column `j` of `cols`,
/// into `nr`-wide panels (`[panel][k][nr]`, zero-padded; the layout [`gemm_cols`] reads), the
/// first at `dst[0]`. Rows of a panel that lie in one sample are copied as one slice.
fn pack_b_panels(src: &[f32], k: usize, n: usize, cols: Cols, nr: usize, panels: Range<usize>, dst: &mut [f32]) {
    for (q, panel) in panels.clone().zip(dst[..panels.len() * k * nr].chunks_exact_mut(k * nr)) {
        let c0 = q * nr;
        let w = nr.min(n - c0);
        let (b, p0) = (c0 / cols.per, c0 % cols.per);
        if p0 + w <= cols.per {
            // One sample: every row of the panel is one contiguous run.
            let base = b * cols.bs + p0;
            for (r, d) in panel.chunks_exact_mut(nr).enumerate() {
                copy_short(&mut d[..w], &src[base + r * cols.rs..][..w]);
                d[w..].fill(0.0);
            }
        } else {
            for (r, d) in panel.chunks_exact_mut(nr).enumerate() {
                for (jj, at, len) in cols.runs(r, c0, w) {
                    copy_short(&mut d[jj..jj + len], &src[at..at + len]);
                }
                d[w..].fill(0.0);
            }
        }
    }
}

/// Packs the transpose of a `n × k` matrix `M` (element `(c, j)` at `src[cols.at(c, j)]`)
/// as B (`k × n`, `B[j][c] = M[c][j]`) into `nr`-wide panels: each panel gathers `nr` rows
/// of `M`, read along their (contiguous) runs and written into their lanes.
pub fn pack_bt_cols(src: &[f32], n: usize, k: usize, cols: Cols, nr: usize, dst: &mut [f32]) {
    for (q, panel) in dst[..packed_b_len(k, n, nr)].chunks_exact_mut(k * nr).enumerate() {
        let c0 = q * nr;
        let w = nr.min(n - c0);
        if w < nr {
            panel.fill(0.0);
        }
        for lane in 0..w {
            for (j, at, run) in cols.runs(c0 + lane, 0, k) {
                for (t, &v) in src[at..at + run].iter().enumerate() {
                    panel[(j + t) * nr + lane] = v;
                }
            }
        }
    }
}

/// `C = A · B (+ bias per row)` on the calling thread, for drivers that split work
/// themselves (training convs split the batch). `a` holds `m` rows of `k` at stride `lda`;
/// `bp` is B packed in [`pack_b_panels`]' layout (e.g. by [`pack_bt_cols`]); element `(i, j)` of C is written
/// to (or, with `accumulate`, added to) `out[cols.at(i, j)]`. Every element is one
/// micro-kernel sum over the whole `k`, so results do not depend on how callers split `n`.
/// Tiles are visited in blocks of a few B panels, each block against every row panel, so the
/// block stays in L1/L2 while A streams.
#[allow(clippy::too_many_arguments)]
pub fn gemm_cols(
    kern: &Kernels,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    bp: &[f32],
    out: &mut [f32],
    cols: Cols,
    bias: Option<&[f32]>,
    accumulate: bool,
) {
    assert!(bp.len() >= packed_b_len(k, n, kern.micro.nr));
    gemm_cols_from(kern, m, n, k, a, lda, B::Packed(bp), out, cols, bias, None, accumulate)
}

/// [`gemm_cols`] with B as it lies (`k × n`, element `(r, j)` at `b[bcols.at(r, j)]`), packed
/// block by block just before the block is used, into a buffer of `4 · nr · k` floats that
/// stays in cache: packing all of B first wrote and read back a copy of a layer's whole input
/// through memory (4–10 % of a Lite0 CLR step in profiles). `clamp` bounds each stored
/// element (after the bias) in the micro-kernel's epilogue: a ReLU or ReLU6 fused into the
/// product, with no pass of its own.
#[allow(clippy::too_many_arguments)]
pub fn gemm_cols_unpacked(
    kern: &Kernels,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    bcols: Cols,
    out: &mut [f32],
    cols: Cols,
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    accumulate: bool,
) {
    gemm_cols_from(kern, m, n, k, a, lda, B::Cols(b, bcols), out, cols, bias, clamp, accumulate)
}

/// Where [`gemm_cols_from`] finds B.
#[derive(Clone, Copy)]
enum B<'a> {
    Packed(&'a [f32]),
    Cols(&'a [f32], Cols),
}

#[allow(clippy::too_many_arguments)]
fn gemm_cols_from(
    kern: &Kernels,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: B,
    out: &mut [f32],
    cols: Cols,
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (mr, nr) = (kern.micro.mr, kern.micro.nr);
    assert!(k > 0 && lda >= k && a.len() >= (m - 1) * lda + k);
    assert!(!(accumulate && clamp.is_some()), "a clamp applies to a stored product, not to an added one");
    const BLOCK: usize = 4;
    let mut tile = [0.0f32; MAX_TILE];
    let tile = &mut tile[..mr * nr];
    let mut ep = TileEpilogue::IDENTITY;
    if let Some((lo, hi)) = clamp {
        (ep.lo, ep.hi) = (lo, hi);
    }
    let panels = n.div_ceil(nr);
    GEMM_PAD.with(|cell| {
        let mut pad = cell.borrow_mut();
        let (pad, block) = &mut *pad;
        // A partial last row panel is copied and zero-padded once: the micro-kernel reads `mr`
        // rows.
        let tail = m % mr;
        if tail > 0 {
            let p = sized(pad, mr * k);
            p.fill(0.0);
            for i in 0..tail {
                p[i * k..(i + 1) * k].copy_from_slice(&a[(m - tail + i) * lda..][..k]);
            }
        }
        let pad = &pad[..];
        for q0 in (0..panels).step_by(BLOCK) {
            let q1 = (q0 + BLOCK).min(panels);
            // The block's panels, the first at `bb[0]`.
            let bb = match b {
                B::Packed(bp) => &bp[q0 * k * nr..q1 * k * nr],
                B::Cols(src, bcols) => {
                    let dst = sized(block, (q1 - q0) * k * nr);
                    pack_b_panels(src, k, n, bcols, nr, q0..q1, dst);
                    &dst[..]
                }
            };
            for r0 in (0..m).step_by(mr) {
                let m_eff = mr.min(m - r0);
                let (ap, ald) = if m_eff == mr { (&a[r0 * lda..], lda) } else { (pad, k) };
                if let Some(bias) = bias {
                    ep.add[..m_eff].copy_from_slice(&bias[r0..r0 + m_eff]);
                }
                for q in q0..q1 {
                    let bq = &bb[(q - q0) * k * nr..][..k * nr];
                    let c0 = q * nr;
                    let n_eff = nr.min(n - c0);
                    let (b, p0) = (c0 / cols.per, c0 % cols.per);
                    if !accumulate && m_eff == mr && n_eff == nr && p0 + nr <= cols.per {
                        let at = b * cols.bs + r0 * cols.rs + p0;
                        (kern.micro.run)(k, ap, ald, bq, &ep, &mut out[at..], cols.rs);
                        continue;
                    }
                    (kern.micro.run)(k, ap, ald, bq, &ep, tile, nr);
                    for i in 0..m_eff {
                        let row = &tile[i * nr..i * nr + n_eff];
                        for (jj, at, len) in cols.runs(r0 + i, c0, n_eff) {
                            let (d, row) = (&mut out[at..at + len], &row[jj..jj + len]);
                            if accumulate {
                                for (d, &v) in d.iter_mut().zip(row) {
                                    *d += v;
                                }
                            } else {
                                copy_short(d, row);
                            }
                        }
                    }
                }
            }
        }
    })
}

std::thread_local! {
    /// [`gemm_cols`]' copy of a partial row panel of A, and the block of B that
    /// [`gemm_cols_unpacked`] packs.
    static GEMM_PAD: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::MAX_MR;

    use std::vec;

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols).map(|p| a.at(i, p) * b.at(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn every_transpose_combination_matches_the_naive_product() {
        let mut r = crate::rng::SplitMix64::new(5);
        for kern in Kernels::available() {
            for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (40, 3, 65)] {
                let x: Vec<f32> = (0..m * k).map(|_| r.uniform(-1.0, 1.0)).collect();
                let y: Vec<f32> = (0..k * n).map(|_| r.uniform(-1.0, 1.0)).collect();
                let xt: Vec<f32> = (0..k).flat_map(|j| (0..m).map(|i| x[i * k + j]).collect::<Vec<_>>()).collect();
                let yt: Vec<f32> = (0..n).flat_map(|j| (0..k).map(|i| y[i * n + j]).collect::<Vec<_>>()).collect();
                let want = naive(Mat::rows(&x, m, k), Mat::rows(&y, k, n));
                for (a, b) in [
                    (Mat::rows(&x, m, k), Mat::rows(&y, k, n)),
                    (Mat::t(&xt, k, m), Mat::rows(&y, k, n)),
                    (Mat::rows(&x, m, k), Mat::t(&yt, n, k)),
                    (Mat::t(&xt, k, m), Mat::t(&yt, n, k)),
                ] {
                    let mut c = vec![1.0; m * n];
                    matmul(&kern, a, b, &mut c, true);
                    for (got, w) in c.iter().zip(&want) {
                        assert!((got - 1.0 - w).abs() < 1e-4 * (1.0 + w.abs()), "{got} vs {w}");
                    }
                    matmul(&kern, a, b, &mut c, false);
                    for (got, w) in c.iter().zip(&want) {
                        assert!((got - w).abs() < 1e-4 * (1.0 + w.abs()), "{got} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_cols_matches_the_naive_product_in_every_layout() {
        let mut r = crate::rng::SplitMix64::new(6);
        for kern in Kernels::available() {
            let nr = kern.micro.nr;
            // (m, k, per, samples): columns of C and of B are `samples` runs of `per`; the
            // last has more panels than one block of gemm_cols.
            for &(m, k, per, samples) in
                &[(1, 1, 1, 1), (7, 5, 9, 3), (13, 20, 16, 2), (6, 3, 40, 1), (19, 33, 5, 7), (8, 6, 50, 4)]
            {
                let n = per * samples;
                let a: Vec<f32> = (0..m * (k + 2)).map(|_| r.uniform(-1.0, 1.0)).collect();
                let lda = k + 2;
                // B as `[samples][k + 1][per]` (one spare row per sample), its transpose as
                // `[samples][k][per]` read by pack_bt_cols.
                let bsrc: Vec<f32> = (0..samples * (k + 1) * per).map(|_| r.uniform(-1.0, 1.0)).collect();
                let bcols = Cols { per, bs: (k + 1) * per, rs: per };
                let bval = |i: usize, j: usize| bsrc[bcols.at(i, j)];
                let want: Vec<f32> =
                    (0..m * n).map(|e| (0..k).map(|p| a[(e / n) * lda + p] * bval(p, e % n)).sum::<f32>()).collect();
                let mut bp = vec![f32::NAN; packed_b_len(k, n, nr)];
                pack_b_cols(&bsrc, k, n, bcols, nr, &mut bp);
                // Output `[samples][m + 1][per]`.
                let ocols = Cols { per, bs: (m + 1) * per, rs: per };
                let bias: Vec<f32> = (0..m).map(|i| i as f32).collect();
                let mut out = vec![0.5f32; samples * (m + 1) * per];
                gemm_cols(&kern, m, n, k, &a, lda, &bp, &mut out, ocols, Some(&bias), false);
                for (e, &w) in want.iter().enumerate() {
                    let (i, j) = (e / n, e % n);
                    let got = out[ocols.at(i, j)];
                    assert!((got - w - i as f32).abs() < 1e-4 * (1.0 + w.abs()), "{got} vs {w}");
                }
                gemm_cols(&kern, m, n, k, &a, lda, &bp, &mut out, ocols, None, true);
                for (e, &w) in want.iter().enumerate() {
                    let (i, j) = (e / n, e % n);
                    let got = out[ocols.at(i, j)];
                    assert!((got - 2.0 * w - i as f32).abs() < 1e-4 * (1.0 + w.abs()));
                }
                // Packed block by block as it goes: the same bits, set and added.
                let mut out2 = vec![0.5f32; out.len()];
                gemm_cols_unpacked(&kern, m, n, k, &a, lda, &bsrc, bcols, &mut out2, ocols, Some(&bias), None, false);
                gemm_cols_unpacked(&kern, m, n, k, &a, lda, &bsrc, bcols, &mut out2, ocols, None, None, true);
                assert!(out.iter().zip(&out2).all(|(u, v)| u.to_bits() == v.to_bits()), "{m}x{k}x{n} unpacked");
                // Transposed packing: C' = A' · Mᵀ with M the same `k × n` matrix.
                let mut bt = vec![f32::NAN; packed_b_len(n, k, nr)];
                pack_bt_cols(&bsrc, k, n, bcols, nr, &mut bt);
                let a2: Vec<f32> = (0..m * n).map(|_| r.uniform(-1.0, 1.0)).collect();
                let mut c2 = vec![0.0; m * k];
                gemm_cols(&kern, m, k, n, &a2, n, &bt, &mut c2, Cols::plain(k, k), None, false);
                for i in 0..m {
                    for c in 0..k {
                        let w: f32 = (0..n).map(|j| a2[i * n + j] * bval(c, j)).sum();
                        assert!((c2[i * k + c] - w).abs() < 1e-4 * (1.0 + w.abs()));
                    }
                }
            }
        }
    }

    #[test]
    fn a_narrow_micro_kernel_gives_the_first_lanes_of_its_full_one() {
        let mut r = crate::rng::SplitMix64::new(8);
        let mut tables = std::vec![Kernels::generic(true)];
        tables.extend(Kernels::available());
        let mut tested = 0;
        for kern in tables {
            let (full, Some(narrow)) = (kern.micro, kern.micro_narrow) else { continue };
            assert_eq!((narrow.mr, 2 * narrow.nr), (full.mr, full.nr), "{}", narrow.name);
            let (mr, nr) = (full.mr, full.nr);
            for k in [1, 7, 64, 131] {
                let lda = k + 3;
                let a: Vec<f32> = (0..mr * lda).map(|_| r.uniform(-1.0, 1.0)).collect();
                let bn: Vec<f32> = (0..k * narrow.nr).map(|_| r.uniform(-1.0, 1.0)).collect();
                // The same columns in the full kernel's panel, the other lanes zero.
                let mut bf = vec![0.0f32; k * nr];
                for p in 0..k {
                    bf[p * nr..p * nr + narrow.nr].copy_from_slice(&bn[p * narrow.nr..(p + 1) * narrow.nr]);
                }
                let mut ep = TileEpilogue { mul: [1.0; MAX_MR], add: [0.0; MAX_MR], lo: -0.5, hi: 2.0 };
                for i in 0..mr {
                    (ep.mul[i], ep.add[i]) = (1.0 + i as f32 / 8.0, i as f32 / 16.0);
                }
                let (mut cf, mut cn) = (vec![f32::NAN; mr * nr], vec![f32::NAN; mr * (narrow.nr + 1)]);
                (full.run)(k, &a, lda, &bf, &ep, &mut cf, nr);
                (narrow.run)(k, &a, lda, &bn, &ep, &mut cn, narrow.nr + 1);
                for i in 0..mr {
                    assert_eq!(
                        &cn[i * (narrow.nr + 1)..][..narrow.nr],
                        &cf[i * nr..][..narrow.nr],
                        "{} k {k}",
                        narrow.name
                    );
                }
            }
            tested += 1;
        }
        assert!(tested >= 1, "the generic table has a narrow kernel");
    }

    /// Each short kernel gives, bit for bit, the first rows of the table's kernel of its
    /// width on the same A rows and B panel.
    #[test]
    fn a_short_micro_kernel_gives_the_first_rows_of_its_full_one() {
        let mut r = crate::rng::SplitMix64::new(9);
        for kern in Kernels::available() {
            for nr in kern.micro_short.iter().map(|s| s.nr) {
                let rows: Vec<usize> = kern.micro_short.iter().filter(|s| s.nr == nr).map(|s| s.mr).collect();
                assert!(rows.is_sorted_by(|a, b| a < b), "{}: fewest rows first", kern.micro.name);
            }
            for short in kern.micro_short {
                let full = [Some(kern.micro), kern.micro_narrow].into_iter().flatten().find(|m| m.nr == short.nr);
                let full = full.unwrap_or_else(|| panic!("{}: no kernel of its width", short.name));
                assert!(short.mr < full.mr, "{}", short.name);
                let (mr, nr) = (full.mr, full.nr);
                for k in [1, 7, 64, 131] {
                    let lda = k + 3;
                    let a: Vec<f32> = (0..mr * lda).map(|_| r.uniform(-1.0, 1.0)).collect();
                    let b: Vec<f32> = (0..k * nr).map(|_| r.uniform(-1.0, 1.0)).collect();
                    let mut ep = TileEpilogue { mul: [1.0; MAX_MR], add: [0.0; MAX_MR], lo: -0.5, hi: 2.0 };
                    for i in 0..mr {
                        (ep.mul[i], ep.add[i]) = (1.0 + i as f32 / 8.0, i as f32 / 16.0);
                    }
                    let (mut cf, mut cs) = (vec![f32::NAN; mr * nr], vec![f32::NAN; short.mr * (nr + 1)]);
                    (full.run)(k, &a, lda, &b, &ep, &mut cf, nr);
                    (short.run)(k, &a[..(short.mr - 1) * lda + k], lda, &b, &ep, &mut cs, nr + 1);
                    for i in 0..short.mr {
                        assert_eq!(&cs[i * (nr + 1)..][..nr], &cf[i * nr..][..nr], "{} k {k}", short.name);
                    }
                }
            }
        }
    }
}
