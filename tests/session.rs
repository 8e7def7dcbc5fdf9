//! Sessions run every kind of task exactly as evaluation's training graph does (which
//! materialises each task's dense weights), switch between tasks without changing any
//! prediction (`tests/session_alloc.rs`: and allocate nothing per run).
//!
//! Tasks here are random rather than trained: random masks, overlays, norms, reprogramming
//! kernels and heads exercise every path (and every bit position of the masks) in
//! milliseconds. Tolerance: 1e-4 · (1 + |v|) per logit, the kernels' own bound.

use edgecl::adapter::{Method, Task};
use edgecl::backbone::Backbone;
use edgecl::format::graph::{InputSpec, Op as GOp, WeightFormat};
use edgecl::format::task::TaskFile;
use edgecl::import::init::{random_backbone, random_task, Arch};
use edgecl::import::{Ir, IrOp, IrWeights};
use edgecl::kernels::Kernels;
use edgecl::rng::SplitMix64;
use edgecl::session::{Session, SessionError};
use edgecl::train::model;

/// conv 3×3 (bias, no norm: CLR puts an affine there) → relu6 → conv 3×3 → BN → relu →
/// conv 1×1 → GAP → flatten; ends in features, so a head is appended.
fn conv_net() -> Vec<u8> {
    let mut r = SplitMix64::new(4);
    let mut w = |n: usize| IrWeights::F32((0..n).map(|_| r.uniform(-0.5, 0.5)).collect());
    let conv = |cin, cout, k, weight, bias| IrOp::square_conv(cin, cout, k, 1, weight, bias);
    let mut ir = Ir::new("convnet", "test", InputSpec::plain(2, 9, 7));
    let v = ir.push(0, conv(2, 5, 3, w(90), Some(vec![0.1, -0.2, 0.3, 0.0, 0.05])));
    let v = ir.push(v, IrOp::Plain(GOp::Relu6));
    let v = ir.push(v, conv(5, 6, 3, w(270), None));
    let bn = IrOp::BatchNorm {
        eps: 1e-5,
        mean: vec![0.1; 6],
        var: vec![1.5; 6],
        affine: Some((vec![1.1; 6], vec![0.1; 6])),
    };
    let v = ir.push(v, bn);
    let v = ir.push(v, IrOp::Plain(GOp::Relu));
    let v = ir.push(v, conv(6, 4, 1, w(24), None));
    let v = ir.push(v, IrOp::Plain(GOp::GlobalAvgPool));
    ir.push(v, IrOp::Plain(GOp::Flatten));
    ir.emit(WeightFormat::I8)
}

/// Logits of `task` through evaluation's training graph (dense weights materialised).
fn reference_logits(k: &Kernels, bb: &Backbone, files: &[TaskFile], t: usize, x: &[f32], batch: usize) -> Vec<f32> {
    let task = &files[t].task;
    let deps: Vec<&Task> =
        task.depends_on.iter().map(|d| &files.iter().find(|f| &f.digest == d).unwrap().task).collect();
    let mut net = model::build(bb, &deps, task).unwrap();
    net.train_mode = false;
    net.forward(k, x, batch).to_vec()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}: logit {i}: session {a} vs graph {b}");
    }
}

/// Every method on `bytes`: the session's logits equal the training graph's, for every
/// kernel set, alone and interleaved with the other tasks.
fn check_backbone(bytes: &[u8], methods: &[Method]) {
    check_backbone_with(bytes, methods, Kernels::available())
}

fn check_backbone_with(bytes: &[u8], methods: &[Method], kernels: Vec<Kernels>) {
    let bb = Backbone::open(bytes).unwrap();
    let mut files: Vec<TaskFile> = Vec::new();
    for (i, &m) in methods.iter().enumerate() {
        let deps: Vec<&TaskFile> = files.iter().filter(|f| m == Method::Exssnet && f.task.method == m).collect();
        let f = random_task(&bb, m, &format!("t{i}-{}", m.name()), &deps, 100 + i as u64);
        files.push(f);
    }
    let batch = 3;
    let mut r = SplitMix64::new(7);
    let x: Vec<f32> = (0..batch * bb.input_shape().len()).map(|_| r.uniform(-1.0, 1.0)).collect();
    let session = Session::new(&bb, files.clone()).unwrap();
    for k in kernels {
        let mut ws = session.workspace(&k, batch);
        let alone: Vec<Vec<f32>> = (0..files.len())
            .map(|t| {
                let got = session.run(&k, t, &x, batch, &mut ws).to_vec();
                let want = reference_logits(&k, &bb, &files, t, &x, batch);
                assert_close(&got, &want, &format!("{} with {k:?}", files[t].task.name));
                got
            })
            .collect();
        // Interleaved in every order: bit-identical to each task run alone.
        for (a, want) in alone.iter().enumerate() {
            for b in 0..files.len() {
                session.run(&k, b, &x, batch, &mut ws);
                assert_eq!(session.run(&k, a, &x, batch, &mut ws), &want[..], "task {a} after task {b}");
            }
        }
    }
}

#[test]
fn every_method_matches_the_training_graph_on_lenet() {
    let bytes = random_backbone(Arch::Lenet, 10, 3).emit(WeightFormat::I8);
    use Method::*;
    check_backbone(&bytes, &[Supsup, Exssnet, Exssnet, Supsup, Exssnet, Linear, Finetune]);
}

#[test]
fn every_method_matches_the_training_graph_on_an_f32_backbone() {
    let bytes = random_backbone(Arch::Lenet, 10, 5).emit(WeightFormat::F32);
    use Method::*;
    check_backbone(&bytes, &[Exssnet, Supsup, Exssnet, Linear]);
}

#[test]
fn conv_tasks_match_with_norms_reprogramming_and_affines() {
    use Method::*;
    check_backbone(&conv_net(), &[Supsup, Exssnet, Exssnet, Clr, Linear, Finetune, Clr]);
}

#[test]
fn gemresnet18_tasks_match() {
    let bytes = random_backbone(Arch::GemResnet18, 10, 3).emit(WeightFormat::I8);
    use Method::*;
    // The fast kernels only: the reference kernels take minutes on it in a debug build.
    check_backbone_with(&bytes, &[Supsup, Exssnet, Exssnet, Clr], vec![Kernels::detect()]);
}

#[test]
fn bad_task_sets_are_refused_with_named_errors() {
    let bytes = random_backbone(Arch::Lenet, 10, 3).emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    let a = random_task(&bb, Method::Exssnet, "a", &[], 1);
    let b = random_task(&bb, Method::Exssnet, "b", &[&a], 2);
    // A dependency missing from the set.
    match Session::new(&bb, vec![b.clone()]) {
        Err(SessionError::MissingDependency { task, digest }) => assert_eq!((task.as_str(), digest), ("b", a.digest)),
        other => panic!("{other:?}"),
    }
    // Two tasks with one name.
    let mut a2 = a.clone();
    a2.digest[0] ^= 1;
    assert!(matches!(Session::new(&bb, vec![a.clone(), a2]), Err(SessionError::DuplicateName(n)) if n == "a"));
    // An overlay one value short, a mask of the wrong size, a head of the wrong width.
    let mut short = b.clone();
    short.task.components.overlay[0].pop();
    let e = Session::new(&bb, vec![a.clone(), short]).unwrap_err();
    assert!(e.to_string().contains("overlay of maskable layer 0"), "{e}");
    let mut wide = a.clone();
    wide.task.components.masks[1].words.push(0);
    let e = Session::new(&bb, vec![wide]).unwrap_err();
    assert!(e.to_string().contains("mask"), "{e}");
    let mut len = a.clone();
    len.task.components.masks[0].len -= 1; // same word count, one weight uncovered
    let e = Session::new(&bb, vec![len]).unwrap_err();
    assert!(e.to_string().contains("mask of maskable layer 0"), "{e}");
    let mut head = random_task(&bb, Method::Linear, "h", &[], 4);
    head.task.components.head.as_mut().unwrap().inputs += 1;
    let e = Session::new(&bb, vec![head]).unwrap_err();
    assert!(e.to_string().contains("head"), "{e}");
}
