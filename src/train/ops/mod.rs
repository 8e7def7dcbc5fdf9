//! Forward and backward of every op over a batch, each pair in one file. Inputs and outputs
//! are `[batch][c][h][w]` slices; backward functions *add* into the gradients they are given,
//! so a value read by several layers (a residual) sums its gradients without extra buffers.
//! The element-wise ones can also write the input gradient over what the buffer holds
//! ([`Store::Set`]), for the first gradient a value gets in a pass.

pub mod act;
pub mod conv;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod sparse;
mod sparse_conv;
#[cfg(test)]
mod tests;
mod unfold;
mod wgrad;
mod winograd;

pub use crate::kernels::Store;

/// `acc[l] += Σ a[8i + l] · b[8i + l]` (tail into the first lanes): eight independent sums,
/// which the compiler keeps in vector registers.
#[inline(always)]
pub(crate) fn dot8(acc: &mut [f32; 8], a: &[f32], b: &[f32]) {
    let (ac, at) = a.as_chunks::<8>();
    let (bc, bt) = b[..a.len()].as_chunks::<8>();
    for (u, v) in ac.iter().zip(bc) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    for (l, (&u, &v)) in at.iter().zip(bt).enumerate() {
        acc[l] += u * v;
    }
}
