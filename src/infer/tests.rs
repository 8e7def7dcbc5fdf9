use super::*;
use crate::adapter::{Components, Mask, NormState};
use crate::format::graph::{InputSpec, Op as GOp, WeightFormat};
use crate::import::{Ir, IrOp, IrWeights};
use crate::rng::SplitMix64;
use bitvec::prelude::{BitVec, Lsb0};

/// 1×6×6 → conv 3×3 (1→3) → non-affine BN → relu → conv 3×3 (3→4) → relu → global average
/// pool → flatten → linear 4→5, int8 weights.
fn small() -> Vec<u8> {
    let mut r = SplitMix64::new(5);
    let mut w = |n: usize| IrWeights::F32((0..n).map(|_| r.uniform(-0.8, 0.8)).collect());
    let conv = |cin, cout, weight| IrOp::square_conv(cin, cout, 3, 1, weight, None);
    let mut ir = Ir::new("small", "test", InputSpec::plain(1, 6, 6));
    let v = ir.push(0, conv(1, 3, w(27)));
    let v = ir.push(v, IrOp::BatchNorm { eps: 1e-5, mean: vec![0.0; 3], var: vec![1.0; 3], affine: None });
    let v = ir.push(v, IrOp::Plain(GOp::Relu));
    let v = ir.push(v, conv(3, 4, w(108)));
    let v = ir.push(v, IrOp::Plain(GOp::Relu));
    let v = ir.push(v, IrOp::Plain(GOp::GlobalAvgPool));
    let v = ir.push(v, IrOp::Plain(GOp::Flatten));
    let head = IrWeights::F32((0..20).map(|i| if i % 3 == 0 { 2.5 } else { -1.5 } * (1.0 + i as f32 / 20.0)).collect());
    ir.push(v, IrOp::Linear { in_features: 4, out_features: 5, weight: head, bias: Some(vec![0.1; 5]) });
    ir.emit(WeightFormat::I8)
}

/// Weight counts of the maskable layers.
fn sizes(bb: &Backbone) -> Vec<usize> {
    (0..bb.layers().len())
        .filter(|&i| matches!(bb.layers()[i].op, Op::Conv2d(_) | Op::Linear(_)))
        .map(|i| layer_weights(bb, i).len())
        .collect()
}

fn random_masks(r: &mut SplitMix64, sizes: &[usize]) -> Vec<BitVec<u32, Lsb0>> {
    sizes.iter().map(|&n| (0..n).map(|_| r.uniform(0.0, 1.0) < 0.5).collect()).collect()
}

fn task(name: &str, method: Method, masks: &[BitVec<u32, Lsb0>], classes: usize) -> Task {
    Task {
        name: name.into(),
        labels: (0..classes).map(|c| c.to_string()).collect(),
        method,
        components: Components { masks: masks.iter().map(|m| Mask::from_bits(m)).collect(), ..Components::default() },
        depends_on: Vec::new(),
        config: String::new(),
        metrics: Vec::new(),
        created_at: 0,
        version: 1,
        softmax: Softmax::Classes,
    }
}

/// Two supsup tasks (with their own norm statistics) and an ExSSNeT chain of two, the
/// second overlaying weights the first does not use.
fn tasks(bb: &Backbone) -> Vec<Task> {
    let mut r = SplitMix64::new(3);
    let sz = sizes(bb);
    let mut out = Vec::new();
    for (i, classes) in [(0, 5), (1, 3)] {
        let mut t = task(&format!("s{i}"), Method::Supsup, &random_masks(&mut r, &sz), classes);
        let c = 3;
        t.components.norms = vec![NormState {
            mean: (0..c).map(|_| r.uniform(-0.5, 0.5)).collect(),
            var: (0..c).map(|_| r.uniform(0.5, 2.0)).collect(),
            gamma: None,
            beta: None,
        }];
        out.push(t);
    }
    let (ma, mb) = (random_masks(&mut r, &sz), random_masks(&mut r, &sz));
    let mut a = task("e0", Method::Exssnet, &ma, 4);
    a.components.overlay = ma.iter().map(|m| (0..m.count_ones()).map(|_| r.uniform(-1.0, 1.0)).collect()).collect();
    let mut b = task("e1", Method::Exssnet, &mb, 4);
    b.components.overlay = mb
        .iter()
        .zip(&ma)
        .map(|(m, u)| (0..m.iter_ones().filter(|&i| !u[i]).count()).map(|_| r.uniform(-1.0, 1.0)).collect())
        .collect();
    out.push(a);
    out.push(b);
    out
}

fn candidates(t: &[Task]) -> Vec<Candidate<'_>> {
    vec![
        Candidate::new(&t[0], vec![]),
        Candidate::new(&t[1], vec![]),
        Candidate::new(&t[2], vec![]),
        Candidate::new(&t[3], vec![&t[2]]),
    ]
}

fn inputs(batch: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..batch * 36).map(|_| r.uniform(-1.0, 1.0)).collect()
}

#[test]
fn alpha_gradient_matches_finite_differences() {
    let bytes = small();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let t = tasks(&bb);
    let c = candidates(&t);
    for batch in [4, 1] {
        let x = inputs(batch, 9);
        let mut alpha = vec![0.3f32, 0.2, 0.25, 0.25];
        let (h, g) = entropy_gradient(&k, &bb, &c, &alpha, &x, batch).unwrap();
        assert!(h > 0.0 && h <= (5f32).ln() + 1e-5, "entropy {h}");
        assert!(g.iter().any(|v| v.abs() > 1e-4), "gradients all vanish: {g:?}");
        // Small enough that no ReLU changes sides for these inputs (1e-3 already crosses one).
        let step = 5e-4f32;
        for i in 0..alpha.len() {
            let keep = alpha[i];
            alpha[i] = keep + step;
            let up = entropy_gradient(&k, &bb, &c, &alpha, &x, batch).unwrap().0 as f64;
            alpha[i] = keep - step;
            let down = entropy_gradient(&k, &bb, &c, &alpha, &x, batch).unwrap().0 as f64;
            alpha[i] = keep;
            let fd = ((up - down) / (2.0 * step as f64)) as f32;
            // f32 rounding of H (about 1e-7) costs about 1e-4 of the difference quotient.
            assert!(
                (fd - g[i]).abs() <= 2e-4 + 1e-2 * g[i].abs(),
                "batch {batch}, α_{i}: fd {fd} vs analytic {}",
                g[i]
            );
        }
    }
}

#[test]
fn one_hot_alpha_is_the_task_network_itself() {
    let bytes = small();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let t = tasks(&bb);
    let c = candidates(&t);
    let batch = 3;
    let x = inputs(batch, 4);
    for (i, cand) in c.iter().enumerate() {
        let mut alpha = vec![0.0; c.len()];
        alpha[i] = 1.0;
        let (h, _) = entropy_gradient(&k, &bb, &c, &alpha, &x, batch).unwrap();
        // The task's own network with batch statistics, entropy over the widest task's 5 logits.
        let mut net = model::build(&bb, &cand.deps, cand.task).unwrap();
        net.train_mode = true;
        let out = net.forward(&k, &x, batch).to_vec();
        let mut d = vec![0.0; out.len()];
        let own = loss::entropy(&out, 5, 5, batch, &mut d);
        assert!((h - own).abs() < 1e-5, "candidate {i}: superposed {h} vs own {own}");
    }
}

/// Which logits `H` spans: every output (5) when all candidates were trained over every
/// output, else the widest candidate's classes (4 here).
#[test]
fn the_entropy_spans_every_output_only_when_every_candidate_was_trained_over_them() {
    let bytes = small();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let batch = 3;
    let x = inputs(batch, 4);
    let own = |t: &Task, deps: &[&Task], spans: usize| {
        let mut net = model::build(&bb, deps, t).unwrap();
        net.train_mode = true;
        let out = net.forward(&k, &x, batch).to_vec();
        loss::entropy(&out, 5, spans, batch, &mut vec![0.0; out.len()])
    };
    for (softmax, spans) in
        [([Softmax::All; 3], 5), ([Softmax::Classes; 3], 4), ([Softmax::All, Softmax::Classes, Softmax::All], 4)]
    {
        let mut t = tasks(&bb);
        for (task, s) in t[1..].iter_mut().zip(softmax) {
            task.softmax = s;
        }
        let c = candidates(&t);
        let c = &c[1..];
        let mut alpha = vec![0.0; c.len()];
        alpha[0] = 1.0;
        let (h, _) = entropy_gradient(&k, &bb, c, &alpha, &x, batch).unwrap();
        let want = own(&t[1], &[], spans);
        assert!((h - want).abs() < 1e-5, "{softmax:?}: superposed {h} vs own over {spans} outputs {want}");
        assert!((h - own(&t[1], &[], 9 - spans)).abs() > 1e-3, "{softmax:?}: the spans differ");
    }
}

#[test]
fn bad_inputs_and_tasks_are_refused_with_named_errors() {
    let bytes = small();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let t = tasks(&bb);
    let c = candidates(&t);
    let x = inputs(2, 1);
    let run = |c: &[Candidate], x: &[f32], batch| infer_task(&k, &bb, c, x, batch, Mode::OneShot);
    assert_eq!(run(&[], &x, 2).unwrap_err(), InferError::NoCandidates);
    assert!(matches!(run(&c, &x[..71], 2), Err(InferError::Input(_))));
    assert!(matches!(run(&c, &x, 3), Err(InferError::Input(_))));
    assert!(matches!(run(&c, &[], 0), Err(InferError::Input(_))));
    let mut nan = x.clone();
    nan[5] = f32::NAN;
    assert!(matches!(run(&c, &nan, 2), Err(InferError::Input(m)) if m.contains("value 5")));
    // A mask of the wrong length, a missing mask, too many classes, a single class.
    let mut bad = t[0].clone();
    bad.components.masks[1].len -= 1;
    let e = run(&[Candidate::new(&bad, vec![])], &x, 2).unwrap_err();
    assert!(matches!(&e, InferError::Components(m) if m.0.contains("not 108 bits")), "{e}");
    bad = t[0].clone();
    bad.components.masks.pop();
    assert!(matches!(run(&[Candidate::new(&bad, vec![])], &x, 2), Err(InferError::Components(_))));
    bad = t[0].clone();
    bad.labels = (0..6).map(|c| c.to_string()).collect();
    let e = run(&[Candidate::new(&bad, vec![])], &x, 2).unwrap_err();
    assert!(e.to_string().contains("5 outputs"), "{e}");
    bad.labels.truncate(1);
    assert!(run(&[Candidate::new(&bad, vec![])], &x, 2).unwrap_err().to_string().contains("at least 2"));
    // The second ExSSNeT task without its dependency: its overlay does not fit.
    let e = run(&[Candidate::new(&t[3], vec![])], &x, 2).unwrap_err();
    assert!(e.to_string().contains("wrong dependencies"), "{e}");
    // Norm statistics of the wrong size.
    bad = t[0].clone();
    bad.components.norms[0].var.push(1.0);
    assert!(matches!(run(&[Candidate::new(&bad, vec![])], &x, 2), Err(InferError::Components(_))));
    // entropy_gradient: α of the wrong length or not finite, a task that does not superpose.
    assert!(matches!(entropy_gradient(&k, &bb, &c, &[0.5; 3], &x, 2), Err(InferError::Input(_))));
    assert!(matches!(entropy_gradient(&k, &bb, &c, &[f32::INFINITY; 4], &x, 2), Err(InferError::Input(_))));
    let mut clr = t[0].clone();
    clr.method = Method::Linear;
    assert!(matches!(
        entropy_gradient(&k, &bb, &[Candidate::new(&clr, vec![])], &[1.0], &x, 2),
        Err(InferError::Components(_))
    ));
    // A linear task without a head is refused by its network's construction.
    assert!(matches!(run(&[Candidate::new(&clr, vec![])], &x, 2), Err(InferError::Components(_))));
}

#[test]
fn both_modes_pick_among_the_candidates_and_report_every_score() {
    let bytes = small();
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let t = tasks(&bb);
    let c = candidates(&t);
    let x = inputs(4, 2);
    let one = infer_task(&k, &bb, &c, &x, 4, Mode::OneShot).unwrap();
    assert_eq!(one.method, ONE_SHOT);
    assert_eq!(one.scores.len(), 4);
    assert!(one.scores.iter().all(|s| s.is_finite()));
    let best = one.scores.iter().copied().fold(f32::INFINITY, f32::min);
    assert_eq!(one.scores[one.index], best);
    assert!(one.entropies.iter().all(Option::is_none));
    let bin = infer_task(&k, &bb, &c, &x, 4, Mode::Binary).unwrap();
    assert_eq!(bin.method, BINARY);
    // The first binary round is the one-shot pass, so every candidate has its score.
    assert!(bin.scores.iter().all(|s| s.is_finite()));
    assert!(bin.index < 4);
    let info = infer_task(&k, &bb, &c, &x, 4, Mode::Information).unwrap();
    assert_eq!(info.method, INFORMATION);
    assert!(info.scores.iter().all(|s| s.is_finite()));
    assert_eq!(info.scores[info.index], info.scores.iter().copied().fold(f32::INFINITY, f32::min));
    // Every candidate's own network ran; the scores are the negative information, in [-1, 0].
    assert!(info.entropies.iter().all(Option::is_some));
    assert!(info.scores.iter().all(|s| (-1.0..=0.0).contains(s)), "{:?}", info.scores);
    // One input has no class mix: the lowest entropy decides, and says so.
    let one_input = infer_task(&k, &bb, &c, &x[..x.len() / 4], 1, Mode::Information).unwrap();
    assert_eq!(one_input.method, LOWEST_ENTROPY);
    // A single candidate wins, with its gradient as score.
    let solo = infer_task(&k, &bb, &c[2..3], &x, 4, Mode::Binary).unwrap();
    assert_eq!(solo.index, 0);
    assert!(solo.scores[0].is_finite());
}

#[test]
fn information_is_high_for_confident_and_varied_predictions() {
    // Two rows, three classes (width 4: the last logit is not a class).
    let sure_apart = [9.0f32, 0.0, 0.0, 50.0, 0.0, 9.0, 0.0, 50.0];
    let sure_same = [9.0f32, 0.0, 0.0, 50.0, 9.0, 0.0, 0.0, 50.0];
    let unsure = [0.0f32; 8];
    let i = |l: &[f32], b| normalised_information(l, 4, 3, b);
    assert!(i(&sure_apart, 2) > 0.6, "{}", i(&sure_apart, 2));
    assert!(i(&sure_same, 2).abs() < 1e-3 && i(&unsure, 2).abs() < 1e-6);
    assert!(i(&sure_apart, 1).abs() < 1e-6, "one row has no mix");
    // H(mean) − mean H: at most ln 2 / ln 3 for two rows.
    assert!(i(&sure_apart, 2) <= (2f32).ln() / (3f32).ln() + 1e-6);
}

#[test]
fn set_bits_past_the_length_are_ignored_and_argmin_skips_nan() {
    let mut seen = Vec::new();
    for_each_one(&[0b1010_0001, u32::MAX], 35, |j| seen.push(j));
    assert_eq!(seen, [0, 5, 7, 32, 33, 34]);
    assert_eq!(argmin([f32::NAN, 2.0, 1.0, 1.0].into_iter()), Some(2));
    assert_eq!(argmin([f32::NAN].into_iter()), Some(0));
    assert_eq!(argmin(std::iter::empty()), None);
}
