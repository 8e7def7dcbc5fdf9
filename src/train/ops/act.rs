//! Element-wise activations and the residual add. The gradient of a clamp passes where the
//! output lies strictly inside the bounds (at a bound the derivative is taken as 0, as
//! PyTorch does for ReLU at 0 and ReLU6 at 0 and 6). Large tensors are split over the kernel
//! threads (element-wise, so any split gives the same bits).

use super::Store;

/// Floats per piece of a split element-wise pass.
const PIECE: usize = 1 << 15;

/// `f(offset, piece)` over pieces of `out`, in parallel when `out` is large.
pub(crate) fn split(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() >= crate::kernels::PAR_MIN_WORK && crate::kernels::threads() > 1 {
        use rayon::prelude::*;
        out.par_chunks_mut(PIECE).enumerate().for_each(|(i, p)| f(i * PIECE, p));
    } else {
        f(0, out)
    }
}

/// `y = clamp(x, lo, hi)`.
pub fn clamp_forward(x: &[f32], y: &mut [f32], lo: f32, hi: f32) {
    split(y, |at, y| {
        for (o, &v) in y.iter_mut().zip(&x[at..]) {
            *o = crate::kernels::clamp(v, lo, hi);
        }
    })
}

/// `y = clamp(y, lo, hi)` in place: a clamp fused into the op that wrote `y`.
pub fn clamp_in_place(y: &mut [f32], lo: f32, hi: f32) {
    split(y, |_, y| {
        for v in y.iter_mut() {
            *v = crate::kernels::clamp(*v, lo, hi);
        }
    })
}

/// The gradient `g` through a clamp to `(lo, hi)` at `v`, the clamp's input or its output
/// (the same mask): `g` strictly inside the bounds, 0 at or past them. A select rather than a
/// branch, so that the loops using it vectorise.
#[inline(always)]
pub fn through_clamp(v: f32, lo: f32, hi: f32, g: f32) -> f32 {
    if (v > lo) & (v < hi) {
        g
    } else {
        0.0
    }
}

/// Keeps the gradient `dy` of a fused clamp's output where that output `y` lies inside
/// `(lo, hi)` and zeroes it elsewhere, in place: the bits [`clamp_backward`] stores (its mask
/// from the clamp's input is the same mask, and a −0 becomes +0).
pub fn clamp_mask(y: &[f32], dy: &mut [f32], lo: f32, hi: f32) {
    split(dy, |at, dy| {
        for (d, &v) in dy.iter_mut().zip(&y[at..]) {
            *d = 0.0 + through_clamp(v, lo, hi, *d);
        }
    })
}

/// Words of a clamp's gradient mask over `len` values ([`clamp_bits`]).
pub fn mask_words(len: usize) -> usize {
    len.div_ceil(32)
}

/// `1 << j` in lane `j`: a mask's bits set and tested lane by lane, which vectorises (a
/// variable shift did not: applying a mask took four times as long).
const BIT: [u32; 32] = {
    let mut b = [0u32; 32];
    let mut j = 0;
    while j < 32 {
        b[j] = 1 << j;
        j += 1;
    }
    b
};

/// The mask of a clamp to `(lo, hi)` at its output `y`, one bit per value (bit `j % 32` of
/// word `j / 32`): set where the gradient passes ([`through_clamp`]). A value whose only
/// use in the backward pass is this mask is kept as it, a 32nd of its size.
pub fn clamp_bits(y: &[f32], lo: f32, hi: f32, bits: &mut [u32]) {
    let (whole, tail) = y.as_chunks::<32>();
    let bits = &mut bits[..mask_words(y.len())];
    for (w, c) in bits.iter_mut().zip(whole) {
        let mut set = [0u32; 32];
        for j in 0..32 {
            set[j] = if (c[j] > lo) & (c[j] < hi) { BIT[j] } else { 0 };
        }
        *w = set.iter().fold(0, |a, &b| a | b);
    }
    if !tail.is_empty() {
        bits[whole.len()] = tail.iter().zip(BIT).fold(0, |a, (&v, b)| if (v > lo) & (v < hi) { a | b } else { a });
    }
}

/// [`clamp_mask`] by the mask [`clamp_bits`] took of `y`: the same bits.
pub fn clamp_mask_bits(bits: &[u32], dy: &mut [f32]) {
    let keep = |d: f32, w: u32, bit: u32| 0.0 + f32::from_bits(d.to_bits() & ((w & bit != 0) as u32).wrapping_neg());
    let bits = &bits[..mask_words(dy.len())];
    let (whole, tail) = dy.as_chunks_mut::<32>();
    for (&w, c) in bits.iter().zip(whole.iter_mut()) {
        for j in 0..32 {
            c[j] = keep(c[j], w, BIT[j]);
        }
    }
    if let Some(&w) = bits.get(whole.len()) {
        for (d, b) in tail.iter_mut().zip(BIT) {
            *d = keep(*d, w, b);
        }
    }
}

/// Stores `dy` into `dx` where the forward input was inside `(lo, hi)`, 0 elsewhere.
pub fn clamp_backward(x: &[f32], dy: &[f32], dx: &mut [f32], lo: f32, hi: f32, store: Store) {
    // A select rather than a branch, so that the loop vectorises (the branch was 5 % of a
    // GEMResNet step): [`through_clamp`], and one loop per store, chosen outside it. Inside
    // the closure, `&&` and the store's match left a scalar loop with branches (clamp_backward
    // went from 4 % to 20 % of a Lite0 CLR step).
    split(dx, |at, dx| {
        let (dy, x) = (&dy[at..at + dx.len()], &x[at..at + dx.len()]);
        match store {
            Store::Add => {
                for ((d, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
                    *d += through_clamp(v, lo, hi, g);
                }
            }
            Store::Set => {
                for ((d, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
                    *d = 0.0 + through_clamp(v, lo, hi, g);
                }
            }
        }
    })
}

/// `y = a + b`, clamped to `[lo, hi]` when `clamp` is `Some((lo, hi))` (a ReLU that reads
/// only the sum, fused into it: one pass over the activations instead of two, and one
/// tensor fewer kept).
pub fn add_forward(a: &[f32], b: &[f32], y: &mut [f32], clamp: Option<(f32, f32)>) {
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    split(y, |at, y| {
        for ((o, &u), &v) in y.iter_mut().zip(&a[at..]).zip(&b[at..]) {
            // Clamping to ±∞ leaves every value as it is, NaN included.
            *o = crate::kernels::clamp(u + v, lo, hi);
        }
    })
}

/// The gradient of a sum whose output `y` went through a fused clamp to `(lo, hi)`, into both
/// operands' gradients at once: `g = dy` where the clamp passes it, stored into `a` and into
/// `b` by their stores, with the bits [`clamp_mask`] then [`accumulate`] give. One pass
/// reading `y` and `dy`: masking `dy` in place and accumulating it twice read and wrote `dy`
/// three times more (a residual sum's backward is memory-bound).
pub fn accumulate_both(y: &[f32], lo: f32, hi: f32, dy: &[f32], a: (&mut [f32], Store), b: (&mut [f32], Store)) {
    let n = dy.len();
    let ((a, sa), (b, sb)) = ((&mut a.0[..n], a.1), (&mut b.0[..n], b.1));
    let piece = |at: usize, pa: &mut [f32], pb: &mut [f32]| {
        let (d, y) = (&dy[at..at + pa.len()], &y[at..at + pa.len()]);
        // One loop per pair of stores, chosen outside it (see `clamp_backward`).
        match (sa, sb) {
            (Store::Set, Store::Set) => both::<false, false>(pa, pb, d, y, lo, hi),
            (Store::Set, Store::Add) => both::<false, true>(pa, pb, d, y, lo, hi),
            (Store::Add, Store::Set) => both::<true, false>(pa, pb, d, y, lo, hi),
            (Store::Add, Store::Add) => both::<true, true>(pa, pb, d, y, lo, hi),
        }
    };
    if n >= crate::kernels::PAR_MIN_WORK && crate::kernels::threads() > 1 {
        use rayon::prelude::*;
        a.par_chunks_mut(PIECE)
            .zip(b.par_chunks_mut(PIECE))
            .enumerate()
            .for_each(|(i, (pa, pb))| piece(i * PIECE, pa, pb));
    } else {
        piece(0, a, b)
    }
}

/// `g = 0 + through_clamp(y, lo, hi, dy)` into `a` and `b`, each added (`ADD_*`) or set.
#[inline(always)]
fn both<const ADD_A: bool, const ADD_B: bool>(a: &mut [f32], b: &mut [f32], dy: &[f32], y: &[f32], lo: f32, hi: f32) {
    for (((u, v), &d), &yv) in a.iter_mut().zip(b.iter_mut()).zip(dy).zip(y) {
        let g = 0.0 + through_clamp(yv, lo, hi, d);
        if ADD_A {
            *u += g;
        } else {
            *u = 0.0 + g;
        }
        if ADD_B {
            *v += g;
        } else {
            *v = 0.0 + g;
        }
    }
}

/// The gradient of a sum flows unchanged to both operands: `dx += dy` (or `dx = dy`).
pub fn accumulate(dy: &[f32], dx: &mut [f32], store: Store) {
    split(&mut dx[..dy.len()], |at, dx| {
        let dy = &dy[at..at + dx.len()];
        match store {
            Store::Add => {
                for (d, &g) in dx.iter_mut().zip(dy) {
                    *d += g;
                }
            }
            Store::Set => {
                for (d, &g) in dx.iter_mut().zip(dy) {
                    *d = 0.0 + g;
                }
            }
        }
    })
}
