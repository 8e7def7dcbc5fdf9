//! (std) General `C = A · B` over strided views, for training: the backward passes need
//! products with transposed operands (`dW = dY · Xᵀ`, `dX = Wᵀ · dY`). Operands are copied into
//! the layouts the packed GEMM reads (A as rows, B as `nr`-wide panels; a copy costs O(mk + kn)
//! against the product's O(mnk)), then [`super::gemm::gemm_packed`] runs with the table's
//! micro-kernel. Every element of C is one micro-kernel sum over the whole `k`, in the same
//! order whatever the thread count, so results do not depend on threading. Packing buffers
//! are kept per thread and reused: allocating them per call made the kernel zero fresh pages
//! for a quarter of a training step (measured with perf on fc1024).

use super::gemm::{a_scratch_len, gemm_packed, packed_b_len};
use super::{Kernels, PostOp, Weights};
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
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let sc = &mut *guard;
        let a_rows: &[f32] = if a.is_row_major() {
            &a.data[..m * k]
        } else {
            let dst = sized(&mut sc.a, m * k);
            for (i, row) in dst.chunks_exact_mut(k).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = a.at(i, j);
                }
            }
            &sc.a[..m * k]
        };
        let nr = kern.micro.nr;
        let bp = sized(&mut sc.b, packed_b_len(k, n, nr));
        for (q, panel) in bp.chunks_exact_mut(k * nr).enumerate() {
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
        }
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
            for (d, s) in c.iter_mut().zip(tmp.iter()) {
                *d += s;
            }
        } else {
            gemm_packed(kern, m, n, k, Weights::F32(a_rows), 0, bp, c, &post, ap);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
