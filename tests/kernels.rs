//! Fast kernels against the reference kernels on random shapes (strides, padding, dilation,
//! groups, depthwise, odd sizes), with int8 and f32 weights, and whole networks with batch > 1.
//! Tolerance: |fast − ref| ≤ 1e-4 · (1 + |ref|) per element — 1e-4 relative, with an absolute
//! floor for outputs near zero where summation order dominates.

use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::import::init::{random_backbone, Arch};
use edgecl::kernels::{fast, reference, ConvShape, Kernels, Masked, Overlay, PostOp, Weights};
use proptest::prelude::*;

fn close(fast: &[f32], reference: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(fast.len(), reference.len());
    for (i, (&a, &b)) in fast.iter().zip(reference).enumerate() {
        prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "element {}: fast {} vs reference {}", i, a, b);
    }
    Ok(())
}

/// Deterministic pseudo-random floats in [-1, 1).
fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Random conv geometry: groups, depthwise (half the cases), kernels 1–5 (square in half the
/// cases, which selects the specialised small-plane depthwise kernels), strides 1–2, padding
/// 0–2 per side, dilation 1–2, sides 1–13.
fn conv_shape() -> impl Strategy<Value = ConvShape> {
    let dims = (1usize..4, 1usize..6, 1usize..6, 1usize..6, 1usize..6, any::<bool>());
    let geometry = (1usize..3, 1usize..3, 0usize..3, 1usize..3, 1usize..14, 1usize..14, any::<bool>());
    (dims, geometry)
        .prop_flat_map(|((groups, cig, cog, kh, kw, square), (sh, sw, pad, dil, h, w, depthwise))| {
            let (groups, cig, cog) = if depthwise { (cig * groups, 1, 1) } else { (groups, cig, cog) };
            let (kw, sw, dil) = if square { (kh, sh, 1) } else { (kw, sw, dil) };
            (Just((groups, cig, cog, kh, kw, sh, sw, dil, h, w)), prop::array::uniform4(0usize..=pad))
        })
        .prop_filter_map("window must fit", |((groups, cig, cog, kh, kw, sh, sw, dil, h, w), pad)| {
            let s = ConvShape {
                c_in: groups * cig,
                h,
                w,
                c_out: groups * cog,
                kh,
                kw,
                sh,
                sw,
                pad,
                dh: dil,
                dw: dil,
                groups,
            };
            s.out_hw().map(|_| s)
        })
}

fn run_conv(k: &Kernels, s: &ConvShape, weights: Weights, x: &[f32], post: &PostOp) -> Vec<f32> {
    let mut y = vec![0.0; s.c_out * s.oh() * s.ow()];
    if k.fast {
        let mut scratch = vec![0.0; fast::conv_scratch_len(s, k)];
        (k.conv2d)(k, s, weights, x, &mut y, post, &mut scratch);
    } else {
        reference::conv2d(s, weights, x, &mut y, post);
    }
    y
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn conv_fast_matches_reference(s in conv_shape(), seed in any::<u64>(), int8 in any::<bool>(), act in 0u8..3) {
        let nw = s.c_out * s.cin_g() * s.kh * s.kw;
        let wf = floats(nw, seed);
        let q: Vec<i8> = floats(nw, seed ^ 1).iter().map(|v| (v * 127.0) as i8).collect();
        let scale = floats(s.c_out, seed ^ 2).iter().map(|v| v.abs() * 0.05 + 0.001).collect::<Vec<_>>();
        let weights = if int8 { Weights::I8 { q: &q, scale: &scale } } else { Weights::F32(&wf) };
        let x = floats(s.c_in * s.h * s.w, seed ^ 3);
        let mul = floats(s.c_out, seed ^ 4);
        let add = floats(s.c_out, seed ^ 5);
        let (lo, hi) = [(f32::NEG_INFINITY, f32::INFINITY), (0.0, f32::INFINITY), (0.0, 6.0)][act as usize];
        let post = PostOp { mul: &mul, add: &add, lo, hi };
        let want = run_conv(&Kernels::generic(false), &s, weights, &x, &post);
        for k in Kernels::available().iter().filter(|k| k.fast) {
            close(&run_conv(k, &s, weights, &x, &post), &want)?;
        }
    }

    #[test]
    fn linear_fast_matches_reference(i in 1usize..70, o in 1usize..40, seed in any::<u64>(), int8 in any::<bool>()) {
        let wf = floats(i * o, seed);
        let q: Vec<i8> = wf.iter().map(|v| (v * 127.0) as i8).collect();
        let scale = vec![0.01; o];
        let weights = if int8 { Weights::I8 { q: &q, scale: &scale } } else { Weights::F32(&wf) };
        let x = floats(i, seed ^ 7);
        let (mul, add) = (floats(o, seed ^ 8), floats(o, seed ^ 9));
        let post = PostOp { mul: &mul, add: &add, lo: f32::NEG_INFINITY, hi: f32::INFINITY };
        let (mut a, mut b) = (vec![0.0; o], vec![0.0; o]);
        reference::linear(i, o, weights, &x, &mut b, &post);
        for k in Kernels::available().iter().filter(|k| k.fast) {
            (k.linear)(k, i, o, weights, &x, &mut a, &post);
            close(&a, &b)?;
        }
    }
}

/// A random mask and overlay over `n` weights in rows of `row_len`, and the dense weights a
/// task with them sees, computed the obvious way: `mask ? (present ? value : base) : 0`.
struct MaskCase {
    mask: Vec<u32>,
    present: Vec<u32>,
    row_rank: Vec<u32>,
    values: Vec<f32>,
    dense: Vec<f32>,
}

fn mask_case(base: &Weights, n: usize, row_len: usize, seed: u64) -> MaskCase {
    let words = n.div_ceil(32);
    let bit = |v: f32, density: f32| (v + 1.0) / 2.0 < density;
    let (m, p) = (floats(n, seed ^ 11), floats(n, seed ^ 12));
    let density = 0.1 + 0.8 * (floats(1, seed ^ 13)[0] + 1.0) / 2.0;
    let (mut mask, mut present) = (vec![0u32; words], vec![0u32; words]);
    let (mut values, mut dense, mut row_rank) = (Vec::new(), vec![0.0; n], Vec::new());
    let vals = floats(n, seed ^ 14);
    for i in 0..n {
        if i % row_len.max(1) == 0 {
            row_rank.push(values.len() as u32);
        }
        let (on, has) = (bit(m[i], density), bit(p[i], 0.3));
        mask[i / 32] |= u32::from(on) << (i % 32);
        present[i / 32] |= u32::from(has) << (i % 32);
        if has {
            values.push(vals[i]);
        }
        dense[i] = match (on, has) {
            (false, _) => 0.0,
            (true, true) => vals[i],
            (true, false) => base.get(i / row_len.max(1), i),
        };
    }
    MaskCase { mask, present, row_rank, values, dense }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Masks and overlays applied while packing (fast) or per weight (reference) equal a conv
    /// over the task's dense weights.
    #[test]
    fn masked_conv_matches_dense(s in conv_shape(), seed in any::<u64>(), int8 in any::<bool>(), overlay in any::<bool>()) {
        let row_len = s.cin_g() * s.kh * s.kw;
        let nw = s.c_out * row_len;
        let wf = floats(nw, seed);
        let q: Vec<i8> = floats(nw, seed ^ 1).iter().map(|v| (v * 127.0) as i8).collect();
        let scale = floats(s.c_out, seed ^ 2).iter().map(|v| v.abs() * 0.05 + 0.001).collect::<Vec<_>>();
        let base = if int8 { Weights::I8 { q: &q, scale: &scale } } else { Weights::F32(&wf) };
        let mut c = mask_case(&base, nw, row_len, seed);
        if !overlay {
            c.present.fill(0);
            c.values.clear();
            c.row_rank.fill(0);
            c = MaskCase { dense: (0..nw).map(|i| if c.mask[i / 32] >> (i % 32) & 1 != 0 { base.get(i / row_len, i) } else { 0.0 }).collect(), ..c };
        }
        let ov = Overlay { present: &c.present, row_rank: &c.row_rank, values: &c.values };
        let masked = Weights::Masked(Masked { base: &base, mask: &c.mask, row_len, overlay: overlay.then_some(ov) });
        for i in 0..nw {
            prop_assert_eq!(masked.get(i / row_len, i), c.dense[i], "weight {}", i);
        }
        let x = floats(s.c_in * s.h * s.w, seed ^ 3);
        let (mul, add) = (floats(s.c_out, seed ^ 4), floats(s.c_out, seed ^ 5));
        let post = PostOp { mul: &mul, add: &add, lo: f32::NEG_INFINITY, hi: f32::INFINITY };
        let want = run_conv(&Kernels::generic(false), &s, Weights::F32(&c.dense), &x, &post);
        for k in Kernels::available() {
            close(&run_conv(&k, &s, masked, &x, &post), &want)?;
        }
    }

    #[test]
    fn masked_linear_matches_dense(i in 1usize..600, o in 1usize..12, seed in any::<u64>(), int8 in any::<bool>(), overlay in any::<bool>()) {
        let wf = floats(i * o, seed);
        let q: Vec<i8> = wf.iter().map(|v| (v * 127.0) as i8).collect();
        let scale = vec![0.01; o];
        let base = if int8 { Weights::I8 { q: &q, scale: &scale } } else { Weights::F32(&wf) };
        let mut c = mask_case(&base, i * o, i, seed);
        if !overlay {
            c.dense = (0..i * o).map(|j| if c.mask[j / 32] >> (j % 32) & 1 != 0 { base.get(j / i, j) } else { 0.0 }).collect();
        }
        let ov = Overlay { present: &c.present, row_rank: &c.row_rank, values: &c.values };
        let masked = Weights::Masked(Masked { base: &base, mask: &c.mask, row_len: i, overlay: overlay.then_some(ov) });
        let x = floats(i, seed ^ 7);
        let (mul, add) = (floats(o, seed ^ 8), floats(o, seed ^ 9));
        let post = PostOp { mul: &mul, add: &add, lo: f32::NEG_INFINITY, hi: f32::INFINITY };
        let (mut a, mut b) = (vec![0.0; o], vec![0.0; o]);
        reference::linear(i, o, Weights::F32(&c.dense), &x, &mut b, &post);
        for k in Kernels::available() {
            if k.fast {
                (k.linear)(&k, i, o, masked, &x, &mut a, &post);
            } else {
                reference::linear(i, o, masked, &x, &mut a, &post);
            }
            close(&a, &b)?;
        }
    }
}

/// The whole plan (fusions, buffer reuse, batch > 1) on the fast path equals the reference.
#[test]
fn whole_networks_fast_equal_reference_with_batches() {
    for (arch, batch) in [(Arch::GemResnet18, 3), (Arch::Lenet, 5), (Arch::Fc1024, 2)] {
        for format in [WeightFormat::I8, WeightFormat::F32] {
            let bytes = random_backbone(arch, 7, 11).emit(format);
            let bb = Backbone::open(&bytes).unwrap();
            let x = floats(batch * bb.input_shape().len(), 5);
            let run = |k: Kernels| {
                let mut scratch = vec![0.0; bb.scratch_len(&k, batch)];
                bb.forward(&k, &x, batch, &mut scratch).to_vec()
            };
            let want = run(Kernels::generic(false));
            assert_eq!(want.len(), batch * 7);
            assert!(want.iter().any(|&v| v != 0.0), "{arch:?}: the output is not all zeros");
            for k in Kernels::available().into_iter().filter(|k| k.fast) {
                let got = run(k);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{arch:?} {format:?} {k:?}: {a} vs {b}");
                }
            }
            // Each sample of a batch equals that sample run alone.
            let k = Kernels::best_fast();
            let mut scratch = vec![0.0; bb.scratch_len(&k, 1)];
            let per = bb.input_shape().len();
            let batched = run(k);
            for b in 0..batch {
                let alone = bb.forward(&k, &x[b * per..(b + 1) * per], 1, &mut scratch).to_vec();
                assert_eq!(alone, batched[b * 7..(b + 1) * 7], "{arch:?}: sample {b} differs alone vs in a batch");
            }
        }
    }
}

/// Depthwise planes too large for the property test's sides: the mid-size (padded, stride-2
/// split, with even and odd left padding) and large (row-wise) paths, against the reference.
#[test]
fn depthwise_mid_and_large_planes_match_reference() {
    for (side, k, stride, pad) in [
        (40, 3, 1, [1; 4]),
        (41, 3, 2, [0, 0, 1, 1]),
        (38, 5, 2, [1, 2, 2, 1]),
        (44, 5, 2, [1, 1, 2, 2]),
        (43, 3, 2, [1, 3, 0, 0]),
        (70, 5, 1, [2; 4]),
        (130, 3, 2, [1; 4]),
    ] {
        let s = ConvShape {
            c_in: 9,
            h: side,
            w: side + 3,
            c_out: 9,
            kh: k,
            kw: k,
            sh: stride,
            sw: stride,
            pad,
            dh: 1,
            dw: 1,
            groups: 9,
        };
        let wf = floats(9 * k * k, 1);
        let x = floats(9 * side * (side + 3), 2);
        let (mul, add) = (floats(9, 3), floats(9, 4));
        let post = PostOp { mul: &mul, add: &add, lo: 0.0, hi: 6.0 };
        let want = run_conv(&Kernels::generic(false), &s, Weights::F32(&wf), &x, &post);
        for kern in Kernels::available().iter().filter(|k| k.fast) {
            let got = run_conv(kern, &s, Weights::F32(&wf), &x, &post);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{s:?} {kern:?}: {a} vs {b}");
            }
        }
    }
}
