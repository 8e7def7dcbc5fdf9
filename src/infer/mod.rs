//! (std) Task inference: which learned task a batch of inputs belongs to when nobody says
//! (`--task auto`; ALGORITHMS §1.4, issue 4 item 3).
//!
//! **Mask-based tasks (supsup, exssnet)** are told apart by SupSup's entropy gradient. Every
//! maskable layer `l` gets the superposed weights
//!
//! ```text
//! W_l(α) = Σ_i α_i · (M_i,l ⊙ W_i,l)
//! ```
//!
//! where `W_i` are task `i`'s own effective weights: the backbone's, dequantised, with the
//! overlays of its ExSSNeT chain written in (a supsup task reads the backbone unchanged). One
//! forward pass over the batch gives the mean softmax entropy `H`, one backward pass
//! `G_l = ∂H/∂W_l`, and then `∂H/∂α_i = Σ_l ⟨G_l, M_i,l ⊙ W_i,l⟩`: a single pass scores every
//! candidate. With `W_i = W` for all tasks this is the reference's `W ⊙ Σ α_i M_i`.
//! - [`Mode::OneShot`]: `α_i = 1/n`, the task with the most negative gradient wins (one
//!   Frank-Wolfe step, paper eq. 4).
//! - [`Mode::Binary`]: as the reference's `se_binary_minimization`: keep the candidates whose
//!   gradient is at most the lower median of the candidates' gradients, spread `α` uniformly
//!   over them, repeat until one is left (at most `⌈log2 n⌉ + 1` rounds; if ties keep several
//!   after that, the lowest gradient of the last round wins).
//! - [`Mode::Entropy`] and [`Mode::Information`] run every candidate's own network instead
//!   (`n` passes); see "Superfluous outputs" below.
//!
//! Decisions:
//! - *Which logits.* `H` spans every output of the network when every candidate was trained
//!   with [`Softmax::All`] (the reference's way: the outputs beyond a task's classes are
//!   SupSup's superfluous neurons, paper §3.6, which its training pushes down on its own
//!   inputs; that is the signal the gradient reads, see "Superfluous outputs" below).
//!   Otherwise `H` spans the first `C` logits of each row, `C` the largest class count among
//!   the candidates: a task's logits are its first `classes` outputs, and outputs no
//!   candidate was trained on carry only the random rows of the backbone's last layer.
//! - *Batch norm.* Per-task running statistics do not superpose: the superposed network
//!   normalises with the statistics of the batch itself (as the reference, which puts the model
//!   in train mode during inference), and the gradient flows through them. A norm over a 1×1
//!   plane has no batch statistics for a single input; when `batch == 1` and the backbone has
//!   such a norm, the `α`-weighted mixture of the candidates' running statistics is used instead
//!   (mean `Σ α_i μ_i`, variance `Σ α_i (σ²_i + μ_i²) − mean²`), treated as constants.
//! - *Memory.* One superposed dense copy of the maskable weights per call (and its gradient, as
//!   in training), however many candidates; the binary rounds reuse it. Per candidate only one
//!   layer's effective weights exist at a time.
//! - Only the given candidates can win: a caller passes its learned tasks (ALGORITHMS §8).
//!
//! **Superfluous outputs.** Tasks that differ by input domain (permuted Fashion-MNIST, 10
//! tasks, fc1024) are found by the entropy gradient only on a backbone with more outputs than
//! classes, trained with [`Softmax::All`] at the reference's rate:
//! - With 10 outputs for 10 classes it picks the wrong task: 1 of 790 test batches of 128
//!   (RMSprop 1e-3, 282 steps per task). A PyTorch replication of the reference
//!   (`benches/compare/supsup_oneshot.py`, 1000 steps at 1e-4) fails the same way: 51 of 780.
//!   Split by layer, the first layer's term favours wrong tasks and outweighs the others'; the
//!   superposed network is nearly uniform (`H` = 2.16 of ln 10), so `∂H/∂α` mostly measures
//!   how much a candidate would sharpen any logits.
//! - With 500 outputs (the reference's `output_size` for FC1024), the softmax over all of
//!   them, 1000 steps at 1e-4: 790 of 790 batches and 1908 of 2000 single images here, 780 of
//!   780 in the PyTorch replication. The same 500 outputs with the softmax over the classes
//!   only: 0 of 32 at CI size (the extra outputs carry nothing).
//! - The rate matters on its own: on 4 tasks over the 500-output backbone, 80 steps at 1e-4
//!   gave 32 of 32 batches, 320 steps at 3e-4 28 of 32, and at 1e-3 0 of 32, with task
//!   accuracies within a point of each other.
//!
//! [`Softmax::All`] is a choice made when a task is learned (`learn --softmax all`) and kept in
//! its file, not a default: on split tasks whose labels are remapped to each task's first
//! outputs (tops 0..4, shoes 0..3 on a 10-output lenet, tests/cli_predict.rs) it sent a batch
//! of one task to the other, because every task then pushes down the same outputs.
//!
//! Without superfluous outputs, [`Mode::Information`] runs each task's own network (`n`
//! passes) and picks the task that both classifies each input confidently and spreads the
//! batch over its classes: `H(p̄) − mean_b H(p_b)`. It was right on 790 of 790 batches at 10
//! outputs, where the lowest entropy got 626 (one task's network put foreign inputs
//! confidently into a few classes). Its assumption is a batch that mixes classes: on split
//! tasks (fc1024, 5 tasks of 2 classes), batches of 16 images of one class went to the right
//! task 1 of 10 times. So it is a rule to choose (`--infer info` with `--batch-auto`), not the
//! default. A single input is decided by the lowest entropy.
//! Tried at 10 outputs and not kept: the one-shot step on the negative information (275 of
//! 790), leaving the first layer's term out of `∂H/∂α` (157 of 790), removing each
//! candidate's share of the layer's output scale (0 of 32), the lowest entropy relative to
//! each task's own (0.81). Results in `benches/results/2026-11-23-infer/`.
//! On split tasks (new classes, same inputs) the entropy gradient is the better default
//! (tests/cli_predict.rs), and the lowest entropy can prefer a confident wrong task. Every
//! gradient is checked against finite differences and against the tasks' own networks.
//!
//! **Other tasks (clr, linear, finetune)** have their own heads and weights, so nothing
//! superposes. Each candidate's own network runs on the batch and the lowest mean entropy wins.
//! This is a heuristic (confidence, not a gradient); the entropy is divided by `ln C` so that
//! tasks with different class counts compare on one scale `[0, 1]`.
//!
//! **Mixed sets** are decided in two steps: the entropy gradient picks the best mask-based task
//! (one dense copy, as above), then that task's own network is run and its normalised entropy
//! competes with the other tasks' by the same heuristic.

use crate::adapter::{Method, Softmax, Task};
use crate::backbone::Backbone;
use crate::format::graph::Op;
use crate::kernels::Kernels;
use crate::train::model::{self, ComponentError};
use crate::train::net::{Net, Recipe};
use crate::train::ops::{conv, loss};
use std::borrow::Cow;

/// A learned task that inference may choose, with the tasks it depends on (oldest first, as
/// for [`model::build`]).
#[derive(Clone, Debug)]
pub struct Candidate<'t> {
    pub task: &'t Task,
    pub deps: Vec<&'t Task>,
}

impl<'t> Candidate<'t> {
    pub fn new(task: &'t Task, deps: Vec<&'t Task>) -> Self {
        Candidate { task, deps }
    }

    /// Told apart by the entropy gradient over superposed masks.
    pub fn mask_based(&self) -> bool {
        matches!(self.task.method, Method::Supsup | Method::Exssnet)
    }
}

/// How mask-based candidates are narrowed down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// One gradient at `α = 1/n`.
    #[default]
    OneShot,
    /// Halving by the lower median of the gradients.
    Binary,
    /// No gradient: every candidate's own network runs on the batch (as [`Mode::Entropy`]) and
    /// the one with the most information between input and prediction wins:
    /// `H(p̄) − mean_b H(p_b)` (`p̄` the batch's mean prediction), divided by `ln C`. A task
    /// wins by classifying each input confidently *and* spreading the batch over its classes,
    /// so it needs a batch that mixes classes; see the module documentation. A single input
    /// carries no mix: it is decided by the lowest entropy.
    Information,
    /// No gradient: every candidate's own network runs on the batch and the lowest
    /// normalised entropy wins (`H` at each vertex `α = e_i` instead of its slope at the
    /// centre). `n` forward passes instead of one forward and one backward pass over the
    /// superposition; see the module documentation for why it exists.
    Entropy,
}

/// What inference chose and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Inferred {
    /// Index of the chosen candidate.
    pub index: usize,
    /// One per candidate; lower means more likely. Mask-based candidates: `∂H/∂α_i` (one-shot:
    /// from the single pass; binary: from the last round the candidate took part in). Other
    /// candidates: their normalised entropy (as in `entropies`).
    pub scores: Vec<f32>,
    /// Mean entropy of a candidate's own network on the batch divided by `ln(classes)`, where it
    /// was computed: every non-mask candidate, and the best mask-based one in a mixed set.
    pub entropies: Vec<Option<f32>>,
    pub method: &'static str,
}

/// Why inference could not run.
#[derive(Debug, Clone, PartialEq)]
pub enum InferError {
    NoCandidates,
    /// The inputs do not match the backbone (size, batch, non-finite values).
    Input(String),
    /// A candidate does not fit the backbone or its dependencies.
    Components(ComponentError),
}

impl std::fmt::Display for InferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InferError::NoCandidates => f.write_str("task inference needs at least one learned task; none was given"),
            InferError::Input(m) => write!(f, "task inference: {m}"),
            InferError::Components(e) => write!(f, "task inference: {e}"),
        }
    }
}

impl std::error::Error for InferError {}

impl From<ComponentError> for InferError {
    fn from(e: ComponentError) -> Self {
        InferError::Components(e)
    }
}

pub const ONE_SHOT: &str = "one-shot entropy gradient over superposed masks";
pub const BINARY: &str = "binary search by entropy gradient over superposed masks";
pub const INFORMATION: &str = "most information between input and prediction of each task's own network (batch rule)";
pub const LOWEST_ENTROPY: &str = "lowest normalised entropy of each task's own network (heuristic)";
pub const MIXED: &str = "entropy gradient among mask-based tasks, then lowest normalised entropy (heuristic)";

/// Infers which of `candidates` produced the `batch` inputs in `x` (the backbone's input
/// layout, `batch × input size` values). See the module documentation for the method.
pub fn infer_task(
    k: &Kernels,
    bb: &Backbone,
    candidates: &[Candidate],
    x: &[f32],
    batch: usize,
    mode: Mode,
) -> Result<Inferred, InferError> {
    if candidates.is_empty() {
        return Err(InferError::NoCandidates);
    }
    check_input(bb, x, batch)?;
    for c in candidates {
        if c.task.classes() < 2 {
            return Err(ComponentError(format!(
                "task '{}' has {} classes; inference needs at least 2",
                c.task.name,
                c.task.classes()
            ))
            .into());
        }
    }
    let n = candidates.len();
    let superpose = |i: usize| matches!(mode, Mode::OneShot | Mode::Binary) && candidates[i].mask_based();
    // Information needs a batch; a single input is decided by the lowest entropy.
    let information = mode == Mode::Information && batch > 1;
    let masked: Vec<usize> = (0..n).filter(|&i| superpose(i)).collect();
    let others: Vec<usize> = (0..n).filter(|&i| !superpose(i)).collect();
    let mut scores = vec![f32::NAN; n];
    let mut entropies = vec![None; n];
    let mut best_masked = None;
    if !masked.is_empty() {
        let cands: Vec<&Candidate> = masked.iter().map(|&i| &candidates[i]).collect();
        let (pick, g) = gradient_search(k, bb, &cands, x, batch, mode)?;
        for (&i, g) in masked.iter().zip(g) {
            scores[i] = g;
        }
        best_masked = Some(masked[pick]);
    }
    if others.is_empty() {
        let index = best_masked.unwrap_or(0);
        let method = if mode == Mode::Binary { BINARY } else { ONE_SHOT };
        return Ok(Inferred { index, scores, entropies, method });
    }
    for &i in &others {
        let (h, score) = own_scores(k, bb, &candidates[i], x, batch, mode)?;
        scores[i] = score;
        entropies[i] = Some(h);
    }
    if let Some(i) = best_masked {
        entropies[i] = Some(own_scores(k, bb, &candidates[i], x, batch, mode)?.0);
    }
    let contenders: Vec<(usize, f32)> = entropies.iter().enumerate().filter_map(|(i, h)| h.map(|h| (i, h))).collect();
    let index = if information {
        argmin(scores.iter().copied()).unwrap_or(0)
    } else {
        argmin(contenders.iter().map(|c| c.1)).map_or(0, |j| contenders[j].0)
    };
    let method = match (best_masked, information) {
        (Some(_), _) => MIXED,
        (None, true) => INFORMATION,
        (None, false) => LOWEST_ENTROPY,
    };
    Ok(Inferred { index, scores, entropies, method })
}

/// Mean entropy `H` of the superposition `W(α)` of mask-based `candidates` on the batch, and
/// `∂H/∂α_i` for every candidate (also those with `α_i = 0`). `alpha` has one weight per
/// candidate. Exposed for diagnostics and tests; [`infer_task`] is the entry point.
pub fn entropy_gradient(
    k: &Kernels,
    bb: &Backbone,
    candidates: &[Candidate],
    alpha: &[f32],
    x: &[f32],
    batch: usize,
) -> Result<(f32, Vec<f32>), InferError> {
    if candidates.is_empty() {
        return Err(InferError::NoCandidates);
    }
    if alpha.len() != candidates.len() || alpha.iter().any(|a| !a.is_finite()) {
        return Err(InferError::Input(format!(
            "{} finite weights α needed, one per candidate; {} given",
            candidates.len(),
            alpha.len()
        )));
    }
    if let Some(c) = candidates.iter().find(|c| !c.mask_based()) {
        return Err(ComponentError(format!(
            "task '{}' is a {} task; only supsup and exssnet tasks superpose",
            c.task.name,
            c.task.method.name()
        ))
        .into());
    }
    check_input(bb, x, batch)?;
    let cands: Vec<&Candidate> = candidates.iter().collect();
    let mut sp = Superposed::new(bb, &cands, batch)?;
    sp.gradient(k, bb, &cands, alpha, x, batch)
}

fn check_input(bb: &Backbone, x: &[f32], batch: usize) -> Result<(), InferError> {
    let len = bb.input_shape().len();
    if batch == 0 {
        return Err(InferError::Input("a batch of 0 inputs".into()));
    }
    if Some(x.len()) != batch.checked_mul(len) {
        return Err(InferError::Input(format!(
            "{batch} inputs of {len} values each need {} values, {} given",
            batch.saturating_mul(len),
            x.len()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(InferError::Input(format!("input value {i} is not a finite number")));
    }
    Ok(())
}

/// Index of the smallest value (the first on ties; NaN loses to every number).
fn argmin(v: impl Iterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, s) in v.enumerate() {
        let better = match best {
            None => true,
            Some((_, b)) => b.is_nan() && !s.is_nan() || s < b,
        };
        if better {
            best = Some((i, s));
        }
    }
    best.map(|b| b.0)
}

/// The chosen index into `cands` and the gradient score of each.
fn gradient_search(
    k: &Kernels,
    bb: &Backbone,
    cands: &[&Candidate],
    x: &[f32],
    batch: usize,
    mode: Mode,
) -> Result<(usize, Vec<f32>), InferError> {
    let n = cands.len();
    let mut sp = Superposed::new(bb, cands, batch)?;
    let mut scores = vec![f32::NAN; n];
    let mut active: Vec<usize> = (0..n).collect();
    let cap = match mode {
        Mode::OneShot => 1,
        Mode::Binary => n.next_power_of_two().trailing_zeros() as usize + 1,
        Mode::Entropy | Mode::Information => unreachable!("these modes never superpose"),
    };
    for _round in 0..cap {
        let mut alpha = vec![0.0f32; n];
        for &i in &active {
            alpha[i] = 1.0 / active.len() as f32;
        }
        let (_, g) = sp.gradient(k, bb, cands, &alpha, x, batch)?;
        for &i in &active {
            scores[i] = g[i];
        }
        if mode == Mode::OneShot {
            break;
        }
        // Lower median; comparisons by total order, so NaNs sort last and never empty the set.
        let mut sorted: Vec<f32> = active.iter().map(|&i| g[i]).collect();
        sorted.sort_by(f32::total_cmp);
        let median = sorted[(sorted.len() - 1) / 2];
        active.retain(|&i| g[i].total_cmp(&median).is_le());
        if active.len() <= 1 {
            break;
        }
    }
    let pick = argmin(active.iter().map(|&i| scores[i])).map_or(0, |j| active[j]);
    Ok((pick, scores))
}

/// [`own_network_scores`] of candidate `c`'s own network on the batch.
fn own_scores(
    k: &Kernels,
    bb: &Backbone,
    c: &Candidate,
    x: &[f32],
    batch: usize,
    mode: Mode,
) -> Result<(f32, f32), InferError> {
    let mut net = model::build(bb, &c.deps, c.task)?;
    net.train_mode = false;
    let width = net.out_shape().len();
    let out = net.forward(k, x, batch);
    Ok(own_network_scores(out, width, c.task.classes(), batch, mode))
}

/// How [`Mode::Entropy`] and [`Mode::Information`] rank a candidate from its own network's
/// logits (the first `classes` of every `width`, `batch` rows): returns the normalised
/// entropy and the score, lower winning. The score is the entropy, or for
/// [`Mode::Information`] on more than one row the negative [`normalised_information`] (one
/// row carries no class mix). For callers that run the tasks themselves (e.g. through a
/// `Session`, which needs no network per task).
pub fn own_network_scores(logits: &[f32], width: usize, classes: usize, batch: usize, mode: Mode) -> (f32, f32) {
    let h = normalised_entropy(logits, width, classes, batch);
    let score = if mode == Mode::Information && batch > 1 {
        h - normalised_mean_prediction_entropy(logits, width, classes, batch)
    } else {
        h
    };
    (h, score)
}

/// The information between input and prediction over a batch, `H(p̄) − mean_b H(p_b)` with
/// `p̄` the mean of the rows' softmax over their first `classes` of every `width` logits,
/// divided by `ln(classes)`: in `[0, 1]`, high when each row is confident and the rows use
/// many classes; 0 for a single row. The score of [`Mode::Information`].
pub fn normalised_information(logits: &[f32], width: usize, classes: usize, batch: usize) -> f32 {
    if batch == 0 || classes < 2 {
        return 0.0;
    }
    normalised_mean_prediction_entropy(logits, width, classes, batch)
        - normalised_entropy(logits, width, classes, batch)
}

/// `H(p̄) / ln(classes)`, `p̄` the mean softmax of the rows (see [`normalised_information`]).
fn normalised_mean_prediction_entropy(logits: &[f32], width: usize, classes: usize, batch: usize) -> f32 {
    if batch == 0 || classes < 2 {
        return 0.0;
    }
    let mut mean = vec![0.0f64; classes];
    for b in 0..batch {
        let row = &logits[b * width..b * width + classes];
        let log_z = loss::log_sum_exp(row);
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += (v as f64 - log_z).exp() / batch as f64;
        }
    }
    let h_mean: f64 = -mean.iter().filter(|&&p| p > 0.0).map(|p| p * p.ln()).sum::<f64>();
    (h_mean / (classes as f64).ln()) as f32
}

/// Mean softmax entropy of the first `classes` of every `width` logits of `batch` rows,
/// divided by `ln(classes)` so that tasks with different class counts compare on one scale
/// `[0, 1]`: the score of the lowest-entropy rule, for callers that run the tasks themselves
/// (e.g. through a `Session`, which needs no network per task).
pub fn normalised_entropy(logits: &[f32], width: usize, classes: usize, batch: usize) -> f32 {
    let total: f64 = (0..batch).map(|b| loss::softmax_entropy(&logits[b * width..b * width + classes]) as f64).sum();
    (total / batch as f64 / (classes as f64).ln()) as f32
}

/// The superposed network: maskable weights materialised once and rewritten for each `α`.
struct Superposed<'a> {
    net: Net<'a>,
    /// Per maskable layer: (backbone layer, weight param).
    layers: Vec<(usize, usize)>,
    /// The backbone's running statistics per norm (for candidates that carry none).
    norm_base: Vec<(Vec<f32>, Vec<f32>)>,
    /// How many leading outputs of each row `H` spans (see "Which logits").
    logits: usize,
}

impl<'a> Superposed<'a> {
    fn new(bb: &'a Backbone<'a>, cands: &[&Candidate], batch: usize) -> Result<Self, InferError> {
        let mut net = Net::new(bb, Recipe { materialise: true, ..Recipe::default() });
        let layers: Vec<(usize, usize)> = net.maskable.iter().filter_map(|&(l, p)| p.map(|p| (l, p))).collect();
        let width = net.out_shape().len();
        let mut classes = 0;
        let mut all = !cands.is_empty();
        for c in cands {
            let t = c.task;
            if t.classes() == 0 || t.classes() > width {
                return Err(ComponentError(format!(
                    "task '{}' has {} classes; the network gives {width} outputs",
                    t.name,
                    t.classes()
                ))
                .into());
            }
            if t.components.masks.len() != layers.len() {
                return Err(ComponentError(format!(
                    "task '{}' has masks for {} layers, the backbone has {}",
                    t.name,
                    t.components.masks.len(),
                    layers.len()
                ))
                .into());
            }
            let norms = &t.components.norms;
            let fits = norms.is_empty()
                || norms.len() == net.norms.len()
                    && norms.iter().zip(&net.norms).all(|(s, n)| {
                        let c = net.params[n.mean].value.len();
                        s.mean.len() == c && s.var.len() == c
                    });
            if !fits {
                return Err(ComponentError(format!(
                    "task '{}': its norm statistics do not match the backbone's {} norms",
                    t.name,
                    net.norms.len()
                ))
                .into());
            }
            classes = classes.max(t.classes());
            all &= t.softmax == Softmax::All;
        }
        let logits = if all { width } else { classes };
        for &(_, p) in &layers {
            net.params[p].trained = true;
        }
        let norm_base =
            net.norms.iter().map(|n| (net.params[n.mean].value.clone(), net.params[n.var].value.clone())).collect();
        // Batch statistics, unless a single input meets a norm over a 1×1 plane.
        let flat_norm = net.nodes.iter().any(|n| matches!(n.op, crate::train::net::NodeOp::Norm { plane: 1, .. }));
        net.train_mode = !(batch == 1 && flat_norm);
        Ok(Superposed { net, layers, norm_base, logits })
    }

    /// Sets `W(α)`, runs forward and backward, returns `H` and `∂H/∂α`.
    fn gradient(
        &mut self,
        k: &Kernels,
        bb: &Backbone,
        cands: &[&Candidate],
        alpha: &[f32],
        x: &[f32],
        batch: usize,
    ) -> Result<(f32, Vec<f32>), InferError> {
        let nl = self.layers.len();
        let mut scratch = Vec::new();
        for (l, &(layer, p)) in self.layers.iter().enumerate() {
            let base = layer_weights(bb, layer);
            let mut sup = std::mem::take(&mut self.net.params[p].value);
            sup.fill(0.0);
            for (c, &a) in cands.iter().zip(alpha) {
                if a != 0.0 {
                    let (words, w) = effective(c, l, nl, &base, &mut scratch)?;
                    for_each_one(words, w.len(), |j| sup[j] += a * w[j]);
                }
            }
            self.net.params[p].value = sup;
        }
        self.mix_norms(cands, alpha);
        self.net.zero_grad();
        let width = self.net.out_shape().len();
        let out = self.net.forward(k, x, batch).to_vec();
        let mut d = vec![0.0f32; out.len()];
        let h = loss::entropy(&out, width, self.logits, batch, &mut d);
        self.net.backward(k, &d);
        let mut g = vec![0.0f64; cands.len()];
        for (l, &(layer, p)) in self.layers.iter().enumerate() {
            let base = layer_weights(bb, layer);
            let grad = &self.net.params[p].grad;
            for (c, gi) in cands.iter().zip(&mut g) {
                let (words, w) = effective(c, l, nl, &base, &mut scratch)?;
                let mut s = 0.0f64;
                for_each_one(words, w.len(), |j| s += grad[j] as f64 * w[j] as f64);
                *gi += s;
            }
        }
        Ok((h, g.into_iter().map(|v| v as f32).collect()))
    }

    /// Running statistics of the superposition: the `α`-weighted mixture of the candidates'.
    fn mix_norms(&mut self, cands: &[&Candidate], alpha: &[f32]) {
        let total: f32 = alpha.iter().sum();
        for (ni, n) in self.net.norms.clone().iter().enumerate() {
            let (base_mean, base_var) = &self.norm_base[ni];
            let ch = base_mean.len();
            let (mut mean, mut second) = (vec![0.0f64; ch], vec![0.0f64; ch]);
            for (c, &a) in cands.iter().zip(alpha) {
                let a = if total != 0.0 { (a / total) as f64 } else { 1.0 / cands.len() as f64 };
                let (m, v) = match c.task.components.norms.get(ni) {
                    Some(s) => (&s.mean, &s.var),
                    None => (base_mean, base_var),
                };
                for j in 0..ch {
                    mean[j] += a * m[j] as f64;
                    second[j] += a * (v[j] as f64 + (m[j] as f64).powi(2));
                }
            }
            for j in 0..ch {
                self.net.params[n.mean].value[j] = mean[j] as f32;
                self.net.params[n.var].value[j] = (second[j] - mean[j] * mean[j]).max(0.0) as f32;
            }
        }
    }
}

/// Maskable backbone layer `layer`'s weights as f32 (dequantised when int8).
fn layer_weights<'b>(bb: &'b Backbone, layer: usize) -> Cow<'b, [f32]> {
    match &bb.layers()[layer].op {
        Op::Conv2d(c) => conv::dense(bb.weights(c.weight, c.scale)),
        Op::Linear(l) => conv::dense(bb.weights(l.weight, l.scale)),
        _ => Cow::Borrowed(&[]),
    }
}

/// Candidate `c`'s mask words and effective weights of maskable layer `l` (of `layers`):
/// the backbone's `base` for supsup, `base` with the chain's overlays for exssnet.
fn effective<'w>(
    c: &'w Candidate,
    l: usize,
    layers: usize,
    base: &'w [f32],
    scratch: &'w mut Vec<f32>,
) -> Result<(&'w [u32], &'w [f32]), ComponentError> {
    model::mask_bits(c.task, l, base.len())?;
    let words = &c.task.components.masks[l].words[..];
    if c.task.method != Method::Exssnet {
        return Ok((words, base));
    }
    scratch.clear();
    scratch.extend_from_slice(base);
    let chain: Vec<&Task> = c.deps.iter().copied().chain([c.task]).collect();
    model::apply_chain_layer(scratch, &chain, l, layers)?;
    Ok((words, &scratch[..]))
}

/// Calls `f(j)` for every set bit `j < n` of a mask stored as 32-bit words (bit `j` is bit
/// `j % 32` of word `j / 32`).
fn for_each_one(words: &[u32], n: usize, mut f: impl FnMut(usize)) {
    for (wi, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let j = wi * 32 + bits.trailing_zeros() as usize;
            if j >= n {
                return;
            }
            f(j);
            bits &= bits - 1;
        }
    }
}

#[cfg(test)]
mod tests;
