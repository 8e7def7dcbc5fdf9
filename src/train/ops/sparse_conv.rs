//! Direct sparse convolution (one group) for masked training: the forward pass and the input
//! gradient, with no unfolded input. The stride phases it reads its input from ([`Phases`])
//! serve the dense weight gradients of [`super::wgrad`] too.
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
use crate::kernels::matmul::{copy_short, zero_short};
use crate::kernels::sparse::{Runs, SparseRows};
use crate::kernels::{ConvShape, Kernels, Store};

/// Zeros past a phase buffer's end: the product runs over a multiple of 16 columns, up to 15
/// past the last one used.
const TAIL: usize = 16;

/// One sample's tensor (`c × h × w`), zero-padded and split into stride phases: padded row `r`,
/// column `q` of channel `ch` lives in phase `(r mod sh, q mod sw)` at row `r / sh`, column
/// `q / sw` of a `hq × wq` plane. Only the phases some tap reads are filled (`taps`: the
/// kernel's `(kh, dh)` and `(kw, dw)`; a 1 × 1 stride-2 conv reads one phase of four).
#[derive(Clone, Copy)]
pub(super) struct Phases {
    pub(super) c: usize,
    pub(super) hq: usize,
    pub(super) wq: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    pub(super) taps: [(usize, usize); 2],
}

impl Phases {
    /// The phases of a conv's input: padded by the conv's padding, split by its strides.
    pub(super) fn of_input(s: &ConvShape) -> Phases {
        Phases {
            c: s.c_in,
            hq: (s.h + s.pad[0] + s.pad[2]).div_ceil(s.sh),
            wq: (s.w + s.pad[1] + s.pad[3]).div_ceil(s.sw),
            sh: s.sh,
            sw: s.sw,
            taps: [(s.kh, s.dh), (s.kw, s.dw)],
        }
    }

    pub(super) fn len(&self) -> usize {
        self.sh * self.sw * self.c * self.hq * self.wq + TAIL
    }

    pub(super) fn at(&self, ch: usize, r: usize, q: usize) -> usize {
        let phase = (r % self.sh) * self.sw + q % self.sw;
        ((phase * self.c + ch) * self.hq + r / self.sh) * self.wq + q / self.sw
    }

    /// `out` ← `x` (`c × h × w`) placed at padded row `top`, column `left`, zeros around it,
    /// in the phases a tap reads; each of their elements is written once. The others keep
    /// what they held: nothing reads them except product columns that are never used.
    pub(super) fn fill(&self, x: &[f32], h: usize, w: usize, top: usize, left: usize, out: &mut Vec<f32>) {
        out.resize(self.len(), 0.0);
        self.fill_slice(x, h, w, top, left, out);
    }

    /// [`Phases::fill`] into the first [`Phases::len`] floats of `out`.
    pub(super) fn fill_slice(&self, x: &[f32], h: usize, w: usize, top: usize, left: usize, out: &mut [f32]) {
        let (c, hq, wq, sh, sw) = (self.c, self.hq, self.wq, self.sh, self.sw);
        let plane = hq * wq;
        let read = |p: usize, (k, d): (usize, usize), s: usize| (0..k).any(|t| (t * d) % s == p);
        for py in (0..sh).filter(|&py| read(py, self.taps[0], sh)) {
            for px in (0..sw).filter(|&px| read(px, self.taps[1], sw)) {
                // Plane columns `lo .. hi` hold input columns `ix0, ix0 + sw, …`.
                let lo = left.saturating_sub(px).div_ceil(sw).min(wq);
                let hi = (w + left).saturating_sub(px).div_ceil(sw).clamp(lo, wq);
                let ix0 = (lo * sw + px).wrapping_sub(left);
                for ch in 0..c {
                    let dst = &mut out[((py * sw + px) * c + ch) * plane..][..plane];
                    for (rq, row) in dst.chunks_exact_mut(wq).enumerate() {
                        match (rq * sh + py).checked_sub(top).filter(|&iy| iy < h && lo < hi) {
                            Some(iy) => {
                                let src = &x[(ch * h + iy) * w + ix0..];
                                zero_short(&mut row[..lo]);
                                if sw == 1 {
                                    copy_short(&mut row[lo..hi], src);
                                } else if sw == 2 {
                                    take_even(&mut row[lo..hi], src);
                                } else {
                                    for (d, &v) in row[lo..hi].iter_mut().zip(src.iter().step_by(sw)) {
                                        *d = v;
                                    }
                                }
                                zero_short(&mut row[hi..]);
                            }
                            None => zero_short(row),
                        }
                    }
                }
            }
        }
        out[sh * sw * c * plane..self.len()].fill(0.0);
    }
}

/// `dst[i] ← src[2·i]`: one stride-2 phase's run of an input row. The step-by iterator this
/// replaces was a scalar loop with a check per element: the phases of GEMResNet18's stride-2
/// convs took 1.1–1.6 ms per batch of 64 to fill, a third of their weight gradient.
#[inline(always)]
fn take_even(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    // The last element's pair may end past `src` (the input's last column): then it goes alone.
    let pairs = if src.len() >= 2 * n { n } else { n.saturating_sub(1) };
    let (body, last) = dst.split_at_mut(pairs);
    if let Some(d) = last.first_mut() {
        *d = src[2 * pairs];
    }
    let (dc, dt) = body.as_chunks_mut::<8>();
    let (sc, st) = src[..2 * pairs].as_chunks::<16>();
    for (d, s) in dc.iter_mut().zip(sc) {
        for (i, d) in d.iter_mut().enumerate() {
            *d = s[2 * i];
        }
    }
    for (d, s) in dt.iter_mut().zip(st.chunks_exact(2)) {
        *d = s[0];
    }
}

std::thread_local! {
    /// A sample's phases and the product's result, kept between calls.
    static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Fills this thread's kept buffers with NaN: what a call leaves unwritten must not reach a
/// result (the phases no tap reads, for one).
#[cfg(test)]
pub(super) fn poison_buffers() {
    BUFS.with_borrow_mut(|(a, b)| {
        for v in [a, b] {
            v.clear();
            v.resize(1 << 20, f32::NAN);
        }
    })
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
    let ph = Phases::of_input(s);
    let n = ((oh - 1) * ph.wq + ow).next_multiple_of(TAIL);
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
    let nb = samples_per_job(n);
    for_each_chunk(batch, nb, work, Some(y), yl, None, 0, |_, b0, nbs, yc, _| {
        let yc = yc.expect("output samples");
        BUFS.with_borrow_mut(|(xq, out)| {
            let pl = ph.len();
            xq.resize(nbs * pl, 0.0);
            for (b, xb) in (b0..b0 + nbs).zip(xq.chunks_exact_mut(pl)) {
                ph.fill_slice(&x[b * xl..(b + 1) * xl], s.h, s.w, s.pad[0], s.pad[1], xb);
            }
            product(k, taps, (xq, pl, nbs), (oh, ow, ph.wq), n, yc, Store::Set, out);
        });
        if let Some(bias) = bias {
            for (plane, &add) in yc.chunks_exact_mut(oh * ow).zip(bias.iter().cycle()) {
                plane.iter_mut().for_each(|v| *v += add);
            }
        }
    });
}

/// Samples per job of the sparse products over `n` columns: two where a sample's product is
/// one block of two vectors (a 4 × 4 plane's 22 columns in 32), whose sums each wait on the
/// latency of the previous nonzero's add; the two samples' blocks then run side by side.
fn samples_per_job(n: usize) -> usize {
    if n <= 32 {
        2
    } else {
        1
    }
}

/// `c ← a · b` (by `store`) of `samples` samples, `b`'s `bs` floats apart and `c`'s
/// `a.rows()·h·w`: rows of `a` are the planes of `c` (`h × w` each), and a plane's row `y` is
/// columns `y·wq .. y·wq + w` of the product over the sample's `n` columns of `b` (its `wq −
/// w` others are not wanted). Rows a whole number of vectors wide go straight into `c`
/// ([`Runs`]); others run over all `n` columns into `out` (blocks of up to 96 columns; an 8 ×
/// 8 plane's 80 as one), and are copied from there.
#[allow(clippy::too_many_arguments)]
fn product(
    k: &Kernels,
    a: SparseRows,
    (b, bs, samples): (&[f32], usize, usize),
    (h, w, wq): (usize, usize, usize),
    n: usize,
    c: &mut [f32],
    store: Store,
    out: &mut Vec<f32>,
) {
    let cl = a.rows() * h * w;
    if w % 16 == 0 {
        for (bb, cb) in b.chunks(bs).zip(c.chunks_exact_mut(cl)).take(samples) {
            (k.spmm)(a, bb, 1, Runs { width: w, count: h, b_step: wq, c_step: w }, cb, h * w, store);
        }
        return;
    }
    // Sample `i`'s sums are columns `i·n ..` of each row of `out`.
    out.resize(a.rows() * samples * n, 0.0);
    (k.spmm)(a, b, 1, Runs { width: n, count: samples, b_step: bs, c_step: n }, out, samples * n, Store::Set);
    for (i, cb) in c.chunks_exact_mut(cl).take(samples).enumerate() {
        for (plane, sums) in cb.chunks_exact_mut(h * w).zip(out.chunks_exact(samples * n)) {
            for (row, sums) in plane.chunks_exact_mut(w).zip(sums[i * n..(i + 1) * n].chunks(wq)) {
                for (d, &v) in row.iter_mut().zip(sums) {
                    store.put(d, v);
                }
            }
        }
    }
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
    let ph = Phases { c: s.c_out, hq: s.h + rh, wq: s.w + rw, sh: 1, sw: 1, taps: [(1, 1); 2] };
    let n = ((s.h - 1) * ph.wq + s.w).next_multiple_of(TAIL);
    // Each entry at its flipped tap's offset.
    let by_ci = ByInputChannel::new(sp, s, |co, ky, kx| Some(ph.at(co, rh - ky * s.dh, rw - kx * s.dw)));
    let rows = by_ci.rows();
    let work = sp.nnz() * n * batch;
    let (top, left) = (rh - s.pad[0], rw - s.pad[1]);
    let nb = samples_per_job(n);
    for_each_chunk(batch, nb, work, Some(dx), xl, None, 0, |_, b0, nbs, dxc, _| {
        let dxc = dxc.expect("input gradients of the samples");
        BUFS.with_borrow_mut(|(dq, out)| {
            let pl = ph.len();
            dq.resize(nbs * pl, 0.0);
            for (b, db) in (b0..b0 + nbs).zip(dq.chunks_exact_mut(pl)) {
                ph.fill_slice(&dy[b * yl..(b + 1) * yl], oh, ow, top, left, db);
            }
            product(k, rows, (dq, pl, nbs), (s.h, s.w, ph.wq), n, dxc, store, out);
        })
    });
}

/// Whether [`backward_dx_phases`] takes `s`: one group, a stride above 1 in some direction
/// (stride 1 goes to [`backward_dx`]), a kernel larger than 1 × 1, and an output plane of at
/// least 64 positions. Measured on GEMResNet18's stride-2 convs (AVX-512, one thread, batch
/// 64), against the unfolded path: 3 × 3 from 32 × 32, 3.5 → 1.8 ms; from 16 × 16, 1.6 → 1.3
/// ms; but from 8 × 8 (a 4 × 4 output), 1.5 → 2.0 ms, and 1 × 1 (three phases of four zero,
/// stored element by element) 0.85 → 1.3 ms.
pub(super) fn backward_dx_phases_supported(s: &ConvShape) -> bool {
    s.groups == 1 && (s.sh > 1 || s.sw > 1) && s.kh * s.kw > 1 && s.oh() * s.ow() >= 64
}

/// `dx` (stored by `store`) of a strided one-group conv with sparse weights, given `dy`, by
/// stride phases: padded input row `r` is `oy·sh + ky·dh`, so the rows of phase
/// `py = r mod sh` take only the taps with `ky·dh ≡ py`, each at row `r div sh = oy + a` with
/// `a = ky·dh div sh` (columns alike). Per phase, `dx` is then a stride-1 sparse product over
/// `dy` padded by the largest `a` (and `b`) on top (and left), with rows the input channels
/// and entries `(co, tap)`, as in [`backward_dx`]; each element of `dx` lies in exactly one
/// phase and is stored once. The path it replaces multiplied into an unfolded gradient
/// (`c_in·kh·kw` floats per output position) and folded that back, a pass over memory ten
/// times the size of `dx` (GEMResNet18's stride-2 convs).
pub(super) fn backward_dx_phases(
    k: &Kernels,
    s: &ConvShape,
    sp: &SparseW,
    dy: &[f32],
    batch: usize,
    dx: &mut [f32],
    store: Store,
) {
    debug_assert!(backward_dx_phases_supported(s));
    let (oh, ow) = (s.oh(), s.ow());
    let (xl, yl) = (s.c_in * s.h * s.w, s.c_out * oh * ow);
    let (sh, sw) = (s.sh, s.sw);
    // Phase planes: padded rows `0 .. hp` split by the stride.
    let (hp, wp) = (s.h + s.pad[0] + s.pad[2], s.w + s.pad[1] + s.pad[3]);
    let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
    // The output gradient padded by the largest tap offsets within a phase.
    let (a_max, b_max) = (((s.kh - 1) * s.dh) / sh, ((s.kw - 1) * s.dw) / sw);
    let dq = Phases { c: s.c_out, hq: hq + a_max, wq: wq + b_max, sh: 1, sw: 1, taps: [(1, 1); 2] };
    let row = dq.wq;
    let n = ((hq - 1) * row + wq).next_multiple_of(TAIL);
    // Per phase: the entries of the taps that land on it, each at its offset into the padded
    // gradient.
    let phases: Vec<Phase> = (0..sh * sw)
        .map(|phase| {
            let (py, px) = (phase / sw, phase % sw);
            let by_ci = ByInputChannel::new(sp, s, |co, ky, kx| {
                let (ry, rx) = (ky * s.dh, kx * s.dw);
                (ry % sh == py && rx % sw == px).then(|| dq.at(co, a_max - ry / sh, b_max - rx / sw))
            });
            Phase { py, px, by_ci }
        })
        .collect();
    let work = sp.nnz() * n * batch;
    for_each_chunk(batch, 1, work, Some(dx), xl, None, 0, |_, b, _, dxb, _| {
        let dxb = dxb.expect("input gradient of the sample");
        BUFS.with_borrow_mut(|(dyq, out)| {
            dq.fill(&dy[b * yl..(b + 1) * yl], oh, ow, a_max, b_max, dyq);
            out.resize(s.c_in * n, 0.0);
            for Phase { py, px, by_ci } in &phases {
                // A phase no tap reaches (three of four for a 1 × 1 stride-2 conv) is zero.
                let empty = by_ci.idx.is_empty();
                if empty && store == Store::Add {
                    continue;
                }
                if !empty {
                    (k.spmm)(by_ci.rows(), dyq, 1, Runs::one(n), out, n, Store::Set);
                }
                // Phase rows `rq` hold padded rows `rq·sh + py`; those inside the input are
                // rows `rq·sh + py − top` of dx (columns alike).
                let (top, left) = (s.pad[0], s.pad[1]);
                let rq0 = top.saturating_sub(*py).div_ceil(sh);
                let qq0 = left.saturating_sub(*px).div_ceil(sw);
                for (ci, plane) in dxb.chunks_exact_mut(s.h * s.w).enumerate() {
                    let src = &out[ci * n..(ci + 1) * n];
                    for rq in rq0..hq {
                        let iy = rq * sh + py - top;
                        if iy >= s.h {
                            break;
                        }
                        let drow = &mut plane[iy * s.w..(iy + 1) * s.w];
                        for qq in qq0..wq {
                            let ix = qq * sw + px - left;
                            if ix >= s.w {
                                break;
                            }
                            store.put(&mut drow[ix], if empty { 0.0 } else { src[rq * row + qq] });
                        }
                    }
                }
            }
        })
    });
}

/// One stride phase of [`backward_dx_phases`]: its row and column phase, and the sparse rows
/// (input channels) of the taps that reach it.
struct Phase {
    py: usize,
    px: usize,
    by_ci: ByInputChannel,
}

/// A conv's sparse weights regrouped by input channel, the rows of an input-gradient product:
/// the entries `offset(co, ky, kx)` keeps, each with the offset it gives (a counting sort:
/// output channels ascending within a row, each output channel's taps in order).
struct ByInputChannel {
    start: Vec<u32>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl ByInputChannel {
    fn new(sp: &SparseW, s: &ConvShape, offset: impl Fn(usize, usize, usize) -> Option<usize>) -> Self {
        let (w, taps) = (sp.w(), s.kh * s.kw);
        // Each entry as (input channel, offset), in W's order.
        let kept = |co: usize, p: usize| {
            let (ci, t) = (w.idx[p] as usize / taps, w.idx[p] as usize % taps);
            offset(co, t / s.kw, t % s.kw).map(|at| (ci, at))
        };
        let entries =
            || (0..s.c_out).flat_map(|co| (w.start[co] as usize..w.start[co + 1] as usize).map(move |p| (co, p)));
        let mut start = vec![0u32; s.c_in + 1];
        for (ci, _) in entries().filter_map(|(co, p)| kept(co, p)) {
            start[ci + 1] += 1;
        }
        for ci in 0..s.c_in {
            start[ci + 1] += start[ci];
        }
        let mut next = start.clone();
        let len = start[s.c_in] as usize;
        let (mut idx, mut val) = (vec![0u32; len], vec![0.0f32; len]);
        for (co, p) in entries() {
            if let Some((ci, at)) = kept(co, p) {
                let j = next[ci] as usize;
                (idx[j], val[j]) = (at as u32, w.val[p]);
                next[ci] += 1;
            }
        }
        ByInputChannel { start, idx, val }
    }

    fn rows(&self) -> SparseRows<'_> {
        SparseRows { start: &self.start, idx: &self.idx, val: &self.val }
    }
}
