//! Fully connected layer over a batch, `y[b] = W x[b] + bias`, and its gradients:
//! `dx = dY · W`, `dW += dYᵀ · X`, `db += Σ_b dY[b]`, each a matrix product over the batch.

use super::conv::dense;
use crate::kernels::matmul::{matmul, Mat};
use crate::kernels::{Kernels, Weights};

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
) {
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
        let wf = dense(w);
        matmul(k, dym, Mat::rows(&wf, out_f, in_f), &mut dx[..batch * in_f], true);
    }
}
