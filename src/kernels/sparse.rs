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

/// The columns a product computes: `count` runs of `width` columns each, run `i` reading `b`
/// from column `i·b_step` and writing `c` from column `i·c_step`. A conv's output rows are
/// such runs: the direct sparse conv reads its input rows `wq` apart (the padded row) and
/// writes its output rows `ow` apart, straight into the output, with no copy that drops the
/// `wq − ow` columns between them. [`Runs::one`] is the plain product's one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runs {
    pub width: usize,
    pub count: usize,
    pub b_step: usize,
    pub c_step: usize,
}

impl Runs {
    /// Columns `0 .. n`.
    pub const fn one(n: usize) -> Runs {
        Runs { width: n, count: 1, b_step: n, c_step: n }
    }
}

/// `c[r·ldc + i·c_step + j] ← Σ_k a[r][k] · b[k·ldb + i·b_step + j]` for every row `r` of `a`,
/// run `i` and column `j < width` of `runs`, stored by `store`. Panics if an index or a row of
/// `c` lies outside its slice.
#[inline(always)]
pub fn spmm_inline(a: SparseRows, b: &[f32], ldb: usize, runs: Runs, c: &mut [f32], ldc: usize, store: Store) {
    let Runs { width, count, b_step, c_step } = runs;
    // Runs of 16 or 32 columns go four or two together, 64 columns as a plain block has (its
    // sums in registers); other widths run one at a time, split into blocks as `plain` does.
    let mut i = 0;
    macro_rules! grouped {
        ($w:literal, $g:literal) => {
            while i + $g <= count {
                let bo: [usize; $g] = core::array::from_fn(|g| (i + g) * b_step);
                let co: [usize; $g] = core::array::from_fn(|g| (i + g) * c_step);
                runs_block::<$w, $g>(a, b, ldb, bo, c, ldc, co, store);
                i += $g;
            }
        };
    }
    if count > 1 {
        match width {
            16 => grouped!(16, 4),
            32 => grouped!(32, 2),
            _ => {}
        }
    }
    for i in i..count {
        plain(a, b, ldb, (i * b_step, i * c_step), width, c, ldc, store);
    }
}

/// Columns `0 .. n` of one run, starting at column `b0` of `b` and `c0` of `c`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn plain(
    a: SparseRows,
    b: &[f32],
    ldb: usize,
    (b0, c0): (usize, usize),
    n: usize,
    c: &mut [f32],
    ldc: usize,
    store: Store,
) {
    let mut j0 = 0;
    macro_rules! block {
        ($w:literal) => {{
            runs_block::<$w, 1>(a, b, ldb, [b0 + j0], c, ldc, [c0 + j0], store);
            j0 += $w;
        }};
    }
    while j0 + BLOCK <= n {
        // The last 80 to 127 columns go in one block of 80 or 96 rather than 64 and a narrow
        // rest: a block walks all the nonzeros, and on a 16-column block each waits on the
        // latency of an add. An 8 × 8 conv's 80 columns as 64 + 16: its input gradient 1.30
        // ms per batch of 64 (GEMResNet18, AVX-512); as one block of 80, 1.11 ms.
        match n - j0 {
            96..128 => block!(96),
            80..96 => block!(80),
            _ => block!(64),
        }
    }
    // The rest in as few blocks as fit: each nonzero's multiply-adds into a block's sums wait
    // for the previous nonzero's, so a block of one vector does a vector per add's latency,
    // and three such blocks (a 4 × 4 conv output, 22 columns padded to 24) took three times as
    // long as one block of 32 would.
    if j0 + 32 <= n {
        block!(32);
    }
    if j0 + 16 <= n {
        block!(16);
    }
    while j0 + 8 <= n {
        block!(8);
    }
    while j0 < n {
        block!(1);
    }
}

/// `G` runs of `W` columns of every row: run `g` from column `b0[g]` of `b` and `c0[g]` of
/// `c`, their sums in registers together while the row walks its nonzeros.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn runs_block<const W: usize, const G: usize>(
    a: SparseRows,
    b: &[f32],
    ldb: usize,
    b0: [usize; G],
    c: &mut [f32],
    ldc: usize,
    c0: [usize; G],
    store: Store,
) {
    for r in 0..a.rows() {
        let (s, e) = (a.start[r] as usize, a.start[r + 1] as usize);
        let mut acc = [[0.0f32; W]; G];
        for (&k, &v) in a.idx[s..e].iter().zip(&a.val[s..e]) {
            for (acc, &j0) in acc.iter_mut().zip(&b0) {
                let row: &[f32; W] = b[k as usize * ldb + j0..][..W].try_into().expect("a block of W floats");
                for l in 0..W {
                    acc[l] += v * row[l];
                }
            }
        }
        for (acc, &j0) in acc.iter().zip(&c0) {
            let out = &mut c[r * ldc + j0..][..W];
            for (d, &v) in out.iter_mut().zip(acc) {
                store.put(d, v);
            }
        }
    }
}

/// [`spmm_inline`] with the baseline's features (the portable table's slot).
pub fn spmm(a: SparseRows, b: &[f32], ldb: usize, runs: Runs, c: &mut [f32], ldc: usize, store: Store) {
    spmm_inline(a, b, ldb, runs, c, ldc, store)
}

/// The reference: one output at a time, the same order of sums.
pub fn spmm_reference(a: SparseRows, b: &[f32], ldb: usize, runs: Runs, c: &mut [f32], ldc: usize, store: Store) {
    for r in 0..a.rows() {
        let (s, e) = (a.start[r] as usize, a.start[r + 1] as usize);
        for i in 0..runs.count {
            for j in 0..runs.width {
                let mut acc = 0.0f32;
                for p in s..e {
                    acc += a.val[p] * b[a.idx[p] as usize * ldb + i * runs.b_step + j];
                }
                store.put(&mut c[r * ldc + i * runs.c_step + j], acc);
            }
        }
    }
}
