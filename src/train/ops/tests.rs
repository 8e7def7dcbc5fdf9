//! Finite-difference checks of every backward pass on tiny shapes.
//!
//! Each op's output is reduced to `L = Σ r·y` with fixed random `r`, so `dy = r`. Central
//! differences with step `h = 1e-2` in f64 arithmetic over the f32 forward; tolerance
//! `|fd − analytic| ≤ 2e-3 · (1 + |analytic|)`. Inputs of the piecewise ops (clamps, max pool)
//! are drawn away from their kinks.

use super::*;
use crate::kernels::{ConvShape, Kernels, Weights};
use crate::rng::SplitMix64;

const H: f32 = 1e-2;
const TOL: f32 = 2e-3;

/// `n` values uniform in [−1, 1).
pub(super) fn rand(r: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.uniform(-1.0, 1.0)).collect()
}

/// Random weights (`rows × cols`) masked to `⌊density · n⌋` of their `n` positions (random
/// ones), and the mask.
pub(super) fn masked(
    r: &mut SplitMix64,
    rows: usize,
    cols: usize,
    density: f32,
) -> (Vec<f32>, bitvec::vec::BitVec<u32, bitvec::order::Lsb0>) {
    let n = rows * cols;
    let mut order: Vec<(f32, usize)> = (0..n).map(|i| (r.uniform(0.0, 1.0), i)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut mask = bitvec::vec::BitVec::repeat(false, n);
    for &(_, i) in &order[..(density * n as f32) as usize] {
        mask.set(i, true);
    }
    let w = rand(r, rows * cols).iter().zip(mask.iter()).map(|(&v, m)| if *m { v } else { 0.0 }).collect();
    (w, mask)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Compares `analytic` with central differences of `loss` over every element of `v`.
fn check(what: &str, v: &mut [f32], analytic: &[f32], mut loss: impl FnMut(&[f32]) -> f64) {
    for i in 0..v.len() {
        let keep = v[i];
        v[i] = keep + H;
        let up = loss(v);
        v[i] = keep - H;
        let down = loss(v);
        v[i] = keep;
        let fd = ((up - down) / (2.0 * H as f64)) as f32;
        assert!(
            (fd - analytic[i]).abs() <= TOL * (1.0 + analytic[i].abs()),
            "{what}[{i}]: fd {fd} vs analytic {}",
            analytic[i]
        );
    }
}

fn kernels() -> Vec<Kernels> {
    vec![Kernels::generic(false), Kernels::best_fast()]
}

fn conv_case(s: ConvShape, batch: usize, bias: bool) {
    for k in kernels() {
        let mut r = SplitMix64::new(s.c_in as u64 * 31 + s.kh as u64);
        let wl = s.c_out * s.cin_g() * s.kh * s.kw;
        let (xl, yl) = (batch * s.c_in * s.h * s.w, batch * s.c_out * s.oh() * s.ow());
        let (mut x, mut w, mut b) = (rand(&mut r, xl), rand(&mut r, wl), rand(&mut r, s.c_out));
        let rr = rand(&mut r, yl);
        let f = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; yl];
            conv::forward(&k, &s, Weights::F32(w), bias.then_some(b), x, batch, &mut y, None);
            dot(&y, &rr)
        };
        let (mut dx, mut dw, mut db) = (vec![0.0; xl], vec![0.0; wl], vec![0.0; s.c_out]);
        conv::backward(
            &k,
            &s,
            Weights::F32(&w),
            &x,
            &rr,
            batch,
            Some((&mut dx, Store::Add)),
            Some(&mut dw),
            Some(&mut db),
            None,
            None,
        );
        // A kept transpose of the weights (a frozen layer's) gives the same input gradient.
        let mut wt = vec![f32::NAN; wl];
        conv::transpose_groups(&s, &w, &mut wt);
        let mut dx_kept = vec![0.0; xl];
        let dxk = Some((&mut dx_kept[..], Store::Add));
        conv::backward(&k, &s, Weights::F32(&w), &x, &rr, batch, dxk, None, None, None, Some(&wt));
        assert!(dx.iter().zip(&dx_kept).all(|(u, v)| u.to_bits() == v.to_bits()), "{s:?}: kept transpose");
        let (w0, b0) = (w.clone(), b.clone());
        check("conv dx", &mut x, &dx, |x| f(x, &w0, &b0));
        let x0 = x.clone();
        check("conv dw", &mut w, &dw, |w| f(&x0, w, &b0));
        if bias {
            check("conv db", &mut b, &db, |b| f(&x0, &w0, b));
        }
    }
}

fn shape(c_in: usize, c_out: usize, hw: usize, k: usize, stride: usize, pad: usize, groups: usize) -> ConvShape {
    ConvShape { groups, ..ConvShape::square(c_in, hw, hw + 1, c_out, k, stride, pad) }
}

#[test]
fn conv_gradients() {
    conv_case(shape(2, 3, 5, 3, 1, 1, 1), 2, true);
    conv_case(shape(3, 4, 6, 3, 2, 1, 1), 2, false);
    conv_case(shape(4, 4, 5, 1, 1, 0, 1), 3, false);
    conv_case(shape(4, 6, 5, 3, 1, 0, 2), 2, true);
    conv_case(shape(3, 3, 6, 3, 2, 1, 3), 2, false); // depthwise, stride 2
    conv_case(shape(2, 2, 7, 5, 1, 2, 2), 1, true); // depthwise 5x5
    let wide = shape(2, 2, 9, 3, 8, 1, 2); // depthwise, stride 8: more phases than the lanes path takes
    assert!(!crate::kernels::depthwise::backward_supported(&wide));
    conv_case(wide, 1, false);
    let mut dil = shape(2, 2, 7, 3, 1, 2, 1);
    dil.dh = 2;
    dil.dw = 2;
    conv_case(dil, 1, false);
}

#[test]
fn linear_gradients() {
    let k = Kernels::best_fast();
    let (i, o, batch) = (7, 5, 3);
    let mut r = SplitMix64::new(3);
    let (mut x, mut w, mut b, rr) =
        (rand(&mut r, batch * i), rand(&mut r, o * i), rand(&mut r, o), rand(&mut r, batch * o));
    let f = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0.0; batch * o];
        linear::forward(&k, i, o, Weights::F32(w), Some(b), x, batch, &mut y, None);
        dot(&y, &rr)
    };
    let (mut dx, mut dw, mut db) = (vec![0.0; batch * i], vec![0.0; o * i], vec![0.0; o]);
    linear::backward(
        &k,
        i,
        o,
        Weights::F32(&w),
        &x,
        &rr,
        batch,
        Some(&mut dx),
        Some((&mut dw, Store::Add)),
        Some(&mut db),
        None,
    );
    let (w0, b0) = (w.clone(), b.clone());
    check("linear dx", &mut x, &dx, |x| f(x, &w0, &b0));
    let x0 = x.clone();
    check("linear dw", &mut w, &dw, |w| f(&x0, w, &b0));
    check("linear db", &mut b, &db, |b| f(&x0, &w0, b));
}

#[test]
fn batch_norm_gradients_in_both_modes() {
    let (ch, plane, batch) = (3, 4, 2);
    let n = ch * plane * batch;
    let mut r = SplitMix64::new(4);
    let (mut x, mut g, mut bt, rr) = (rand(&mut r, n), rand(&mut r, ch), rand(&mut r, ch), rand(&mut r, n));
    for affine in [true, false] {
        let f = |x: &[f32], g: &[f32], bt: &[f32]| {
            let (mut rm, mut rv, mut y) = (vec![0.0; ch], vec![1.0; ch], vec![0.0; n]);
            let (g, bt) = if affine { (Some(g), Some(bt)) } else { (None, None) };
            norm::train_forward(ch, plane, batch, x, g, bt, 1e-5, 0.1, &mut rm, &mut rv, None, None, &mut y);
            dot(&y, &rr)
        };
        let (mut rm, mut rv, mut y) = (vec![0.0; ch], vec![1.0; ch], vec![0.0; n]);
        let (ga, ba) = if affine { (Some(&g[..]), Some(&bt[..])) } else { (None, None) };
        let saved = norm::train_forward(ch, plane, batch, &x, ga, ba, 1e-5, 0.1, &mut rm, &mut rv, None, None, &mut y);
        let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; ch], vec![0.0; ch]);
        norm::train_backward(
            ch,
            plane,
            batch,
            &x,
            &saved,
            ga,
            &rr,
            None,
            Some((&mut dx, Store::Add)),
            None,
            Some(&mut dg),
            Some(&mut db),
        );
        let (g0, b0) = (g.clone(), bt.clone());
        check("bn dx", &mut x, &dx, |x| f(x, &g0, &b0));
        if affine {
            let x0 = x.clone();
            check("bn dgamma", &mut g, &dg, |g| f(&x0, g, &b0));
            check("bn dbeta", &mut bt, &db, |b| f(&x0, &g0, b));
        }
    }
    // Evaluation mode and the per-channel affine.
    let (mean, var) = (rand(&mut r, ch), rand(&mut r, ch).iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>());
    let fe = |x: &[f32], g: &[f32], bt: &[f32]| {
        let mut y = vec![0.0; n];
        norm::eval_forward(ch, plane, batch, x, Some(g), Some(bt), 1e-5, &mean, &var, None, None, &mut y);
        dot(&y, &rr)
    };
    let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; ch], vec![0.0; ch]);
    norm::eval_backward(
        ch,
        plane,
        batch,
        &x,
        Some(&g),
        1e-5,
        &mean,
        &var,
        &rr,
        None,
        Some(&mut dx),
        None,
        Some(&mut dg),
        Some(&mut db),
    );
    let (g0, b0, x0) = (g.clone(), bt.clone(), x.clone());
    check("bn eval dx", &mut x, &dx, |x| fe(x, &g0, &b0));
    check("bn eval dgamma", &mut g, &dg, |g| fe(&x0, g, &b0));
    check("bn eval dbeta", &mut bt, &db, |b| fe(&x0, &g0, b));
    let fa = |x: &[f32], g: &[f32], bt: &[f32]| {
        let mut y = vec![0.0; n];
        norm::affine_forward(ch, plane, batch, x, g, bt, None, &mut y);
        dot(&y, &rr)
    };
    let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; ch], vec![0.0; ch]);
    norm::affine_backward(ch, plane, batch, &x, &g, &bt, &rr, None, Some((&mut dx, Store::Add)), &mut dg, &mut db);
    let (g0, b0, x0) = (g.clone(), bt.clone(), x.clone());
    check("affine dx", &mut x, &dx, |x| fa(x, &g0, &b0));
    check("affine dgamma", &mut g, &dg, |g| fa(&x0, g, &b0));
    check("affine dbeta", &mut bt, &db, |b| fa(&x0, &g0, b));
}

#[test]
fn activation_and_add_gradients() {
    let mut r = SplitMix64::new(5);
    // Values at least 0.05 away from the kinks at 0 and 6.
    let mut x: Vec<f32> = (0..40)
        .map(|_| {
            let v = r.uniform(-2.0, 8.0);
            if v.abs() < 0.05 || (v - 6.0).abs() < 0.05 {
                v + 0.2
            } else {
                v
            }
        })
        .collect();
    let rr = rand(&mut r, 40);
    for (lo, hi) in [(0.0, f32::INFINITY), (0.0, 6.0)] {
        let mut dx = vec![0.0; 40];
        act::clamp_backward(&x, &rr, &mut dx, lo, hi, Store::Add);
        check("clamp dx", &mut x, &dx, |x| {
            let mut y = vec![0.0; 40];
            act::clamp_forward(x, &mut y, lo, hi);
            dot(&y, &rr)
        });
    }
    let b = rand(&mut r, 40);
    let mut dx = vec![0.0; 40];
    act::accumulate(&rr, &mut dx, Store::Add);
    check("add dx", &mut x, &dx, |x| {
        let mut y = vec![0.0; 40];
        act::add_forward(x, &b, &mut y, None);
        dot(&y, &rr)
    });
}

#[test]
fn pool_gradients() {
    use crate::kernels::reference::PoolShape;
    let mut r = SplitMix64::new(6);
    let batch = 2;
    for (max, include) in [(true, false), (false, false), (false, true)] {
        let s =
            PoolShape { c: 2, h: 5, w: 6, kh: 3, kw: 2, sh: 2, sw: 2, pad: [1, 0, 1, 1], count_include_pad: include };
        let (oh, ow) = s.out_hw().unwrap();
        let n = batch * s.c * s.h * s.w;
        // Distinct values spaced well beyond the step, so no window's maximum changes.
        let mut x: Vec<f32> = (0..n).map(|i| (i * 7 % n) as f32 * 0.1).collect();
        let rr = rand(&mut r, batch * s.c * oh * ow);
        let mut dx = vec![0.0; n];
        pool::backward(&s, max, &x, &rr, batch, &mut dx);
        check("pool dx", &mut x, &dx, |x| {
            let mut y = vec![0.0; rr.len()];
            pool::forward(&s, max, x, batch, &mut y);
            dot(&y, &rr)
        });
    }
    let (c, plane) = (3, 5);
    let mut x = rand(&mut r, batch * c * plane);
    let rr = rand(&mut r, batch * c);
    let mut dx = vec![0.0; x.len()];
    pool::global_backward(c, plane, &rr, batch, &mut dx);
    check("global pool dx", &mut x, &dx, |x| {
        let mut y = vec![0.0; batch * c];
        pool::global_forward(c, plane, x, batch, &mut y);
        dot(&y, &rr)
    });
}

#[test]
fn cross_entropy_gradient_and_value() {
    let mut r = SplitMix64::new(7);
    let (width, classes) = (5, 3);
    let mut logits = rand(&mut r, 2 * width);
    let labels = [2u32, 0];
    let mut d = vec![0.0; 2 * width];
    let l = loss::cross_entropy(&logits, width, classes, &labels, &mut d);
    // By hand for the first row.
    let row = &logits[..3];
    let z: f32 = row.iter().map(|v| v.exp()).sum();
    let l0 = -(row[2].exp() / z).ln();
    let row = &logits[5..8];
    let z: f32 = row.iter().map(|v| v.exp()).sum();
    let l1 = -(row[0].exp() / z).ln();
    assert!((l - (l0 + l1) / 2.0).abs() < 1e-6);
    assert!(d[3] == 0.0 && d[4] == 0.0 && d[8] == 0.0, "unused logits get no gradient");
    let mut scratch = vec![0.0; 2 * width];
    check("cross-entropy", &mut logits, &d, |lg| loss::cross_entropy(lg, width, classes, &labels, &mut scratch) as f64);
}

#[test]
fn depthwise_backward_is_the_same_on_one_and_two_threads() {
    let s = shape(16, 16, 32, 3, 1, 1, 16);
    let batch = 8;
    let mut r = SplitMix64::new(8);
    let (x, w) = (rand(&mut r, batch * 16 * 32 * 33), rand(&mut r, 16 * 9));
    let dy = rand(&mut r, batch * 16 * s.oh() * s.ow());
    let k = Kernels::best_fast();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
            conv::backward(
                &k,
                &s,
                Weights::F32(&w),
                &x,
                &dy,
                batch,
                Some((&mut dx, Store::Add)),
                Some(&mut dw),
                None,
                None,
                None,
            );
            (dx, dw)
        })
    };
    assert!(batch * 16 * 32 * 33 * 9 >= crate::kernels::PAR_MIN_WORK, "large enough to run in parallel");
    assert_eq!(run(1), run(2));
}

/// Direct loops: `dx += Σ dy·w`, `dw += Σ dy·x` over every (sample, output, tap).
#[allow(clippy::too_many_arguments)]
fn naive_conv_backward(s: &ConvShape, w: &[f32], x: &[f32], dy: &[f32], batch: usize, dx: &mut [f32], dw: &mut [f32]) {
    let (oh, ow, cin_g, cout_g) = (s.oh(), s.ow(), s.cin_g(), s.cout_g());
    let (xl, yl) = (s.c_in * s.h * s.w, s.c_out * oh * ow);
    for b in 0..batch {
        for o in 0..s.c_out {
            let g = o / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let d = dy[b * yl + (o * oh + oy) * ow + ox];
                    for ci in 0..cin_g {
                        for ky in 0..s.kh {
                            for kx in 0..s.kw {
                                let iy = (oy * s.sh + ky * s.dh) as isize - s.pad[0] as isize;
                                let ix = (ox * s.sw + kx * s.dw) as isize - s.pad[1] as isize;
                                if iy < 0 || ix < 0 || iy as usize >= s.h || ix as usize >= s.w {
                                    continue;
                                }
                                let xi = b * xl + ((g * cin_g + ci) * s.h + iy as usize) * s.w + ix as usize;
                                let wi = ((o * cin_g + ci) * s.kh + ky) * s.kw + kx;
                                dx[xi] += d * w[wi];
                                dw[wi] += d * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The batched conv (chunks of samples, GEMMs over each chunk's positions, chunks in
/// parallel) against the reference forward and direct-loop backward, on batches that split
/// into several chunks, and bit for bit the same on one and two threads.
#[test]
fn batched_conv_matches_direct_loops_and_is_thread_independent() {
    let cases = [
        (shape(3, 5, 6, 3, 1, 1, 1), 9),
        (shape(4, 7, 7, 3, 2, 1, 1), 6),
        (shape(6, 9, 5, 1, 1, 0, 1), 11), // pointwise: dx straight from the GEMM
        (shape(4, 6, 6, 1, 2, 0, 1), 5),  // 1×1 stride 2 (a shortcut)
        (shape(6, 4, 5, 3, 1, 1, 2), 7),  // grouped
        (shape(40, 48, 18, 3, 1, 1, 1), 8),
    ];
    for (s, batch) in cases {
        assert!(conv::chunk_samples(&s, batch) < batch, "{s:?}: one chunk only");
        let mut r = SplitMix64::new(s.c_out as u64);
        let wl = s.c_out * s.cin_g() * s.kh * s.kw;
        let (xl, yl) = (batch * s.c_in * s.h * s.w, batch * s.c_out * s.oh() * s.ow());
        let (x, w, bias, dy) = (rand(&mut r, xl), rand(&mut r, wl), rand(&mut r, s.c_out), rand(&mut r, yl));
        let mut want_y = vec![0.0; yl];
        conv::forward(&Kernels::generic(false), &s, Weights::F32(&w), Some(&bias), &x, batch, &mut want_y, None);
        let (mut want_dx, mut want_dw) = (vec![0.0; xl], vec![0.0; wl]);
        naive_conv_backward(&s, &w, &x, &dy, batch, &mut want_dx, &mut want_dw);
        for k in Kernels::available() {
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let mut y = vec![0.0; yl];
                    conv::forward(&k, &s, Weights::F32(&w), Some(&bias), &x, batch, &mut y, None);
                    let (mut dx, mut dw) = (vec![0.5; xl], vec![0.25; wl]);
                    conv::backward(
                        &k,
                        &s,
                        Weights::F32(&w),
                        &x,
                        &dy,
                        batch,
                        Some((&mut dx, Store::Add)),
                        Some(&mut dw),
                        None,
                        None,
                        None,
                    );
                    (y, dx, dw)
                })
            };
            let (y, dx, dw) = run(1);
            let close = |what: &str, got: &[f32], want: &[f32], base: f32| {
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    let w = w + base;
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}[{i}] {s:?} {}: {g} vs {w}", k.isa);
                }
            };
            close("y", &y, &want_y, 0.0);
            close("dx", &dx, &want_dx, 0.5);
            close("dw", &dw, &want_dw, 0.25);
            assert!(run(2) == (y, dx, dw), "{s:?}: two threads differ from one");
        }
    }
}

/// The eight-channel depthwise backward against the row-wise one, on shapes with partial
/// channel blocks, every supported kernel width, rectangular kernels, strides, dilations and
/// uneven padding, each gradient alone and both, added onto non-zero gradients; one scratch
/// reused across shapes. Sums are taken in another order, so within 1e-5 relative.
#[test]
fn depthwise_lanes_match_the_row_wise_backward() {
    let mut r = SplitMix64::new(21);
    use crate::kernels::depthwise;
    let tables = Kernels::available();
    let mut sc = Vec::new();
    let mut cases = 0;
    for i in 0..300 {
        let kw = [1, 3, 5, 7][r.below(4)];
        let kh = 1 + r.below(7);
        let s = ConvShape {
            c_in: 1 + r.below(20),
            h: 1 + r.below(13),
            w: 1 + r.below(13),
            c_out: 0,
            kh,
            kw,
            // Stride 1 (the gather) in about half the shapes.
            sh: [1, 1, 2, 3][r.below(4)],
            sw: [1, 1, 2, 3][r.below(4)],
            pad: [r.below(4), r.below(4), r.below(4), r.below(4)],
            dh: 1 + r.below(2),
            dw: 1 + r.below(2),
            groups: 0,
        };
        let s = ConvShape { c_out: s.c_in, groups: s.c_in, ..s };
        if !depthwise::backward_supported(&s) {
            continue;
        }
        cases += 1;
        let (xl, yl, wl) = (s.c_in * s.h * s.w, s.c_in * s.oh() * s.ow(), s.c_in * kh * kw);
        let (mut x, w, dy) = (rand(&mut r, xl), rand(&mut r, wl), rand(&mut r, yl));
        if i % 10 == 0 && s.c_in > 8 {
            // A NaN in channel 1 must stay in channel 1 (stale lanes of the last block).
            x[s.h * s.w] = f32::NAN;
        }
        let (dx0, dw0) = (rand(&mut r, xl), rand(&mut r, wl));
        for (want_dx, want_dw) in [(true, true), (true, false), (false, true)] {
            let (mut dxa, mut dwa) = (dx0.clone(), dw0.clone());
            let (mut dxb, mut dwb) = (Vec::new(), Vec::new());
            conv::depthwise_backward(&s, &w, &x, &dy, want_dx.then_some(&mut dxa[..]), want_dw.then_some(&mut dwa[..]));
            // Every table's instance (the baseline and each ISA): the same bits.
            sc.resize(sc.len().max(depthwise::backward_scratch_len(&s)), f32::NAN);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            let mut first: Option<(Vec<u32>, Vec<u32>)> = None;
            for k in &tables {
                let (mut dxk, mut dwk) = (dx0.clone(), dw0.clone());
                (k.depthwise_backward)(
                    &s,
                    &w,
                    &x,
                    &dy,
                    want_dx.then_some((&mut dxk[..], Store::Add)),
                    want_dw.then_some(&mut dwk[..]),
                    &mut sc,
                );
                let got = (bits(&dxk), bits(&dwk));
                match &first {
                    None => (dxb, dwb, first) = (dxk, dwk, Some(got)),
                    Some(f) => assert!(*f == got, "{s:?}: table {} gives other bits", k.isa),
                }
            }
            for (what, a, b) in [("dx", &dxa, &dxb), ("dw", &dwa, &dwb)] {
                let scale = a.iter().filter(|v| v.is_finite()).fold(1.0f32, |m, v| m.max(v.abs()));
                for (j, (u, v)) in a.iter().zip(b.iter()).enumerate() {
                    let same = (u.is_nan() && v.is_nan()) || (u - v).abs() <= 1e-5 * scale;
                    assert!(same, "{s:?} {what}[{j}]: row-wise {u} vs lanes {v}");
                }
            }
        }
    }
    assert!(cases > 150, "only {cases} supported shapes drawn");
}

/// An affine with a fused clamp gives the bits of the affine followed by the clamp, forward
/// and backward (values at the bounds, past them and a −0 gradient included).
#[test]
fn fused_affine_clamp_equals_the_two_ops() {
    let (ch, plane, batch) = (3, 7, 2);
    let n = ch * plane * batch;
    let mut r = SplitMix64::new(31);
    let x: Vec<f32> = (0..n).map(|i| if i % 5 == 0 { 0.0 } else { r.uniform(-4.0, 9.0) }).collect();
    let (g, b) = (rand(&mut r, ch), rand(&mut r, ch));
    let mut dy = rand(&mut r, n);
    dy[3] = -0.0;
    for (lo, hi) in [(0.0, 6.0), (0.0, f32::INFINITY)] {
        let (mut a, mut want, mut got) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        norm::affine_forward(ch, plane, batch, &x, &g, &b, None, &mut a);
        act::clamp_forward(&a, &mut want, lo, hi);
        norm::affine_forward(ch, plane, batch, &x, &g, &b, Some((lo, hi)), &mut got);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&got), bits(&want));
        assert!(want.contains(&lo) && (hi.is_infinite() || want.contains(&hi)));
        for store in [Store::Set, Store::Add] {
            let mut da = vec![0.0; n];
            act::clamp_backward(&a, &dy, &mut da, lo, hi, Store::Set);
            let (mut dxw, mut dgw, mut dbw) = (vec![0.5; n], vec![0.25; ch], vec![0.0; ch]);
            norm::affine_backward(ch, plane, batch, &x, &g, &b, &da, None, Some((&mut dxw, store)), &mut dgw, &mut dbw);
            let (mut dxg, mut dgg, mut dbg) = (vec![0.5; n], vec![0.25; ch], vec![0.0; ch]);
            let cl = Some((lo, hi));
            norm::affine_backward(ch, plane, batch, &x, &g, &b, &dy, cl, Some((&mut dxg, store)), &mut dgg, &mut dbg);
            assert_eq!((bits(&dxg), bits(&dgg), bits(&dbg)), (bits(&dxw), bits(&dgw), bits(&dbw)), "{lo} {hi}");
        }
    }
}

/// A batch norm with a fused clamp gives the bits of the norm followed by the clamp, forward
/// and backward, in training and evaluation mode, affine or not.
#[test]
fn fused_norm_clamp_equals_the_two_ops() {
    let (ch, plane, batch) = (3, 7, 2);
    let n = ch * plane * batch;
    let mut r = SplitMix64::new(32);
    let x: Vec<f32> = (0..n).map(|_| r.uniform(-4.0, 9.0)).collect();
    let (g, b) = (rand(&mut r, ch), rand(&mut r, ch));
    let (mean, var) = (rand(&mut r, ch), rand(&mut r, ch).iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>());
    let mut dy = rand(&mut r, n);
    dy[3] = -0.0;
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    for ((lo, hi), affine) in [(0.0, 0.5), (0.0, f32::INFINITY)].into_iter().flat_map(|c| [(c, true), (c, false)]) {
        let (ga, ba) = if affine { (Some(&g[..]), Some(&b[..])) } else { (None, None) };
        // Training mode: the same statistics, the clamped output, and its gradients.
        let norm = |clamp, y: &mut Vec<f32>| {
            let (mut rm, mut rv) = (vec![0.0; ch], vec![1.0; ch]);
            let saved = norm::train_forward(ch, plane, batch, &x, ga, ba, 1e-5, 0.1, &mut rm, &mut rv, None, clamp, y);
            (saved, rm, rv)
        };
        let (mut a, mut want, mut got) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let (saved, rm, rv) = norm(None, &mut a);
        act::clamp_forward(&a, &mut want, lo, hi);
        let (fsaved, frm, frv) = norm(Some((lo, hi)), &mut got);
        assert_eq!(bits(&got), bits(&want));
        assert!(want.contains(&lo) && (hi.is_infinite() || want.contains(&hi)), "values at both bounds");
        assert_eq!((bits(&fsaved.mean), bits(&fsaved.inv_std)), (bits(&saved.mean), bits(&saved.inv_std)));
        assert_eq!((bits(&frm), bits(&frv)), (bits(&rm), bits(&rv)));
        let mut da = vec![0.0; n];
        act::clamp_backward(&a, &dy, &mut da, lo, hi, Store::Set);
        let cl = Some(norm::Clamped { y: &got, lo, hi });
        let grads = |dy: &[f32], cl, store| {
            let (mut dx, mut dg, mut db) = (vec![0.5; n], vec![0.25; ch], vec![0.0; ch]);
            norm::train_backward(
                ch,
                plane,
                batch,
                &x,
                &saved,
                ga,
                dy,
                cl,
                Some((&mut dx, store)),
                None,
                Some(&mut dg),
                Some(&mut db),
            );
            (bits(&dx), bits(&dg), bits(&db))
        };
        for store in [Store::Set, Store::Add] {
            assert_eq!(grads(&dy, cl, store), grads(&da, None, store), "train {lo} {hi} {affine}");
        }
        // Evaluation mode.
        let (mut a, mut want, mut got) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        norm::eval_forward(ch, plane, batch, &x, ga, ba, 1e-5, &mean, &var, None, None, &mut a);
        act::clamp_forward(&a, &mut want, lo, hi);
        norm::eval_forward(ch, plane, batch, &x, ga, ba, 1e-5, &mean, &var, None, Some((lo, hi)), &mut got);
        assert_eq!(bits(&got), bits(&want));
        let mut da = vec![0.0; n];
        act::clamp_backward(&a, &dy, &mut da, lo, hi, Store::Set);
        let cl = Some(norm::Clamped { y: &got, lo, hi });
        let grads = |dy: &[f32], cl| {
            let (mut dx, mut dg, mut db) = (vec![0.5; n], vec![0.25; ch], vec![0.0; ch]);
            norm::eval_backward(
                ch,
                plane,
                batch,
                &x,
                ga,
                1e-5,
                &mean,
                &var,
                dy,
                cl,
                Some(&mut dx),
                None,
                Some(&mut dg),
                Some(&mut db),
            );
            (bits(&dx), bits(&dg), bits(&db))
        };
        assert_eq!(grads(&dy, cl), grads(&da, None), "eval {lo} {hi} {affine}");
    }
}

/// A batch norm with a fused residual sum (and a clamp after it, or none) gives the bits of
/// the norm followed by the add, forward and backward, in training and evaluation mode,
/// affine or not, storing or adding into either gradient, with no input gradient asked for,
/// and on two threads where the tensor is large enough to be split.
#[test]
fn fused_norm_residual_equals_the_norm_then_the_add() {
    let mut r = SplitMix64::new(34);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (ch, plane, batch) in [(3, 7, 2), (4, 1024, 64)] {
        let n = ch * plane * batch;
        let x: Vec<f32> = (0..n).map(|_| r.uniform(-4.0, 9.0)).collect();
        let res = rand(&mut r, n);
        let (g, b) = (rand(&mut r, ch), rand(&mut r, ch));
        let (mean, var) = (rand(&mut r, ch), rand(&mut r, ch).iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>());
        let mut dy = rand(&mut r, n);
        dy[3] = -0.0;
        for (clamp, affine) in
            [None, Some((0.0, 6.0)), Some((0.0, f32::INFINITY))].into_iter().flat_map(|c| [(c, true), (c, false)])
        {
            let (ga, ba) = if affine { (Some(&g[..]), Some(&b[..])) } else { (None, None) };
            let at = format!("{ch}×{plane}×{batch} {clamp:?} affine {affine}");
            // The two ops' gradients into the norm's output and the residual.
            let split = |y: &[f32], rstore: Store| {
                let (mut da, mut dr) = (vec![0.0; n], vec![0.75; n]);
                match clamp {
                    Some((lo, hi)) => act::accumulate_both(y, lo, hi, &dy, (&mut da, Store::Set), (&mut dr, rstore)),
                    None => {
                        act::accumulate(&dy, &mut da, Store::Set);
                        act::accumulate(&dy, &mut dr, rstore);
                    }
                }
                (da, dr)
            };
            for train in [true, false] {
                let forward = |residual: Option<&[f32]>, clamp, y: &mut Vec<f32>| {
                    let (mut rm, mut rv) = (vec![0.0; ch], vec![1.0; ch]);
                    if train {
                        let saved = norm::train_forward(
                            ch, plane, batch, &x, ga, ba, 1e-5, 0.1, &mut rm, &mut rv, residual, clamp, y,
                        );
                        Some((saved, rm, rv))
                    } else {
                        norm::eval_forward(ch, plane, batch, &x, ga, ba, 1e-5, &mean, &var, residual, clamp, y);
                        None
                    }
                };
                let (mut a, mut want, mut got) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                let two = pool.install(|| forward(None, None, &mut a));
                act::add_forward(&a, &res, &mut want, clamp);
                let one = pool.install(|| forward(Some(&res), clamp, &mut got));
                assert_eq!(bits(&got), bits(&want), "{at} train {train}");
                if let (Some(one), Some(two)) = (&one, &two) {
                    assert_eq!((bits(&one.0.mean), bits(&one.0.inv_std)), (bits(&two.0.mean), bits(&two.0.inv_std)));
                    assert_eq!((bits(&one.1), bits(&one.2)), (bits(&two.1), bits(&two.2)), "running statistics");
                    assert!(!one.0.identity, "the output is not x̂ with a residual added");
                }
                let backward = |dy: &[f32], cl: Option<norm::Clamped>, dx: Option<Store>, dres: Option<Store>| {
                    let (mut dx_b, mut dr, mut dg, mut db) =
                        (vec![0.5; n], vec![0.75; n], vec![0.25; ch], vec![0.0; ch]);
                    let dxs = dx.map(|st| (&mut dx_b[..], st));
                    let drs = dres.map(|st| (&mut dr[..], st));
                    pool.install(|| match &one {
                        Some((saved, ..)) => norm::train_backward(
                            ch,
                            plane,
                            batch,
                            &x,
                            saved,
                            ga,
                            dy,
                            cl,
                            dxs,
                            drs,
                            Some(&mut dg),
                            Some(&mut db),
                        ),
                        None => {
                            let dxs = dxs.map(|(d, _)| d);
                            norm::eval_backward(
                                ch,
                                plane,
                                batch,
                                &x,
                                ga,
                                1e-5,
                                &mean,
                                &var,
                                dy,
                                cl,
                                dxs,
                                drs,
                                Some(&mut dg),
                                Some(&mut db),
                            )
                        }
                    });
                    (bits(&dx_b), bits(&dr), bits(&dg), bits(&db))
                };
                let cl = clamp.map(|(lo, hi)| norm::Clamped { y: &got, lo, hi });
                // Evaluation mode only adds into the input gradient.
                let dx_stores: &[Option<Store>] =
                    if train { &[Some(Store::Set), Some(Store::Add), None] } else { &[Some(Store::Add), None] };
                for &dxs in dx_stores {
                    for rstore in [Store::Set, Store::Add] {
                        let (da, dr) = split(&want, rstore);
                        let (dxw, _, dgw, dbw) = backward(&da, None, dxs, None);
                        let (dxg, drg, dgg, dbg) = backward(&dy, cl, dxs, Some(rstore));
                        let ctx = format!("{at} train {train} dx {dxs:?} residual {rstore:?}");
                        assert_eq!((&dxg, &dgg, &dbg), (&dxw, &dgw, &dbw), "{ctx}");
                        assert_eq!(drg, bits(&dr), "{ctx}");
                    }
                }
            }
        }
    }
}

/// `Store::Set` over a buffer of garbage gives the bits of `Store::Add` onto zeros, for
/// every op that can set (a −0 gradient included), and `Add` adds onto what is there.
#[test]
fn stored_gradients_set_as_adding_onto_zeros() {
    let (ch, plane, batch) = (3, 5, 2);
    let n = ch * plane * batch;
    let mut r = SplitMix64::new(8);
    let (x, g, mut dy) = (rand(&mut r, n), rand(&mut r, ch), rand(&mut r, n));
    dy[1] = -0.0;
    let (mut rm, mut rv, mut y) = (vec![0.0; ch], vec![1.0; ch], vec![0.0; n]);
    let saved =
        norm::train_forward(ch, plane, batch, &x, Some(&g), None, 1e-5, 0.1, &mut rm, &mut rv, None, None, &mut y);
    let run = |store: Store, start: f32, op: usize| {
        let mut dx = vec![start; n];
        let (mut dg, mut db) = (vec![0.0; ch], vec![0.0; ch]);
        match op {
            0 => act::clamp_backward(&x, &dy, &mut dx, 0.0, 6.0, store),
            1 => act::accumulate(&dy, &mut dx, store),
            2 => {
                norm::affine_backward(ch, plane, batch, &x, &g, &g, &dy, None, Some((&mut dx, store)), &mut dg, &mut db)
            }
            _ => norm::train_backward(
                ch,
                plane,
                batch,
                &x,
                &saved,
                Some(&g),
                &dy,
                None,
                Some((&mut dx, store)),
                None,
                None,
                None,
            ),
        }
        dx.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    for op in 0..4 {
        let added = run(Store::Add, 0.0, op);
        assert_eq!(run(Store::Set, f32::NAN, op), added, "op {op}");
        assert_eq!(run(Store::Set, -3.5, op), added, "op {op}");
        let onto: Vec<u32> = run(Store::Add, 1.0, op);
        let want: Vec<u32> = added.iter().map(|&b| (1.0 + f32::from_bits(b)).to_bits()).collect();
        assert_eq!(onto, want, "op {op}");
    }
    assert_eq!(run(Store::Set, 7.0, 1)[1], 0.0f32.to_bits(), "a -0 gradient is stored as +0");
    // Convs: pointwise and depthwise (which set), 3×3, 1×1 stride 2 and grouped (which add
    // into chunks zeroed first), dense and, with one group, sparse (a third of the weights
    // masked in), on every table (the reference kernels among them).
    let tables = Kernels::available();
    for s in [
        shape(12, 5, 6, 1, 1, 0, 1),
        shape(4, 6, 6, 3, 1, 1, 2),
        shape(12, 12, 7, 3, 1, 1, 12),
        shape(9, 9, 8, 3, 2, 1, 9),
        shape(5, 6, 6, 3, 1, 1, 1),
        shape(4, 6, 6, 1, 2, 0, 1),
        shape(4, 8, 8, 3, 2, 1, 1),
    ] {
        let (xl, kk) = (batch * s.c_in * s.h * s.w, s.cin_g() * s.kh * s.kw);
        let x = rand(&mut r, xl);
        let (w, mask) = masked(&mut r, s.c_out, kk, 0.34);
        let sp =
            (s.groups == 1).then(|| sparse::SparseW::from_mask(&w, &mask, s.c_out, kk, 1.0).expect("sparse enough"));
        let dy = rand(&mut r, batch * s.c_out * s.oh() * s.ow());
        for k in &tables {
            for sp in [None, sp.as_ref()] {
                let run = |store: Store, start: f32| {
                    let mut dx = vec![start; xl];
                    conv::backward(
                        k,
                        &s,
                        Weights::F32(&w),
                        &x,
                        &dy,
                        batch,
                        Some((&mut dx, store)),
                        None,
                        None,
                        sp,
                        None,
                    );
                    dx.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                };
                let added = run(Store::Add, 0.0);
                assert_eq!(run(Store::Set, f32::NAN), added, "{s:?} on {}, sparse {}", k.isa, sp.is_some());
            }
        }
    }
}

/// Batch norm splits channels (statistics) and samples (outputs) over the threads when large,
/// the affine samples and the element-wise ops pieces: the same bits with one thread or two.
#[test]
fn split_ops_are_thread_independent() {
    let (ch, plane, batch) = (16, 1024, 17);
    let n = ch * plane * batch;
    assert!(n >= crate::kernels::PAR_MIN_WORK, "large enough to split");
    let mut r = SplitMix64::new(12);
    let (x, g, b, dy) = (rand(&mut r, n), rand(&mut r, ch), rand(&mut r, ch), rand(&mut r, n));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (mut rm, mut rv, mut y) = (vec![0.0; ch], vec![1.0; ch], vec![0.0; n]);
            let saved = norm::train_forward(
                ch,
                plane,
                batch,
                &x,
                Some(&g),
                Some(&b),
                1e-5,
                0.1,
                &mut rm,
                &mut rv,
                None,
                None,
                &mut y,
            );
            let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; ch], vec![0.0; ch]);
            let dxs = Some((&mut dx[..], Store::Set));
            norm::train_backward(
                ch,
                plane,
                batch,
                &x,
                &saved,
                Some(&g),
                &dy,
                None,
                dxs,
                None,
                Some(&mut dg),
                Some(&mut db),
            );
            // The same norm with a fused ReLU6.
            let (mut fy, mut fdx, mut fdg) = (vec![0.0; n], vec![0.0; n], vec![0.0; ch]);
            let (mut frm, mut frv) = (vec![0.0; ch], vec![1.0; ch]);
            let six = Some((0.0, 6.0));
            let fsaved = norm::train_forward(
                ch,
                plane,
                batch,
                &x,
                Some(&g),
                None,
                1e-5,
                0.1,
                &mut frm,
                &mut frv,
                None,
                six,
                &mut fy,
            );
            let cl = Some(norm::Clamped { y: &fy, lo: 0.0, hi: 6.0 });
            let dxs = Some((&mut fdx[..], Store::Set));
            norm::train_backward(ch, plane, batch, &x, &fsaved, Some(&g), &dy, cl, dxs, None, Some(&mut fdg), None);
            let (mut ay, mut adx, mut adg, mut adb) = (vec![0.0; n], vec![0.0; n], vec![0.5; ch], vec![0.5; ch]);
            norm::affine_forward(ch, plane, batch, &x, &g, &b, None, &mut ay);
            norm::affine_backward(
                ch,
                plane,
                batch,
                &x,
                &g,
                &b,
                &dy,
                None,
                Some((&mut adx, Store::Add)),
                &mut adg,
                &mut adb,
            );
            let (mut cy, mut cdx, mut sum) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            act::clamp_forward(&x, &mut cy, 0.0, 0.5);
            act::clamp_backward(&x, &dy, &mut cdx, 0.0, 0.5, Store::Set);
            act::add_forward(&x, &dy, &mut sum, None);
            act::accumulate(&x, &mut sum, Store::Add);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            [&y, &rm, &rv, &dx, &dg, &db, &fy, &fdx, &fdg, &ay, &adx, &adg, &adb, &cy, &cdx, &sum].map(|v| bits(v))
        })
    };
    assert_eq!(run(1), run(2));
}

/// Batch statistics of values far from zero (mean 1000, spread 0.01) and of many values
/// (a channel of 64 × 32 × 32) against f64 sums: f32 block sums lose no more than f32
/// inputs round to.
#[test]
fn batch_statistics_hold_for_large_means_and_many_values() {
    let mut r = SplitMix64::new(12);
    for (ch, plane, batch, centre, spread) in [(2, 9, 3, 1000.0f32, 0.01f32), (2, 1024, 64, 0.5, 1.0)] {
        let n = ch * plane * batch;
        let x: Vec<f32> = (0..n).map(|_| centre + spread * r.uniform(-1.0, 1.0)).collect();
        let (mut rm, mut rv, mut y) = (vec![0.0; ch], vec![1.0; ch], vec![0.0; n]);
        let saved =
            norm::train_forward(ch, plane, batch, &x, None, None, 0.0, 1.0, &mut rm, &mut rv, None, None, &mut y);
        for c in 0..ch {
            let vals: Vec<f64> =
                (0..batch).flat_map(|b| x[(b * ch + c) * plane..][..plane].iter().map(|&v| v as f64)).collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / vals.len() as f64;
            assert!((saved.mean[c] as f64 - mean).abs() <= 1e-6 * mean.abs(), "{} vs {mean}", saved.mean[c]);
            let inv_std = 1.0 / var.sqrt();
            assert!((saved.inv_std[c] as f64 - inv_std).abs() <= 1e-4 * inv_std, "{} vs {inv_std}", saved.inv_std[c]);
        }
    }
}

/// A residual sum with a fused clamp gives the bits of the sum followed by the clamp, and its
/// gradient (masked in place by the output then passed on, or masked on the way into both
/// operands) the bits of the clamp's backward followed by the sum's, into a fresh buffer and
/// added into one.
#[test]
fn fused_add_clamp_equals_the_two_ops() {
    let mut r = SplitMix64::new(34);
    let n = 4099;
    let (a, b, dy) = (rand(&mut r, n), rand(&mut r, n), rand(&mut r, n));
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    for (lo, hi) in [(0.0, f32::INFINITY), (0.0, 0.6), (-0.3, 0.2)] {
        let (mut sum, mut want, mut got) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        act::add_forward(&a, &b, &mut sum, None);
        act::clamp_forward(&sum, &mut want, lo, hi);
        act::add_forward(&a, &b, &mut got, Some((lo, hi)));
        assert_eq!(bits(&got), bits(&want), "{lo} {hi}");
        assert!(want.contains(&lo), "values at the lower bound");
        for store in [Store::Set, Store::Add] {
            let (mut dsum, mut want_dx) = (vec![0.0; n], vec![0.5; n]);
            act::clamp_backward(&sum, &dy, &mut dsum, lo, hi, Store::Set);
            act::accumulate(&dsum, &mut want_dx, store);
            let (mut masked, mut got_dx) = (dy.clone(), vec![0.5; n]);
            act::clamp_mask(&got, &mut masked, lo, hi);
            act::accumulate(&masked, &mut got_dx, store);
            assert_eq!(bits(&got_dx), bits(&want_dx), "{lo} {hi} {store:?}");
            // Into both operands in one pass, each with its own store.
            for other in [Store::Set, Store::Add] {
                let (mut want_o, mut got_o) = (vec![-0.25; n], vec![-0.25; n]);
                act::accumulate(&dsum, &mut want_o, other);
                let mut both_dx = vec![0.5; n];
                act::accumulate_both(&got, lo, hi, &dy, (&mut both_dx, store), (&mut got_o, other));
                assert_eq!(bits(&both_dx), bits(&want_dx), "{lo} {hi} {store:?} {other:?}");
                assert_eq!(bits(&got_o), bits(&want_o), "{lo} {hi} {store:?} {other:?}");
            }
        }
    }
}

/// A clamp's mask kept as bits gives [`act::clamp_mask`]'s bits: at the bounds, past them,
/// at ±0, NaN and ±∞, in whole words and in a partial last one.
#[test]
fn clamp_mask_bits_equal_the_mask_from_the_values() {
    let mut r = SplitMix64::new(35);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    let special = [0.0, -0.0, 6.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, 5.999_999];
    for n in [1, 31, 32, 33, 64, 1000] {
        for (lo, hi) in [(0.0, 6.0), (0.0, f32::INFINITY)] {
            let mut y: Vec<f32> = (0..n).map(|_| r.uniform(-2.0, 8.0)).collect();
            for (i, v) in special.iter().enumerate().filter(|(i, _)| i * 5 < n) {
                y[i * 5] = *v;
            }
            let mut dy: Vec<f32> = (0..n).map(|_| r.uniform(-1.0, 1.0)).collect();
            dy[n / 2] = -0.0;
            dy[n - 1] = f32::NAN;
            let mut want = dy.clone();
            act::clamp_mask(&y, &mut want, lo, hi);
            // Words past the mask's are left alone.
            let mut mask = vec![u32::MAX; act::mask_words(n) + 1];
            act::clamp_bits(&y, lo, hi, &mut mask);
            assert_eq!(mask[act::mask_words(n)], u32::MAX, "{n}");
            let passed = mask[..act::mask_words(n)].iter().map(|w| w.count_ones() as usize).sum::<usize>();
            assert_eq!(passed, y.iter().filter(|&&v| v > lo && v < hi).count(), "{n}: one bit per passing value");
            let mut got = dy.clone();
            act::clamp_mask_bits(&mask, &mut got);
            assert_eq!(bits(&got), bits(&want), "{n} {lo} {hi}");
        }
    }
}

/// A conv with a fused clamp gives the bits of the conv followed by the clamp on every path
/// (dense batched, sparse, depthwise, reference), and its in-place gradient mask the bits of
/// the clamp's own backward; its input gradient does not read the input.
#[test]
fn fused_conv_clamp_equals_the_two_ops() {
    let mut r = SplitMix64::new(33);
    let mut tables = vec![Kernels::generic(false), Kernels::generic(true)];
    tables.extend(Kernels::available());
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    for s in [shape(6, 9, 5, 1, 1, 0, 1), shape(5, 7, 6, 3, 2, 1, 1), shape(6, 6, 7, 3, 1, 1, 6)] {
        let batch = 3;
        let wl = s.c_out * s.cin_g() * s.kh * s.kw;
        let (xl, yl) = (batch * s.c_in * s.h * s.w, batch * s.c_out * s.oh() * s.ow());
        let (x, mut w, bias) = (rand(&mut r, xl), rand(&mut r, wl), rand(&mut r, s.c_out));
        let mask: bitvec::vec::BitVec<u32, bitvec::order::Lsb0> = (0..wl).map(|i| i % 3 == 1).collect();
        let sparse = (s.groups == 1).then(|| {
            w.iter_mut().zip(mask.iter()).filter(|(_, m)| !**m).for_each(|(v, _)| *v = 0.0);
            let sp = sparse::SparseW::from_mask(&w, &mask, s.c_out, wl / s.c_out, 1.0);
            sp.expect("a sparse form at density 1/3")
        });
        for k in &tables {
            for sp in [None, sparse.as_ref()] {
                for (lo, hi) in [(0.0, 0.5), (0.0, f32::INFINITY), (-0.1, 0.2)] {
                    let (mut y, mut want, mut got) = (vec![0.0; yl], vec![0.0; yl], vec![0.0; yl]);
                    conv::forward(k, &s, Weights::F32(&w), Some(&bias), &x, batch, &mut y, sp);
                    act::clamp_forward(&y, &mut want, lo, hi);
                    conv::forward_clamped(
                        k,
                        &s,
                        Weights::F32(&w),
                        Some(&bias),
                        Some((lo, hi)),
                        &x,
                        batch,
                        &mut got,
                        sp,
                    );
                    let at = format!("{s:?} {} sparse {} [{lo}, {hi}]", k.micro.name, sp.is_some());
                    assert_eq!(bits(&got), bits(&want), "{at}");
                    assert!(want.contains(&lo) && (hi.is_infinite() || want.contains(&hi)), "{at}: both bounds met");
                    let mut dy = rand(&mut r, yl);
                    dy[0] = -0.0;
                    let mut dx = vec![f32::NAN; yl];
                    act::clamp_backward(&y, &dy, &mut dx, lo, hi, Store::Set);
                    act::clamp_mask(&got, &mut dy, lo, hi);
                    assert_eq!(bits(&dy), bits(&dx), "{at}");
                    // The input gradient alone reads no input: the same bits with `x` empty.
                    let (wt, mut with_x, mut without) = (Weights::F32(&w), vec![0.0; xl], vec![0.0; xl]);
                    conv::backward(k, &s, wt, &x, &dy, batch, Some((&mut with_x, Store::Set)), None, None, sp, None);
                    conv::backward(k, &s, wt, &[], &dy, batch, Some((&mut without, Store::Set)), None, None, sp, None);
                    assert_eq!(bits(&without), bits(&with_x), "{at}");
                    assert!(with_x.iter().any(|&g| g != 0.0), "{at}");
                }
            }
        }
    }
}
