//! aarch64 kernels with NEON (Advanced SIMD) intrinsics.
//!
//! * GEMM: an 8 × 8 micro-kernel, 16 accumulators. Packed A holds rows at stride `k` (the
//!   layout every ISA shares, see [`super::gemm`]), so the kernel loads four consecutive `k`
//!   of each of the 8 rows into one register and multiplies by lane (`fmla v.4s, v.4s,
//!   v.s[i]`): per four steps of `k`, 8 loads of A, 8 of B and 64 multiply-adds. 16
//!   accumulators + 8 A + 2 B = 26 of the 32 registers. The classic 8 × 12 (24 accumulators)
//!   needs A packed `k`-major to broadcast by lane; with row-major A it needs 35 registers,
//!   or a broadcast load per row and step (inner loop of 8 × 12 with `ld1r`: 0.36
//!   instructions per multiply-add, against 0.31 here). The panel width 8 also keeps B
//!   packing on its fixed-width path. The post-op is applied while the tile is in registers.
//!   Counted under qemu, a 256³ GEMM takes 0.35 instructions per multiply-add, the portable
//!   4 × 8 kernel 0.81 (`benches/qemu/insn_ratio.sh`).
//! * Weight packing for the GEMM, for a task's masked weights (SupSup, ExSSNeT): int8
//!   dequantised and the mask applied in one pass, 16 weights per step, the mask bits turned
//!   into byte masks (`cmtst`) that clear the int8 values before they are widened. Overlays
//!   are the portable sparse walk; unmasked int8 and f32 rows the portable loops, which the
//!   compiler already vectorises as well (see [`pack_a`]).
//! * Depthwise: the portable drivers of [`super::depthwise`] with NEON inner loops (taps as
//!   multiply-adds by a scalar from registers, the epilogue in registers) and 4 × 4
//!   transposes for the interleaving of the small-plane path.
//! * Linear (int8 dot product, plain and masked): the same fused dequantise-and-mask, with
//!   fused multiply-adds into four accumulators.
//!
//! Not used: the `dotprod` extension (`sdot`, int8 × int8 → int32). Activations are f32 and
//! weights are dequantised while they are packed, so no kernel here multiplies two int8
//! vectors; using it would need quantised activations, a different numeric contract.
//!
//! Selection: NEON is part of every aarch64 target this module is compiled for (`cfg
//! target_feature = "neon"` on the module). On std the table is still chosen at run time by
//! `is_aarch64_feature_detected!("neon")`; without std (bare metal) by that compile-time cfg.
//! Every kernel is tested against the portable and reference kernels (`tests/kernels.rs` and
//! the tests below), which run under qemu-aarch64 on an x86 host.
#![allow(unsafe_code)]

use super::{depthwise, fast, gemm, Kernels, Masked, MicroKernel, MulAdd, PostOp, TileEpilogue, Weights};
use core::arch::aarch64::*;

/// The NEON table if this CPU has NEON: run-time detection on std, the compile-time target
/// features without it.
pub fn detect() -> Option<Kernels> {
    #[cfg(feature = "std")]
    let neon = std::arch::is_aarch64_feature_detected!("neon");
    #[cfg(not(feature = "std"))]
    let neon = cfg!(target_feature = "neon");
    neon.then(neon_table)
}

/// Every aarch64 table this CPU can run, best last (the tests check each one).
#[cfg(feature = "std")]
pub fn available() -> std::vec::Vec<Kernels> {
    detect().into_iter().collect()
}

/// The table's `isa`, and the kernels `edgecl kernels` names ([`Kernels::describe`]).
pub(crate) const ISA: &str = "aarch64 neon";
pub(crate) const CONV2D: &str = "im2col + GEMM, masked weights dequantised and masked by neon";
pub(crate) const DEPTHWISE: &str = "neon: 8 channels per 2 vectors on small planes, unrolled 3x3/5x5, else row-wise";
pub(crate) const LINEAR: &str = "neon: int8 dot product, mask fused, 16 lanes";

fn neon_table() -> Kernels {
    Kernels {
        fast: true,
        isa: ISA,
        micro: NEON_MICRO,
        // Its 8 lanes are narrow already.
        micro_narrow: None,
        micro_short: &[],
        conv2d: fast::conv2d,
        linear: fast::linear,
        gemm_rows,
        depthwise,
        linear_rows,
        // Portable loops: NEON is the aarch64 baseline, so they are vectorised already.
        depthwise_backward: super::depthwise::backward,
        spmm: super::sparse::spmm,
        wgrad_rows: None,
    }
}

// SAFETY (every `unsafe` block below that only calls NEON intrinsics on registers): the module
// is compiled only where the target enables NEON (see the module's cfg), so the feature the
// intrinsics assume is present. Blocks that touch memory say why their accesses are in bounds.

// ---------------------------------------------------------------------------------------------
// GEMM micro-kernel

/// Only reachable through [`detect`], which checked NEON.
pub const NEON_MICRO: MicroKernel = MicroKernel { name: "aarch64 neon 8x8", mr: 8, nr: 8, run: micro_8x8 };

fn micro_8x8(k: usize, a: &[f32], lda: usize, b: &[f32], ep: &TileEpilogue, c: &mut [f32], ldc: usize) {
    assert!(lda >= k && a.len() >= 7 * lda + k && b.len() >= k * 8 && ldc >= 8 && c.len() >= 7 * ldc + 8);
    // SAFETY: the slices hold what the kernel reads and writes (asserted above); NEON: see the
    // module.
    unsafe { micro_8x8_neon(k, a.as_ptr(), lda, b.as_ptr(), ep, c.as_mut_ptr(), ldc) }
}

/// One step of `k` for all 8 rows: `acc[i] += a[i][S] * b`, with `a[i]` holding four steps.
#[inline(always)]
fn step8<const S: i32>(acc: &mut [[float32x4_t; 2]; 8], a: &[float32x4_t; 8], b0: float32x4_t, b1: float32x4_t) {
    for (row, av) in acc.iter_mut().zip(a) {
        // SAFETY: registers only; NEON: see the module.
        unsafe {
            row[0] = vfmaq_laneq_f32::<S>(row[0], b0, *av);
            row[1] = vfmaq_laneq_f32::<S>(row[1], b1, *av);
        }
    }
}

/// `c[i][..8] = ep(i, Σ_p a[i][p] · b[p][..8])`; the caller guarantees 8 rows of `k` floats at
/// stride `lda` in `a`, `8k` floats in `b` and 8 rows of 8 at stride `ldc` in `c`.
#[inline]
unsafe fn micro_8x8_neon(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ep: &TileEpilogue,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (whole body): every load reads a[i * lda + p .. + 4] with p + 4 <= k, or
    // a[i * lda + p] with p < k, or b[p * 8 .. + 8] with p < k; every store writes
    // c[i * ldc .. + 8] with i < 8: inside what the caller guarantees.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 2]; 8];
        let rows: [*const f32; 8] = core::array::from_fn(|i| a.add(i * lda));
        let mut bp = b;
        let mut p = 0;
        while p + 4 <= k {
            let av: [float32x4_t; 8] = core::array::from_fn(|i| vld1q_f32(rows[i].add(p)));
            step8::<0>(&mut acc, &av, vld1q_f32(bp), vld1q_f32(bp.add(4)));
            step8::<1>(&mut acc, &av, vld1q_f32(bp.add(8)), vld1q_f32(bp.add(12)));
            step8::<2>(&mut acc, &av, vld1q_f32(bp.add(16)), vld1q_f32(bp.add(20)));
            step8::<3>(&mut acc, &av, vld1q_f32(bp.add(24)), vld1q_f32(bp.add(28)));
            bp = bp.add(32);
            p += 4;
        }
        while p < k {
            let (b0, b1) = (vld1q_f32(bp), vld1q_f32(bp.add(4)));
            for (row, r) in acc.iter_mut().zip(&rows) {
                let av = *r.add(p);
                row[0] = vfmaq_n_f32(row[0], b0, av);
                row[1] = vfmaq_n_f32(row[1], b1, av);
            }
            bp = bp.add(8);
            p += 1;
        }
        let (lo, hi) = (vdupq_n_f32(ep.lo), vdupq_n_f32(ep.hi));
        for (i, row) in acc.iter().enumerate() {
            let (mul, add) = (vdupq_n_f32(ep.mul[i]), vdupq_n_f32(ep.add[i]));
            for (h, v) in row.iter().enumerate() {
                let y = vminq_f32(hi, vmaxq_f32(lo, vfmaq_f32(add, *v, mul)));
                vst1q_f32(c.add(i * ldc + h * 4), y);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Weight packing: dequantise and mask in one pass

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
    gemm::gemm_rows_with(pack_a, m, n, k, w, r0, b, c, post, ap)
}

/// [`gemm::pack_a`] with masked rows through [`masked_segment`]; int8 and f32 rows take the
/// portable loops, which the compiler vectorises well (instruction counts under qemu, 256
/// rows of 1152: 322 k for int8 against 364 k with intrinsics; masked 1.40 M against 0.72 M).
/// Public for that comparison (`benches/kernel_insns.rs`).
pub fn pack_a(w: Weights, row0: usize, m: usize, k: usize, mr: usize, dst: &mut [f32]) {
    let Weights::Masked(mw) = w else {
        return gemm::pack_a(w, row0, m, k, mr, dst);
    };
    let dst = &mut dst[..gemm::packed_a_len(m, k, mr)];
    let (rows, pad) = dst.split_at_mut(m * k);
    for (r, d) in rows.chunks_exact_mut(k).enumerate() {
        masked_segment(&mw, row0 + r, 0, d);
    }
    pad.fill(0.0);
}

/// [`Masked::row_into`]: columns `j0 .. j0 + dst.len()` of row `o` of a task's weights, the
/// base dequantised and masked in one pass, then the overlay's values put in place.
#[inline]
fn masked_segment(m: &Masked, o: usize, j0: usize, dst: &mut [f32]) {
    let start = o * m.row_len + j0;
    let n = dst.len();
    match *m.base {
        Weights::I8 { q, scale } => dequant_masked(&q[start..start + n], scale[o], m.mask, start, dst),
        Weights::F32(wf) => copy_masked(&wf[start..start + n], m.mask, start, dst),
        Weights::Masked(_) => unreachable!("a mask's base is plain backbone weights"),
    }
    m.overlay_into(o, j0, dst);
}

/// The bytes of 16 mask bits as lane masks: byte `j` is `0xff` if bit `j` of `bits` is set.
#[inline(always)]
fn byte_mask(bits: u32) -> uint8x16_t {
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    // SAFETY: registers and a 16-byte constant; NEON: see the module.
    unsafe {
        let b = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
        vtstq_u8(b, vld1q_u8(BIT.as_ptr()))
    }
}

/// The 16 int8 values as four vectors of f32 times `s`.
#[inline(always)]
fn widen_scale(v: int8x16_t, s: float32x4_t) -> [float32x4_t; 4] {
    // SAFETY: registers only; NEON: see the module.
    unsafe {
        let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        [
            vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), s),
            vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(lo)), s),
            vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), s),
            vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(hi)), s),
        ]
    }
}

/// `dst[j] = s · q[j]` where bit `start + j` of `mask` is set, else 0: the bits as byte
/// masks on the int8 values, then widened, converted and scaled.
#[inline(always)]
fn dequant_masked(q: &[i8], s: f32, mask: &[u32], start: usize, dst: &mut [f32]) {
    let n = q.len();
    assert!(dst.len() >= n);
    let full = n / 16 * 16;
    // SAFETY: every load reads q[j .. j + 16] and every store writes dst[j .. j + 16] with
    // j + 16 <= full <= n, in bounds by the assertion; NEON: see the module.
    unsafe {
        let sv = vdupq_n_f32(s);
        let (qp, dp) = (q.as_ptr(), dst.as_mut_ptr());
        let mut j = 0;
        while j < full {
            let bm = vreinterpretq_s8_u8(byte_mask(super::bits32(mask, start + j)));
            let v = vandq_s8(vld1q_s8(qp.add(j)), bm);
            for (h, f) in widen_scale(v, sv).into_iter().enumerate() {
                vst1q_f32(dp.add(j + h * 4), f);
            }
            j += 16;
        }
    }
    let bits = super::bits32(mask, start + full);
    for (j, (d, &v)) in dst[full..n].iter_mut().zip(&q[full..]).enumerate() {
        *d = if bits >> j & 1 != 0 { v as f32 * s } else { 0.0 };
    }
}

/// `dst[j] = w[j]` where bit `start + j` of `mask` is set, else 0.
#[inline(always)]
fn copy_masked(w: &[f32], mask: &[u32], start: usize, dst: &mut [f32]) {
    let n = w.len();
    assert!(dst.len() >= n);
    let full = n / 16 * 16;
    // SAFETY: every load reads w[j .. j + 16] and every store writes dst[j .. j + 16] with
    // j + 16 <= full <= n, in bounds by the assertion; NEON: see the module.
    unsafe {
        let (wp, dp) = (w.as_ptr(), dst.as_mut_ptr());
        let mut j = 0;
        while j < full {
            let bm = vreinterpretq_s8_u8(byte_mask(super::bits32(mask, start + j)));
            let (lo, hi) = (vmovl_s8(vget_low_s8(bm)), vmovl_high_s8(bm));
            let lanes =
                [vmovl_s16(vget_low_s16(lo)), vmovl_high_s16(lo), vmovl_s16(vget_low_s16(hi)), vmovl_high_s16(hi)];
            for (h, l) in lanes.into_iter().enumerate() {
                let v = vreinterpretq_s32_f32(vld1q_f32(wp.add(j + h * 4)));
                vst1q_f32(dp.add(j + h * 4), vreinterpretq_f32_s32(vandq_s32(v, l)));
            }
            j += 16;
        }
    }
    let bits = super::bits32(mask, start + full);
    for (j, (d, &v)) in dst[full..n].iter_mut().zip(&w[full..]).enumerate() {
        *d = if bits >> j & 1 != 0 { v } else { 0.0 };
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layers

fn linear_rows(first: usize, in_f: usize, w: Weights, x: &[f32], ys: &mut [f32], post: &PostOp) {
    let x = &x[..in_f];
    for (i, yo) in ys.iter_mut().enumerate() {
        let o = first + i;
        let start = o * in_f;
        let acc = match w {
            Weights::I8 { q, scale } => scale[o] * dot_i8(&q[start..start + in_f], None, x),
            Weights::F32(wf) => dot_f32(&wf[start..start + in_f], x),
            Weights::Masked(m @ Masked { base: Weights::I8 { q, scale }, overlay: None, .. }) => {
                scale[o] * dot_i8(&q[start..start + in_f], Some((m.mask, start)), x)
            }
            Weights::Masked(m) => {
                // The row in L1-sized segments through the stack.
                let mut seg = [0.0f32; 256];
                let mut acc = 0.0;
                for j0 in (0..in_f).step_by(256) {
                    let d = &mut seg[..256.min(in_f - j0)];
                    masked_segment(&m, o, j0, d);
                    acc += dot_f32(d, &x[j0..]);
                }
                acc
            }
        };
        *yo = post.apply(o, acc);
    }
}

/// `Σ q[j] · x[j]` over the weights whose bit (from bit `start` of `mask`) is set, or all of
/// them without a mask; 16 per step into four accumulators.
#[inline(always)]
fn dot_i8(q: &[i8], mask: Option<(&[u32], usize)>, x: &[f32]) -> f32 {
    let n = q.len();
    assert!(x.len() >= n);
    let full = n / 16 * 16;
    // SAFETY: loads read q[j .. j + 16] and x[j .. j + 16] with j + 16 <= full <= n, in bounds
    // by the assertion; NEON: see the module.
    let mut sum = unsafe {
        let one = vdupq_n_f32(1.0);
        let mut acc = [vdupq_n_f32(0.0); 4];
        let (qp, xp) = (q.as_ptr(), x.as_ptr());
        let mut j = 0;
        while j < full {
            let mut v = vld1q_s8(qp.add(j));
            if let Some((mask, start)) = mask {
                v = vandq_s8(v, vreinterpretq_s8_u8(byte_mask(super::bits32(mask, start + j))));
            }
            for (h, (a, f)) in acc.iter_mut().zip(widen_scale(v, one)).enumerate() {
                *a = vfmaq_f32(*a, f, vld1q_f32(xp.add(j + h * 4)));
            }
            j += 16;
        }
        vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])))
    };
    let bits = mask.map_or(u32::MAX, |(mask, start)| super::bits32(mask, start + full));
    for (j, (&v, &xv)) in q[full..].iter().zip(&x[full..n]).enumerate() {
        if bits >> j & 1 != 0 {
            sum += v as f32 * xv;
        }
    }
    sum
}

#[inline(always)]
fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len();
    assert!(x.len() >= n);
    let full = n / 16 * 16;
    // SAFETY: loads read w[j .. j + 16] and x[j .. j + 16] with j + 16 <= full <= n, in bounds
    // by the assertion; NEON: see the module.
    let mut sum = unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut j = 0;
        while j < full {
            for (h, a) in acc.iter_mut().enumerate() {
                *a = vfmaq_f32(*a, vld1q_f32(wp.add(j + h * 4)), vld1q_f32(xp.add(j + h * 4)));
            }
            j += 16;
        }
        vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])))
    };
    for (&a, &b) in w[full..].iter().zip(&x[full..n]) {
        sum += a * b;
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// Depthwise

fn depthwise(s: &super::ConvShape, w: Weights, c0: usize, x: &[f32], y: &mut [f32], post: &PostOp) {
    depthwise::depthwise_channels_inline::<Neon>(s, w, c0, x, y, post)
}

/// The depthwise kernels' inner loops with NEON intrinsics; `LANES` (8) channels or outputs
/// are two vectors.
struct Neon;

impl MulAdd for Neon {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        // One fused multiply-add (`fmadd`); `f32::mul_add` is not in `core`.
        // SAFETY: registers only; NEON: see the module.
        unsafe { vget_lane_f32::<0>(vfma_n_f32(vdup_n_f32(c), vdup_n_f32(a), b)) }
    }
}

impl depthwise::DwInner for Neon {
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
        // dst[..R * LANES], in bounds by the assertion; NEON: see the module.
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); 2]; R];
            for ky in 0..K {
                let p = rows[ky].as_ptr().add(o);
                for kx in 0..K {
                    let (wv, q) = (wk[ky][kx], p.add(col[kx]));
                    for (r, a) in acc.iter_mut().enumerate() {
                        a[0] = vfmaq_n_f32(a[0], vld1q_f32(q.add(r * 8)), wv);
                        a[1] = vfmaq_n_f32(a[1], vld1q_f32(q.add(r * 8 + 4)), wv);
                    }
                }
            }
            let (mul, add) = (vdupq_n_f32(ep.mul), vdupq_n_f32(ep.add));
            let (lo, hi) = (vdupq_n_f32(ep.lo), vdupq_n_f32(ep.hi));
            let d = dst.as_mut_ptr();
            for (r, a) in acc.iter().enumerate() {
                for (h, v) in a.iter().enumerate() {
                    vst1q_f32(d.add(r * 8 + h * 4), vminq_f32(hi, vmaxq_f32(lo, vfmaq_f32(add, *v, mul))));
                }
            }
        }
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
        // kx < K, or wk[t][..L] with t < K * K <= 25, and every store dst[..R * L], in bounds
        // by the assertion; NEON: see the module.
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); 2]; R];
            for ky in 0..K {
                let p = rows[ky].as_ptr().add(ox * S * L);
                for kx in 0..K {
                    let wp = wk[ky * K + kx].as_ptr();
                    let (w0, w1) = (vld1q_f32(wp), vld1q_f32(wp.add(4)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let x = p.add((r * S + kx) * L);
                        a[0] = vfmaq_f32(a[0], w0, vld1q_f32(x));
                        a[1] = vfmaq_f32(a[1], w1, vld1q_f32(x.add(4)));
                    }
                }
            }
            let mul = [vld1q_f32(ep.mul.as_ptr()), vld1q_f32(ep.mul.as_ptr().add(4))];
            let add = [vld1q_f32(ep.add.as_ptr()), vld1q_f32(ep.add.as_ptr().add(4))];
            let (lo, hi) = (vdupq_n_f32(ep.lo), vdupq_n_f32(ep.hi));
            let d = dst.as_mut_ptr();
            for (r, a) in acc.iter().enumerate() {
                for h in 0..2 {
                    let y = vminq_f32(hi, vmaxq_f32(lo, vfmaq_f32(add[h], a[h], mul[h])));
                    vst1q_f32(d.add(r * L + h * 4), y);
                }
            }
        }
    }

    #[inline(always)]
    fn interleave(planes: &[&[f32]; depthwise::LANES], from: usize, len: usize, dst: &mut [f32]) {
        const L: usize = depthwise::LANES;
        assert!(planes.iter().all(|p| p.len() >= from + len) && dst.len() >= len * L);
        let mut x = 0;
        // SAFETY: loads read planes[l][from + x ..][..4] with x + 4 <= len, stores write
        // dst[(x + j) * L ..][..L] with j < 4, in bounds by the assertion; NEON: see the module.
        unsafe {
            let d = dst.as_mut_ptr();
            while x + 4 <= len {
                for half in 0..2 {
                    let r = core::array::from_fn(|i| vld1q_f32(planes[half * 4 + i].as_ptr().add(from + x)));
                    for (j, v) in transpose4(r).into_iter().enumerate() {
                        vst1q_f32(d.add((x + j) * L + half * 4), v);
                    }
                }
                x += 4;
            }
        }
        for x in x..len {
            for (l, p) in planes.iter().enumerate() {
                dst[x * L + l] = p[from + x];
            }
        }
    }

    #[inline(always)]
    fn deinterleave(src: &[f32], out: &mut [f32], plane: usize) {
        const L: usize = depthwise::LANES;
        let n = out.len() / plane.max(1);
        assert!(n <= L && src.len() >= plane * L && out.len() >= n * plane);
        let mut pos = 0;
        // SAFETY: loads read src[(pos + j) * L ..][..L] with pos + 4 <= plane, j < 4, stores
        // write out[l * plane + pos ..][..4] with l < n, in bounds by the assertion; NEON: see
        // the module.
        unsafe {
            let (s, o) = (src.as_ptr(), out.as_mut_ptr());
            while pos + 4 <= plane {
                for half in 0..2 {
                    let r = core::array::from_fn(|j| vld1q_f32(s.add((pos + j) * L + half * 4)));
                    for (i, v) in transpose4(r).into_iter().enumerate() {
                        let l = half * 4 + i;
                        if l < n {
                            vst1q_f32(o.add(l * plane + pos), v);
                        }
                    }
                }
                pos += 4;
            }
        }
        for pos in pos..plane {
            for l in 0..n {
                out[l * plane + pos] = src[pos * L + l];
            }
        }
    }
}

/// Transposes a 4 × 4 block of floats held as 4 row vectors.
#[inline(always)]
fn transpose4(r: [float32x4_t; 4]) -> [float32x4_t; 4] {
    // SAFETY: registers only; NEON: see the module.
    unsafe {
        // Pairs of rows interleaved by element, then by pairs of elements.
        let (t0, t1) = (vtrn1q_f32(r[0], r[1]), vtrn2q_f32(r[0], r[1]));
        let (t2, t3) = (vtrn1q_f32(r[2], r[3]), vtrn2q_f32(r[2], r[3]));
        let (t0, t1) = (vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t1));
        let (t2, t3) = (vreinterpretq_f64_f32(t2), vreinterpretq_f64_f32(t3));
        [
            vreinterpretq_f32_f64(vtrn1q_f64(t0, t2)),
            vreinterpretq_f32_f64(vtrn1q_f64(t1, t3)),
            vreinterpretq_f32_f64(vtrn2q_f64(t0, t2)),
            vreinterpretq_f32_f64(vtrn2q_f64(t1, t3)),
        ]
    }
}

#[cfg(test)]
mod tests {
    //! Each NEON kernel against its portable counterpart, at the edges the whole-op property
    //! tests in `tests/kernels.rs` do not reach: micro-kernel `k` of 0 and 1 and every
    //! remainder of 4, strides between rows; packing of odd row lengths, rows that start
    //! mid-word in the mask, overlays; depthwise strides, kernels and paddings on every
    //! plane-size path.
    use super::*;
    use crate::kernels::depthwise::{DwInner, LANES};
    use crate::kernels::{reference, ConvShape, Overlay, Plain, MAX_MR};
    use crate::rng::SplitMix64;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn floats(n: usize, r: &mut SplitMix64) -> Vec<f32> {
        (0..n).map(|_| r.uniform(-1.0, 1.0)).collect()
    }

    fn close(got: f32, want: f32) -> bool {
        (got - want).abs() <= 1e-5 * (1.0 + want.abs())
    }

    #[test]
    fn neon_is_the_best_table_and_is_named() {
        let best = Kernels::best_fast();
        assert_eq!(best.isa, "aarch64 neon");
        assert_eq!(best.micro.name, NEON_MICRO.name);
        assert!(Kernels::available().iter().any(|k| k.isa == ISA), "the tests would skip the NEON table");
        let d = best.describe();
        assert!(d.iter().any(|&(slot, desc)| slot == "gemm micro-kernel" && desc == "aarch64 neon 8x8"));
        assert!(d.iter().any(|&(slot, desc)| slot == "conv2d" && desc == CONV2D));
        assert!(d.iter().any(|&(slot, desc)| slot == "depthwise" && desc == DEPTHWISE));
        assert!(d.iter().any(|&(slot, desc)| slot == "linear" && desc == LINEAR));
    }

    /// Random weights of `rows × row_len`: int8, f32, or a mask (with or without an overlay)
    /// over either, every bit vector at a random density.
    struct Case {
        q: Vec<i8>,
        scale: Vec<f32>,
        wf: Vec<f32>,
        mask: Vec<u32>,
        present: Vec<u32>,
        row_rank: Vec<u32>,
        values: Vec<f32>,
    }

    fn case(rows: usize, row_len: usize, seed: u64) -> Case {
        let mut r = SplitMix64::new(seed);
        let n = rows * row_len;
        let q = (0..n).map(|_| (r.uniform(-1.0, 1.0) * 127.0) as i8).collect();
        let scale = (0..rows).map(|_| r.uniform(-0.1, 0.1)).collect();
        let wf = floats(n, &mut r);
        let (density, overlay_density) = (r.uniform(0.0, 1.0), r.uniform(0.0, 0.5));
        let (mut mask, mut present) = (vec![0u32; n.div_ceil(32)], vec![0u32; n.div_ceil(32)]);
        let (mut row_rank, mut values) = (Vec::new(), Vec::new());
        for i in 0..n {
            if i % row_len == 0 {
                row_rank.push(values.len() as u32);
            }
            mask[i / 32] |= u32::from(r.next_f32() < density) << (i % 32);
            if r.next_f32() < overlay_density {
                present[i / 32] |= 1 << (i % 32);
                values.push(r.uniform(-2.0, 2.0));
            }
        }
        Case { q, scale, wf, mask, present, row_rank, values }
    }

    impl Case {
        /// kind 0: int8, 1: f32, 2/3: masked int8 without/with overlay, 4/5: masked f32.
        fn weights<'a>(&'a self, kind: u8, base: &'a mut Weights<'a>, row_len: usize) -> Weights<'a> {
            let plain =
                |int8| if int8 { Weights::I8 { q: &self.q, scale: &self.scale } } else { Weights::F32(&self.wf) };
            if kind < 2 {
                return plain(kind == 0);
            }
            *base = plain(kind < 4);
            let ov = Overlay { present: &self.present, row_rank: &self.row_rank, values: &self.values };
            Weights::Masked(Masked { base, mask: &self.mask, row_len, overlay: (kind % 2 == 1).then_some(ov) })
        }
    }

    proptest! {
        #[test]
        fn micro_kernel_matches_generic(k in 0usize..27, lda_gap in 0usize..3, ldc_gap in 0usize..3, act in 0u8..3, seed in any::<u64>()) {
            let mut r = SplitMix64::new(seed);
            let (lda, ldc) = (k + lda_gap, 8 + ldc_gap);
            let a = floats(7 * lda + k, &mut r);
            let b = floats(8 * k, &mut r);
            let (lo, hi) = [(f32::NEG_INFINITY, f32::INFINITY), (0.0, f32::INFINITY), (-0.3, 0.4)][act as usize];
            let mut ep = TileEpilogue { mul: [0.0; MAX_MR], add: [0.0; MAX_MR], lo, hi };
            for i in 0..8 {
                (ep.mul[i], ep.add[i]) = (r.uniform(-2.0, 2.0), r.uniform(-1.0, 1.0));
            }
            // The portable 4 × 8 kernel twice: rows 0-3 and 4-7.
            let generic = gemm::GENERIC_MICRO;
            let mut want = vec![0.0f32; 8 * 8];
            let mut ep_hi = ep;
            ep_hi.mul[..4].copy_from_slice(&ep.mul[4..8]);
            ep_hi.add[..4].copy_from_slice(&ep.add[4..8]);
            (generic.run)(k, &a, lda, &b, &ep, &mut want, 8);
            (generic.run)(k, &a[4 * lda..], lda, &b, &ep_hi, &mut want[32..], 8);
            let mut c = vec![f32::NAN; 7 * ldc + 8];
            (NEON_MICRO.run)(k, &a, lda, &b, &ep, &mut c, ldc);
            for i in 0..8 {
                for j in 0..ldc {
                    let got = c.get(i * ldc + j).copied().unwrap_or(f32::NAN);
                    if j < 8 {
                        prop_assert!(close(got, want[i * 8 + j]), "({}, {}): {} vs {}", i, j, got, want[i * 8 + j]);
                    } else {
                        prop_assert!(got.is_nan(), "({}, {}) past the tile was written", i, j);
                    }
                }
            }
        }

        #[test]
        fn packing_matches_portable(row_len in 1usize..90, row0 in 0usize..5, m in 1usize..=8, kind in 0u8..6, seed in any::<u64>()) {
            let c = case(row0 + m + 1, row_len, seed);
            let mut base = Weights::F32(&[]);
            let w = c.weights(kind, &mut base, row_len);
            let len = gemm::packed_a_len(m, row_len, 8);
            let (mut want, mut got) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            gemm::pack_a(w, row0, m, row_len, 8, &mut want);
            pack_a(w, row0, m, row_len, 8, &mut got);
            prop_assert_eq!(got, want);
        }

        /// Segments of a row from any column (a linear layer's L1-sized pieces), so that the
        /// mask words start anywhere relative to a group of 16.
        #[test]
        fn segments_match_row_into(row_len in 1usize..700, o in 0usize..3, from in 0.0f64..1.0, to in 0.0f64..1.0, kind in 2u8..6, seed in any::<u64>()) {
            let c = case(3, row_len, seed);
            let mut base = Weights::F32(&[]);
            let w = c.weights(kind, &mut base, row_len);
            let Weights::Masked(mw) = w else { unreachable!() };
            let j0 = (from * row_len as f64) as usize;
            let n = ((to * (row_len - j0) as f64) as usize).max(1).min(row_len - j0);
            let (mut want, mut got) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            mw.row_into(o, j0, &mut want);
            masked_segment(&mw, o, j0, &mut got);
            prop_assert_eq!(got, want);
        }

        #[test]
        fn linear_rows_match_reference(in_f in 1usize..300, out_f in 1usize..6, kind in 0u8..6, seed in any::<u64>()) {
            let c = case(out_f, in_f, seed);
            let mut base = Weights::F32(&[]);
            let w = c.weights(kind, &mut base, in_f);
            let mut r = SplitMix64::new(seed ^ 1);
            let x = floats(in_f, &mut r);
            let (mul, add) = (floats(out_f, &mut r), floats(out_f, &mut r));
            let post = PostOp { mul: &mul, add: &add, lo: -0.5, hi: f32::INFINITY };
            let (mut want, mut got) = (vec![0.0; out_f], vec![0.0; out_f]);
            reference::linear(in_f, out_f, w, &x, &mut want, &post);
            linear_rows(0, in_f, w, &x, &mut got, &post);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{} vs {}", g, w);
            }
        }

        #[test]
        fn interleave_and_deinterleave_match_portable(len in 0usize..40, from in 0usize..5, n in 1usize..=LANES, seed in any::<u64>()) {
            let mut r = SplitMix64::new(seed);
            let data: Vec<Vec<f32>> = (0..LANES).map(|_| floats(from + len, &mut r)).collect();
            let planes: [&[f32]; LANES] = core::array::from_fn(|l| &data[l][..]);
            let (mut want, mut got) = (vec![f32::NAN; len * LANES + 3], vec![f32::NAN; len * LANES + 3]);
            <Plain as DwInner>::interleave(&planes, from, len, &mut want);
            <Neon as DwInner>::interleave(&planes, from, len, &mut got);
            prop_assert_eq!(&got[..len * LANES], &want[..len * LANES]);
            prop_assert!(got[len * LANES..].iter().all(|v| v.is_nan()), "written past len");
            let plane = len.max(1);
            let src = floats(plane * LANES, &mut r);
            let (mut want, mut got) = (vec![f32::NAN; n * plane], vec![f32::NAN; n * plane]);
            <Plain as DwInner>::deinterleave(&src, &mut want, plane);
            <Neon as DwInner>::deinterleave(&src, &mut got, plane);
            prop_assert_eq!(got, want);
        }

        /// Depthwise 3×3 / 5×5, strides 1 and 2, each side padded 0-2, on planes from 1×1 to
        /// 40×40 (the interleaved small-plane path and the padded mid-size one; channel counts
        /// that leave a partial group of 8; one channel is a plain conv, not depthwise),
        /// against the reference conv.
        #[test]
        fn depthwise_matches_reference(c in 2usize..20, h in 1usize..41, w in 1usize..41, k5 in any::<bool>(), s2 in any::<bool>(), pad in prop::array::uniform4(0usize..3), act in 0u8..3, seed in any::<u64>()) {
            let k = if k5 { 5 } else { 3 };
            let s = ConvShape { c_in: c, h, w, c_out: c, kh: k, kw: k, sh: 1 + s2 as usize, sw: 1 + s2 as usize, pad, dh: 1, dw: 1, groups: c };
            prop_assume!(s.out_hw().is_some());
            let mut r = SplitMix64::new(seed);
            let (wf, x) = (floats(c * k * k, &mut r), floats(c * h * w, &mut r));
            let (mul, add) = (floats(c, &mut r), floats(c, &mut r));
            let (lo, hi) = [(f32::NEG_INFINITY, f32::INFINITY), (0.0, f32::INFINITY), (0.0, 0.5)][act as usize];
            let post = PostOp { mul: &mul, add: &add, lo, hi };
            let len = c * s.oh() * s.ow();
            let (mut want, mut got) = (vec![0.0; len], vec![f32::NAN; len]);
            reference::conv2d(&s, Weights::F32(&wf), &x, &mut want, &post);
            let kern = neon_table();
            (kern.conv2d)(&kern, &s, Weights::F32(&wf), &x, &mut got, &post, &mut []);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                prop_assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{:?} element {}: {} vs {}", s, i, g, w);
            }
        }
    }
}
