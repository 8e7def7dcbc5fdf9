//! Sparse × dense products for training under a mask (SupSup's mask phase): with a
//! supermask of density 5 %, a layer's masked weights are 95 % zeros, and the forward product
//! and the input gradient need only the nonzeros. The weights come as compressed rows
//! ([`SparseRows`]); the dense operand and the result are row-major.
//!
//! `c[r][j] = Σ a[r][k] · b[k][j]` runs over blocks of [`BLOCK`] columns: for one block, every
//! row keeps its sums in registers while it walks its nonzeros, each nonzero a broadcast and
//! `BLOCK / 8` vector multiply-adds of one row of `b`'s block (which stays in cache across the
//! rows). Each output is summed in the row's index order from +0 with a multiply and an add
//! (no fused multiply-add), so every ISA's instance gives the same bits, whatever the block.

use super::Store;

/// Columns summed together per row; 8 vectors of 8 lanes (AVX2), 16 of 4 (NEON). A row's
/// last 80 to 127 columns go in one block of 80 or 96.
pub const BLOCK: usize = 64;

/// Rows of a sparse matrix in compressed form: row `r`'s nonzeros are `idx[start[r]..start[r
/// + 1]]` with values `val[..]` at the same positions, summed in that order. An index is a
/// row of `b`: a column of the sparse matrix, or with `ldb = 1` any offset into `b` (the
/// direct sparse convolution of training reads its taps so). `start` has one entry more than
/// there are rows; its values index `idx` and `val` directly, so a run of rows is the
/// sub-slice `start[r0..=r1]`.
#[derive(Clone, Copy, Debug)]
pub struct SparseRows<'a> {
    pub start: &'a [u32],
    pub idx: &'a [u32],
    pub val: &'a [f32],
}

impl SparseRows<'_> {
    pub fn rows(&self) -> usize {
        self.start.len().saturating_sub(1)
    }
}

/// `c[r·ldc + j] ← Σ_k a[r][k] · b[k·ldb + j]` for every row `r` of `a` and `j < n`, stored by
/// `store`. Panics if an index or a row of `c` lies outside its slice.
#[inline(always)]
pub fn spmm_inline(a: SparseRows, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize, store: Store) {
    let mut j0 = 0;
    while j0 + BLOCK <= n {
        // The last 80 to 127 columns go in one block of 80 or 96 rather than 64 and a narrow
        // rest: a block walks all the nonzeros, and on a 16-column block each waits on the
        // latency of an add. An 8 × 8 conv's 80 columns as 64 + 16: its input gradient 1.30
        // ms per batch of 64 (GEMResNet18, AVX-512); as one block of 80, 1.11 ms.
        j0 += match n - j0 {
            96..128 => {
                rows_block::<96>(a, b, ldb, j0, c, ldc, store);
                96
            }
            80..96 => {
                rows_block::<80>(a, b, ldb, j0, c, ldc, store);
                80
            }
            _ => {
                rows_block::<BLOCK>(a, b, ldb, j0, c, ldc, store);
                BLOCK
            }
        };
    }
    // The rest in as few blocks as fit: each nonzero's multiply-adds into a block's sums wait
    // for the previous nonzero's, so a block of one vector does a vector per add's latency,
    // and three such blocks (a 4 × 4 conv output, 22 columns padded to 24) took three times as
    // long as one block of 32 would.
    if j0 + 32 <= n {
        rows_block::<32>(a, b, ldb, j0, c, ldc, store);
        j0 += 32;
    }
    if j0 + 16 <= n {
        rows_block::<16>(a, b, ldb, j0, c, ldc, store);
        j0 += 16;
    }
    while j0 + 8 <= n {
        rows_block::<8>(a, b, ldb, j0, c, ldc, store);
        j0 += 8;
    }
    while j0 < n {
        rows_block::<1>(a, b, ldb, j0, c, ldc, store);
        j0 += 1;
    }
}

/// Columns `j0..j0 + W` of every row.
#[inline(always)]
fn rows_block<const W: usize>(
    a: SparseRows,
    b: &[f32],
    ldb: usize,
    j0: usize,
    c: &mut [f32],
    ldc: usize,
    store: Store,
) {
    for r in 0..a.rows() {
        let (s, e) = (a.start[r] as usize, a.start[r + 1] as usize);
        let mut acc = [0.0f32; W];
        for (&k, &v) in a.idx[s..e].iter().zip(&a.val[s..e]) {
            let row: &[f32; W] = b[k as usize * ldb + j0..][..W].try_into().expect("a block of W floats");
            for l in 0..W {
                acc[l] += v * row[l];
            }
        }
        let out = &mut c[r * ldc + j0..][..W];
        for (d, &v) in out.iter_mut().zip(&acc) {
            store.put(d, v);
        }
    }
}

/// [`spmm_inline`] with the baseline's features (the portable table's slot).
pub fn spmm(a: SparseRows, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize, store: Store) {
    spmm_inline(a, b, ldb, n, c, ldc, store)
}

/// The reference: one output at a time, the same order of sums.
pub fn spmm_reference(a: SparseRows, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize, store: Store) {
    for r in 0..a.rows() {
        let (s, e) = (a.start[r] as usize, a.start[r + 1] as usize);
        for j in 0..n {
            let mut acc = 0.0f32;
            for p in s..e {
                acc += a.val[p] * b[a.idx[p] as usize * ldb + j];
            }
            store.put(&mut c[r * ldc + j], acc);
        }
    }
}
