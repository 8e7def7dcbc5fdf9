//! x86-64 kernels, chosen at run time by CPU feature detection.
//!
//! With AVX2 and FMA: a 6 × 16 GEMM micro-kernel (12 ymm accumulators, 2 ymm of B and one
//! broadcast of A per step, the classic register blocking for 16 vector registers), and the
//! portable fast path compiled a second time with those features enabled, so that the compiler
//! vectorises im2col, packing, depthwise and the dot products 8 lanes wide with fused
//! multiply-adds. Everything here is tested against the reference kernels.
#![allow(unsafe_code)]

use super::sparse::{self, Runs, SparseRows};
use super::{depthwise, fast, gemm, ConvShape, Kernels, MicroKernel, PostOp, Store, TileEpilogue, Weights};

mod wgrad;

/// The best table this CPU runs: AVX2 + FMA, with the 512-bit GEMM micro-kernel when
/// AVX-512F is present too.
pub fn detect() -> Option<Kernels> {
    available().pop()
}

/// Every x86-64 table this CPU can run, best last (the tests check each one).
pub fn available() -> Vec<Kernels> {
    let mut out = Vec::new();
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        out.push(avx2(AVX2_MICRO, Some(AVX2_NARROW), &[AVX2_SHORT, AVX2_SHORT_NARROW]));
        if std::arch::is_x86_feature_detected!("avx512f") {
            out.push(Kernels {
                spmm: spmm_512,
                wgrad_rows: Some(wgrad::rows),
                ..avx2(AVX512_MICRO, None, &AVX512_SHORT)
            });
        }
    }
    out
}

fn avx2(micro: MicroKernel, micro_narrow: Option<MicroKernel>, micro_short: &'static [MicroKernel]) -> Kernels {
    {
        Kernels {
            fast: true,
            isa: "x86_64 avx2+fma",
            micro,
            micro_narrow,
            micro_short,
            conv2d,
            linear,
            gemm_rows,
            depthwise,
            linear_rows,
            depthwise_backward,
            spmm,
            wgrad_rows: None,
        }
    }
}

// Each slot: a safe wrapper for the table, and the portable body compiled with AVX2 + FMA.
// SAFETY (every wrapper below): only reachable through the table that `detect` returns after
// checking AVX2 and FMA, so the target features the callee assumes are present.

fn conv2d(k: &Kernels, s: &ConvShape, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp, scratch: &mut [f32]) {
    unsafe { conv2d_avx2(k, s, w, x, y, post, scratch) }
}
#[target_feature(enable = "avx2,fma")]
fn conv2d_avx2(k: &Kernels, s: &ConvShape, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp, scratch: &mut [f32]) {
    fast::conv2d_inline(k, s, w, x, y, post, scratch)
}

fn linear(k: &Kernels, i: usize, o: usize, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    unsafe { linear_avx2(k, i, o, w, x, y, post) }
}
#[target_feature(enable = "avx2,fma")]
fn linear_avx2(k: &Kernels, i: usize, o: usize, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    fast::linear_inline(k, i, o, w, x, y, post)
}

#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    m: &MicroKernel,
    n: usize,
    k: usize,
    w: Weights,
    r0: usize,
    b: &[f32],
    c: &mut [f32],
    post: &PostOp,
    ap: &mut [f32],
) {
    unsafe { gemm_rows_avx2(m, n, k, w, r0, b, c, post, ap) }
}
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
fn gemm_rows_avx2(
    m: &MicroKernel,
    n: usize,
    k: usize,
    w: Weights,
    r0: usize,
    b: &[f32],
    c: &mut [f32],
    post: &PostOp,
    ap: &mut [f32],
) {
    gemm::gemm_rows_inline(m, n, k, w, r0, b, c, post, ap)
}

fn depthwise(s: &ConvShape, w: Weights, c0: usize, x: &[f32], y: &mut [f32], post: &PostOp) {
    unsafe { depthwise_avx2(s, w, c0, x, y, post) }
}
#[target_feature(enable = "avx2,fma")]
fn depthwise_avx2(s: &ConvShape, w: Weights, c0: usize, x: &[f32], y: &mut [f32], post: &PostOp) {
    depthwise::depthwise_channels_inline::<Avx2Fma>(s, w, c0, x, y, post)
}

fn depthwise_backward(
    s: &ConvShape,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    dx: Option<(&mut [f32], Store)>,
    dw: Option<&mut [f32]>,
    scratch: &mut [f32],
) {
    unsafe { depthwise_backward_avx2(s, w, x, dy, dx, dw, scratch) }
}
#[target_feature(enable = "avx2,fma")]
fn depthwise_backward_avx2(
    s: &ConvShape,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    dx: Option<(&mut [f32], Store)>,
    dw: Option<&mut [f32]>,
    scratch: &mut [f32],
) {
    depthwise::backward_inline::<Avx2Fma>(s, w, x, dy, dx, dw, scratch)
}

fn spmm(a: SparseRows, b: &[f32], ldb: usize, runs: Runs, c: &mut [f32], ldc: usize, store: Store) {
    unsafe { spmm_avx2(a, b, ldb, runs, c, ldc, store) }
}
#[target_feature(enable = "avx2,fma")]
fn spmm_avx2(a: SparseRows, b: &[f32], ldb: usize, runs: Runs, c: &mut [f32], ldc: usize, store: Store) {
    sparse::spmm_inline(a, b, ldb, runs, c, ldc, store)
}

/// The sparse product 16 lanes wide: half the multiplies and adds of the AVX2 build per
/// nonzero, same bits (no fused multiply-add in either). Only reachable through the table
/// [`available`] builds after checking AVX-512F.
fn spmm_512(a: SparseRows, b: &[f32], ldb: usize, runs: Runs, c: &mut [f32], ldc: usize, store: Store) {
    unsafe { spmm_avx512(a, b, ldb, runs, c, ldc, store) }
}
#[target_feature(enable = "avx512f,avx2,fma")]
fn spmm_avx512(a: SparseRows, b: &[f32], ldb: usize, runs: Runs, c: &mut [f32], ldc: usize, store: Store) {
    sparse::spmm_inline(a, b, ldb, runs, c, ldc, store)
}

/// The depthwise kernels' inner loops with AVX2 + FMA intrinsics: left to itself, the
/// compiler rebuilds the overlapping unaligned loads of neighbouring taps from shuffles and
/// spills the weights (measured: the blocked 3×3 stride-1 path ran at half the speed).
/// Only named inside [`depthwise_avx2`], which the table reaches after checking AVX2 and FMA.
struct Avx2Fma;

impl super::MulAdd for Avx2Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl depthwise::DwInner for Avx2Fma {
    #[inline(always)]
    fn strip<const K: usize, const R: usize>(
        rows: &[&[f32]; K],
        col: &[usize; K],
        wk: &[[f32; K]; K],
        o: usize,
        ep: &depthwise::Epilogue,
        dst: &mut [f32],
    ) {
        let reach = o + col.iter().max().map_or(0, |&c| c) + R * depthwise::LANES;
        assert!(rows.iter().all(|r| r.len() >= reach) && dst.len() >= R * depthwise::LANES);
        // SAFETY: every load reads rows[ky][col[kx] + o ..][..R * LANES] and every store
        // dst[..R * LANES], in bounds by the assertion; AVX2 and FMA: see `Avx2Fma`.
        unsafe { dw_strip_avx2::<K, R>(rows, col, wk, o, ep, dst) }
    }

    #[inline(always)]
    fn lanes_strip<const K: usize, const S: usize, const R: usize>(
        rows: &[&[f32]; K],
        wk: &[[f32; depthwise::LANES]; 25],
        ox: usize,
        ep: &depthwise::LanesEpilogue,
        dst: &mut [f32],
    ) {
        const L: usize = depthwise::LANES;
        let reach = (ox * S + (R - 1) * S + K) * L;
        assert!(K * K <= 25 && rows.iter().all(|r| r.len() >= reach) && dst.len() >= R * L);
        // SAFETY: every load reads rows[ky][(ox * S + r * S + kx) * L ..][..L] with r < R,
        // kx < K, and every store dst[..R * L], in bounds by the assertion; AVX2 and FMA: see
        // `Avx2Fma`.
        unsafe { dw_lanes_strip_avx2::<K, S, R>(rows, wk, ox, ep, dst) }
    }
    #[inline(always)]
    fn gather_strip<const R: usize>(
        g: &[[f32; 8]],
        from: &[usize],
        at: usize,
        w: &[[f32; 8]],
        out: &mut [[f32; 8]; R],
    ) {
        let reach = from.iter().max().map_or(0, |&f| f) + at + R;
        assert!(g.len() >= reach && w.len() >= from.len());
        // SAFETY: every load reads g[from[t] + at + j] with j < R, or w[t] with t < from.len(),
        // in bounds by the assertion; AVX2: see `Avx2Fma`.
        unsafe { gather_strip_avx2::<R>(g, from, at, w, out) }
    }

    #[inline(always)]
    fn grad_rows<const KW: usize>(
        x: &[[f32; 8]],
        x_ld: usize,
        g: &[[f32; 8]],
        g_ld: usize,
        rows: usize,
        cols: usize,
        sw: usize,
        dw: usize,
        acc: &mut [[[f32; 8]; KW]; 2],
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        let reach = (rows - 1) * x_ld + (cols - 1) * sw + (KW - 1) * dw + 1;
        assert!(g.len() >= (rows - 1) * g_ld + cols && x.len() >= reach);
        // SAFETY: every load reads g[oy * g_ld + ox] or x[oy * x_ld + ox * sw + kx * dw] with
        // oy < rows, ox < cols, kx < KW, in bounds by the assertion; AVX2: see `Avx2Fma`.
        unsafe { grad_rows_avx2::<KW>(x, x_ld, g, g_ld, rows, cols, sw, dw, acc) }
    }

    #[inline(always)]
    fn interleave(planes: &[&[f32]; depthwise::LANES], from: usize, len: usize, dst: &mut [f32]) {
        assert!(planes.iter().all(|p| p.len() >= from + len) && dst.len() >= len * 8);
        // SAFETY: reads planes[l][from..from + len], writes dst[..len * 8], in bounds by the
        // assertion; AVX2: see `Avx2Fma`.
        unsafe { interleave_avx2(planes, from, len, dst) }
    }

    #[inline(always)]
    fn deinterleave(src: &[f32], out: &mut [f32], plane: usize) {
        let n = out.len() / plane.max(1);
        assert!(n <= 8 && src.len() >= plane * 8);
        // SAFETY: reads src[..plane * 8], writes out[..n * plane], in bounds by the assertion;
        // AVX2: see `Avx2Fma`.
        unsafe { deinterleave_avx2(src, out, plane, n) }
    }

    #[inline(always)]
    fn interleave_rows(
        planes: &[&[f32]; 8],
        ld: usize,
        rows: usize,
        cols: usize,
        dst: &mut [[f32; 8]],
        dst_ld: usize,
        _stage: &mut [[f32; 8]],
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        let run = (rows - 1) * ld + cols;
        assert!(cols <= ld && planes.iter().all(|p| p.len() >= run) && dst.len() >= (rows - 1) * dst_ld + cols);
        // SAFETY: reads planes[l][..run], writes dst[r * dst_ld + c] with r < rows, c < cols,
        // in bounds by the assertion; AVX2: see `Avx2Fma`.
        unsafe { interleave_rows_avx2(planes, ld, run, cols, dst, dst_ld) }
    }
}

/// See [`depthwise::DwInner::interleave_rows`]: the run of `run` positions of the planes
/// (rows `ld` apart), 8 per transpose, each position's vector stored at its place in `dst`
/// or dropped when it lies past its row's `cols`: no staging copy, which for rows of a few
/// positions went through `memmove` three times per block; the caller checks the bounds.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn interleave_rows_avx2(
    planes: &[&[f32]; 8],
    ld: usize,
    run: usize,
    cols: usize,
    dst: &mut [[f32; 8]],
    dst_ld: usize,
) {
    use core::arch::x86_64::*;
    // Row and column of the next position, and its place in `dst`.
    let (mut c, mut at) = (0, 0);
    let d = dst.as_mut_ptr().cast::<f32>();
    let mut x = 0;
    // SAFETY (whole body): the caller checked the bounds of every access below.
    unsafe {
        while x + 8 <= run {
            let r = core::array::from_fn(|l| _mm256_loadu_ps(planes[l].as_ptr().add(x)));
            for v in transpose8(r) {
                if c < cols {
                    _mm256_storeu_ps(d.add(at * 8), v);
                }
                (c, at) = if c + 1 == ld { (0, at + 1 + dst_ld - ld) } else { (c + 1, at + 1) };
            }
            x += 8;
        }
        for x in x..run {
            if c < cols {
                for (l, p) in planes.iter().enumerate() {
                    *d.add(at * 8 + l) = *p.get_unchecked(x);
                }
            }
            (c, at) = if c + 1 == ld { (0, at + 1 + dst_ld - ld) } else { (c + 1, at + 1) };
        }
    }
}

/// Transposes an 8 × 8 block of floats held as 8 row vectors.
#[target_feature(enable = "avx2")]
#[inline]
fn transpose8(r: [core::arch::x86_64::__m256; 8]) -> [core::arch::x86_64::__m256; 8] {
    use core::arch::x86_64::*;
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves exchanged.
    let t: [__m256; 8] = core::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    let s = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(s[0], s[4]),
        _mm256_permute2f128_ps::<0x20>(s[1], s[5]),
        _mm256_permute2f128_ps::<0x20>(s[2], s[6]),
        _mm256_permute2f128_ps::<0x20>(s[3], s[7]),
        _mm256_permute2f128_ps::<0x31>(s[0], s[4]),
        _mm256_permute2f128_ps::<0x31>(s[1], s[5]),
        _mm256_permute2f128_ps::<0x31>(s[2], s[6]),
        _mm256_permute2f128_ps::<0x31>(s[3], s[7]),
    ]
}

/// See [`depthwise::DwInner::gather_strip`]: the `R` sums in registers, each tap a multiply
/// and an add (not fused, so that every table gives the same bits); the caller checks the
/// bounds.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn gather_strip_avx2<const R: usize>(
    g: &[[f32; 8]],
    from: &[usize],
    at: usize,
    w: &[[f32; 8]],
    out: &mut [[f32; 8]; R],
) {
    use core::arch::x86_64::*;
    // SAFETY (whole body): the caller checked the bounds of every access below.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        let base = g.as_ptr().add(at).cast::<f32>();
        for (t, &f) in from.iter().enumerate() {
            let wv = _mm256_loadu_ps(w.as_ptr().add(t).cast());
            let p = base.add(f * 8);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(_mm256_loadu_ps(p.add(j * 8)), wv));
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), a);
        }
    }
}

/// See [`depthwise::DwInner::grad_rows`]: the `2 · KW` sums in registers for all the rows
/// (loaded and stored once per row, they were most of the work on planes of a few
/// positions), each product a multiply and an add (not fused); the caller checks the bounds.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn grad_rows_avx2<const KW: usize>(
    x: &[[f32; 8]],
    x_ld: usize,
    g: &[[f32; 8]],
    g_ld: usize,
    rows: usize,
    cols: usize,
    sw: usize,
    dw: usize,
    acc: &mut [[[f32; 8]; KW]; 2],
) {
    use core::arch::x86_64::*;
    // SAFETY (whole body): the caller checked the bounds of every access below.
    unsafe {
        let mut a: [[__m256; KW]; 2] =
            core::array::from_fn(|h| core::array::from_fn(|kx| _mm256_loadu_ps(acc[h][kx].as_ptr())));
        for oy in 0..rows {
            let (gr, xr) = (g.as_ptr().add(oy * g_ld).cast::<f32>(), x.as_ptr().add(oy * x_ld).cast::<f32>());
            let step = |a: &mut [__m256; KW], ox: usize| {
                let gv = _mm256_loadu_ps(gr.add(ox * 8));
                let p = xr.add(ox * sw * 8);
                for (kx, ak) in a.iter_mut().enumerate() {
                    *ak = _mm256_add_ps(*ak, _mm256_mul_ps(gv, _mm256_loadu_ps(p.add(kx * dw * 8))));
                }
            };
            // Pairs of columns, even ones into the first set, as `grad_row` does.
            let pairs = cols / 2 * 2;
            for ox in (0..pairs).step_by(2) {
                step(&mut a[0], ox);
                step(&mut a[1], ox + 1);
            }
            if pairs < cols {
                step(&mut a[0], pairs);
            }
        }
        for h in 0..2 {
            for kx in 0..KW {
                _mm256_storeu_ps(acc[h][kx].as_mut_ptr(), a[h][kx]);
            }
        }
    }
}

/// See [`depthwise::DwInner::interleave`]: 8 positions of 8 planes per transpose; the caller
/// checks the bounds.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn interleave_avx2(planes: &[&[f32]; 8], from: usize, len: usize, dst: &mut [f32]) {
    use core::arch::x86_64::*;
    let mut x = 0;
    // SAFETY (whole body): the caller checked the bounds of every access below.
    unsafe {
        while x + 8 <= len {
            let r = core::array::from_fn(|l| _mm256_loadu_ps(planes[l].as_ptr().add(from + x)));
            for (j, v) in transpose8(r).iter().enumerate() {
                _mm256_storeu_ps(dst.as_mut_ptr().add((x + j) * 8), *v);
            }
            x += 8;
        }
        for x in x..len {
            for (l, p) in planes.iter().enumerate() {
                *dst.get_unchecked_mut(x * 8 + l) = *p.get_unchecked(from + x);
            }
        }
    }
}

/// See [`depthwise::DwInner::deinterleave`]: 8 positions of the `n` planes per transpose;
/// the caller checks the bounds.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn deinterleave_avx2(src: &[f32], out: &mut [f32], plane: usize, n: usize) {
    use core::arch::x86_64::*;
    let mut pos = 0;
    // SAFETY (whole body): the caller checked the bounds of every access below.
    unsafe {
        while pos + 8 <= plane {
            let r = core::array::from_fn(|j| _mm256_loadu_ps(src.as_ptr().add((pos + j) * 8)));
            for (l, v) in transpose8(r).iter().enumerate().take(n) {
                _mm256_storeu_ps(out.as_mut_ptr().add(l * plane + pos), *v);
            }
            pos += 8;
        }
        for pos in pos..plane {
            for l in 0..n {
                *out.get_unchecked_mut(l * plane + pos) = *src.get_unchecked(pos * 8 + l);
            }
        }
    }
}

/// See [`depthwise::DwInner::strip`]; the caller checks the bounds.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dw_strip_avx2<const K: usize, const R: usize>(
    rows: &[&[f32]; K],
    col: &[usize; K],
    wk: &[[f32; K]; K],
    o: usize,
    ep: &depthwise::Epilogue,
    dst: &mut [f32],
) {
    use core::arch::x86_64::*;
    // SAFETY (whole body): the caller checked that every address below is in bounds.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for ky in 0..K {
            let p = rows[ky].as_ptr().add(o);
            for kx in 0..K {
                let wv = _mm256_set1_ps(wk[ky][kx]);
                let q = p.add(col[kx]);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(q.add(r * 8)), *a);
                }
            }
        }
        let (mul, add) = (_mm256_set1_ps(ep.mul), _mm256_set1_ps(ep.add));
        let (lo, hi) = (_mm256_set1_ps(ep.lo), _mm256_set1_ps(ep.hi));
        for (r, a) in acc.iter().enumerate() {
            let v = _mm256_fmadd_ps(*a, mul, add);
            _mm256_storeu_ps(dst.as_mut_ptr().add(r * 8), _mm256_min_ps(hi, _mm256_max_ps(lo, v)));
        }
    }
}

/// See [`depthwise::DwInner::lanes_strip`]; the caller checks the bounds.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dw_lanes_strip_avx2<const K: usize, const S: usize, const R: usize>(
    rows: &[&[f32]; K],
    wk: &[[f32; depthwise::LANES]; 25],
    ox: usize,
    ep: &depthwise::LanesEpilogue,
    dst: &mut [f32],
) {
    use core::arch::x86_64::*;
    // SAFETY (whole body): the caller checked that every address below is in bounds.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for ky in 0..K {
            let p = rows[ky].as_ptr().add(ox * S * 8);
            for kx in 0..K {
                let wv = _mm256_loadu_ps(wk[ky * K + kx].as_ptr());
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p.add((r * S + kx) * 8)), *a);
                }
            }
        }
        let (mul, add) = (_mm256_loadu_ps(ep.mul.as_ptr()), _mm256_loadu_ps(ep.add.as_ptr()));
        let (lo, hi) = (_mm256_set1_ps(ep.lo), _mm256_set1_ps(ep.hi));
        for (r, a) in acc.iter().enumerate() {
            let v = _mm256_fmadd_ps(*a, mul, add);
            _mm256_storeu_ps(dst.as_mut_ptr().add(r * 8), _mm256_min_ps(hi, _mm256_max_ps(lo, v)));
        }
    }
}

fn linear_rows(first: usize, i: usize, w: Weights, x: &[f32], ys: &mut [f32], post: &PostOp) {
    unsafe { linear_rows_avx2(first, i, w, x, ys, post) }
}
#[target_feature(enable = "avx2,fma")]
fn linear_rows_avx2(first: usize, i: usize, w: Weights, x: &[f32], ys: &mut [f32], post: &PostOp) {
    fast::linear_rows_inline(first, i, w, x, ys, post)
}

/// Only reachable through [`detect`], which checked AVX2 and FMA.
const AVX2_MICRO: MicroKernel = MicroKernel { name: "x86_64 avx2+fma 6x16", mr: 6, nr: 16, run: micro_rxn::<6, 2> };

/// Its narrow twin ([`Kernels::micro_narrow`]), one ymm of B wide. Only reachable through
/// [`detect`], which checked AVX2 and FMA.
const AVX2_NARROW: MicroKernel = MicroKernel { name: "x86_64 avx2+fma 6x8", mr: 6, nr: 8, run: micro_rxn::<6, 1> };

/// Two rows of each ([`Kernels::micro_short`]): a third of their work for a last row panel of
/// at most two rows. Only reachable through [`detect`], which checked AVX2 and FMA.
const AVX2_SHORT: MicroKernel = MicroKernel { name: "x86_64 avx2+fma 2x16", mr: 2, nr: 16, run: micro_rxn::<2, 2> };
const AVX2_SHORT_NARROW: MicroKernel =
    MicroKernel { name: "x86_64 avx2+fma 2x8", mr: 2, nr: 8, run: micro_rxn::<2, 1> };

/// `R` × `8·V`: `R·V` ymm accumulators (12 for the full kernel, the classic blocking for 16
/// registers), `V` ymm of B and one broadcast of A per row and step.
fn micro_rxn<const R: usize, const V: usize>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ep: &TileEpilogue,
    c: &mut [f32],
    ldc: usize,
) {
    let nr = 8 * V;
    assert!(
        lda >= k && a.len() >= (R - 1) * lda + k && b.len() >= k * nr && ldc >= nr && c.len() >= (R - 1) * ldc + nr
    );
    // SAFETY: the slices hold what the kernel reads and writes (asserted above), and this
    // function is only reachable through `detect`, which confirmed AVX2 and FMA.
    unsafe { micro_rxn_avx2::<R, V>(k, a.as_ptr(), lda, b.as_ptr(), ep, c.as_mut_ptr(), ldc) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn micro_rxn_avx2<const R: usize, const V: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ep: &TileEpilogue,
    c: *mut f32,
    ldc: usize,
) {
    use core::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees R rows of `k` floats at stride `lda` in `a`,
    // `8·V·k` floats in `b` and R rows of `8·V` at stride `ldc` in `c`; every load and store
    // below stays inside them.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        let rows: [*const f32; R] = core::array::from_fn(|i| a.add(i * lda));
        let mut bp = b;
        for p in 0..k {
            let bv: [__m256; V] = core::array::from_fn(|h| _mm256_loadu_ps(bp.add(h * 8)));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*rows[i].add(p));
                for (r, &bh) in row.iter_mut().zip(&bv) {
                    *r = _mm256_fmadd_ps(av, bh, *r);
                }
            }
            bp = bp.add(8 * V);
        }
        let (lo, hi) = (_mm256_set1_ps(ep.lo), _mm256_set1_ps(ep.hi));
        for (i, row) in acc.iter().enumerate() {
            let (mul, add) = (_mm256_set1_ps(ep.mul[i]), _mm256_set1_ps(ep.add[i]));
            for (h, v) in row.iter().enumerate() {
                let y = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_fmadd_ps(*v, mul, add)));
                _mm256_storeu_ps(c.add(i * ldc + h * 8), y);
            }
        }
    }
}

/// Only reachable through [`detect`], which checked AVX-512F.
const AVX512_MICRO: MicroKernel = MicroKernel { name: "x86_64 avx512f 12x16", mr: 12, nr: 16, run: micro_rx16::<12> };

/// Fewer rows of it ([`Kernels::micro_short`]), fewest first: the last row panels of 20 and
/// 40 channels hold 8 and 4 (GEMResNet18's first two stages), which the full kernel runs at
/// two thirds and one third of its work. Only reachable through [`detect`], which checked
/// AVX-512F.
const AVX512_SHORT: [MicroKernel; 3] = [
    MicroKernel { name: "x86_64 avx512f 2x16", mr: 2, nr: 16, run: micro_rx16::<2> },
    MicroKernel { name: "x86_64 avx512f 4x16", mr: 4, nr: 16, run: micro_rx16::<4> },
    MicroKernel { name: "x86_64 avx512f 8x16", mr: 8, nr: 16, run: micro_rx16::<8> },
];

/// `R` × 16 with 512-bit vectors: `R` zmm accumulators, one B load and `R` broadcasts per
/// step. Same B panels as the AVX2 kernel (16 wide); twice the multiply-adds per instruction.
fn micro_rx16<const R: usize>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ep: &TileEpilogue,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(
        lda >= k && a.len() >= (R - 1) * lda + k && b.len() >= k * 16 && ldc >= 16 && c.len() >= (R - 1) * ldc + 16
    );
    // SAFETY: the slices hold what the kernel reads and writes (asserted above), and this
    // function is only reachable through `detect`, which confirmed AVX-512F.
    unsafe { micro_rx16_avx512::<R>(k, a.as_ptr(), lda, b.as_ptr(), ep, c.as_mut_ptr(), ldc) }
}

#[target_feature(enable = "avx512f")]
unsafe fn micro_rx16_avx512<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ep: &TileEpilogue,
    c: *mut f32,
    ldc: usize,
) {
    use core::arch::x86_64::*;
    // SAFETY (whole body): the caller guarantees R rows of `k` floats at stride `lda` in `a`,
    // 16k floats in `b` and R rows of 16 at stride `ldc` in `c`; every load and store below
    // stays inside them.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let rows: [*const f32; R] = core::array::from_fn(|i| a.add(i * lda));
        let mut bp = b;
        for p in 0..k {
            let bv = _mm512_loadu_ps(bp);
            for (i, row) in acc.iter_mut().enumerate() {
                *row = _mm512_fmadd_ps(_mm512_set1_ps(*rows[i].add(p)), bv, *row);
            }
            bp = bp.add(16);
        }
        let (lo, hi) = (_mm512_set1_ps(ep.lo), _mm512_set1_ps(ep.hi));
        for (i, row) in acc.iter().enumerate() {
            let y = _mm512_fmadd_ps(*row, _mm512_set1_ps(ep.mul[i]), _mm512_set1_ps(ep.add[i]));
            _mm512_storeu_ps(c.add(i * ldc), _mm512_min_ps(hi, _mm512_max_ps(lo, y)));
        }
    }
}
