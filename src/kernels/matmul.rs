//! (alloc) General `C = A · B` over strided views, for training: the backward passes need
//! products with transposed operands (`dW = dY · Xᵀ`, `dX = Wᵀ · dY`). Operands are copied into
//! the layouts the packed GEMM reads (A as rows, B as `nr`-wide panels; a copy costs O(mk + kn)
//! against the product's O(mnk)), then [`super::gemm::gemm_packed`] runs with the table's
//! micro-kernel. Every element of C is one micro-kernel sum over the whole `k`, in the same
//! order whatever the thread count, so results do not depend on threading.

use super::gemm::{a_scratch_len, gemm_packed, packed_b_len};
use super::{Kernels, PostOp, Weights};
use alloc::vec;
use alloc::vec::Vec;

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
    let owned_a;
    let a_rows: &[f32] = if a.is_row_major() {
        &a.data[..m * k]
    } else {
        owned_a = (0..m).flat_map(|i| (0..k).map(move |j| a.at(i, j))).collect::<Vec<f32>>();
        &owned_a
    };
    let nr = kern.micro.nr;
    let mut bp = vec![0.0f32; packed_b_len(k, n, nr)];
    for (q, panel) in bp.chunks_exact_mut(k * nr).enumerate() {
        let c0 = q * nr;
        let w = nr.min(n - c0);
        for kk in 0..k {
            let d = &mut panel[kk * nr..kk * nr + w];
            if b.cs == 1 {
                let at = kk * b.rs + c0;
                d.copy_from_slice(&b.data[at..at + w]);
            } else {
                for (j, v) in d.iter_mut().enumerate() {
                    *v = b.at(kk, c0 + j);
                }
            }
        }
    }
    let ones = vec![1.0f32; m];
    let zeros = vec![0.0f32; m];
    let post = PostOp { mul: &ones, add: &zeros, lo: f32::NEG_INFINITY, hi: f32::INFINITY };
    let mut a_scratch = vec![0.0f32; a_scratch_len(k, kern.micro.mr)];
    if accumulate {
        let mut tmp = vec![0.0f32; m * n];
        gemm_packed(kern, m, n, k, Weights::F32(a_rows), 0, &bp, &mut tmp, &post, &mut a_scratch);
        for (d, s) in c.iter_mut().zip(&tmp) {
            *d += s;
        }
    } else {
        gemm_packed(kern, m, n, k, Weights::F32(a_rows), 0, &bp, c, &post, &mut a_scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
