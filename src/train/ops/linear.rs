//! Fully connected layer over a batch, `y[b] = W x[b] + bias`, and its gradients:
//! `dx = dY · W`, `dW += dYᵀ · X`, `db += Σ_b dY[b]`, each a matrix product over the batch.
//! With the weights' sparse form ([`SparseW`], a masked layer) the forward and `dx` are
//! sparse products over the transposed batch: `Yᵀ = W · Xᵀ`, `dXᵀ = Wᵀ · dYᵀ`.

use super::conv::dense;
use super::sparse::{spmm, SparseW};
use crate::kernels::matmul::{matmul, Mat};
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
        let (mut xt, mut yt) = T.take();
        transpose(&x[..batch * in_f], batch, in_f, &mut xt);
        yt.resize(out_f * batch, 0.0);
        spmm(k, sp.w(), &xt, batch, batch, &mut yt, Store::Set);
        for (b, row) in y[..batch * out_f].chunks_exact_mut(out_f).enumerate() {
            for (o, v) in row.iter_mut().enumerate() {
                *v = yt[o * batch + b] + bias.map_or(0.0, |bs| bs[o]);
            }
        }
        T.set((xt, yt));
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

/// Adds the gradients of [`forward`] into `dx`, `dw`, `db` (each only when asked for).
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
    dw: Option<&mut [f32]>,
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
    if let Some(dw) = dw {
        matmul(k, Mat::t(&dy[..batch * out_f], batch, out_f), Mat::rows(&x[..batch * in_f], batch, in_f), dw, true);
    }
    if let Some(dx) = dx {
        if let Some(sp) = sp.filter(|sp| sp.dims() == (out_f, in_f)) {
            let (mut dyt, mut dxt) = T.take();
            transpose(&dy[..batch * out_f], batch, out_f, &mut dyt);
            dxt.resize(in_f * batch, 0.0);
            spmm(k, sp.wt(), &dyt, batch, batch, &mut dxt, Store::Set);
            for (b, row) in dx[..batch * in_f].chunks_exact_mut(in_f).enumerate() {
                for (i, v) in row.iter_mut().enumerate() {
                    *v += dxt[i * batch + b];
                }
            }
            T.set((dyt, dxt));
            return;
        }
        let wf = dense(w);
        matmul(k, dym, Mat::rows(&wf, out_f, in_f), &mut dx[..batch * in_f], true);
    }
}
