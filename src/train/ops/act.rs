//! Element-wise activations and the residual add. The gradient of a clamp passes where the
//! output lies strictly inside the bounds (at a bound the derivative is taken as 0, as
//! PyTorch does for ReLU at 0 and ReLU6 at 0 and 6).

use super::Store;

/// `y = clamp(x, lo, hi)`.
pub fn clamp_forward(x: &[f32], y: &mut [f32], lo: f32, hi: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = crate::kernels::clamp(v, lo, hi);
    }
}

/// Stores `dy` into `dx` where the forward input was inside `(lo, hi)`, 0 elsewhere.
pub fn clamp_backward(x: &[f32], dy: &[f32], dx: &mut [f32], lo: f32, hi: f32, store: Store) {
    // A select rather than a branch, so that the loop vectorises (the branch was 5 % of a
    // GEMResNet step).
    for ((d, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
        store.put(d, if v > lo && v < hi { g } else { 0.0 });
    }
}

/// `y = a + b`.
pub fn add_forward(a: &[f32], b: &[f32], y: &mut [f32]) {
    for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
        *o = u + v;
    }
}

/// The gradient of a sum flows unchanged to both operands: `dx += dy` (or `dx = dy`).
pub fn accumulate(dy: &[f32], dx: &mut [f32], store: Store) {
    for (d, &g) in dx.iter_mut().zip(dy) {
        store.put(d, g);
    }
}
