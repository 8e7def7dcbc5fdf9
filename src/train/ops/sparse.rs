//! A masked layer's weights as compressed rows, for the sparse products of the forward pass
//! and the input gradient ([`crate::kernels::sparse`]). SupSup's mask phase builds one per
//! layer each step, after the top-k, from the mask's set bits (`O(n/32 + nnz)`); a dense
//! layer's products then cost `density ×` the GEMM's multiply-adds. The weight gradient
//! stays dense: the scores of unselected weights need theirs.

use crate::kernels::sparse::{Runs, SparseRows};
use crate::kernels::{Kernels, Store};
use bitvec::prelude::{BitSlice, Lsb0};

/// Above this density a linear layer keeps the packed GEMM. The sparse product runs at a
/// lower rate per multiply-add (one load per vector, no register reuse of `b` across rows);
/// measured on fc1024's SupSup step (`benches/train_step.rs` with the cut-off forced either
/// way, 1 and 2 threads), the two cost the same at density 0.10–0.15.
pub const LINEAR_MAX_DENSITY: f64 = 0.125;

/// Above this density a convolution keeps im2col and the GEMM. The direct sparse conv also
/// skips im2col, so it stays ahead longer: on GEMResNet18's step the two cross between 0.4
/// and 0.6 (0.58 s against 0.69 s at 0.4, 0.78 s against 0.56 s at 0.6, one thread).
pub const CONV_MAX_DENSITY: f64 = 0.4;

#[derive(Clone, Debug, Default)]
struct Csr {
    start: Vec<u32>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl Csr {
    fn view(&self) -> SparseRows<'_> {
        SparseRows { start: &self.start, idx: &self.idx, val: &self.val }
    }
}

/// `W` (`rows × cols`, row-major) and `Wᵀ`, each as compressed rows.
#[derive(Clone, Debug, Default)]
pub struct SparseW {
    rows: usize,
    cols: usize,
    w: Csr,
    wt: Csr,
    /// The transpose's fill positions (kept for [`SparseW::refill`]).
    next: Vec<u32>,
}

impl SparseW {
    /// The weights `w` where `mask` is set (the others must be zero in `w`: it is `base ⊙
    /// mask`). `None` when the mask is denser than `max_density` ([`LINEAR_MAX_DENSITY`],
    /// [`CONV_MAX_DENSITY`]), or the sizes disagree or do not fit the 32-bit indices.
    pub fn from_mask(
        w: &[f32],
        mask: &BitSlice<u32, Lsb0>,
        rows: usize,
        cols: usize,
        max_density: f64,
    ) -> Option<SparseW> {
        let mut sp = SparseW::default();
        sp.refill(w, mask, rows, cols, max_density).then_some(sp)
    }

    /// [`SparseW::from_mask`] into this one's buffers (a step rebuilds every layer's form:
    /// reusing them saves the allocations). `false`, leaving `self` unusable, where
    /// `from_mask` gives `None`.
    pub fn refill(
        &mut self,
        w: &[f32],
        mask: &BitSlice<u32, Lsb0>,
        rows: usize,
        cols: usize,
        max_density: f64,
    ) -> bool {
        let Some(n) = rows.checked_mul(cols) else { return false };
        if n != w.len() || mask.len() < n || n > u32::MAX as usize || rows == 0 || cols == 0 {
            return false;
        }
        let nnz = mask[..n].count_ones();
        if nnz as f64 > max_density * n as f64 {
            return false;
        }
        (self.rows, self.cols) = (rows, cols);
        let (f, t) = (&mut self.w, &mut self.wt);
        f.start.clear();
        f.idx.clear();
        f.val.clear();
        t.start.clear();
        t.start.resize(cols + 1, 0);
        f.start.push(0);
        // The set bits a word at a time (bit i of the weights is bit i % 32 of word i / 32),
        // rows closed as the index passes their end.
        let mut row_end = cols;
        let mut add = |i: usize, f: &mut Csr, counts: &mut [u32]| {
            while i >= row_end {
                f.start.push(f.idx.len() as u32);
                row_end += cols;
            }
            let c = i + cols - row_end;
            f.idx.push(c as u32);
            f.val.push(w[i]);
            counts[c + 1] += 1;
        };
        match mask[..n].domain() {
            bitvec::domain::Domain::Region { head: None, body, tail } => {
                // The tail's dead bits load as 0.
                let words = body.iter().copied().chain(tail.map(|t| t.load_value()));
                for (wi, word) in words.enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        add(wi * 32 + bits.trailing_zeros() as usize, f, &mut t.start);
                        bits &= bits - 1;
                    }
                }
            }
            _ => {
                for i in mask[..n].iter_ones() {
                    add(i, f, &mut t.start);
                }
            }
        }
        while f.start.len() <= rows {
            f.start.push(f.idx.len() as u32);
        }
        // Wᵀ by a counting sort on the column: rows stay ascending within each column.
        for c in 0..cols {
            t.start[c + 1] += t.start[c];
        }
        t.idx.resize(nnz, 0);
        t.val.resize(nnz, 0.0);
        let mut next = std::mem::take(&mut self.next);
        next.clear();
        next.extend_from_slice(&t.start[..cols]);
        for r in 0..rows {
            for p in f.start[r] as usize..f.start[r + 1] as usize {
                let c = f.idx[p] as usize;
                let at = next[c] as usize;
                t.idx[at] = r as u32;
                t.val[at] = f.val[p];
                next[c] += 1;
            }
        }
        self.next = next;
        true
    }

    /// `(rows, cols)` of `W`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn nnz(&self) -> usize {
        self.w.idx.len()
    }

    /// `W`'s rows.
    pub fn w(&self) -> SparseRows<'_> {
        self.w.view()
    }

    /// `Wᵀ`'s rows.
    pub fn wt(&self) -> SparseRows<'_> {
        self.wt.view()
    }

    /// Whether this is `dense` exactly (same bits where set, +0 elsewhere): the debug check
    /// that a step's weights and their sparse form agree.
    pub fn matches(&self, dense: &[f32]) -> bool {
        if dense.len() != self.rows * self.cols {
            return false;
        }
        let mut expect = vec![0.0f32; dense.len()];
        for r in 0..self.rows {
            for p in self.w.start[r] as usize..self.w.start[r + 1] as usize {
                expect[r * self.cols + self.w.idx[p] as usize] = self.w.val[p];
            }
        }
        expect.iter().zip(dense).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// `c ← a · b` (by `store`) with `a` sparse (`rows × k`), `b` dense `k × n` (row-major, rows
/// `ldb` apart) and `c` dense `rows × n` (rows `n` apart): rows split over the kernel threads
/// when the work is worth it. Each output is one row's sum, so any split gives the same bits.
pub fn spmm(k: &Kernels, a: SparseRows, b: &[f32], ldb: usize, n: usize, c: &mut [f32], store: Store) {
    let rows = a.rows();
    let work = a.idx.len() * n;
    let threads = crate::kernels::threads();
    if threads > 1 && work >= crate::kernels::PAR_MIN_WORK && rows > 1 {
        use rayon::prelude::*;
        // A few pieces per thread, for balance (row lengths vary).
        let per = rows.div_ceil(threads * 4).max(1);
        c[..rows * n].par_chunks_mut(per * n).enumerate().for_each(|(i, cp)| {
            let r0 = i * per;
            let r1 = (r0 + per).min(rows);
            let part = SparseRows { start: &a.start[r0..=r1], idx: a.idx, val: a.val };
            (k.spmm)(part, b, ldb, Runs::one(n), cp, n, store)
        });
    } else {
        (k.spmm)(a, b, ldb, Runs::one(n), &mut c[..rows * n], n, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sparse::spmm_reference;
    use crate::kernels::{ConvShape, Weights};
    use crate::rng::SplitMix64;
    use crate::train::ops::tests::{masked, rand};
    use crate::train::ops::{conv, linear};
    use bitvec::prelude::BitVec;

    fn tables() -> Vec<Kernels> {
        let mut t = vec![Kernels::generic(true)];
        t.extend(Kernels::available());
        t
    }

    #[test]
    fn every_table_and_thread_count_gives_the_reference_bits() {
        let mut r = SplitMix64::new(11);
        // Small cases (widths that take every block size: 64, 32, 16, 8, single columns, and
        // the last blocks of 80 and 96), and one large enough to be split over the threads.
        let widths = [1, 7, 8, 9, 63, 64, 65, 130, 48, 120, 80, 95, 96, 127, 128, 208];
        let cases = (0..40).map(|c| (1 + c % 37, 1 + (c * 7) % 53, widths[c % widths.len()], c % 3));
        for (rows, k, n, pad) in cases.chain([(300, 400, 130, 1)]) {
            assert!(rows < 300 || k * rows / 5 * n >= crate::kernels::PAR_MIN_WORK);
            let ldb = n + pad;
            let (w, mask) = masked(&mut r, rows, k, 0.2);
            let sp = SparseW::from_mask(&w, &mask, rows, k, 1.0).expect("sparse enough");
            let b = rand(&mut r, k * ldb);
            let start = rand(&mut r, rows * n);
            for store in [Store::Set, Store::Add] {
                let mut want = start.clone();
                spmm_reference(sp.w(), &b, ldb, Runs::one(n), &mut want, n, store);
                for t in tables() {
                    for threads in [1, 2] {
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        let mut got = start.clone();
                        pool.install(|| spmm(&t, sp.w(), &b, ldb, n, &mut got, store));
                        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{} {rows}×{k}·{k}×{n} {store:?} {threads} threads", t.micro.name);
                    }
                }
                // And the reference is the product.
                for (i, row) in want.chunks(n).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        let dense: f32 = (0..k).map(|c| w[i * k + c] * b[c * ldb + j]).sum();
                        let base = if store == Store::Add { start[i * n + j] } else { 0.0 };
                        assert!((v - base - dense).abs() <= 1e-4 * (1.0 + dense.abs()), "{i},{j}: {v} vs {dense}");
                    }
                }
            }
        }
    }

    #[test]
    fn runs_of_columns_give_the_reference_bits_on_every_table() {
        let mut r = SplitMix64::new(12);
        // Widths the grouped blocks take (16, 32) and others; counts that leave partial groups.
        for (case, (width, count)) in
            [(16, 1), (16, 4), (16, 7), (32, 2), (32, 5), (8, 3), (48, 3), (64, 2), (5, 4)].into_iter().enumerate()
        {
            let (rows, k) = (3 + case % 5, 4 + case);
            let (b_step, c_step, ldb) = (width + case % 3, width + 2 * (case % 2), 1 + case % 2);
            let (w, mask) = masked(&mut r, rows, k, 0.3);
            let sp = SparseW::from_mask(&w, &mask, rows, k, 1.0).expect("sparse enough");
            // Row `k` of `b` starts `ldb` floats after row `k − 1`: runs overlap rows, as the
            // direct conv's taps do.
            let b = rand(&mut r, (k - 1) * ldb + (count - 1) * b_step + width);
            let ldc = (count - 1) * c_step + width + 1;
            let runs = Runs { width, count, b_step, c_step };
            let start = rand(&mut r, rows * ldc);
            for store in [Store::Set, Store::Add] {
                let mut want = start.clone();
                spmm_reference(sp.w(), &b, ldb, runs, &mut want, ldc, store);
                for t in tables() {
                    let mut got = start.clone();
                    (t.spmm)(sp.w(), &b, ldb, runs, &mut got, ldc, store);
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} {runs:?} {store:?}", t.micro.name);
                }
                // The reference is the product on the runs' columns and leaves the others.
                for (i, row) in want.chunks(ldc).enumerate() {
                    for (col, &v) in row.iter().enumerate() {
                        let (run, j) = (col / c_step, col % c_step);
                        let base =
                            if store == Store::Add || run >= count || j >= width { start[i * ldc + col] } else { 0.0 };
                        let dense: f32 = if run < count && j < width {
                            (0..k).map(|c| w[i * k + c] * b[c * ldb + run * b_step + j]).sum()
                        } else {
                            0.0
                        };
                        assert!((v - base - dense).abs() <= 1e-4 * (1.0 + dense.abs()), "{i},{col}: {v} vs {dense}");
                    }
                }
            }
        }
    }

    #[test]
    fn from_mask_holds_the_weights_and_their_transpose() {
        let mut r = SplitMix64::new(5);
        let (rows, cols) = (23, 41);
        let (w, mask) = masked(&mut r, rows, cols, 0.15);
        let sp = SparseW::from_mask(&w, &mask, rows, cols, 1.0).expect("sparse enough");
        assert_eq!(sp.nnz(), mask.count_ones());
        assert!(sp.matches(&w));
        let mut changed = w.clone();
        let at = mask.first_one().unwrap();
        changed[at] += 1.0;
        assert!(!sp.matches(&changed), "a changed weight is noticed");
        // Wᵀ's rows are W's columns, rows ascending.
        let t = sp.wt();
        assert_eq!(t.rows(), cols);
        for c in 0..cols {
            let (s, e) = (t.start[c] as usize, t.start[c + 1] as usize);
            let got: Vec<(u32, f32)> = (s..e).map(|p| (t.idx[p], t.val[p])).collect();
            let want: Vec<(u32, f32)> =
                (0..rows).filter(|&i| mask[i * cols + c]).map(|i| (i as u32, w[i * cols + c])).collect();
            assert_eq!(got, want, "column {c}");
        }
        // A mask that does not start on a word boundary, and a form refilled from another
        // mask, give what a fresh one does.
        let mut shifted: BitVec<u32, Lsb0> = BitVec::repeat(true, 5);
        shifted.extend_from_bitslice(&mask);
        let other = SparseW::from_mask(&w, &shifted[5..], rows, cols, 1.0).expect("sparse enough");
        assert_eq!(format!("{other:?}"), format!("{sp:?}"));
        let (w2, mask2) = masked(&mut r, rows, cols, 0.05);
        let mut reused = sp.clone();
        assert!(reused.refill(&w2, &mask2, rows, cols, 1.0));
        let fresh = SparseW::from_mask(&w2, &mask2, rows, cols, 1.0).unwrap();
        assert_eq!((reused.w().start, reused.w().idx, reused.w().val), (fresh.w().start, fresh.w().idx, fresh.w().val));
        assert_eq!(
            (reused.wt().start, reused.wt().idx, reused.wt().val),
            (fresh.wt().start, fresh.wt().idx, fresh.wt().val)
        );
        // Too dense, or sizes that disagree: no sparse form.
        let (dense, dmask) = masked(&mut r, rows, cols, 0.6);
        let (dense, dmask) = (&dense, &dmask);
        assert!(SparseW::from_mask(dense, dmask, rows, cols, 0.5).is_none());
        assert!(SparseW::from_mask(dense, dmask, rows, cols, 1.0).is_some());
        assert!(SparseW::from_mask(&w, &mask, rows, cols + 1, 1.0).is_none());
        assert!(SparseW::from_mask(&w[1..], &mask, rows, cols, 1.0).is_none());
    }

    fn close(what: &str, got: &[f32], want: &[f32]) {
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}[{i}]: sparse {a} vs dense {b}");
        }
    }

    #[test]
    fn sparse_conv_and_linear_equal_the_dense_products() {
        // Whatever earlier calls left in the direct conv's buffers must not matter.
        rayon::broadcast(|_| crate::train::ops::sparse_conv::poison_buffers());
        crate::train::ops::sparse_conv::poison_buffers();
        let shape = ConvShape::square;
        let dilated = ConvShape { dh: 2, dw: 2, pad: [2; 4], ..shape(4, 9, 10, 6, 3, 1, 0) };
        let lopsided = ConvShape { pad: [0, 1, 1, 0], ..shape(3, 7, 6, 5, 3, 1, 0) };
        let wide = ConvShape { pad: [3, 3, 3, 3], ..shape(3, 5, 6, 5, 3, 1, 0) };
        let conv_shapes = [
            shape(6, 9, 8, 10, 3, 1, 1),
            shape(5, 8, 7, 12, 3, 2, 1),
            shape(3, 11, 9, 7, 5, 2, 2),
            shape(3, 10, 9, 7, 3, 3, 0),
            shape(8, 6, 6, 16, 1, 2, 0),
            shape(8, 5, 5, 4, 1, 1, 0),
            shape(4, 6, 6, 6, 3, 1, 0),
            dilated,
            lopsided,
            wide,
            // Phases no tap reads (left unwritten by the direct conv).
            shape(8, 7, 7, 5, 1, 2, 1),
            ConvShape { dh: 2, dw: 2, pad: [2; 4], ..shape(4, 9, 9, 6, 3, 2, 0) },
            // The input gradient by phases: strides, padding and dilation that differ by
            // direction, and a 1 × 1 kernel among larger ones (outputs of at least 64).
            ConvShape { sw: 1, pad: [1, 0, 2, 1], ..shape(5, 17, 9, 6, 3, 2, 0) },
            ConvShape { sh: 1, sw: 3, pad: [0, 2, 1, 0], ..shape(3, 8, 29, 4, 3, 1, 0) },
            ConvShape { kw: 1, dh: 2, pad: [2, 0, 1, 0], ..shape(4, 18, 17, 5, 3, 2, 0) },
            shape(4, 17, 17, 6, 3, 2, 1),
            // Output rows of whole vectors, written in place (stride 1 and 2, input gradient
            // in place at stride 1).
            shape(3, 16, 16, 4, 3, 1, 1),
            shape(2, 32, 32, 3, 3, 1, 1),
            shape(2, 32, 32, 3, 3, 2, 1),
        ];
        let phased = conv_shapes.iter().filter(|s| crate::train::ops::sparse_conv::backward_dx_phases_supported(s));
        assert_eq!(phased.count(), 5, "the input gradient by phases is among the paths checked");
        let k = Kernels::best_fast();
        let mut r = SplitMix64::new(9);
        for s in conv_shapes {
            let batch = 5;
            let kk = s.c_in * s.kh * s.kw;
            let (w, mask) = masked(&mut r, s.c_out, kk, 0.2);
            let sp = SparseW::from_mask(&w, &mask, s.c_out, kk, 1.0).expect("sparse enough");
            let (xl, yl) = (batch * s.c_in * s.h * s.w, batch * s.c_out * s.oh() * s.ow());
            let (x, bias, dy) = (rand(&mut r, xl), rand(&mut r, s.c_out), rand(&mut r, yl));
            let run = |sp: Option<&SparseW>, store: Store| {
                let mut y = vec![f32::NAN; yl];
                conv::forward(&k, &s, Weights::F32(&w), Some(&bias), &x, batch, &mut y, sp);
                let mut dx = vec![if store == Store::Set { f32::NAN } else { 0.5 }; xl];
                let mut dw = vec![0.25; w.len()];
                conv::backward(
                    &k,
                    &s,
                    Weights::F32(&w),
                    &x,
                    &dy,
                    batch,
                    Some((&mut dx, store)),
                    Some(&mut dw),
                    None,
                    sp,
                    None,
                );
                (y, dx, dw)
            };
            for store in [Store::Set, Store::Add] {
                let (y, dx, dw) = run(Some(&sp), store);
                let (y0, dx0, dw0) = run(None, store);
                close(&format!("{s:?} y"), &y, &y0);
                close(&format!("{s:?} dx {store:?}"), &dx, &dx0);
                assert_eq!(dw, dw0, "{s:?}: the weight gradient is the dense one either way");
            }
        }
        for (i, o, batch) in [(37, 29, 6), (64, 100, 17), (10, 3, 1)] {
            let (w, mask) = masked(&mut r, o, i, 0.2);
            let sp = SparseW::from_mask(&w, &mask, o, i, 1.0).expect("sparse enough");
            let (x, bias, dy) = (rand(&mut r, batch * i), rand(&mut r, o), rand(&mut r, batch * o));
            let run = |sp: Option<&SparseW>| {
                let mut y = vec![f32::NAN; batch * o];
                linear::forward(&k, i, o, Weights::F32(&w), Some(&bias), &x, batch, &mut y, sp);
                let (mut dx, mut dw) = (vec![0.5; batch * i], vec![0.25; w.len()]);
                linear::backward(
                    &k,
                    i,
                    o,
                    Weights::F32(&w),
                    &x,
                    &dy,
                    batch,
                    Some(&mut dx),
                    Some((&mut dw, Store::Add)),
                    None,
                    sp,
                );
                (y, dx, dw)
            };
            let ((y, dx, dw), (y0, dx0, dw0)) = (run(Some(&sp)), run(None));
            close("linear y", &y, &y0);
            close("linear dx", &dx, &dx0);
            assert_eq!(dw, dw0);
        }
    }
}
