//! The methods' training procedures (ALGORITHMS §1–§3 with the adaptations of §8): what is
//! trained, in which phases, and the task they produce.

use super::mask::{self, Density, MaskRule};
use super::model::{self, ComponentError};
use super::net::Net;
use super::ops::loss;
use super::ops::sparse::SparseW;
use super::optim::{Kind, Optimizer, Schedule};
use crate::adapter::{Components, Mask, Method, Softmax, Task};
use crate::backbone::Backbone;
use crate::kernels::Kernels;
use crate::rng::SplitMix64;
use bitvec::prelude::{BitVec, Lsb0};

/// Labelled samples, produced on demand in the backbone's input layout.
pub trait Samples {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn label(&self, i: usize) -> u32;
    /// Writes samples `idx` into `out`; `augment` drives random augmentation (None: none).
    fn load(&self, idx: &[usize], augment: Option<&mut SplitMix64>, out: &mut [f32]) -> Result<(), String>;
}

/// How to train one task.
#[derive(Clone, Debug)]
pub struct Config {
    pub method: Method,
    pub rule: MaskRule,
    pub density: Density,
    /// Mask phase (supsup, exssnet) or the only phase (clr, linear, finetune).
    pub epochs: usize,
    /// ExSSNeT's exclusive-weight phase.
    pub weight_epochs: usize,
    pub lr: f32,
    pub weight_lr: f32,
    pub batch: usize,
    pub optimizer: Kind,
    pub weight_decay: f32,
    pub schedule: Schedule,
    pub seed: u64,
    pub kkt: bool,
    /// KKT's K (clipped to the number of references).
    pub knn_k: usize,
    /// CLR's `λ` in `CE + λ·Σ‖p‖₂`.
    pub penalty: f32,
    pub augment: bool,
    /// Which outputs the training softmax spans: the task's classes, or every output of the
    /// backbone (SupSup's superfluous neurons, for task inference; `infer`).
    pub softmax: Softmax,
}

impl Config {
    pub fn new(method: Method) -> Self {
        Config {
            method,
            rule: MaskRule::TopK,
            density: Density::Uniform(0.1),
            epochs: 3,
            weight_epochs: if method == Method::Exssnet { 3 } else { 0 },
            lr: 1e-3,
            weight_lr: 1e-3,
            batch: 128,
            optimizer: Kind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            weight_decay: 0.0,
            schedule: Schedule::Cosine,
            seed: 1,
            kkt: false,
            knn_k: 200,
            penalty: 1e-5,
            augment: false,
            softmax: Softmax::Classes,
        }
    }
}

/// An earlier task the new one may build on.
pub struct Prior<'t> {
    pub task: &'t Task,
    pub digest: [u8; 32],
    /// Its final scores, one vector per maskable layer (KKT), when kept.
    pub scores: Option<&'t [Vec<f32>]>,
}

/// What a training run reports as it goes.
#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: &'static str,
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub accuracy: f32,
    pub images: usize,
}

#[derive(Debug)]
pub enum TrainError {
    Data(String),
    Components(ComponentError),
    Diverged { phase: &'static str, epoch: usize, step: usize, loss: f32 },
    Invalid(String),
}

impl std::fmt::Display for TrainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainError::Data(m) => write!(f, "reading training data: {m}"),
            TrainError::Components(e) => e.fmt(f),
            TrainError::Diverged { phase, epoch, step, loss } => write!(
                f,
                "training diverged: loss {loss} in the {phase} phase, epoch {}, step {}; nothing was written. Try a smaller learning rate",
                epoch + 1,
                step + 1
            ),
            TrainError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TrainError {}

impl From<ComponentError> for TrainError {
    fn from(e: ComponentError) -> Self {
        TrainError::Components(e)
    }
}

/// The result of [`learn`].
pub struct Learned {
    pub task: Task,
    /// Final scores per maskable layer (supsup, exssnet), for KKT of later tasks.
    pub scores: Option<Vec<Vec<f32>>>,
    /// Human-readable notes (e.g. what KKT chose).
    pub notes: Vec<String>,
}

/// Learns one task on `train`. `prior` holds the earlier tasks (oldest first): ExSSNeT chains
/// on the ExSSNeT ones, KKT compares them, finetune continues from the latest finetune task.
#[allow(clippy::too_many_arguments)]
pub fn learn(
    k: &Kernels,
    bb: &Backbone,
    cfg: &Config,
    name: &str,
    labels: Vec<String>,
    train: &dyn Samples,
    prior: &[Prior],
    progress: &mut dyn FnMut(&Progress),
) -> Result<Learned, TrainError> {
    crate::format::task::check_name(name).map_err(|e| TrainError::Invalid(format!("bad task name: {e}")))?;
    let classes = labels.len();
    if classes < 2 {
        return Err(TrainError::Invalid(format!("a task needs at least 2 classes, '{name}' has {classes}")));
    }
    if train.is_empty() {
        return Err(TrainError::Invalid(format!("task '{name}' has no training samples")));
    }
    if cfg.batch == 0 {
        return Err(TrainError::Invalid("--batch must be at least 1".into()));
    }
    let mut task = Task {
        name: name.into(),
        labels,
        method: cfg.method,
        components: Components::default(),
        depends_on: Vec::new(),
        config: String::new(),
        metrics: Vec::new(),
        created_at: 0,
        version: 1,
        softmax: Softmax::Classes,
    };
    let chain: Vec<&Prior> = match cfg.method {
        Method::Exssnet => prior.iter().filter(|p| p.task.method == Method::Exssnet).collect(),
        _ => Vec::new(),
    };
    task.depends_on = chain.iter().map(|p| p.digest).collect();
    let deps: Vec<&Task> = chain.iter().map(|p| p.task).collect();
    let mut notes = Vec::new();
    let mut scores_out = None;
    let mut trainer = Trainer { k, cfg, train, progress, classes, metrics: (0.0, 0.0) };
    match cfg.method {
        Method::Supsup | Method::Exssnet => {
            // Scratch task: masks all ones so the network builds; replaced as training goes.
            let mut net = Net::new(bb, model::recipe(cfg.method, classes));
            check_outputs(&net, classes)?;
            let wp: Vec<usize> = net.maskable.iter().filter_map(|m| m.1).collect();
            let mut base: Vec<Vec<f32>> = wp.iter().map(|&p| net.params[p].value.clone()).collect();
            let union = if cfg.method == Method::Exssnet {
                model::apply_chain(&mut base, &deps)?
            } else {
                base.iter().map(|l| BitVec::repeat(false, l.len())).collect()
            };
            let mut scores = init_scores(bb, &net, cfg.seed, name);
            if cfg.kkt && !prior.is_empty() {
                let (choice, note) = kkt(k, bb, cfg, train, prior, classes)?;
                notes.push(note);
                if let Some(i) = choice {
                    if prior[i].scores.is_none() {
                        notes.push(format!("KKT: '{}' kept no scores; starting from its mask", prior[i].task.name));
                    }
                    scores = transferred_scores(&prior[i], &scores, &base);
                }
            }
            for &p in &wp {
                net.params[p].trained = true;
            }
            net.train_mode = true;
            let mut masks: Vec<BitVec<u32, Lsb0>> = vec![BitVec::new(); wp.len()];
            let densities: Vec<f64> =
                net.maskable.iter().map(|&(layer, _)| layer_density(bb, layer, cfg.density)).collect();
            trainer.mask_phase(&mut net, &wp, &base, &mut scores, &mut masks, &densities)?;
            if cfg.method == Method::Exssnet && cfg.weight_epochs > 0 {
                trainer.weight_phase(&mut net, &wp, &mut base, &masks, &union)?;
            }
            task.components.masks = masks.iter().map(|m| Mask::from_bits(m)).collect();
            if cfg.method == Method::Exssnet {
                task.components.overlay = base
                    .iter()
                    .zip(&masks)
                    .zip(&union)
                    .map(|((w, m), u)| m.iter_ones().filter(|&i| !u[i]).map(|i| w[i]).collect())
                    .collect();
            }
            task.components.norms = net.norm_states();
            task.softmax = spanned(cfg.softmax, &net, classes, &mut notes);
            scores_out = Some(scores);
        }
        Method::Clr | Method::Linear => {
            let mut net = Net::new(bb, model::recipe(cfg.method, classes));
            let (w, b) = net.head.expect("the recipe adds a head");
            let feat = net.params[w].value.len() / classes;
            // PyTorch's default Linear init: U(±1/sqrt(in)) for weights and bias.
            let bound = 1.0 / (feat as f32).sqrt();
            let mut r = SplitMix64::fork(cfg.seed, 3);
            for p in [w, b] {
                for v in &mut net.params[p].value {
                    *v = r.uniform(-bound, bound);
                }
            }
            let mut trained = vec![w, b];
            if cfg.method == Method::Clr {
                trained.extend(net.reprogram.iter().copied());
                trained.extend(net.norms.iter().flat_map(|n| n.gamma.into_iter().chain(n.beta)));
                trained.extend(net.affines.iter().flat_map(|&(g, b)| [g, b]));
                net.train_mode = true;
            }
            for &p in &trained {
                net.params[p].trained = true;
            }
            task.softmax = spanned(cfg.softmax, &net, classes, &mut notes);
            let penalty = if cfg.method == Method::Clr { cfg.penalty } else { 0.0 };
            trainer.dense_phase(&mut net, &trained, penalty, "train")?;
            let c = &mut task.components;
            c.head = net.head_state();
            if cfg.method == Method::Clr {
                (c.reprogram, c.shifts) = net.clr_state();
                c.norms = net.norm_states();
            }
        }
        Method::Finetune => {
            let mut net = Net::new(bb, model::recipe(cfg.method, classes));
            check_outputs(&net, classes)?;
            let wp: Vec<usize> = net.maskable.iter().filter_map(|m| m.1).collect();
            // Continue from the shared copy the previous finetune task left.
            if let Some(p) = prior.iter().rev().find(|p| p.task.method == Method::Finetune) {
                for (&q, d) in wp.iter().zip(&p.task.components.dense) {
                    if d.len() == net.params[q].value.len() {
                        net.params[q].value.clone_from(d);
                    }
                }
                net.set_norm_states(&p.task.components.norms);
            }
            let mut trained = wp.clone();
            trained.extend(net.norms.iter().flat_map(|n| n.gamma.into_iter().chain(n.beta)));
            for &p in &trained {
                net.params[p].trained = true;
            }
            net.train_mode = true;
            trainer.dense_phase(&mut net, &trained, 0.0, "train")?;
            task.components.dense = wp.iter().map(|&p| net.params[p].value.clone()).collect();
            task.components.norms = net.norm_states();
            task.softmax = spanned(cfg.softmax, &net, classes, &mut notes);
        }
    }
    task.metrics.push(("train_loss".into(), trainer.metrics.0 as f64));
    task.metrics.push(("train_accuracy".into(), trainer.metrics.1 as f64));
    Ok(Learned { task, scores: scores_out, notes })
}

/// The softmax a task records: [`Softmax::All`] only where the network has outputs beyond the
/// task's classes (a head of its own has none, and then `All` changes nothing).
fn spanned(asked: Softmax, net: &Net, classes: usize, notes: &mut Vec<String>) -> Softmax {
    if asked == Softmax::All && net.out_shape().len() == classes {
        notes.push(format!("--softmax all changes nothing here: the network has exactly the task's {classes} outputs"));
        return Softmax::Classes;
    }
    asked
}

fn check_outputs(net: &Net, classes: usize) -> Result<(), TrainError> {
    let out = net.out_shape().len();
    if classes > out {
        return Err(TrainError::Invalid(format!(
            "the task has {classes} classes but the backbone's output layer has {out} outputs; \
             create the backbone with more (`edgecl init --outputs {classes}`)"
        )));
    }
    Ok(())
}

/// Scores `U(±1/sqrt(fan_in))` per maskable layer (Kaiming uniform with a = √5), drawn
/// independently per task as the reference allocates them: the stream depends on the task's
/// name as well as the seed. Tasks sharing one starting point end with masks that agree on
/// most bits they were not trained to change, and the entropy gradient of task inference
/// (ALGORITHMS §1.4) then cannot tell them apart.
fn init_scores(bb: &Backbone, net: &Net, seed: u64, name: &str) -> Vec<Vec<f32>> {
    // FNV-1a of the name.
    let tag = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut r = SplitMix64::fork(seed ^ tag, 1);
    net.maskable
        .iter()
        .map(|&(layer, p)| {
            let n = net.params[p.expect("materialised")].value.len();
            let (fan_in, _) = fans(bb, layer, n);
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| r.uniform(-bound, bound)).collect()
        })
        .collect()
}

/// Kept fraction of maskable backbone layer `layer`.
fn layer_density(bb: &Backbone, layer: usize, d: Density) -> f64 {
    use crate::format::graph::Op;
    match &bb.layers()[layer].op {
        Op::Conv2d(c) => d.of_layer(
            c.out_channels as usize,
            (c.in_channels / c.groups.max(1)) as usize,
            (c.kernel[0] * c.kernel[1]) as usize,
        ),
        Op::Linear(l) => d.of_layer(l.out_features as usize, l.in_features as usize, 1),
        _ => 1.0,
    }
    .clamp(0.0, 1.0)
}

/// (fan_in, c_out) of maskable layer `layer` with `n` weights.
fn fans(bb: &Backbone, layer: usize, n: usize) -> (usize, usize) {
    match &bb.layers()[layer].op {
        crate::format::graph::Op::Conv2d(c) => (n / c.out_channels.max(1) as usize, c.out_channels as usize),
        crate::format::graph::Op::Linear(l) => (l.in_features as usize, l.out_features as usize),
        _ => (n.max(1), 1),
    }
}

/// Scores copied from an earlier task (KKT): its kept scores, or, without them, `±c` from its
/// mask with `c` the layer's initial score bound.
fn transferred_scores(p: &Prior, fresh: &[Vec<f32>], base: &[Vec<f32>]) -> Vec<Vec<f32>> {
    if let Some(s) = p.scores {
        if s.len() == fresh.len() && s.iter().zip(fresh).all(|(a, b)| a.len() == b.len()) {
            return s.to_vec();
        }
    }
    fresh
        .iter()
        .enumerate()
        .map(|(l, f)| {
            let c = f.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            match model::mask_bits(p.task, l, base[l].len()) {
                Ok(m) => m.iter().by_vals().map(|b| if b { c } else { -c }).collect(),
                Err(_) => f.clone(),
            }
        })
        .collect()
}

/// KKT (ALGORITHMS §2.4): for every earlier masked task, a K-nearest-neighbour classifier on
/// its features of about 20 % of the new task's training data (66 % references, the rest
/// queries). Returns the best task when its accuracy beats chance, and a note.
fn kkt(
    k: &Kernels,
    bb: &Backbone,
    cfg: &Config,
    train: &dyn Samples,
    prior: &[Prior],
    classes: usize,
) -> Result<(Option<usize>, String), TrainError> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    SplitMix64::fork(cfg.seed, 7).shuffle(&mut order);
    let batches = train.len().div_ceil(cfg.batch);
    let take = ((0.2 * batches as f64).ceil() as usize + 1).min(batches) * cfg.batch;
    let idx = &order[..take.min(order.len())];
    let labels: Vec<u32> = idx.iter().map(|&i| train.label(i)).collect();
    let mut best: Option<(usize, f32)> = None;
    let mut accs = Vec::new();
    for (i, p) in prior.iter().enumerate() {
        if !matches!(p.task.method, Method::Supsup | Method::Exssnet) {
            continue;
        }
        let deps: Vec<&Task> =
            prior[..i].iter().filter(|q| p.task.depends_on.contains(&q.digest)).map(|q| q.task).collect();
        let mut net = model::build(bb, &deps, p.task)?;
        let fv = net.feature_value();
        let dim = net.value_shape(fv).len();
        let mut feats = Vec::with_capacity(idx.len() * dim);
        let mut x = vec![0.0f32; cfg.batch * net.in_shape.len()];
        for chunk in idx.chunks(cfg.batch) {
            let xs = &mut x[..chunk.len() * net.in_shape.len()];
            train.load(chunk, None, xs).map_err(TrainError::Data)?;
            net.forward(k, xs, chunk.len());
            feats.extend_from_slice(&net.value(fv)[..chunk.len() * dim]);
        }
        let acc = knn_accuracy(&feats, dim, &labels, classes, cfg.knn_k);
        accs.push(format!("{} {:.3}", p.task.name, acc));
        if best.is_none_or(|(_, a)| acc > a) {
            best = Some((i, acc));
        }
    }
    let chance = 1.0 / classes as f32;
    Ok(match best {
        Some((i, a)) if a > chance => {
            (Some(i), format!("KKT: scores from '{}' (KNN accuracies: {})", prior[i].task.name, accs.join(", ")))
        }
        _ => (
            None,
            format!(
                "KKT: no earlier task beats chance {chance:.3}; random scores (KNN accuracies: {})",
                accs.join(", ")
            ),
        ),
    })
}

/// Accuracy of a K-NN vote (Euclidean; ties to the smallest label) of the last 34 % of the
/// samples against the first 66 %.
pub fn knn_accuracy(feats: &[f32], dim: usize, labels: &[u32], classes: usize, k: usize) -> f32 {
    let n = labels.len();
    let refs = (n as f64 * 0.66).floor() as usize;
    if refs == 0 || refs >= n {
        return 0.0;
    }
    let k = k.clamp(1, refs);
    let mut correct = 0;
    let mut d: Vec<(f32, u32)> = Vec::with_capacity(refs);
    for q in refs..n {
        let fq = &feats[q * dim..(q + 1) * dim];
        d.clear();
        d.extend((0..refs).map(|r| {
            let fr = &feats[r * dim..(r + 1) * dim];
            (fq.iter().zip(fr).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(), labels[r])
        }));
        d.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut votes = vec![0usize; classes];
        for &(_, l) in &d[..k] {
            if (l as usize) < classes {
                votes[l as usize] += 1;
            }
        }
        let pred = votes.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |v| v.0);
        if pred as u32 == labels[q] {
            correct += 1;
        }
    }
    correct as f32 / (n - refs) as f32
}

struct Trainer<'r> {
    k: &'r Kernels,
    cfg: &'r Config,
    train: &'r dyn Samples,
    progress: &'r mut dyn FnMut(&Progress),
    classes: usize,
    /// (loss, accuracy) of the last epoch.
    metrics: (f32, f32),
}

impl Trainer<'_> {
    /// Runs `epochs` epochs; `step(net, x, labels, lr)` does one batch and returns the loss and
    /// the number of correct predictions.
    fn epochs(
        &mut self,
        net: &mut Net,
        phase: &'static str,
        epochs: usize,
        base_lr: f32,
        mut step: impl FnMut(&mut Net, &[f32], &[u32], f32) -> (f32, usize) + Send,
    ) -> Result<(), TrainError> {
        let n = self.train.len();
        let steps = n.div_ceil(self.cfg.batch);
        let in_len = net.in_shape.len();
        let mut x = vec![0.0f32; self.cfg.batch * in_len];
        let mut order: Vec<usize> = (0..n).collect();
        let mut images = 0;
        for epoch in 0..epochs {
            let lr = self.cfg.schedule.lr(base_lr, epoch, epochs);
            let mut shuffle =
                SplitMix64::fork(self.cfg.seed, 100 + epoch as u64 + if phase == "weights" { 1 << 32 } else { 0 });
            order.sort_unstable();
            shuffle.shuffle(&mut order);
            let mut aug = SplitMix64::fork(self.cfg.seed, 200 + epoch as u64);
            let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
            for (s, chunk) in order.chunks(self.cfg.batch).enumerate() {
                let xs = &mut x[..chunk.len() * in_len];
                self.train.load(chunk, self.cfg.augment.then_some(&mut aug), xs).map_err(TrainError::Data)?;
                let labels: Vec<u32> = chunk.iter().map(|&i| self.train.label(i)).collect();
                let (l, ok) = crate::kernels::busy(|| step(net, xs, &labels, lr));
                if !l.is_finite() {
                    return Err(TrainError::Diverged { phase, epoch, step: s, loss: l });
                }
                loss_sum += l as f64 * chunk.len() as f64;
                correct += ok;
                seen += chunk.len();
                images += chunk.len();
                (self.progress)(&Progress {
                    phase,
                    epoch,
                    epochs,
                    step: s,
                    steps,
                    loss: (loss_sum / seen as f64) as f32,
                    accuracy: correct as f32 / seen as f32,
                    images,
                });
            }
            self.metrics = ((loss_sum / seen.max(1) as f64) as f32, correct as f32 / seen.max(1) as f32);
        }
        Ok(())
    }

    fn mask_phase(
        &mut self,
        net: &mut Net,
        wp: &[usize],
        base: &[Vec<f32>],
        scores: &mut [Vec<f32>],
        masks: &mut [BitVec<u32, Lsb0>],
        densities: &[f64],
    ) -> Result<(), TrainError> {
        let (k, cfg, classes) = (*self.k, self.cfg.clone(), self.classes);
        let mut opt = Optimizer::new(cfg.optimizer, cfg.weight_decay);
        // Layers are independent: each is thresholded and masked on its own thread, which
        // rewrites only the weights whose bit changed (`prev`: the last masks' words). A
        // sparse enough mask also gives the layer's sparse form, rebuilt in its old buffers,
        // for the forward and input-gradient products (`train::ops::sparse`).
        let dims: Vec<Option<(usize, usize, f64)>> = wp.iter().map(|&p| net.weight_dims(p)).collect();
        let mut prev: Vec<Vec<u32>> = vec![Vec::new(); wp.len()];
        let mut refresh = |net: &mut Net, scores: &[Vec<f32>], masks: &mut [BitVec<u32, Lsb0>]| {
            use rayon::prelude::*;
            let old: Vec<Option<SparseW>> = wp.iter().map(|&p| net.take_sparse(p)).collect();
            let mut values = net.params_mut(wp);
            let sparse: Vec<Option<SparseW>> = values
                .par_iter_mut()
                .zip(masks.par_iter_mut())
                .zip(prev.par_iter_mut())
                .zip(old.into_par_iter())
                .enumerate()
                .map(|(l, (((p, m), was), old))| {
                    match cfg.rule {
                        MaskRule::TopK => mask::top_k(&scores[l], densities[l], m),
                        MaskRule::Threshold => mask::threshold(&scores[l], m),
                    }
                    if was.len() == m.as_raw_slice().len() {
                        mask::apply_changed(&base[l], was, m, &mut p.value);
                    } else {
                        mask::apply(&base[l], m, &mut p.value);
                    }
                    was.clear();
                    was.extend_from_slice(m.as_raw_slice());
                    let (rows, cols, max_density) = dims[l]?;
                    let mut sp = old.unwrap_or_default();
                    sp.refill(&p.value, m, rows, cols, max_density).then_some(sp)
                })
                .collect();
            for (&p, sp) in wp.iter().zip(sparse) {
                net.set_sparse(p, sp);
            }
        };
        let epochs = cfg.epochs;
        self.epochs(net, "mask", epochs, cfg.lr, |net, x, labels, lr| {
            refresh(net, scores, masks);
            let (l, ok) = forward_backward(&k, net, x, labels, (classes, cfg.softmax), 0.0, &[]);
            opt.begin();
            for (li, &p) in wp.iter().enumerate() {
                let (w, dw) = (&base[li], &net.params[p].grad);
                opt.update_with(li, &mut scores[li], lr, |at, s, ds| {
                    mask::score_grad(cfg.rule, s, &w[at..at + s.len()], &dw[at..at + s.len()], ds)
                });
            }
            (l, ok)
        })?;
        refresh(net, scores, masks);
        // The weight phase changes the values under the masks.
        net.clear_sparse();
        Ok(())
    }

    /// ExSSNeT's exclusive-weight phase: only weights in `mask AND NOT union` change.
    fn weight_phase(
        &mut self,
        net: &mut Net,
        wp: &[usize],
        base: &mut [Vec<f32>],
        masks: &[BitVec<u32, Lsb0>],
        union: &[BitVec<u32, Lsb0>],
    ) -> Result<(), TrainError> {
        let (k, cfg, classes) = (*self.k, self.cfg.clone(), self.classes);
        let excl: Vec<Vec<usize>> =
            masks.iter().zip(union).map(|(m, u)| m.iter_ones().filter(|&i| !u[i]).collect()).collect();
        let mut vals: Vec<Vec<f32>> =
            excl.iter().zip(base.iter()).map(|(e, w)| e.iter().map(|&i| w[i]).collect()).collect();
        let mut opt = Optimizer::new(cfg.optimizer, cfg.weight_decay);
        let mut g: Vec<Vec<f32>> = vals.iter().map(|v| vec![0.0; v.len()]).collect();
        self.epochs(net, "weights", cfg.weight_epochs, cfg.weight_lr, |net, x, labels, lr| {
            for (l, &p) in wp.iter().enumerate() {
                let w = &mut net.params[p].value;
                for (&i, &v) in excl[l].iter().zip(&vals[l]) {
                    w[i] = v;
                }
            }
            let (loss, ok) = forward_backward(&k, net, x, labels, (classes, cfg.softmax), 0.0, &[]);
            opt.begin();
            for (l, &p) in wp.iter().enumerate() {
                let grad = &net.params[p].grad;
                for (d, &i) in g[l].iter_mut().zip(&excl[l]) {
                    *d = grad[i];
                }
                opt.update(l, &mut vals[l], &g[l], lr);
            }
            (loss, ok)
        })?;
        for (l, &p) in wp.iter().enumerate() {
            for (&i, &v) in excl[l].iter().zip(&vals[l]) {
                base[l][i] = v;
                net.params[p].value[i] = v;
            }
        }
        Ok(())
    }

    /// Trains the params `trained` directly (CLR, linear, finetune).
    fn dense_phase(
        &mut self,
        net: &mut Net,
        trained: &[usize],
        penalty: f32,
        phase: &'static str,
    ) -> Result<(), TrainError> {
        let (k, cfg, classes) = (*self.k, self.cfg.clone(), self.classes);
        let mut opt = Optimizer::new(cfg.optimizer, cfg.weight_decay);
        self.epochs(net, phase, cfg.epochs, cfg.lr, |net, x, labels, lr| {
            let (l, ok) = forward_backward(&k, net, x, labels, (classes, cfg.softmax), penalty, trained);
            opt.begin();
            for (slot, &p) in trained.iter().enumerate() {
                let prm = &mut net.params[p];
                opt.update(slot, &mut prm.value, &prm.grad, lr);
            }
            (l, ok)
        })
    }
}

/// Forward, cross-entropy (+ `penalty·Σ‖p‖₂` over `penalised`), backward. Returns the loss
/// and the number of correct predictions (the argmax over the task's classes). The softmax
/// spans the first `classes` outputs, or with [`Softmax::All`] every output: those beyond the
/// classes are never targets, so training pushes them down on the task's own inputs (SupSup's
/// superfluous neurons, paper §3.6; what lets `infer` find the task).
fn forward_backward(
    k: &Kernels,
    net: &mut Net,
    x: &[f32],
    labels: &[u32],
    (classes, softmax): (usize, Softmax),
    penalty: f32,
    penalised: &[usize],
) -> (f32, usize) {
    let batch = labels.len();
    {
        let width = net.out_shape().len();
        let out = net.forward(k, x, batch).to_vec();
        let mut d = vec![0.0f32; out.len()];
        let spans = if softmax == Softmax::All { width } else { classes };
        let mut l = loss::cross_entropy(&out, width, spans, labels, &mut d);
        let ok = (0..batch).filter(|&b| loss::argmax(&out[b * width..], classes) as u32 == labels[b]).count();
        net.backward_over(k, &d);
        if penalty > 0.0 {
            for &p in penalised {
                let prm = &mut net.params[p];
                let norm = prm.value.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() as f32;
                if norm > 0.0 {
                    l += penalty * norm;
                    for (g, v) in prm.grad.iter_mut().zip(&prm.value) {
                        *g += penalty * v / norm;
                    }
                }
            }
        }
        (l, ok)
    }
}
