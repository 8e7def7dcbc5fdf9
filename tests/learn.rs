//! Continual learning end to end on small synthetic tasks: each method learns, task files
//! round-trip, earlier tasks' predictions stay bit-identical after later tasks (supsup,
//! exssnet, clr, linear), ExSSNeT leaves every weight outside its exclusive set untouched,
//! and the finetune baseline forgets.

use edgecl::adapter::{Method, Task};
use edgecl::backbone::Backbone;
use edgecl::eval::{evaluate, Matrix};
use edgecl::format::graph::WeightFormat;
use edgecl::format::task::{decode, encode};
use edgecl::import::init::{random_backbone, Arch};
use edgecl::kernels::Kernels;
use edgecl::rng::SplitMix64;
use edgecl::train::mask::{Density, MaskRule};
use edgecl::train::method::{learn, Config, Prior, Samples};

/// In-memory samples.
struct Mem {
    x: Vec<f32>,
    y: Vec<u32>,
    len: usize,
}

impl Samples for Mem {
    fn len(&self) -> usize {
        self.y.len()
    }
    fn label(&self, i: usize) -> u32 {
        self.y[i]
    }
    fn load(&self, idx: &[usize], _: Option<&mut SplitMix64>, out: &mut [f32]) -> Result<(), String> {
        for (b, &i) in idx.iter().enumerate() {
            out[b * self.len..(b + 1) * self.len].copy_from_slice(&self.x[i * self.len..(i + 1) * self.len]);
        }
        Ok(())
    }
}

/// Task `t` of a 3-task split: classes 2t and 2t+1 of six synthetic classes, each a bright
/// 6×6 square at its own place on a noisy 28×28 image; labels 0 and 1. With `conflict`, every
/// task uses the same two squares and odd tasks swap their labels, so one shared network
/// cannot serve them all.
fn task_data(t: usize, n: usize, seed: u64, side: usize, channels: usize, conflict: bool) -> Mem {
    let mut r = SplitMix64::new(seed * 1000 + t as u64);
    let len = channels * side * side;
    let mut x = Vec::with_capacity(n * len);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        let class = if conflict { (label as usize) ^ (t & 1) } else { 2 * t + label as usize };
        let (cy, cx) = (3 + (class / 3) * (side / 2), 2 + (class % 3) * (side / 3));
        for _ in 0..channels {
            for py in 0..side {
                for px in 0..side {
                    let inside = py >= cy && py < cy + 6 && px >= cx && px < cx + 6;
                    x.push(if inside { 1.5 } else { 0.0 } + r.uniform(-0.5, 0.5));
                }
            }
        }
        y.push(label);
    }
    Mem { x, y, len }
}

struct Run {
    tasks: Vec<(Task, [u8; 32])>,
    matrix: Matrix,
    /// Predictions on each task's test set right after it was learned.
    first: Vec<Vec<u32>>,
    /// Predictions after the last task.
    last: Vec<Vec<u32>>,
}

fn run(method: Method, arch: Arch, cfg_edit: impl Fn(&mut Config)) -> Run {
    run_on(method, arch, false, cfg_edit)
}

#[allow(clippy::needless_range_loop)]
fn run_on(method: Method, arch: Arch, conflict: bool, cfg_edit: impl Fn(&mut Config)) -> Run {
    let k = Kernels::detect();
    let bytes = random_backbone(arch, 10, 3).emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    let (side, ch) = if arch == Arch::GemResnet18 { (32, 3) } else { (28, 1) };
    let mut cfg = Config::new(method);
    cfg.batch = 32;
    cfg.epochs = 2;
    cfg.density = Density::Uniform(0.3);
    cfg.lr = 0.01;
    cfg.weight_lr = 0.01;
    cfg_edit(&mut cfg);
    let t = 3;
    let mut out = Run { tasks: Vec::new(), matrix: Matrix::new(t), first: Vec::new(), last: Vec::new() };
    let mut scores: Vec<Option<Vec<Vec<f32>>>> = Vec::new();
    let tests: Vec<Mem> = (0..t).map(|i| task_data(i, 60, 2, side, ch, conflict)).collect();
    for i in 0..t {
        let train = task_data(i, 200, 1, side, ch, conflict);
        let prior: Vec<Prior> = out
            .tasks
            .iter()
            .zip(&scores)
            .map(|((task, d), s)| Prior { task, digest: *d, scores: s.as_deref() })
            .collect();
        let learned =
            learn(&k, &bb, &cfg, &format!("t{i}"), vec!["a".into(), "b".into()], &train, &prior, &mut |_| {}).unwrap();
        // Through the file format, as a device would keep it.
        let file = decode(&encode(&learned.task, &bb.digest())).unwrap();
        file.check_backbone(&bb.digest()).unwrap();
        out.tasks.push((file.task, file.digest));
        scores.push(learned.scores);
        for j in 0..=i {
            let (task, _) = &out.tasks[j];
            let deps: Vec<&Task> =
                out.tasks[..j].iter().filter(|(_, d)| task.depends_on.contains(d)).map(|(t, _)| t).collect();
            // The finetune baseline evaluates every task on the latest shared weights.
            let (acc, preds) = if method == Method::Finetune {
                let mut latest = out.tasks[i].0.clone();
                latest.labels = task.labels.clone();
                evaluate(&k, &bb, &[], &latest, &tests[j], 64).unwrap()
            } else {
                evaluate(&k, &bb, &deps, task, &tests[j], 64).unwrap()
            };
            out.matrix.0[i][j] = Some(acc);
            if j == i {
                out.first.push(preds.clone());
            }
            if i == t - 1 {
                out.last.push(preds);
            }
        }
    }
    out
}

fn assert_learns_without_forgetting(r: &Run, min_acc: f64) {
    assert!(r.matrix.acc() >= min_acc, "ACC {} below {min_acc}: {:?}", r.matrix.acc(), r.matrix);
    assert_eq!(r.first, r.last, "an earlier task's predictions changed");
    assert_eq!(r.matrix.bwt(), 0.0);
}

#[test]
fn supsup_learns_and_never_forgets() {
    let r = run(Method::Supsup, Arch::Lenet, |_| {});
    assert_learns_without_forgetting(&r, 0.9);
}

#[test]
fn supsup_threshold_masks() {
    let r = run(Method::Supsup, Arch::Lenet, |c| {
        c.rule = MaskRule::Threshold;
        c.optimizer = edgecl::train::optim::Kind::RmsProp { alpha: 0.99, eps: 1e-8 };
        c.lr = 1e-3;
    });
    assert_learns_without_forgetting(&r, 0.9);
}

#[test]
fn exssnet_learns_never_forgets_and_only_touches_its_exclusive_weights() {
    let r = run(Method::Exssnet, Arch::Lenet, |c| c.weight_epochs = 2);
    assert_learns_without_forgetting(&r, 0.9);
    // Task t's overlay holds exactly its exclusive weights, and they are disjoint from every
    // earlier mask: nothing an earlier task reads was changed.
    for (t, (task, _)) in r.tasks.iter().enumerate() {
        assert_eq!(task.depends_on.len(), t);
        for (l, m) in task.components.masks.iter().enumerate() {
            let bits = m.bits().unwrap();
            let excl = bits
                .iter_ones()
                .filter(|&i| r.tasks[..t].iter().all(|(p, _)| !p.components.masks[l].bits().unwrap()[i]))
                .count();
            assert_eq!(task.components.overlay[l].len(), excl, "task {t} layer {l}");
        }
    }
    // Some exclusive weight actually moved away from the backbone's value.
    let bytes = random_backbone(Arch::Lenet, 10, 3).emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    let w0 = match bb.weights_of(1) {
        Some(w) => w,
        None => panic!("layer 1 is linear"),
    };
    let (task, _) = &r.tasks[0];
    let moved =
        task.components.masks[0].bits().unwrap().iter_ones().zip(&task.components.overlay[0]).any(|(i, &v)| v != w0[i]);
    assert!(moved, "the weight phase changed no exclusive weight");
}

#[test]
fn exssnet_with_kkt_transfers_from_a_task_above_chance() {
    let r = run(Method::Exssnet, Arch::Lenet, |c| {
        c.kkt = true;
        c.knn_k = 200; // more than the references: must be clipped, not crash
    });
    assert_learns_without_forgetting(&r, 0.9);
}

#[test]
fn finetune_forgets() {
    let r = run_on(Method::Finetune, Arch::Lenet, true, |c| c.lr = 1e-3);
    assert!(r.matrix.0[0][0].unwrap() > 0.9, "{:?}", r.matrix);
    assert!(r.matrix.bwt() < 0.0, "finetune shows no forgetting: {:?}", r.matrix);
    // The same conflicting tasks, learned with supermasks, are all kept.
    let s = run_on(Method::Supsup, Arch::Lenet, true, |_| {});
    assert_learns_without_forgetting(&s, 0.9);
}

#[test]
fn linear_probe_never_forgets() {
    let r = run(Method::Linear, Arch::Lenet, |c| c.lr = 0.01);
    assert_learns_without_forgetting(&r, 0.8);
}

#[test]
fn clr_on_a_conv_backbone_never_forgets() {
    let r = run(Method::Clr, Arch::GemResnet18, |c| {
        c.epochs = 1;
        c.lr = 0.01;
    });
    assert_learns_without_forgetting(&r, 0.8);
}

/// `Softmax::All` puts the outputs beyond a task's classes in the training softmax as
/// never-targets (SupSup's superfluous neurons): on the task's own inputs they end up with
/// little probability, where training over the classes alone leaves them as the random
/// backbone made them. The task file records what training did; a head of the task's own
/// width has no outputs beyond its classes, so a linear task records `Classes` and says so.
#[test]
fn softmax_all_pushes_the_superfluous_outputs_down() {
    use edgecl::adapter::Softmax;
    let k = Kernels::detect();
    let bytes = random_backbone(Arch::Lenet, 10, 3).emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    let (train, test) = (task_data(0, 200, 1, 28, 1, false), task_data(0, 60, 2, 28, 1, false));
    let mass_beyond = |softmax: Softmax| {
        let mut cfg = Config::new(Method::Supsup);
        (cfg.batch, cfg.epochs, cfg.lr, cfg.softmax) = (32, 2, 0.01, softmax);
        let l = learn(&k, &bb, &cfg, "t", vec!["a".into(), "b".into()], &train, &[], &mut |_| {}).unwrap();
        let task = decode(&encode(&l.task, &bb.digest())).unwrap().task;
        assert_eq!(task.softmax, softmax);
        assert!(l.notes.is_empty(), "{:?}", l.notes);
        let mut net = edgecl::train::model::build(&bb, &[], &task).unwrap();
        let out = net.forward(&k, &test.x, test.y.len()).to_vec();
        let (acc, _) = evaluate(&k, &bb, &[], &task, &test, 64).unwrap();
        let mass: f64 = out
            .chunks(10)
            .map(|row| {
                let m = row.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f64> = row.iter().map(|&v| ((v - m) as f64).exp()).collect();
                e[2..].iter().sum::<f64>() / e.iter().sum::<f64>()
            })
            .sum::<f64>()
            / test.y.len() as f64;
        (acc, mass)
    };
    let (acc_all, all) = mass_beyond(Softmax::All);
    let (acc_classes, classes) = mass_beyond(Softmax::Classes);
    eprintln!("probability beyond the 2 classes: {all:.3} with Softmax::All, {classes:.3} without");
    assert!(acc_all >= 0.9 && acc_classes >= 0.9, "{acc_all} {acc_classes}");
    assert!(all < 0.1, "Softmax::All left {all:.3} of the probability on the 8 superfluous outputs");
    assert!(classes > 2.0 * all, "without it, {classes:.3}");
    let mut cfg = Config::new(Method::Linear);
    (cfg.batch, cfg.epochs, cfg.softmax) = (32, 1, Softmax::All);
    let l = learn(&k, &bb, &cfg, "h", vec!["a".into(), "b".into()], &train, &[], &mut |_| {}).unwrap();
    assert_eq!(l.task.softmax, Softmax::Classes);
    assert!(l.notes.iter().any(|n| n.contains("--softmax all changes nothing")), "{:?}", l.notes);
}
