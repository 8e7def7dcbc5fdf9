//! Forward and backward of every op over a batch, each pair in one file. Inputs and outputs
//! are `[batch][c][h][w]` slices; backward functions *add* into the gradients they are given,
//! so a value read by several layers (a residual) sums its gradients without extra buffers.

pub mod act;
pub mod conv;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pool;
#[cfg(test)]
mod tests;
