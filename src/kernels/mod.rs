//! Pure math on slices: the reference kernels, the fast path, and the choice between them.
//!
//! Activations are f32 in NCHW order. Weights arrive as [`Weights`]: int8 with one f32 scale
//! per output channel (dequantised while they are packed for the matrix kernel) or plain f32.
//! Every conv and linear kernel ends in a per-channel [`PostOp`] (`y = acc * mul + add`, then a
//! clamp), into which the plan folds bias, batch norm and ReLU/ReLU6.
//!
//! Two implementations of every op:
//! * [`reference`]: direct loops, obviously correct; the fallback, the test oracle, the doc.
//! * [`fast`]: im2col + packed GEMM ([`gemm`]; the micro-kernel is a per-ISA slot), the
//!   [`depthwise`] kernels and an int8 dot-product kernel for linear layers. Property tests hold
//!   it to the reference within 1e-4 relative.
//!
//! Training kernels live here too, so that each ISA compiles them: the depthwise backward
//! ([`depthwise::backward_inline`], slot `depthwise_backward`), held to the row-wise loop of
//! `train::ops::conv` in `train::ops::tests`; the sparse × dense product of masked training
//! ([`sparse::spmm_inline`], slot `spmm`), held to [`sparse::spmm_reference`]; and, on
//! AVX-512 only, a 3 × 3 conv weight gradient with output positions in the lanes (slot
//! `wgrad_rows`, [`WgradRowsFn`]), held to the definition in `train::ops::wgrad`.
//!
//! The choice is made once, in [`Kernels::detect`]: run-time CPU feature detection on std
//! (x86-64: AVX2+FMA, AVX-512F; aarch64: NEON); bare-metal builds select by the target's
//! compile-time features (aarch64 with NEON gets the NEON table, other targets the portable
//! one). `EDGECL_FORCE_GENERIC=1` selects the reference kernels.
//! Kernels never allocate: callers pass scratch sized by [`fast::conv_scratch_len`].
//!
//! With std, work large enough ([`PAR_MIN_WORK`]) goes to the rayon pool ([`for_each_chunk`]
//! and its kin, in `pool`); `busy` runs a training step on the pool with its other workers
//! polling for work rather than sleeping between the step's parallel regions.

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub mod aarch64;
pub mod depthwise;
pub mod fast;
pub mod gemm;
#[cfg(feature = "std")]
pub mod matmul;
mod pool;
pub mod reference;
pub mod sparse;
#[cfg(all(target_arch = "x86_64", feature = "std"))]
pub mod x86_64;

pub use pool::*;

/// Weights of one conv or linear layer, `[out][in/groups][kh][kw]` (or `[out][in]`).
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// `w[o][..] = scale[o] * q[o][..]`
    I8 {
        q: &'a [i8],
        scale: &'a [f32],
    },
    F32(&'a [f32]),
    /// A task's view of a layer (SupSup, ExSSNeT): see [`Masked`].
    Masked(Masked<'a>),
}

/// The weights a mask-based task sees in one layer: `base ⊙ mask`, where an overlay value
/// replaces the base value of every weight that both the mask and the overlay hold. Applied
/// row by row while weights are packed ([`Masked::row_into`]), so no dense copy exists.
#[derive(Clone, Copy, Debug)]
pub struct Masked<'a> {
    /// The backbone's weights: [`Weights::I8`] or [`Weights::F32`], never `Masked`.
    pub base: &'a Weights<'a>,
    /// One bit per weight in weight order, bit `i` is bit `i % 32` of word `i / 32`.
    pub mask: &'a [u32],
    /// Weights per output row (`in/groups · kh · kw`).
    pub row_len: usize,
    pub overlay: Option<Overlay<'a>>,
}

/// Trained values for a sparse set of weights (ExSSNeT's exclusive weights of a task chain).
#[derive(Clone, Copy, Debug)]
pub struct Overlay<'a> {
    /// Which weights have a value, as a bit vector like [`Masked::mask`].
    pub present: &'a [u32],
    /// Per output row, the number of `present` bits before the row's first weight.
    pub row_rank: &'a [u32],
    /// The values, in the order of the set bits of `present`.
    pub values: &'a [f32],
}

/// Bits `p .. p + 32` of a bit vector (zeros past its end).
#[inline(always)]
pub(crate) fn bits32(words: &[u32], p: usize) -> u32 {
    let (w, s) = (p / 32, p % 32);
    let lo = words.get(w).copied().unwrap_or(0) >> s;
    if s == 0 {
        lo
    } else {
        lo | words.get(w + 1).copied().unwrap_or(0) << (32 - s)
    }
}

impl Masked<'_> {
    /// Writes the effective weights of row `o`, columns `j0 .. j0 + dst.len()`.
    #[inline(always)]
    pub fn row_into(&self, o: usize, j0: usize, dst: &mut [f32]) {
        let start = o * self.row_len + j0;
        let n = dst.len();
        match *self.base {
            Weights::I8 { q, scale } => {
                let s = scale[o];
                masked_copy(self.mask, start, &q[start..start + n], dst, |v| v as f32 * s);
            }
            Weights::F32(w) => masked_copy(self.mask, start, &w[start..start + n], dst, |v| v),
            Weights::Masked(_) => unreachable!("a mask's base is plain backbone weights"),
        }
        self.overlay_into(o, j0, dst);
    }

    /// The overlay's part of [`Masked::row_into`]: puts the overlay values of row `o`,
    /// columns `j0 .. j0 + dst.len()`, whose mask bit is set, into `dst` (which holds the
    /// masked base weights). Shared with the per-ISA packing kernels.
    #[inline(always)]
    pub(crate) fn overlay_into(&self, o: usize, j0: usize, dst: &mut [f32]) {
        let start = o * self.row_len + j0;
        let n = dst.len();
        if let Some(ov) = &self.overlay {
            // Rank of the first weight of the segment, then walk the present bits in order.
            let row0 = o * self.row_len;
            let mut rank = ov.row_rank[o] as usize + count_ones(ov.present, row0, start);
            let mut p = start;
            while p < start + n {
                let mut bits = bits32(ov.present, p);
                let take = 32.min(start + n - p);
                if take < 32 {
                    bits &= (1u32 << take) - 1;
                }
                let m = bits32(self.mask, p);
                while bits != 0 {
                    let j = bits.trailing_zeros() as usize;
                    if m >> j & 1 != 0 {
                        dst[p - start + j] = ov.values[rank];
                    }
                    rank += 1;
                    bits &= bits - 1;
                }
                p += take;
            }
        }
    }
}

/// `dst[j] = f(src[j])` where bit `start + j` of `mask` is set, else 0. Whole groups of 8
/// multiply by the bit as a float (a shift, a convert and a multiply per lane, which the
/// compiler vectorises); a data-dependent branch per weight measured 3× slower packing.
#[inline(always)]
fn masked_copy<T: Copy>(mask: &[u32], start: usize, src: &[T], dst: &mut [f32], f: impl Fn(T) -> f32) {
    let (groups, tail) = dst.as_chunks_mut::<8>();
    let (sg, st) = src.as_chunks::<8>();
    for (g, (d, s)) in groups.iter_mut().zip(sg).enumerate() {
        let b = bits32(mask, start + g * 8);
        for j in 0..8 {
            d[j] = f(s[j]) * ((b >> j) & 1) as f32;
        }
    }
    let b = bits32(mask, start + groups.len() * 8);
    for (j, (d, &v)) in tail.iter_mut().zip(st).enumerate() {
        *d = if b >> j & 1 != 0 { f(v) } else { 0.0 };
    }
}

/// Set bits of `words` in positions `from .. to`.
#[inline]
pub fn count_ones(words: &[u32], from: usize, to: usize) -> usize {
    let mut n = 0;
    let mut p = from;
    while p < to {
        let take = 32.min(to - p);
        let b = bits32(words, p);
        n += (if take < 32 { b & ((1u32 << take) - 1) } else { b }).count_ones() as usize;
        p += take;
    }
    n
}

impl Weights<'_> {
    /// The effective weight at flat index `i` of output channel `o`.
    #[inline]
    pub fn get(&self, o: usize, i: usize) -> f32 {
        match self {
            Weights::I8 { q, scale } => scale[o] * q[i] as f32,
            Weights::F32(w) => w[i],
            Weights::Masked(m) => {
                let mut v = [0.0f32];
                m.row_into(o, i - o * m.row_len, &mut v);
                v[0]
            }
        }
    }

    /// The effective weights at flat indices `i .. i + dst.len()`, all of output channel `o`,
    /// into `dst`: [`Weights::get`] for a run, with one dispatch (a depthwise kernel's taps,
    /// fetched per channel block on planes of a few positions, made `get` 4 % of a training
    /// step).
    #[inline]
    pub fn run_into(&self, o: usize, i: usize, dst: &mut [f32]) {
        match self {
            Weights::I8 { q, scale } => {
                let n = dst.len();
                for (d, &v) in dst.iter_mut().zip(&q[i..i + n]) {
                    *d = scale[o] * v as f32;
                }
            }
            Weights::F32(w) => dst.copy_from_slice(&w[i..i + dst.len()]),
            Weights::Masked(m) => m.row_into(o, i - o * m.row_len, dst),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Weights::I8 { q, .. } => q.len(),
            Weights::F32(w) => w.len(),
            Weights::Masked(m) => m.base.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-output-channel epilogue: `y[c] = clamp(acc[c] * mul[c] + add[c], lo, hi)`.
#[derive(Clone, Copy, Debug)]
pub struct PostOp<'a> {
    pub mul: &'a [f32],
    pub add: &'a [f32],
    pub lo: f32,
    pub hi: f32,
}

impl PostOp<'_> {
    #[inline(always)]
    pub fn apply(&self, c: usize, acc: f32) -> f32 {
        clamp(acc * self.mul[c] + self.add[c], self.lo, self.hi)
    }
}

/// `lo ≤ v ≤ hi` by comparisons: compiles to one max and one min instruction, where
/// `f32::max`/`min` add NaN handling (measured: the compare-and-blend was the hottest
/// instruction of the depthwise kernel). A NaN passes through unchanged.
#[inline(always)]
pub fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi {
        hi
    } else {
        v
    }
}

/// How an instance of a portable kernel multiplies and adds. Rust never contracts `a * b + c`
/// into one instruction, and `f32::mul_add` is a slow library call where the CPU has no FMA
/// (and is not in `core`), so the choice is a type parameter: ISA instances compiled with FMA
/// use [`Fused`], the baseline uses [`Plain`].
pub trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a * b + c`, two roundings.
pub struct Plain;

impl MulAdd for Plain {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `a * b + c` fused, one rounding: only for instances compiled with FMA.
#[cfg(feature = "std")]
pub struct Fused;

#[cfg(feature = "std")]
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Activation fused into a post-op, as clamp bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Relu6,
}

impl Act {
    pub fn bounds(self) -> (f32, f32) {
        match self {
            Act::None => (f32::NEG_INFINITY, f32::INFINITY),
            Act::Relu => (0.0, f32::INFINITY),
            Act::Relu6 => (0.0, 6.0),
        }
    }
}

/// Geometry of a 2-D convolution on one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    /// top, left, bottom, right
    pub pad: [usize; 4],
    pub dh: usize,
    pub dw: usize,
    pub groups: usize,
}

impl ConvShape {
    /// A one-group `k × k` conv of `c_in` channels of `h × w` to `c_out`, with the same stride
    /// and padding on every side and no dilation: the tests' shape, varied by struct update.
    #[cfg(test)]
    pub(crate) fn square(c_in: usize, h: usize, w: usize, c_out: usize, k: usize, stride: usize, pad: usize) -> Self {
        ConvShape { c_in, h, w, c_out, kh: k, kw: k, sh: stride, sw: stride, pad: [pad; 4], dh: 1, dw: 1, groups: 1 }
    }

    /// Output height and width, or `None` if the window does not fit even once.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let eh = self.dh * (self.kh - 1) + 1;
        let ew = self.dw * (self.kw - 1) + 1;
        let ph = self.h + self.pad[0] + self.pad[2];
        let pw = self.w + self.pad[1] + self.pad[3];
        if ph < eh || pw < ew {
            return None;
        }
        Some(((ph - eh) / self.sh + 1, (pw - ew) / self.sw + 1))
    }
    pub fn oh(&self) -> usize {
        self.out_hw().map_or(0, |d| d.0)
    }
    pub fn ow(&self) -> usize {
        self.out_hw().map_or(0, |d| d.1)
    }
    pub fn cin_g(&self) -> usize {
        self.c_in / self.groups
    }
    pub fn cout_g(&self) -> usize {
        self.c_out / self.groups
    }
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.c_in && self.c_out == self.c_in
    }
    /// Multiply-accumulates per sample.
    pub fn macs(&self) -> usize {
        self.c_out * self.oh() * self.ow() * self.cin_g() * self.kh * self.kw
    }
}

/// A GEMM micro-kernel with its epilogue: `c[i * ldc + j] = ep(i, Σ_p a[i * lda + p] · b[p][j])`
/// for `i < mr`, `j < nr`, `p < k`; `b` is one packed `[k][nr]` panel. Applying the post-op
/// while the tile is in registers and storing straight into C saves a round trip through a
/// stack tile (measured: that epilogue loop was most of `gemm_rows` outside the kernel).
pub type MicroKernelFn = fn(k: usize, a: &[f32], lda: usize, b: &[f32], ep: &TileEpilogue, c: &mut [f32], ldc: usize);

/// Largest `mr` of any micro-kernel.
pub const MAX_MR: usize = 12;

/// The post-op of the `mr` rows of one micro-kernel tile: `clamp(acc * mul[i] + add[i], lo, hi)`.
#[derive(Clone, Copy, Debug)]
pub struct TileEpilogue {
    pub mul: [f32; MAX_MR],
    pub add: [f32; MAX_MR],
    pub lo: f32,
    pub hi: f32,
}

impl TileEpilogue {
    /// Stores the plain sum: scale 1, no offset, no clamp.
    pub const IDENTITY: TileEpilogue =
        TileEpilogue { mul: [1.0; MAX_MR], add: [0.0; MAX_MR], lo: f32::NEG_INFINITY, hi: f32::INFINITY };

    #[inline(always)]
    pub fn apply(&self, i: usize, acc: f32) -> f32 {
        clamp(acc * self.mul[i] + self.add[i], self.lo, self.hi)
    }
}

/// A convolution on one sample (see [`fast::conv2d`]).
pub type ConvFn = fn(&Kernels, &ConvShape, Weights, &[f32], &mut [f32], &PostOp, &mut [f32]);
/// A linear layer on one sample (see [`fast::linear`]).
pub type LinearFn = fn(&Kernels, usize, usize, Weights, &[f32], &mut [f32], &PostOp);
/// One thread's block of GEMM rows (see [`gemm::gemm_rows_inline`]).
pub type GemmRowsFn = fn(&MicroKernel, usize, usize, Weights, usize, &[f32], &mut [f32], &PostOp, &mut [f32]);
/// One thread's block of depthwise channels (see [`depthwise::depthwise_channels_inline`]).
pub type DepthwiseFn = fn(&ConvShape, Weights, usize, &[f32], &mut [f32], &PostOp);
/// The depthwise backward on one sample (see [`depthwise::backward_inline`]).
pub type DepthwiseBackwardFn =
    fn(&ConvShape, &[f32], &[f32], &[f32], Option<(&mut [f32], Store)>, Option<&mut [f32]>, &mut [f32]);

/// A sparse × dense product (see [`sparse::spmm_inline`]).
pub type SpmmFn = fn(sparse::SparseRows, &[f32], usize, sparse::Runs, &mut [f32], usize, Store);

/// Part of a 3 × 3 stride-1 conv's weight gradient with the output positions in the lanes
/// (training's `wgrad::weight_grad_rows`): `(rows, samples, x, x_stride, off, d, d_stride,
/// acc)` adds, for every sample `b < samples`, row `r < rows.rows`, position `j <
/// rows.width` and tap `t`, `x[b·x_stride + off[t] + r·rows.x_row + j] · d[h][b·d_stride +
/// r·rows.d_row + j]` into `acc[9·h + t][j mod 16]`: one input channel's nine taps against
/// two output channels' gradients, summed per lane, samples and rows in order. A row goes in
/// whole vectors: `x` holds up to 15 floats past a row's last position (they meet zero lanes
/// of `d`); `d` is read only at the positions named.
pub type WgradRowsFn = fn(WgradRows, usize, &[f32], usize, &[usize; 9], [&[f32]; 2], usize, &mut [[f32; 16]; 18]);

/// The output positions [`WgradRowsFn`] walks per sample: `rows` rows of `width`, row `r`
/// starting `r·x_row` floats into the input and `r·d_row` into the output gradient.
#[derive(Clone, Copy, Debug)]
pub struct WgradRows {
    pub rows: usize,
    pub width: usize,
    pub x_row: usize,
    pub d_row: usize,
}

/// How a backward function (training's, `train::ops`, and [`depthwise::backward_inline`])
/// stores an input gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Added to what the buffer holds.
    Add,
    /// Written over the buffer, as `0 + v`: the bits adding onto a zeroed buffer gives (a
    /// −0 stays +0), without zeroing it first (that zeroing was 4 % of a Lite0 CLR step).
    Set,
}

impl Store {
    #[inline(always)]
    pub fn put(self, d: &mut f32, v: f32) {
        match self {
            Store::Add => *d += v,
            Store::Set => *d = 0.0 + v,
        }
    }
}
/// One thread's block of linear-layer rows (see [`fast::linear_rows_inline`]).
pub type LinearRowsFn = fn(usize, usize, Weights, &[f32], &mut [f32], &PostOp);

/// A micro-kernel and its tile size.
#[derive(Clone, Copy)]
pub struct MicroKernel {
    pub name: &'static str,
    pub mr: usize,
    pub nr: usize,
    pub run: MicroKernelFn,
}

/// The kernel table, built once and passed down. `Copy`, so it costs nothing to hand around.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// `false`: the reference kernels for every op.
    pub fast: bool,
    /// What the fast path's portable code was compiled for, e.g. `baseline` or `avx2+fma`.
    pub isa: &'static str,
    pub micro: MicroKernel,
    /// A micro-kernel with `micro`'s rows and half its lanes, for a product whose last panel
    /// has at most that many columns: 20 output channels in 16-lane panels leave 12 of 32
    /// lanes unused, and 4 of 24 with it. Its B panels are `nr`-wide in its own `nr`.
    pub micro_narrow: Option<MicroKernel>,
    /// Micro-kernels with fewer rows than `micro`, for a product's last row panel when they
    /// hold it, fewest rows first; each has the B panel width of `micro` or `micro_narrow`.
    /// Twenty rows in panels of 6 leave 4 of 24 rows unused; with a 2-row kernel for the last
    /// two, none.
    pub micro_short: &'static [MicroKernel],
    /// Drivers (im2col, packing) and the leaf kernels that threads run. Each ISA compiles
    /// the same portable code with its own features, so every slot is vectorised for it.
    pub conv2d: ConvFn,
    pub linear: LinearFn,
    pub gemm_rows: GemmRowsFn,
    pub depthwise: DepthwiseFn,
    pub linear_rows: LinearRowsFn,
    /// Training only (the forward kernels' tables carry them so that each ISA compiles them).
    pub depthwise_backward: DepthwiseBackwardFn,
    pub spmm: SpmmFn,
    /// Where the ISA has one (AVX-512): a conv weight gradient with positions in the lanes,
    /// for output channels too few to fill a micro-kernel's lanes.
    pub wgrad_rows: Option<WgradRowsFn>,
}

impl core::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Kernels")
            .field("fast", &self.fast)
            .field("isa", &self.isa)
            .field("micro", &self.micro.name)
            .finish()
    }
}

impl Kernels {
    /// The portable tables: reference loops, or the fast path with the portable micro-kernel.
    pub const fn generic(fast: bool) -> Self {
        Kernels {
            fast,
            isa: "baseline",
            micro: gemm::GENERIC_MICRO,
            micro_narrow: Some(gemm::GENERIC_NARROW),
            micro_short: &[],
            conv2d: fast::conv2d,
            linear: fast::linear,
            gemm_rows: gemm::gemm_rows,
            depthwise: depthwise::depthwise_channels,
            linear_rows: fast::linear_rows,
            depthwise_backward: depthwise::backward,
            spmm: sparse::spmm,
            wgrad_rows: None,
        }
    }

    /// The best kernels for this CPU. On std, `EDGECL_FORCE_GENERIC=1` forces the reference.
    pub fn detect() -> Self {
        #[cfg(feature = "std")]
        if std::env::var_os("EDGECL_FORCE_GENERIC").is_some_and(|v| v == "1") {
            return Self::generic(false);
        }
        Self::best_fast()
    }

    /// The fast path with the best micro-kernel for this CPU.
    pub fn best_fast() -> Self {
        #[cfg(all(target_arch = "x86_64", feature = "std"))]
        if let Some(k) = x86_64::detect() {
            return k;
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        if let Some(k) = aarch64::detect() {
            return k;
        }
        Self::generic(true)
    }

    /// Every table this CPU can run (the portable ones first, the best last), for tests and
    /// benchmarks that hold each against the reference.
    #[cfg(feature = "std")]
    pub fn available() -> std::vec::Vec<Self> {
        #[allow(unused_mut)]
        let mut out = std::vec![Self::generic(false), Self::generic(true)];
        #[cfg(target_arch = "x86_64")]
        out.extend(x86_64::available());
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        out.extend(aarch64::available());
        out
    }

    /// One line per kernel slot, for `edgecl kernels`.
    pub fn describe(&self) -> [(&'static str, &'static str); 5] {
        if self.fast {
            #[allow(unused_mut)]
            let (mut conv2d, mut depthwise, mut linear) = (
                "im2col + GEMM",
                "8 channels per vector on small planes, unrolled 3x3/5x5, else row-wise",
                "int8 dot product, 8 lanes",
            );
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            if self.isa == aarch64::ISA {
                (conv2d, depthwise, linear) = (aarch64::CONV2D, aarch64::DEPTHWISE, aarch64::LINEAR);
            }
            [
                ("conv2d", conv2d),
                ("gemm micro-kernel", self.micro.name),
                ("depthwise", depthwise),
                ("linear", linear),
                ("compiled for", self.isa),
            ]
        } else {
            [
                ("conv2d", "reference (direct loops)"),
                ("gemm micro-kernel", "unused"),
                ("depthwise", "reference (direct loops)"),
                ("linear", "reference (direct loops)"),
                ("compiled for", "baseline"),
            ]
        }
    }
}
