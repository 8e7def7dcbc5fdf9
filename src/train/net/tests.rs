use super::samples::Kept;
use super::*;
use crate::format::graph::{InputSpec, Op as GOp, WeightFormat};
use crate::import::{Ir, IrOp, IrWeights};
use crate::rng::SplitMix64;
use crate::train::ops::loss;

/// conv 3×3 (bias, no norm after: CLR adds an affine) → relu6 → conv 3×3 → BN (affine) →
/// relu → GAP → flatten, with a CLR kernel after both 3×3 convs and a new head.
fn tiny() -> Vec<u8> {
    let mut r = SplitMix64::new(9);
    let mut w = |n: usize| IrWeights::F32((0..n).map(|_| r.uniform(-0.5, 0.5)).collect());
    let conv = |cin, cout, weight, bias| IrOp::square_conv(cin, cout, 3, 1, weight, bias);
    let mut ir = Ir::new("tiny", "test", InputSpec::plain(2, 5, 5));
    let v = ir.push(0, conv(2, 3, w(54), Some(vec![0.1, -0.2, 0.3])));
    let v = ir.push(v, IrOp::Plain(GOp::Relu6));
    let v = ir.push(v, conv(3, 4, w(108), None));
    let v = ir.push(
        v,
        IrOp::BatchNorm {
            eps: 1e-5,
            mean: vec![0.1; 4],
            var: vec![1.5; 4],
            affine: Some((vec![1.2, 0.8, 1.0, 0.9], vec![0.1, 0.0, -0.1, 0.2])),
        },
    );
    let v = ir.push(v, IrOp::Plain(GOp::Relu));
    let v = ir.push(v, IrOp::Plain(GOp::GlobalAvgPool));
    ir.push(v, IrOp::Plain(GOp::Flatten));
    ir.emit(WeightFormat::F32)
}

#[test]
fn clr_network_gradients_match_finite_differences() {
    let bytes = tiny();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut net = Net::new(&bb, Recipe { reprogram: true, head: Some(3), ..Recipe::default() });
    assert_eq!(net.reprogram.len(), 2);
    assert_eq!(net.affines.len(), 1, "only the first conv lacks a following norm");
    // The relu6 that alone reads that affine is fused into it, and the relu into the norm.
    let fused = [("conv", None), ("affine", Some((0.0, 6.0))), ("conv", None), ("norm", Some((0.0, f32::INFINITY)))];
    assert_eq!(clamps(&net), fused);
    let trained = clr_trained(&net);
    gradients_match_finite_differences(&mut net, &k, &trained, 1);
}

/// The params CLR trains: its kernels, affines, the norms' γ and β, and the head.
fn clr_trained(net: &Net) -> Vec<usize> {
    let mut trained = net.reprogram.clone();
    trained.extend(net.affines.iter().flat_map(|&(g, b)| [g, b]));
    trained.extend(net.norms.iter().flat_map(|n| n.gamma.into_iter().chain(n.beta)));
    trained.extend(net.head.map(|(w, b)| [w, b]).unwrap());
    trained
}

/// Each conv, norm, affine and unfused clamp of `net`, in order, with the clamp it applies.
fn clamps(net: &Net) -> Vec<(&'static str, Option<(f32, f32)>)> {
    let clamp = |n: &Node| match n.op {
        NodeOp::Conv { clamp, .. } => Some(("conv", clamp)),
        NodeOp::Affine { clamp, .. } => Some(("affine", clamp)),
        NodeOp::Norm { clamp, .. } => Some(("norm", clamp)),
        NodeOp::Clamp { lo, hi } => Some(("clamp", Some((lo, hi)))),
        _ => None,
    };
    net.nodes.iter().filter_map(clamp).collect()
}

/// Moves every param in `trained` by U(±0.3) from where it starts and trains it, then checks
/// their analytic gradients (training mode) against central differences of the cross-entropy
/// loss on a random batch of three.
fn gradients_match_finite_differences(net: &mut Net, k: &Kernels, trained: &[usize], seed: u64) {
    let mut r = SplitMix64::new(seed);
    for &p in trained {
        for v in &mut net.params[p].value {
            *v += r.uniform(-0.3, 0.3);
        }
        net.params[p].trained = true;
    }
    net.train_mode = true;
    let batch = 3;
    let x: Vec<f32> = (0..batch * 50).map(|_| r.uniform(-1.0, 1.0)).collect();
    let labels = [0u32, 2, 1];
    let loss_of = |net: &mut Net| -> f64 {
        let out = net.forward(k, &x, batch).to_vec();
        let mut d = vec![0.0; out.len()];
        loss::cross_entropy(&out, 3, 3, &labels, &mut d) as f64
    };
    net.zero_grad();
    let out = net.forward(k, &x, batch).to_vec();
    let mut d = vec![0.0; out.len()];
    loss::cross_entropy(&out, 3, 3, &labels, &mut d);
    net.backward(k, &d);
    // A step of 1e-3 keeps the clamps' kinks out of almost every difference (1e-2 crossed
    // a few); f32 rounding then costs about 1e-4 of the 2e-3 tolerance.
    let h = 1e-3f32;
    for &p in trained {
        assert!(net.params[p].grad.iter().any(|&g| g != 0.0), "param {p} gets a gradient");
        for i in 0..net.params[p].value.len() {
            let keep = net.params[p].value[i];
            net.params[p].value[i] = keep + h;
            let up = loss_of(net);
            net.params[p].value[i] = keep - h;
            let down = loss_of(net);
            net.params[p].value[i] = keep;
            let fd = ((up - down) / (2.0 * h as f64)) as f32;
            let an = net.params[p].grad[i];
            assert!((fd - an).abs() <= 2e-3 * (1.0 + an.abs()), "param {p}[{i}]: fd {fd} vs analytic {an}");
        }
    }
}

/// Without CLR the relu6 after the first conv is fused into the conv (its epilogue forward,
/// an in-place mask of `dy` backward), and the gradients still match finite differences.
#[test]
fn a_relu_fused_into_a_conv_passes_finite_differences() {
    let bytes = tiny();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut net = Net::new(&bb, Recipe { materialise: true, head: Some(3), ..Recipe::default() });
    assert_eq!(clamps(&net), [("conv", Some((0.0, 6.0))), ("conv", None), ("norm", Some((0.0, f32::INFINITY)))]);
    let mut trained: Vec<usize> = net.maskable.iter().filter_map(|&(_, p)| p).collect();
    trained.extend(net.head.map(|(w, b)| [w, b]).unwrap());
    gradients_match_finite_differences(&mut net, &k, &trained, 2);
}

/// conv 3×3 → BN → relu (the stem) → conv 3×3 → BN → add of the stem → relu → GAP →
/// flatten: a residual block as GEMResNet18 has them.
fn residual() -> Vec<u8> {
    let mut r = SplitMix64::new(10);
    let mut w = |n: usize| IrWeights::F32((0..n).map(|_| r.uniform(-0.5, 0.5)).collect());
    let conv = |weight| IrOp::square_conv(3, 3, 3, 1, weight, None);
    let norm = || IrOp::BatchNorm { eps: 1e-5, mean: vec![0.0; 3], var: vec![1.0; 3], affine: None };
    let mut ir = Ir::new("residual", "test", InputSpec::plain(2, 5, 5));
    let v = ir.push(0, IrOp::square_conv(2, 3, 3, 1, w(54), None));
    let v = ir.push(v, norm());
    let stem = ir.push(v, IrOp::Plain(GOp::Relu));
    let v = ir.push(stem, conv(w(81)));
    let v = ir.push(v, norm());
    let v = ir.push(v, IrOp::Plain(GOp::Add { other: stem }));
    let v = ir.push(v, IrOp::Plain(GOp::Relu));
    let v = ir.push(v, IrOp::Plain(GOp::GlobalAvgPool));
    ir.push(v, IrOp::Plain(GOp::Flatten));
    ir.emit(WeightFormat::F32)
}

/// The residual sum after the block's second norm is fused into it, and the relu after the
/// sum with it; the gradients of both convs, one of them reached through the sum's second
/// operand, match finite differences.
#[test]
fn a_residual_sum_fused_into_its_norm_passes_finite_differences() {
    let bytes = residual();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut net = Net::new(&bb, Recipe { materialise: true, head: Some(3), ..Recipe::default() });
    let relu = Some((0.0, f32::INFINITY));
    assert_eq!(clamps(&net), [("conv", None), ("norm", relu), ("conv", None), ("norm", relu)]);
    assert!(!net.nodes.iter().any(|n| matches!(n.op, NodeOp::Add { .. })), "no add of its own");
    let stem = 2;
    assert!(matches!(net.nodes[3].op, NodeOp::Norm { residual: Some(v), .. } if v == stem), "{:?}", net.nodes[3]);
    let mut trained: Vec<usize> = net.maskable.iter().filter_map(|&(_, p)| p).collect();
    trained.extend(net.head.map(|(w, b)| [w, b]).unwrap());
    gradients_match_finite_differences(&mut net, &k, &trained, 3);
}

/// What a CLR task stores (γ folded into the kernel, int8 steps) computes what the
/// trained net computes, within the quantisation error, and reloads to the same bytes.
#[test]
fn clr_state_folds_the_affine_scale_and_reloads() {
    let bytes = tiny();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let recipe = Recipe { reprogram: true, head: Some(3), ..Recipe::default() };
    let mut net = Net::new(&bb, recipe);
    assert_eq!(net.affine_after, vec![Some(0), None]);
    let mut r = SplitMix64::new(3);
    let mut moved = net.reprogram.clone();
    moved.extend(net.affines.iter().flat_map(|&(g, b)| [g, b]));
    moved.extend(net.head.map(|(w, b)| [w, b]).unwrap());
    for &p in &moved {
        net.params[p].value.iter_mut().for_each(|v| *v += r.uniform(-0.3, 0.3));
    }
    let x: Vec<f32> = (0..2 * 50).map(|_| r.uniform(-1.0, 1.0)).collect();
    let want = net.forward(&k, &x, 2).to_vec();
    let (kernels, shifts) = net.clr_state();
    let mut back = Net::new(&bb, recipe);
    let ((w, b), (bw, bb_)) = (net.head.unwrap(), back.head.unwrap());
    back.params[bw].value = net.params[w].value.clone();
    back.params[bb_].value = net.params[b].value.clone();
    back.set_clr_state(&kernels, &shifts).unwrap();
    let got = back.forward(&k, &x, 2).to_vec();
    for (a, b) in want.iter().zip(&got) {
        assert!((a - b).abs() <= 5e-3 * (1.0 + a.abs()), "{a} vs {b}");
    }
    assert_ne!(want, got, "quantisation changes the values a little");
    assert_eq!(back.clr_state().1, shifts);
    let again = back.clr_state().0;
    assert!(again.iter().zip(&kernels).all(|(a, b)| a.steps == b.steps));
    assert!(back.set_clr_state(&kernels[..1], &shifts).is_none(), "a missing kernel is refused");
}

#[test]
fn sparse_forms_give_the_dense_pass_and_are_checked() {
    let bytes = tiny();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut net = Net::new(&bb, Recipe { materialise: true, head: Some(3), ..Recipe::default() });
    let wp: Vec<usize> = net.maskable.iter().filter_map(|&(_, p)| p).collect();
    assert_eq!(wp.len(), 2, "both convs are materialised");
    let mut r = SplitMix64::new(4);
    let mut masks = Vec::new();
    for &p in &wp {
        net.params[p].trained = true;
        let value = &mut net.params[p].value;
        let mask: bitvec::vec::BitVec<u32, bitvec::order::Lsb0> = (0..value.len()).map(|i| i % 5 == 1).collect();
        for (v, m) in value.iter_mut().zip(mask.iter()) {
            if !*m {
                *v = 0.0;
            }
        }
        masks.push(mask);
    }
    // A head that passes gradients back (a new head starts at zero).
    let (hw, _) = net.head.unwrap();
    for v in &mut net.params[hw].value {
        *v = r.uniform(-1.0, 1.0);
    }
    net.train_mode = true;
    let batch = 4;
    let x: Vec<f32> = (0..batch * 50).map(|_| r.uniform(-1.0, 1.0)).collect();
    let pass = |net: &mut Net| {
        net.zero_grad();
        let out = net.forward(&k, &x, batch).to_vec();
        let mut d = vec![0.0; out.len()];
        loss::cross_entropy(&out, 3, 3, &[0, 1, 2, 1], &mut d);
        net.backward(&k, &d);
        (out, wp.iter().map(|&p| net.params[p].grad.clone()).collect::<Vec<_>>())
    };
    let (out0, g0) = pass(&mut net);
    for (&p, m) in wp.iter().zip(&masks) {
        let (rows, cols, max_density) = net.weight_dims(p).expect("a conv's weight");
        let sp = SparseW::from_mask(&net.params[p].value, m, rows, cols, max_density);
        assert!(sp.is_some(), "density 0.2 has a sparse form");
        net.set_sparse(p, sp);
    }
    let (out1, g1) = pass(&mut net);
    assert!(g0.iter().flatten().any(|&g| g != 0.0), "gradients reach both convs");
    for (a, b) in out1.iter().zip(&out0).chain(g1.iter().flatten().zip(g0.iter().flatten())) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "sparse {a} vs dense {b}");
    }
    // A weight changed behind the sparse form's back is caught (debug builds).
    net.params[wp[0]].value[1] += 1.0;
    if cfg!(debug_assertions) {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pass(&mut net))).is_err();
        assert!(caught, "a stale sparse form is an error");
    }
    net.clear_sparse();
    let (out2, _) = pass(&mut net);
    assert_ne!(out2, out0, "dense again, with the changed weight");
}

/// `backward_over` gives `zero_grad` then `backward`, bit for bit, whatever the gradient
/// buffers held: on the CLR net (head, affines, norms, CLR kernels) and on a materialised
/// lenet (trained linear layers, one of them sparse, one left out of the pass).
#[test]
fn overwriting_backward_equals_zeroing_then_adding() {
    let k = Kernels::detect();
    let lenet = crate::import::init::random_backbone(crate::import::init::Arch::Lenet, 10, 3).emit(WeightFormat::F32);
    let clr = tiny();
    for (name, bytes) in [("clr", &clr), ("lenet", &lenet)] {
        let bb = Backbone::open(bytes).unwrap();
        let recipe = if name == "clr" {
            Recipe { reprogram: true, head: Some(3), ..Recipe::default() }
        } else {
            Recipe { materialise: true, head: Some(3), ..Recipe::default() }
        };
        let mut net = Net::new(&bb, recipe);
        let mut r = SplitMix64::new(6);
        for p in &mut net.params {
            for v in &mut p.value {
                *v += r.uniform(-0.2, 0.2);
            }
        }
        let wp: Vec<usize> = net.maskable.iter().filter_map(|&(_, p)| p).collect();
        if name == "clr" {
            for p in clr_trained(&net) {
                net.params[p].trained = true;
            }
        } else {
            // Every linear layer trains, the first through its sparse form.
            let (rows, cols, max_density) = net.weight_dims(wp[0]).unwrap();
            let mask: bitvec::vec::BitVec<u32, bitvec::order::Lsb0> =
                (0..net.params[wp[0]].value.len()).map(|i| i % 25 == 2).collect();
            for (v, m) in net.params[wp[0]].value.iter_mut().zip(mask.iter()) {
                if !*m {
                    *v = 0.0;
                }
            }
            let sp = SparseW::from_mask(&net.params[wp[0]].value, &mask, rows, cols, max_density);
            assert!(sp.is_some());
            net.set_sparse(wp[0], sp);
            for &p in &wp {
                net.params[p].trained = true;
            }
        }
        let (hw, hb) = net.head.unwrap();
        net.params[hw].trained = true;
        net.params[hb].trained = true;
        let trained: Vec<usize> = (0..net.params.len()).filter(|&p| net.params[p].trained).collect();
        assert!(trained.len() >= 3, "{name}: {trained:?}");
        net.train_mode = true;
        let batch = 3;
        let x: Vec<f32> = (0..batch * net.value_shape(0).len()).map(|_| r.uniform(-1.0, 1.0)).collect();
        let pass = |net: &mut Net, over: bool| {
            for p in &mut net.params {
                p.grad.fill(7.0);
            }
            if !over {
                net.zero_grad();
            }
            let out = net.forward(&k, &x, batch).to_vec();
            let mut d = vec![0.0; out.len()];
            loss::cross_entropy(&out, 3, 3, &[0, 2, 1], &mut d);
            if over {
                net.backward_over(&k, &d);
            } else {
                net.backward(&k, &d);
            }
            trained.iter().map(|&p| net.params[p].grad.iter().map(|g| g.to_bits()).collect()).collect::<Vec<Vec<u32>>>()
        };
        let (added, over) = (pass(&mut net, false), pass(&mut net, true));
        assert!(added.iter().flatten().any(|&g| f32::from_bits(g) != 0.0), "{name}: gradients flow");
        assert_eq!(added, over, "{name}");
    }
}

/// A batch-norm stem, then an inverted residual block on 40×40 planes (1×1 expansion, ReLU6,
/// depthwise 3×3, ReLU6, 1×1 projection, add of the stem), a strided 3×3 conv, global pool:
/// with CLR, everything after the norm goes sample by sample.
fn block() -> Vec<u8> {
    let mut r = SplitMix64::new(11);
    let mut w = |n: usize| IrWeights::F32((0..n).map(|_| r.uniform(-0.4, 0.4)).collect());
    let mut ir = Ir::new("block", "test", InputSpec::plain(3, 40, 40));
    let v = ir.push(0, IrOp::square_conv(3, 8, 3, 1, w(216), None));
    let norm = IrOp::BatchNorm {
        eps: 1e-5,
        mean: vec![0.0; 8],
        var: vec![1.0; 8],
        affine: Some((vec![1.0; 8], vec![0.1; 8])),
    };
    let v = ir.push(v, norm);
    let stem = ir.push(v, IrOp::Plain(GOp::Relu6));
    let v = ir.push(stem, IrOp::square_conv(8, 16, 1, 1, w(128), Some(vec![0.05; 16])));
    let v = ir.push(v, IrOp::Plain(GOp::Relu6));
    let dw = IrOp::Conv {
        in_channels: 16,
        out_channels: 16,
        kernel: [3, 3],
        stride: [1, 1],
        pad: [1; 4],
        dilation: [1, 1],
        groups: 16,
        weight: w(144),
        bias: None,
    };
    let v = ir.push(v, dw);
    let v = ir.push(v, IrOp::Plain(GOp::Relu6));
    let v = ir.push(v, IrOp::square_conv(16, 8, 1, 1, w(128), None));
    let v = ir.push(v, IrOp::Plain(GOp::Add { other: stem }));
    let v = ir.push(v, IrOp::square_conv(8, 8, 3, 2, w(576), None));
    let v = ir.push(v, IrOp::Plain(GOp::GlobalAvgPool));
    ir.push(v, IrOp::Plain(GOp::Flatten));
    ir.emit(WeightFormat::F32)
}

/// Runs that go sample by sample, with every value kept or with values passing through slots
/// (one kept only as its clamp's mask, others not at all), give the layer-by-layer pass's
/// outputs and gradients bit for bit, overwriting or adding into the gradients, on one thread
/// or two.
#[test]
fn sample_runs_give_the_layer_pass_bit_for_bit() {
    let bytes = block();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut net = Net::new(&bb, Recipe { reprogram: true, head: Some(3), ..Recipe::default() });
    let mut r = SplitMix64::new(12);
    for p in &mut net.params {
        for v in &mut p.value {
            *v += r.uniform(-0.2, 0.2);
        }
    }
    let trained = clr_trained(&net);
    for &p in &trained {
        net.params[p].trained = true;
    }
    net.train_mode = true;
    let batch = 5;
    let runs = net.plan(batch);
    let sampled: Vec<_> = runs.iter().filter(|r| r.by_sample).map(|r| (r.nodes.start, r.nodes.end)).collect();
    // conv, reprogram, norm (batch statistics) | expansion ... flatten | head.
    let n = net.nodes.len();
    assert_eq!(sampled, [(3, n - 1)], "{runs:?}");
    assert!(net.plan(1).iter().all(|r| !r.by_sample), "one sample: nothing to gain");
    // The expansion's output (conv + ReLU6, read by the frozen depthwise conv alone) is kept
    // as its mask; the affines' (after the reprogramming) read by frozen convs, the
    // projection's read by the add, the add's read by a frozen conv and the pool's read by
    // the flatten, not at all.
    let kept = net.kept(&runs);
    let of = |k: Kept| kept.iter().enumerate().filter(|(_, &m)| m == k).map(|(v, _)| v).collect::<Vec<_>>();
    let (masked, dropped) = (of(Kept::Mask), of(Kept::Nothing));
    assert_eq!(masked.len(), 1, "{kept:?}");
    let expansion = masked[0] - 1;
    assert!(matches!(net.nodes[expansion].op, NodeOp::Conv { clamp: Some((0.0, 6.0)), .. }), "{expansion}");
    assert!(matches!(&net.nodes[masked[0]].op, NodeOp::Conv { s, .. } if s.is_depthwise()));
    let name = |op: &NodeOp| match op {
        NodeOp::Conv { .. } => "conv",
        NodeOp::Reprogram { .. } => "reprogram",
        NodeOp::Affine { .. } => "affine",
        NodeOp::Add { .. } => "add",
        NodeOp::GlobalPool { .. } => "global pool",
        _ => "other",
    };
    let makers: Vec<_> = dropped.iter().map(|v| name(&net.nodes[v - 1].op)).collect();
    assert_eq!(makers, ["affine", "conv", "add", "affine", "global pool"], "{kept:?}");
    let x: Vec<f32> = (0..batch * net.value_shape(0).len()).map(|_| r.uniform(-1.0, 1.0)).collect();
    let bits = |v: &[f32]| v.iter().map(|g| g.to_bits()).collect::<Vec<u32>>();
    let pass = |net: &mut Net, over: bool| {
        for p in &mut net.params {
            p.grad.fill(0.5);
        }
        let out = net.forward(&k, &x, batch).to_vec();
        let mut d = vec![0.0; out.len()];
        loss::cross_entropy(&out, 3, 3, &[0, 2, 1, 1, 0], &mut d);
        if over {
            net.backward_over(&k, &d);
        } else {
            net.backward(&k, &d);
        }
        let mut all = vec![bits(&out)];
        all.extend(trained.iter().map(|&p| bits(&net.params[p].grad)));
        all
    };
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for over in [false, true] {
            // Every node over the whole batch, then the runs with every value kept, then the
            // runs with values passing through slots.
            let mut first = None;
            for (sample_runs, pass_through) in [(false, true), (true, false), (true, true)] {
                (net.sample_runs, net.pass_through) = (sample_runs, pass_through);
                let got = pool.install(|| pass(&mut net, over));
                if !sample_runs {
                    assert_eq!(net.runs.len(), n, "every node on its own");
                }
                if sample_runs && pass_through {
                    assert!(net.values[masked[0]].is_empty() && !net.masks[masked[0]].is_empty(), "kept as a mask");
                    assert!(dropped.iter().all(|&v| net.values[v].is_empty() && net.masks[v].is_empty()), "not kept");
                } else {
                    assert!(net.values[1..].iter().all(|v| !v.is_empty()), "every value kept");
                }
                let want = first.get_or_insert_with(|| got.clone());
                let reached = want[1..].iter().flatten().all(|&g| f32::from_bits(g) != 0.5);
                assert!(reached, "every trained param gets a gradient");
                assert_eq!(&got, want, "{threads} threads, over {over}, runs {sample_runs}, slots {pass_through}");
            }
        }
    }
}
