//! Fully connected layer over a batch, `y[b] = W x[b] + bias`, and its gradients:
//! `dx = dY · W`, `dW += dYᵀ · X`, `db += Σ_b dY[b]`, each a matrix product over the batch.
//! With the weights' sparse form ([`SparseW`], a masked layer) the forward and `dx` are
//! sparse products over the transposed batch: `Yᵀ = W · Xᵀ`, `dXᵀ = Wᵀ · dYᵀ`.

use super::conv::dense;
use super::sparse::{spmm, SparseW};
use crate::kernels::matmul::{matmul, Mat};
use crate::kernels::sparse::SparseRows;
use crate::kernels::{Kernels, Store, Weights};

std::thread_local! {
    /// The transposed operand and result of the sparse products, kept between calls.
    static T: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `out[c·rows + r] = m[r·cols + c]`: `m` (`rows × cols`) transposed.
fn transpose(m: &[f32], rows: usize, cols: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(rows * cols, 0.0);
    // Tiles of 8 × 8, so that reads and writes both stay within a few cache lines.
    for r0 in (0..rows).step_by(8) {
        for c0 in (0..cols).step_by(8) {
            for r in r0..(r0 + 8).min(rows) {
                for c in c0..(c0 + 8).min(cols) {
                    out[c * rows + r] = m[r * cols + c];
                }
            }
        }
    }
}

/// `put(&mut out[b][r], (m · a[b])[r], r)` for the `batch` rows of `a` (`batch × cols`) and
/// the sparse `m` (`rows × cols`): one sparse product over the transposed batch,
/// `m · aᵀ`, in buffers kept between calls.
fn sparse_rows(
    k: &Kernels,
    m: SparseRows,
    a: &[f32],
    cols: usize,
    batch: usize,
    out: &mut [f32],
    put: impl Fn(&mut f32, f32, usize),
) {
    let rows = m.rows();
    let (mut at, mut prod) = T.take();
    transpose(&a[..batch * cols], batch, cols, &mut at);
    prod.resize(rows * batch, 0.0);
    spmm(k, m, &at, batch, batch, &mut prod, Store::Set);
    for (b, row) in out[..batch * rows].chunks_exact_mut(rows).enumerate() {
        for (r, v) in row.iter_mut().enumerate() {
            put(v, prod[r * batch + b], r);
        }
    }
    T.set((at, prod));
}

/// `x` is `batch × in_f`, `y` is `batch × out_f`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    k: &Kernels,
    in_f: usize,
    out_f: usize,
    w: Weights,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    sp: Option<&SparseW>,
) {
    if let Some(sp) = sp.filter(|sp| sp.dims() == (out_f, in_f)) {
        sparse_rows(k, sp.w(), x, in_f, batch, y, |v, s, o| *v = s + bias.map_or(0.0, |bs| bs[o]));
        return;
    }
    let wf = dense(w);
    if batch < out_f {
        // Yᵀ = W · Xᵀ reads the (larger) weights in place and packs only the batch.
        let mut yt = vec![0.0f32; out_f * batch];
        matmul(k, Mat::rows(&wf, out_f, in_f), Mat::t(&x[..batch * in_f], batch, in_f), &mut yt, false);
        for (b, row) in y[..batch * out_f].chunks_exact_mut(out_f).enumerate() {
            for (o, v) in row.iter_mut().enumerate() {
                *v = yt[o * batch + b];
            }
        }
    } else {
        matmul(k, Mat::rows(&x[..batch * in_f], batch, in_f), Mat::t(&wf, out_f, in_f), &mut y[..batch * out_f], false);
    }
    if let Some(bias) = bias {
        for row in y[..batch * out_f].chunks_exact_mut(out_f) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

/// Adds the gradients of [`forward`] into `dx` and `db`, and stores `dw`'s by its [`Store`]
/// (each only when asked for).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    k: &Kernels,
    in_f: usize,
    out_f: usize,
    w: Weights,
    x: &[f32],
    dy: &[f32],
    batch: usize,
    dx: Option<&mut [f32]>,
    dw: Option<(&mut [f32], Store)>,
    db: Option<&mut [f32]>,
    sp: Option<&SparseW>,
) {
    let dym = Mat::rows(&dy[..batch * out_f], batch, out_f);
    if let Some(db) = db {
        for row in dy[..batch * out_f].chunks_exact(out_f) {
            for (d, g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }
    if let Some((dw, store)) = dw {
        let add = store == Store::Add;
        matmul(k, Mat::t(&dy[..batch * out_f], batch, out_f), Mat::rows(&x[..batch * in_f], batch, in_f), dw, add);
    }
    if let Some(dx) = dx {
        if let Some(sp) = sp.filter(|sp| sp.dims() == (out_f, in_f)) {
            sparse_rows(k, sp.wt(), dy, out_f, batch, dx, |v, s, _| *v += s);
            return;
        }
        let wf = dense(w);
        matmul(k, dym, Mat::rows(&wf, out_f, in_f), &mut dx[..batch * in_f], true);
    }
}
