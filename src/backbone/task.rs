//! What a task changes in a forward pass, read through a trait so that the owner of the task
//! state decides how it is stored: a session (std) keeps decoded tasks in vectors, a firmware
//! in static buffers. Nothing here allocates or copies weights.
//!
//! Indices are ordinals in the backbone's layer order: the `i`-th maskable layer (conv or
//! linear), the `i`-th batch-norm layer, the `i`-th conv with a kernel larger than 1×1
//! (CLR's reprogrammed convs), the `i`-th reprogrammed conv that no batch norm follows (which
//! has a shift).
//!
//! A task is checked against the backbone once ([`Backbone::check_task`]); after that the
//! forward pass with it cannot fail.

use super::plan::StepKind;
use super::Backbone;
use crate::format::graph::Op;
use crate::kernels::Overlay;

/// How a task sees one maskable layer's weights.
#[derive(Clone, Copy, Debug)]
pub enum LayerWeights<'t> {
    /// The backbone's weights unchanged.
    Backbone,
    /// `backbone ⊙ mask`, overlay values where present (SupSup, ExSSNeT).
    Masked { mask: &'t [u32], overlay: Option<Overlay<'t>> },
    /// Dense weights of the task's own (fine-tuning baseline).
    Dense(&'t [f32]),
}

/// A task's statistics (and affine parameters) for one batch-norm layer.
#[derive(Clone, Copy, Debug)]
pub struct NormView<'t> {
    pub mean: &'t [f32],
    pub var: &'t [f32],
    pub gamma: Option<&'t [f32]>,
    pub beta: Option<&'t [f32]>,
}

/// A task's own classifier `y = W x + b`, `W` is `[outputs][inputs]`.
#[derive(Clone, Copy, Debug)]
pub struct HeadView<'t> {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: &'t [f32],
    pub bias: &'t [f32],
}

/// The task state a forward pass reads. Every method has the answer "nothing changes" as its
/// default, so [`NoTask`] is the plain backbone.
pub trait TaskParts {
    fn weights(&self, _maskable: usize) -> LayerWeights<'_> {
        LayerWeights::Backbone
    }
    /// The task's state of batch-norm layer `bn`, or `None` for the backbone's.
    fn norm(&self, _bn: usize) -> Option<NormView<'_>> {
        None
    }
    /// Whether the task inserts CLR reprogramming after every conv with a kernel > 1×1.
    fn reprograms(&self) -> bool {
        false
    }
    /// The `[channels][3][3]` kernel after reprogrammed conv `r`.
    fn reprogram(&self, _r: usize) -> &[f32] {
        &[]
    }
    /// The per-channel shift β added after the `a`-th reprogrammed conv that no batch norm
    /// follows (its scale γ is folded into the kernel).
    fn shift(&self, _a: usize) -> &[f32] {
        &[]
    }
    /// A head replacing the backbone's final linear layer (or appended after its features).
    fn head(&self) -> Option<HeadView<'_>> {
        None
    }
    /// Post-ops folded in advance by [`Backbone::fold_posts`], or `None` to fold per call.
    fn folded_posts(&self) -> Option<&[f32]> {
        None
    }
}

/// The backbone as it is.
pub struct NoTask;

impl TaskParts for NoTask {}

/// Why a task's state does not fit this backbone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFit {
    pub what: &'static str,
    pub index: usize,
    pub expected: usize,
    pub found: usize,
}

impl core::fmt::Display for TaskFit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "the task does not fit this backbone: {} {} has size {} where the backbone needs {}",
            self.what, self.index, self.found, self.expected
        )
    }
}

fn fit(what: &'static str, index: usize, expected: usize, found: usize) -> Result<(), TaskFit> {
    if expected == found {
        Ok(())
    } else {
        Err(TaskFit { what, index, expected, found })
    }
}

/// Where the head of a task attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HeadAt {
    /// Replaces the final linear layer, whose step is skipped.
    Replace,
    /// Reads the backbone's output.
    Append,
}

impl Backbone<'_> {
    /// Whether conv layer `i` gets CLR reprogramming (kernel larger than 1×1).
    pub fn is_reprogrammed(&self, i: usize) -> bool {
        matches!(&self.layers[i].op, Op::Conv2d(c) if c.kernel[0] > 1 || c.kernel[1] > 1)
    }

    /// Whether the layer after conv `i` is a batch norm that reads it (CLR folds that norm
    /// after the reprogramming; otherwise the task adds a shift there).
    pub fn norm_follows(&self, i: usize) -> bool {
        self.layers.get(i + 1).is_some_and(|l| l.input as usize == i + 1 && matches!(l.op, Op::BatchNorm(_)))
    }

    pub(super) fn head_at(&self) -> HeadAt {
        match self.layers.last().map(|l| &l.op) {
            Some(Op::Linear(_)) => HeadAt::Replace,
            _ => HeadAt::Append,
        }
    }

    /// Features a head reads: the input of the final linear layer, or the output.
    pub fn head_inputs(&self) -> usize {
        match self.head_at() {
            HeadAt::Replace => self.shape(self.layers[self.layers.len() - 1].input).len(),
            HeadAt::Append => self.output_shape().len(),
        }
    }

    /// Floats of post-ops per plan step with `task`: `2·c` (mul, add) for a matmul or norm
    /// step, `4·c` for a reprogrammed conv (the conv's, then the reprogramming's).
    pub fn folded_len(&self, task: &dyn TaskParts) -> usize {
        self.plan.steps.iter().map(|s| self.step_post_len(s.layer as usize, s.kind, s.output, task)).sum()
    }

    pub(super) fn step_post_len(&self, layer: usize, kind: StepKind, output: u32, task: &dyn TaskParts) -> usize {
        let c = self.shape(output).c;
        match kind {
            StepKind::Matmul { .. } if task.reprograms() && self.is_reprogrammed(layer) => 4 * c,
            StepKind::Matmul { .. } | StepKind::Norm => 2 * c,
            _ => 0,
        }
    }

    /// Checks every part of `task` against this backbone's sizes.
    pub fn check_task(&self, task: &dyn TaskParts) -> Result<(), TaskFit> {
        let (mut mi, mut bi, mut ri, mut ai) = (0, 0, 0, 0);
        for (i, l) in self.layers.iter().enumerate() {
            match &l.op {
                Op::Conv2d(_) | Op::Linear(_) => {
                    let n = self.maskable(i);
                    let rows = self.output_channels(i);
                    match task.weights(mi) {
                        LayerWeights::Backbone => {}
                        LayerWeights::Dense(w) => fit("dense weights of maskable layer", mi, n, w.len())?,
                        LayerWeights::Masked { mask, overlay } => {
                            fit("mask of maskable layer", mi, n.div_ceil(32), mask.len())?;
                            if let Some(o) = overlay {
                                fit("overlay of maskable layer", mi, n.div_ceil(32), o.present.len())?;
                                fit("overlay row index of maskable layer", mi, rows, o.row_rank.len())?;
                                let ones: usize = o.present.iter().map(|w| w.count_ones() as usize).sum();
                                fit("overlay values of maskable layer", mi, ones, o.values.len())?;
                                // Bits past the end would shift every rank: they must be clear.
                                if !n.is_multiple_of(32) && o.present[n / 32] >> (n % 32) != 0 {
                                    return Err(TaskFit {
                                        what: "overlay bits past maskable layer",
                                        index: mi,
                                        expected: 0,
                                        found: 1,
                                    });
                                }
                                let mut rank = 0usize;
                                let row = n / rows.max(1);
                                for (r, &rr) in o.row_rank.iter().enumerate() {
                                    fit("overlay row rank of maskable layer", mi, rank, rr as usize)?;
                                    rank += crate::kernels::count_ones(o.present, r * row, (r + 1) * row);
                                }
                            }
                        }
                    }
                    mi += 1;
                    if task.reprograms() && self.is_reprogrammed(i) {
                        let c = self.shape(i as u32 + 1).c;
                        fit("reprogramming kernel", ri, 9 * c, task.reprogram(ri).len())?;
                        ri += 1;
                        if !self.norm_follows(i) {
                            fit("reprogramming shift", ai, c, task.shift(ai).len())?;
                            ai += 1;
                        }
                    }
                }
                Op::BatchNorm(_) => {
                    let c = self.shape(l.input).c;
                    if let Some(n) = task.norm(bi) {
                        fit("norm mean", bi, c, n.mean.len())?;
                        fit("norm variance", bi, c, n.var.len())?;
                        fit("norm scale", bi, c, n.gamma.map_or(c, |g| g.len()))?;
                        fit("norm shift", bi, c, n.beta.map_or(c, |b| b.len()))?;
                    }
                    bi += 1;
                }
                _ => {}
            }
        }
        if let Some(h) = task.head() {
            fit("head inputs", 0, self.head_inputs(), h.inputs)?;
            // Saturating: on a 32-bit target a hostile head size could wrap to the weights' length.
            let weights = h.inputs.saturating_mul(h.outputs);
            fit("head weights", 0, weights, h.weight.len())?;
            fit("head bias", 0, h.outputs, h.bias.len())?;
            if h.outputs == 0 {
                return Err(TaskFit { what: "head outputs", index: 0, expected: 1, found: 0 });
            }
        }
        if let Some(p) = task.folded_posts() {
            fit("folded post-ops", 0, self.folded_len(task), p.len())?;
        }
        Ok(())
    }

    /// Folds every step's bias, batch norm (the task's statistics where it has them), CLR
    /// shift and reprogramming into per-channel `(mul, add)` pairs, laid out as
    /// [`Self::folded_len`] says. A session does this once per task at decode.
    pub fn fold_posts(&self, task: &dyn TaskParts, out: &mut [f32]) {
        let mut cur = Cursor::default();
        let mut off = 0;
        for s in self.plan.steps.iter() {
            let len = self.step_post_len(s.layer as usize, s.kind, s.output, task);
            self.step_posts(s.layer as usize, s.kind, cur, task, &mut out[off..off + len]);
            self.advance(s.layer as usize, s.kind, task, &mut cur);
            off += len;
        }
    }

    /// Moves the ordinals in `cur` past the layers of one step.
    pub(super) fn advance(&self, layer: usize, kind: StepKind, task: &dyn TaskParts, cur: &mut Cursor) {
        match kind {
            StepKind::Matmul { bn } => {
                cur.maskable += 1;
                cur.bn += usize::from(bn.is_some());
                if task.reprograms() && self.is_reprogrammed(layer) {
                    cur.reprogram += 1;
                    cur.shift += usize::from(!self.norm_follows(layer));
                }
            }
            StepKind::Norm => cur.bn += 1,
            _ => {}
        }
    }

    /// Post-ops of one step into `out` (`[mul | add]`, then `[mul | add]` of the
    /// reprogramming); `at` holds the ordinals at the step's first layer.
    pub(super) fn step_posts(&self, layer: usize, kind: StepKind, at: Cursor, task: &dyn TaskParts, out: &mut [f32]) {
        match kind {
            StepKind::Matmul { bn } => {
                let bias = match &self.layers[layer].op {
                    Op::Conv2d(c) => c.bias,
                    Op::Linear(l) => l.bias,
                    _ => unreachable!("matmul steps are conv or linear"),
                }
                .map(|b| self.view.f32s(b));
                let c = self.shape(layer as u32 + 1).c;
                let bn = bn.map(|b| (b as usize, at.bn));
                if task.reprograms() && self.is_reprogrammed(layer) {
                    let (conv, rep) = out.split_at_mut(2 * c);
                    let (m, a) = conv.split_at_mut(c);
                    self.fold_norm(bias, None, task, m, a);
                    let (m, a) = rep.split_at_mut(c);
                    if self.norm_follows(layer) {
                        // The norm reads the reprogrammed value: folded here when the plan
                        // fused it, else it runs as its own step (and `bn` is `None`).
                        self.fold_norm(None, bn, task, m, a);
                    } else {
                        m.fill(1.0);
                        a.copy_from_slice(task.shift(at.shift));
                    }
                } else {
                    let (m, a) = out.split_at_mut(c);
                    self.fold_norm(bias, bn, task, m, a);
                }
            }
            StepKind::Norm => {
                let c = self.shape(self.layers[layer].input).c;
                let (m, a) = out.split_at_mut(c);
                self.fold_norm(None, Some((layer, at.bn)), task, m, a);
            }
            _ => {}
        }
    }

    /// `mul = γ / sqrt(var + eps)`, `add = (bias − mean)·mul + β` for batch-norm layer
    /// `bn = (layer index, ordinal)`, with the task's statistics where it has them.
    fn fold_norm(
        &self,
        bias: Option<&[f32]>,
        bn: Option<(usize, usize)>,
        task: &dyn TaskParts,
        mul: &mut [f32],
        add: &mut [f32],
    ) {
        match bias {
            Some(b) => add.copy_from_slice(b),
            None => add.fill(0.0),
        }
        mul.fill(1.0);
        let Some((layer, ordinal)) = bn else { return };
        let Op::BatchNorm(b) = &self.layers[layer].op else { unreachable!("the plan fuses only batch norms") };
        let own = task.norm(ordinal);
        // The task's statistics replace the backbone's; its γ and β where it has them.
        let n = NormView {
            mean: own.map_or(self.view.f32s(b.mean), |n| n.mean),
            var: own.map_or(self.view.f32s(b.var), |n| n.var),
            gamma: own.and_then(|n| n.gamma).or(b.gamma.map(|t| self.view.f32s(t))),
            beta: own.and_then(|n| n.beta).or(b.beta.map(|t| self.view.f32s(t))),
        };
        for c in 0..mul.len() {
            let g = n.gamma.map_or(1.0, |g| g[c]);
            // libm, not std: the same bits on the host and on a microcontroller.
            let s = g / libm::sqrtf(n.var[c] + b.eps);
            mul[c] = s;
            add[c] = (add[c] - n.mean[c]) * s + n.beta.map_or(0.0, |b| b[c]);
        }
    }
}

/// Ordinals of the layers passed so far, in layer order.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Cursor {
    pub maskable: usize,
    pub bn: usize,
    pub reprogram: usize,
    pub shift: usize,
}
