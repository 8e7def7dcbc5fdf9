//! Direct sparse convolution (one group) for masked training: the forward pass and, at stride
//! 1, the input gradient, with no unfolded input.
//!
//! im2col writes `K = c_in·kh·kw` floats per output position, and with a 5 % mask the product
//! that reads them is cheap: the unfolding was the larger cost. Instead the input of a sample
//! is padded and split into its `sh × sw` stride phases once; then every tap `(ci, ky, kx)`
//! of the output row `oy` reads one contiguous run of a phase plane, at an offset that depends
//! on the tap only. With the columns of the output numbered `oy · wq + ox` (the phase plane's
//! row width `wq`, so each row carries `wq − ow` unused columns), the conv is the sparse
//! product of [`crate::kernels::sparse`] with the taps' offsets as its "row" indices and a
//! row stride of 1. The input gradient at stride 1 is the same product over the output
//! gradient padded by `(k − 1)·d − pad`, with the kernel flipped and its rows indexed by the
//! input channel.

use super::conv::for_each_chunk;
use super::sparse::SparseW;
use crate::kernels::sparse::SparseRows;
use crate::kernels::{ConvShape, Kernels, Store};

/// Zeros past a phase buffer's end: the product runs over a multiple of 8 columns, up to 7
/// past the last one used.
const TAIL: usize = 8;

/// One sample's tensor (`c × h × w`), zero-padded and split into stride phases: padded row `r`,
/// column `q` of channel `ch` lives in phase `(r mod sh, q mod sw)` at row `r / sh`, column
/// `q / sw` of a `hq × wq` plane.
#[derive(Clone, Copy)]
struct Phases {
    c: usize,
    hq: usize,
    wq: usize,
    sh: usize,
    sw: usize,
}

impl Phases {
    fn len(&self) -> usize {
        self.sh * self.sw * self.c * self.hq * self.wq + TAIL
    }

    fn at(&self, ch: usize, r: usize, q: usize) -> usize {
        let phase = (r % self.sh) * self.sw + q % self.sw;
        ((phase * self.c + ch) * self.hq + r / self.sh) * self.wq + q / self.sw
    }

    /// `out` ← `x` (`c × h × w`) placed at padded row `top`, column `left`; zeros elsewhere.
    fn fill(&self, x: &[f32], h: usize, w: usize, top: usize, left: usize, out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.len(), 0.0);
        for ch in 0..self.c {
            for iy in 0..h {
                let row = &x[(ch * h + iy) * w..][..w];
                if self.sw == 1 {
                    let o = self.at(ch, iy + top, left);
                    out[o..o + w].copy_from_slice(row);
                } else {
                    for (ix, &v) in row.iter().enumerate() {
                        out[self.at(ch, iy + top, ix + left)] = v;
                    }
                }
            }
        }
    }
}

std::thread_local! {
    /// A sample's phases and the product's result, kept between calls.
    static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `y = conv(x) + bias` for `batch` samples of a one-group conv with sparse weights; samples in
/// parallel, each output one row's sum in the mask's order (any thread count, same bits).
pub(super) fn forward(
    k: &Kernels,
    s: &ConvShape,
    sp: &SparseW,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) {
    let (oh, ow) = (s.oh(), s.ow());
    let (xl, yl) = (s.c_in * s.h * s.w, s.c_out * oh * ow);
    let ph = Phases {
        c: s.c_in,
        hq: (s.h + s.pad[0] + s.pad[2]).div_ceil(s.sh),
        wq: (s.w + s.pad[1] + s.pad[3]).div_ceil(s.sw),
        sh: s.sh,
        sw: s.sw,
    };
    let n = ((oh - 1) * ph.wq + ow).next_multiple_of(8);
    // Column (ci, ky, kx) of W → where the tap reads for output (0, 0).
    let mut off = Vec::with_capacity(s.c_in * s.kh * s.kw);
    for ci in 0..s.c_in {
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                off.push(ph.at(ci, ky * s.dh, kx * s.dw) as u32);
            }
        }
    }
    let w = sp.w();
    let idx: Vec<u32> = w.idx.iter().map(|&c| off[c as usize]).collect();
    let taps = SparseRows { start: w.start, idx: &idx, val: w.val };
    let work = sp.nnz() * n * batch;
    for_each_chunk(batch, 1, work, Some(y), yl, None, 0, |_, b, _, yb, _| {
        let yb = yb.expect("output sample");
        BUFS.with_borrow_mut(|(xq, out)| {
            ph.fill(&x[b * xl..(b + 1) * xl], s.h, s.w, s.pad[0], s.pad[1], xq);
            out.resize(s.c_out * n, 0.0);
            (k.spmm)(taps, xq, 1, n, out, n, Store::Set);
            for (co, plane) in yb.chunks_exact_mut(oh * ow).enumerate() {
                let add = bias.map_or(0.0, |bs| bs[co]);
                for (oy, row) in plane.chunks_exact_mut(ow).enumerate() {
                    for (v, &u) in row.iter_mut().zip(&out[co * n + oy * ph.wq..][..ow]) {
                        *v = u + add;
                    }
                }
            }
        })
    });
}

/// Whether [`backward_dx`] takes `s`: stride 1, and no padding beyond the kernel's reach (the
/// output gradient's own padding, `(k − 1)·d − pad`, is then at least 0 on every side).
pub(super) fn backward_dx_supported(s: &ConvShape) -> bool {
    let (rh, rw) = ((s.kh - 1) * s.dh, (s.kw - 1) * s.dw);
    s.groups == 1 && s.sh == 1 && s.sw == 1 && s.pad[0].max(s.pad[2]) <= rh && s.pad[1].max(s.pad[3]) <= rw
}

/// `dx` (stored by `store`) of a stride-1 one-group conv with sparse weights, given `dy`:
/// `dx[ci][iy][ix] = Σ w[co][ci][ky][kx] · dy[co][iy + pad − ky·dh][ix + pad − kx·dw]` over the
/// taps whose output position exists, as one sparse product per sample over `dy` padded by
/// `(k − 1)·d − pad` (rows of the product: input channels; entries: `(co, ky, kx)`, flipped).
pub(super) fn backward_dx(
    k: &Kernels,
    s: &ConvShape,
    sp: &SparseW,
    dy: &[f32],
    batch: usize,
    dx: &mut [f32],
    store: Store,
) {
    debug_assert!(backward_dx_supported(s));
    let (oh, ow) = (s.oh(), s.ow());
    let (xl, yl) = (s.c_in * s.h * s.w, s.c_out * oh * ow);
    let (rh, rw) = ((s.kh - 1) * s.dh, (s.kw - 1) * s.dw);
    let ph = Phases { c: s.c_out, hq: s.h + rh, wq: s.w + rw, sh: 1, sw: 1 };
    let n = ((s.h - 1) * ph.wq + s.w).next_multiple_of(8);
    // W's entries regrouped by input channel (a counting sort; output channels ascending
    // within each), each with its flipped tap's offset.
    let (w, taps) = (sp.w(), s.kh * s.kw);
    let mut start = vec![0u32; s.c_in + 1];
    for &c in w.idx {
        start[c as usize / taps + 1] += 1;
    }
    for ci in 0..s.c_in {
        start[ci + 1] += start[ci];
    }
    let mut next = start.clone();
    let (mut idx, mut val) = (vec![0u32; w.idx.len()], vec![0.0f32; w.idx.len()]);
    for co in 0..s.c_out {
        for p in w.start[co] as usize..w.start[co + 1] as usize {
            let c = w.idx[p] as usize;
            let (ci, t) = (c / taps, c % taps);
            let (ky, kx) = (t / s.kw, t % s.kw);
            let at = next[ci] as usize;
            idx[at] = ph.at(co, rh - ky * s.dh, rw - kx * s.dw) as u32;
            val[at] = w.val[p];
            next[ci] += 1;
        }
    }
    let rows = SparseRows { start: &start, idx: &idx, val: &val };
    let work = sp.nnz() * n * batch;
    let (top, left) = (rh - s.pad[0], rw - s.pad[1]);
    for_each_chunk(batch, 1, work, Some(dx), xl, None, 0, |_, b, _, dxb, _| {
        let dxb = dxb.expect("input gradient of the sample");
        BUFS.with_borrow_mut(|(dq, out)| {
            ph.fill(&dy[b * yl..(b + 1) * yl], oh, ow, top, left, dq);
            out.resize(s.c_in * n, 0.0);
            (k.spmm)(rows, dq, 1, n, out, n, Store::Set);
            for (ci, plane) in dxb.chunks_exact_mut(s.h * s.w).enumerate() {
                for (iy, row) in plane.chunks_exact_mut(s.w).enumerate() {
                    for (d, &v) in row.iter_mut().zip(&out[ci * n + iy * ph.wq..][..s.w]) {
                        store.put(d, v);
                    }
                }
            }
        })
    });
}
