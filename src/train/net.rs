//! The training graph: the backbone's layers, executed one by one over a batch with every
//! value kept for the backward pass, plus what a task inserts (CLR's reprogramming kernels and
//! affines, a new head). Runs of layers whose activations outweigh their weights go sample by
//! sample instead, with the same results ([`samples`]). Parameters live in one pool; each is
//! frozen or trained. Frozen conv and linear weights are read from the mapped backbone when
//! they are f32; int8 ones are dequantised once, when the net is built, rather than in every
//! step's forward and backward (for Lite0 that is 13 MB, against the 450 MB of a CLR training
//! step). Weights a method changes (masked, overlaid, fine-tuned) are materialised as f32
//! params.
//!
//! Backward runs only as far back as the earliest trained parameter: a frozen prefix gets
//! neither weight nor input gradients.
//!
//! Element-wise ops that alone read a value are fused into the op that makes it: a ReLU or
//! ReLU6 into a conv, norm, affine or residual sum, and a residual sum into the norm before it
//! (a ResNet block's `relu(norm(x) + shortcut)` is one pass). Each fused op gives the bits of
//! the ops it replaces, forward and backward.

use super::ops::sparse::{self, SparseW};
use super::ops::{act, conv, linear, norm, pool};
use crate::adapter::{Base, Head, NormState, Quantized};
use crate::backbone::{Backbone, Shape};
use crate::format::graph::Op;
use crate::kernels::reference::PoolShape;
use crate::kernels::{ConvShape, Kernels, Weights};

/// A tensor of the parameter pool and its gradient.
#[derive(Clone, Debug, Default)]
pub struct Param {
    pub value: Vec<f32>,
    pub grad: Vec<f32>,
    pub trained: bool,
}

/// Where a conv or linear layer reads its weights.
#[derive(Clone, Copy, Debug)]
pub enum WSrc<'a> {
    /// f32 weights of the backbone, read in place.
    Frozen(Weights<'a>),
    /// Int8 weights of the backbone, dequantised once into [`Net`]'s `frozen` pool at this
    /// index: every step would otherwise dequantise them again, forward and backward.
    Dense(usize),
    Param(usize),
}

#[derive(Clone, Debug)]
pub enum NodeOp<'a> {
    /// A conv, with the ReLU or ReLU6 that alone reads it fused in (`clamp`).
    Conv {
        s: ConvShape,
        w: WSrc<'a>,
        bias: Option<&'a [f32]>,
        clamp: Option<(f32, f32)>,
    },
    Linear {
        in_f: usize,
        out_f: usize,
        w: WSrc<'a>,
        bias: Option<&'a [f32]>,
    },
    /// A new dense head (trained weight and bias params).
    Head {
        in_f: usize,
        out_f: usize,
        w: usize,
        b: usize,
    },
    /// Batch norm: running statistics (params, never trained by gradient), optional γ, β,
    /// the residual sum that alone reads it fused in (`residual`, the sum's other value), and
    /// the ReLU or ReLU6 that alone reads the result fused in (`clamp`).
    Norm {
        c: usize,
        plane: usize,
        eps: f32,
        mean: usize,
        var: usize,
        gamma: Option<usize>,
        beta: Option<usize>,
        residual: Option<usize>,
        clamp: Option<(f32, f32)>,
    },
    /// A per-channel affine, with the ReLU or ReLU6 that alone reads it fused in (`clamp`).
    Affine {
        c: usize,
        plane: usize,
        gamma: usize,
        beta: usize,
        clamp: Option<(f32, f32)>,
    },
    /// CLR: depthwise 3×3, stride 1, padding 1, kernel param `k`.
    Reprogram {
        s: ConvShape,
        k: usize,
    },
    Clamp {
        lo: f32,
        hi: f32,
    },
    /// A residual sum, with the ReLU or ReLU6 that alone reads it fused in (`clamp`).
    Add {
        other: usize,
        clamp: Option<(f32, f32)>,
    },
    Pool {
        s: PoolShape,
        max: bool,
    },
    GlobalPool {
        c: usize,
        plane: usize,
    },
    Flatten,
}

#[derive(Clone, Debug)]
pub struct Node<'a> {
    pub op: NodeOp<'a>,
    /// Value read (0 = the input, `i + 1` = output of node `i`).
    pub input: usize,
    pub out: Shape,
}

impl Node<'_> {
    /// The second value the node reads: an add's other operand, a norm's fused residual.
    pub fn other(&self) -> Option<usize> {
        match self.op {
            NodeOp::Add { other, .. } | NodeOp::Norm { residual: Some(other), .. } => Some(other),
            _ => None,
        }
    }
}

/// What a task wraps around the backbone.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recipe {
    /// Conv and linear weights become f32 params (masks, overlays, fine-tuning).
    pub materialise: bool,
    /// Insert CLR reprogramming after every conv with a kernel larger than 1×1.
    pub reprogram: bool,
    /// A new head with this many outputs: replaces the backbone's final linear layer, or is
    /// appended when the backbone ends in features.
    pub head: Option<usize>,
}

/// Indices into the parameter pool for one backbone batch-norm layer.
#[derive(Clone, Copy, Debug)]
pub struct NormParams {
    pub mean: usize,
    pub var: usize,
    pub gamma: Option<usize>,
    pub beta: Option<usize>,
}

pub struct Net<'a> {
    pub nodes: Vec<Node<'a>>,
    pub params: Vec<Param>,
    pub in_shape: Shape,
    /// Per maskable backbone layer: (layer index, weight param when materialised).
    pub maskable: Vec<(usize, Option<usize>)>,
    /// Per backbone batch-norm layer.
    pub norms: Vec<NormParams>,
    /// Per reprogrammed conv: its kernel param.
    pub reprogram: Vec<usize>,
    /// Per reprogrammed conv: the index in `affines` of the affine after it, if any.
    pub affine_after: Vec<Option<usize>>,
    /// Per reprogrammed conv without a following norm: (γ, β) params.
    pub affines: Vec<(usize, usize)>,
    /// The head's (weight, bias) params.
    pub head: Option<(usize, usize)>,
    /// Batch norms use batch statistics and update running ones.
    pub train_mode: bool,
    pub momentum: f32,
    /// Dequantised frozen weights ([`WSrc::Dense`]).
    frozen: Vec<Vec<f32>>,
    /// Per node: the transpose of a frozen conv's weights ([`conv::transpose_groups`]),
    /// made on its first input gradient and kept (empty until then).
    transposed: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Per value: what of it the passes keep ([`Net::kept`]); decided with the runs. Only a
    /// [`Kept::Whole`] value has its buffer in `values`.
    kept: Vec<samples::Kept>,
    /// Per value kept as a mask: `batch ×` [`act::mask_words`] words (else empty).
    masks: Vec<Vec<u32>>,
    /// Gradient buffers per value, kept between steps (empty = no gradient yet).
    grads: Vec<Vec<f32>>,
    saved: Vec<norm::Saved>,
    batch: usize,
    /// Sparse forms of masked weight params, by param index ([`Net::set_sparse`]).
    sparse: Vec<Option<SparseW>>,
    /// How the last forward pass ran the nodes ([`Net::plan`]); the backward pass follows it.
    runs: Vec<samples::Run>,
    /// Runs may go sample by sample (the default); off, every node goes over the whole batch,
    /// the pass the tests compare them with.
    sample_runs: bool,
    /// Values that only the next node reads may pass through slots (the default, [`Net::kept`]);
    /// off, every value is kept whole, the pass the tests compare them with.
    pass_through: bool,
    /// Per-sample partial gradients of the params in runs that go sample by sample.
    partials: Vec<f32>,
    /// Per-node times, when `EDGECL_PROFILE` is set ([`profile`]).
    profile: Option<profile::Profile>,
}

impl<'a> Net<'a> {
    pub fn new(bb: &'a Backbone<'a>, recipe: Recipe) -> Net<'a> {
        let mut net = Net {
            nodes: Vec::new(),
            params: Vec::new(),
            in_shape: bb.input_shape(),
            maskable: Vec::new(),
            norms: Vec::new(),
            reprogram: Vec::new(),
            affine_after: Vec::new(),
            affines: Vec::new(),
            head: None,
            train_mode: false,
            momentum: 0.1,
            frozen: Vec::new(),
            transposed: Vec::new(),
            values: Vec::new(),
            kept: Vec::new(),
            masks: Vec::new(),
            grads: Vec::new(),
            saved: Vec::new(),
            batch: 0,
            sparse: Vec::new(),
            runs: Vec::new(),
            sample_runs: true,
            pass_through: true,
            partials: Vec::new(),
            profile: profile::Profile::from_env(),
        };
        let layers = bb.layers();
        let view = bb.view();
        // The head replaces the last layer when that is a linear layer.
        let replace_last = recipe.head.is_some() && matches!(layers.last().map(|l| &l.op), Some(Op::Linear(_)));
        let kept = if replace_last { layers.len() - 1 } else { layers.len() };
        // Backbone value id -> training-graph value id.
        let mut map = vec![0usize; layers.len() + 1];
        // Readers of each backbone value.
        let mut readers = vec![0usize; layers.len() + 1];
        for layer in layers {
            readers[layer.input as usize] += 1;
            if let Op::Add { other } = layer.op {
                readers[other as usize] += 1;
            }
        }
        for (i, layer) in layers.iter().enumerate().take(kept) {
            let input = map[layer.input as usize];
            let x = bb.shape(layer.input);
            let out = bb.shape(i as u32 + 1);
            // A ReLU or ReLU6 that alone reads a conv, a norm or a reprogrammed conv's affine is
            // fused into it: one pass over the activations fewer, one tensor fewer kept.
            if let (Op::Relu | Op::Relu6, true) = (&layer.op, readers[layer.input as usize] == 1) {
                if let Some(
                    NodeOp::Affine { clamp: clamp @ None, .. }
                    | NodeOp::Norm { clamp: clamp @ None, .. }
                    | NodeOp::Conv { clamp: clamp @ None, .. }
                    | NodeOp::Add { clamp: clamp @ None, .. },
                ) = input.checked_sub(1).map(|a| &mut net.nodes[a].op)
                {
                    *clamp = Some((0.0, if matches!(layer.op, Op::Relu6) { 6.0 } else { f32::INFINITY }));
                    map[i + 1] = input;
                    continue;
                }
            }
            // A residual sum that alone reads a norm's output is fused into the norm: two
            // passes over the activations fewer forward, one backward, one tensor fewer kept.
            // The other operand must be ready before the norm runs, and not be its input.
            if let Op::Add { other } = layer.op {
                let operands = [(layer.input as usize, other as usize), (other as usize, layer.input as usize)];
                if let Some((normed, rest)) = operands.into_iter().find(|&(a0, b0)| {
                    let (a, b) = (map[a0], map[b0]);
                    readers[a0] == 1
                        && a > 0
                        && b < a
                        && net.nodes[a - 1].input != b
                        && matches!(net.nodes[a - 1].op, NodeOp::Norm { residual: None, clamp: None, .. })
                }) {
                    if let NodeOp::Norm { residual, .. } = &mut net.nodes[map[normed] - 1].op {
                        *residual = Some(map[rest]);
                    }
                    map[i + 1] = map[normed];
                    continue;
                }
            }
            let op = match &layer.op {
                Op::Conv2d(c) => {
                    let s = bb.conv_shape(i).expect("conv layer");
                    let w = bb.weights(c.weight, c.scale);
                    let src = net.weight_src(w, recipe.materialise);
                    net.maskable.push((i, param_of(src)));
                    NodeOp::Conv { s, w: src, bias: c.bias.map(|b| view.f32s(b)), clamp: None }
                }
                Op::Linear(l) => {
                    let w = bb.weights(l.weight, l.scale);
                    let src = net.weight_src(w, recipe.materialise);
                    net.maskable.push((i, param_of(src)));
                    NodeOp::Linear {
                        in_f: l.in_features as usize,
                        out_f: l.out_features as usize,
                        w: src,
                        bias: l.bias.map(|b| view.f32s(b)),
                    }
                }
                Op::BatchNorm(b) => {
                    let mean = net.param(view.f32s(b.mean).to_vec());
                    let var = net.param(view.f32s(b.var).to_vec());
                    let (gamma, beta) = match (b.gamma, b.beta, recipe.reprogram) {
                        (Some(g), Some(bt), _) => {
                            (Some(net.param(view.f32s(g).to_vec())), Some(net.param(view.f32s(bt).to_vec())))
                        }
                        // CLR trains every norm's γ, β: a non-affine norm gets them at (1, 0).
                        (_, _, true) => (Some(net.param(vec![1.0; x.c])), Some(net.param(vec![0.0; x.c]))),
                        _ => (None, None),
                    };
                    net.norms.push(NormParams { mean, var, gamma, beta });
                    NodeOp::Norm {
                        c: x.c,
                        plane: x.plane(),
                        eps: b.eps,
                        mean,
                        var,
                        gamma,
                        beta,
                        residual: None,
                        clamp: None,
                    }
                }
                Op::Relu => NodeOp::Clamp { lo: 0.0, hi: f32::INFINITY },
                Op::Relu6 => NodeOp::Clamp { lo: 0.0, hi: 6.0 },
                Op::Add { other } => NodeOp::Add { other: map[*other as usize], clamp: None },
                Op::MaxPool(p) => NodeOp::Pool { s: crate::backbone::pool_shape(p, x), max: true },
                Op::AvgPool(p) => NodeOp::Pool { s: crate::backbone::pool_shape(p, x), max: false },
                Op::GlobalAvgPool => NodeOp::GlobalPool { c: x.c, plane: x.plane() },
                Op::Flatten => NodeOp::Flatten,
            };
            net.nodes.push(Node { op, input, out });
            let mut last = net.nodes.len();
            if recipe.reprogram {
                if let Op::Conv2d(c) = &layer.op {
                    if c.kernel[0] > 1 || c.kernel[1] > 1 {
                        last = net.add_reprogram(last, out, layers, i);
                    }
                }
            }
            map[i + 1] = last;
        }
        if let Some(classes) = recipe.head {
            let input = map[kept];
            let feat = net.value_shape(input).len();
            let w = net.param(vec![0.0; classes * feat]);
            let b = net.param(vec![0.0; classes]);
            net.head = Some((w, b));
            net.nodes.push(Node {
                op: NodeOp::Head { in_f: feat, out_f: classes, w, b },
                input,
                out: Shape { c: classes, h: 1, w: 1 },
            });
        }
        net
    }

    fn add_reprogram(&mut self, input: usize, out: Shape, layers: &[crate::format::graph::Layer], i: usize) -> usize {
        let c = out.c;
        let mut k = vec![0.0f32; c * 9];
        for ch in 0..c {
            k[ch * 9 + 4] = 1.0;
        }
        let kp = self.param(k);
        self.reprogram.push(kp);
        let s = ConvShape {
            c_in: c,
            h: out.h,
            w: out.w,
            c_out: c,
            kh: 3,
            kw: 3,
            sh: 1,
            sw: 1,
            pad: [1; 4],
            dh: 1,
            dw: 1,
            groups: c,
        };
        self.nodes.push(Node { op: NodeOp::Reprogram { s, k: kp }, input, out });
        let mut last = self.nodes.len();
        // The backbone's own norm follows when the next layer reads this conv and is one.
        let followed_by_norm =
            layers.get(i + 1).is_some_and(|l| l.input as usize == i + 1 && matches!(l.op, Op::BatchNorm(_)));
        self.affine_after.push((!followed_by_norm).then_some(self.affines.len()));
        if !followed_by_norm {
            let g = self.param(vec![1.0; c]);
            let b = self.param(vec![0.0; c]);
            self.affines.push((g, b));
            let op = NodeOp::Affine { c, plane: out.plane(), gamma: g, beta: b, clamp: None };
            self.nodes.push(Node { op, input: last, out });
            last = self.nodes.len();
        }
        last
    }

    fn weight_src(&mut self, w: Weights<'a>, materialise: bool) -> WSrc<'a> {
        if materialise {
            WSrc::Param(self.param(conv::dense(w).into_owned()))
        } else if let Weights::F32(_) = w {
            WSrc::Frozen(w)
        } else {
            self.frozen.push(conv::dense(w).into_owned());
            WSrc::Dense(self.frozen.len() - 1)
        }
    }

    fn param(&mut self, value: Vec<f32>) -> usize {
        self.params.push(Param { grad: vec![0.0; value.len()], value, trained: false });
        self.params.len() - 1
    }

    /// Shape of training-graph value `v`.
    pub fn value_shape(&self, v: usize) -> Shape {
        if v == 0 {
            self.in_shape
        } else {
            self.nodes[v - 1].out
        }
    }

    pub fn out_shape(&self) -> Shape {
        self.value_shape(self.nodes.len())
    }

    /// The value a method reads features from (KKT): the input of the last linear layer or head.
    pub fn feature_value(&self) -> usize {
        self.nodes
            .iter()
            .rposition(|n| matches!(n.op, NodeOp::Linear { .. } | NodeOp::Head { .. }))
            .map_or(self.nodes.len(), |i| self.nodes[i].input)
    }

    /// Output (and kept values) for `batch` samples of `x`. Runs of nodes whose activations
    /// dwarf their weights go sample by sample ([`Net::plan`]), the others layer by layer.
    pub fn forward(&mut self, k: &Kernels, x: &[f32], batch: usize) -> &[f32] {
        self.batch = batch;
        let n = self.nodes.len();
        let runs = self.plan(batch);
        self.kept = self.kept(&runs);
        self.values.resize(n + 1, Vec::new());
        self.masks.resize(n + 1, Vec::new());
        self.saved.resize(n, norm::Saved::default());
        let v0 = &mut self.values[0];
        v0.clear();
        v0.extend_from_slice(&x[..batch * self.in_shape.len()]);
        let kept = self.values[1..].iter_mut().zip(&mut self.masks[1..]).zip(&self.kept[1..]);
        for (((y, mask), &kept), node) in kept.zip(&self.nodes) {
            // A value kept as a mask has its words instead (each written whole); a buffer not
            // used is freed.
            let (len, words) = (batch * node.out.len(), batch * act::mask_words(node.out.len()));
            if kept == samples::Kept::Mask {
                mask.resize(words, 0);
                // Every word is written; debug builds poison them, as the values below.
                #[cfg(debug_assertions)]
                mask.fill(0x5555_5555);
            } else {
                *mask = Vec::new();
            }
            if kept != samples::Kept::Whole {
                *y = Vec::new();
                continue;
            }
            // Every op writes all of its output, so a buffer of the right size is not zeroed
            // again (it was 9 % of a Lite0 CLR step); debug builds fill it with NaN instead,
            // so that the tests catch an op that leaves some of it unwritten.
            if y.len() != len {
                y.clear();
                y.resize(len, 0.0);
            }
            #[cfg(debug_assertions)]
            y.fill(f32::NAN);
        }
        let on = self.profile.is_some();
        let clock = || on.then(std::time::Instant::now);
        for run in &runs {
            if run.by_sample {
                let t0 = clock();
                self.forward_samples(k, run.nodes.clone());
                if let (Some(p), Some(t0)) = (&mut self.profile, t0) {
                    p.forward(run.nodes.clone(), t0);
                }
            } else {
                for i in run.nodes.clone() {
                    let t0 = clock();
                    self.forward_layer(k, i);
                    if let (Some(p), Some(t0)) = (&mut self.profile, t0) {
                        p.forward(i..i + 1, t0);
                    }
                }
            }
        }
        if let Some(p) = &mut self.profile {
            p.pass();
        }
        self.runs = runs;
        &self.values[n]
    }

    /// Node `i`'s forward over the whole batch.
    fn forward_layer(&mut self, k: &Kernels, i: usize) {
        let batch = self.batch;
        let (done, rest) = self.values.split_at_mut(i + 1);
        let (y, x) = (&mut rest[0], &done[self.nodes[i].input]);
        if let (NodeOp::Norm { c, plane, eps, mean, var, gamma, beta, residual, clamp }, true) =
            (&self.nodes[i].op, self.train_mode)
        {
            // Batch statistics: the one op that reads across samples and changes params.
            let params = &mut self.params;
            let (mut rm, mut rv) =
                (core::mem::take(&mut params[*mean].value), core::mem::take(&mut params[*var].value));
            self.saved[i] = norm::train_forward(
                *c,
                *plane,
                batch,
                x,
                gamma.map(|g| &params[g].value[..]),
                beta.map(|b| &params[b].value[..]),
                *eps,
                self.momentum,
                &mut rm,
                &mut rv,
                residual.map(|r| &done[r][..]),
                *clamp,
                y,
            );
            params[*mean].value = rm;
            params[*var].value = rv;
            return;
        }
        let mut values = core::mem::take(&mut self.values);
        let node = &self.nodes[i];
        let (done, rest) = values.split_at_mut(i + 1);
        let other = node.other().map_or(&[][..], |o| &done[o][..]);
        forward_op(k, self.ctx(), node, &done[node.input], other, &mut rest[0], batch);
        self.values = values;
    }

    /// What the ops read besides values and gradients.
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            params: &self.params,
            frozen: &self.frozen,
            sparse: &self.sparse,
            transposed: &self.transposed,
            saved: &self.saved,
            train_mode: self.train_mode,
        }
    }

    /// A kept value of the last forward pass (`batch × shape`): not one that only the next
    /// node reads, and only forward ([`Net::kept`]).
    pub fn value(&self, v: usize) -> &[f32] {
        let whole = self.kept.get(v).is_none_or(|&k| k == samples::Kept::Whole);
        assert!(whole, "value {v} was not kept: only the next node reads it");
        &self.values[v]
    }

    /// The params at `idx` (distinct indices), mutably, in that order.
    pub fn params_mut(&mut self, idx: &[usize]) -> Vec<&mut Param> {
        let mut slots: Vec<Option<&mut Param>> = self.params.iter_mut().map(Some).collect();
        idx.iter().map(|&i| slots[i].take().expect("distinct params")).collect()
    }

    /// `(rows, cols, max_density)` of weight param `p`: the matrix as its layer multiplies by
    /// it (`c_out × K` for a conv of one group, `out × in` for a linear layer) and the densest
    /// mask for which a sparse form pays ([`sparse::CONV_MAX_DENSITY`],
    /// [`sparse::LINEAR_MAX_DENSITY`]); `None` for any other param.
    pub fn weight_dims(&self, p: usize) -> Option<(usize, usize, f64)> {
        self.nodes.iter().find_map(|n| match n.op {
            NodeOp::Conv { s, w: WSrc::Param(q), .. } if q == p && s.groups == 1 => {
                Some((s.c_out, s.c_in * s.kh * s.kw, sparse::CONV_MAX_DENSITY))
            }
            NodeOp::Linear { in_f, out_f, w: WSrc::Param(q), .. } if q == p => {
                Some((out_f, in_f, sparse::LINEAR_MAX_DENSITY))
            }
            _ => None,
        })
    }

    /// From now on weight param `p`'s forward and input-gradient products use `sp` (`None`:
    /// the dense GEMMs again). The caller keeps it equal to the param's value, or clears it
    /// ([`Net::clear_sparse`]) before changing the value otherwise; debug builds check every
    /// use.
    pub fn set_sparse(&mut self, p: usize, sp: Option<SparseW>) {
        if self.sparse.len() <= p {
            self.sparse.resize(p + 1, None);
        }
        self.sparse[p] = sp;
    }

    /// Weight param `p`'s sparse form, taken out (its products are dense until one is set).
    pub fn take_sparse(&mut self, p: usize) -> Option<SparseW> {
        self.sparse.get_mut(p).and_then(Option::take)
    }

    /// Every weight back to the dense products.
    pub fn clear_sparse(&mut self) {
        self.sparse.clear();
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            if p.trained {
                p.grad.fill(0.0);
            }
        }
    }

    /// The task's norm states as they are now.
    pub fn norm_states(&self) -> Vec<NormState> {
        self.norms
            .iter()
            .map(|n| NormState {
                mean: self.params[n.mean].value.clone(),
                var: self.params[n.var].value.clone(),
                gamma: n.gamma.map(|g| self.params[g].value.clone()),
                beta: n.beta.map(|b| self.params[b].value.clone()),
            })
            .collect()
    }

    /// Loads norm states (running statistics, γ, β) saved with a task.
    pub fn set_norm_states(&mut self, states: &[NormState]) {
        for (n, s) in self.norms.clone().iter().zip(states) {
            self.params[n.mean].value.clone_from(&s.mean);
            self.params[n.var].value.clone_from(&s.var);
            if let (Some(p), Some(v)) = (n.gamma, &s.gamma) {
                self.params[p].value.clone_from(v);
            }
            if let (Some(p), Some(v)) = (n.beta, &s.beta) {
                self.params[p].value.clone_from(v);
            }
        }
    }

    pub fn head_state(&self) -> Option<Head> {
        self.head.map(|(w, b)| {
            let outputs = self.params[b].value.len();
            Head {
                inputs: (self.params[w].value.len() / outputs.max(1)) as u32,
                outputs: outputs as u32,
                weight: self.params[w].value.clone(),
                bias: self.params[b].value.clone(),
            }
        })
    }

    /// CLR's task state as stored: every kernel with the scale γ of the affine after it
    /// folded in (`γ·(k ∗ x) + β = (γ·k) ∗ x + β`), and the affines' shifts β, quantised
    /// (`adapter::Quantized`).
    pub fn clr_state(&self) -> (Vec<Quantized>, Vec<Quantized>) {
        let kernels = self
            .reprogram
            .iter()
            .zip(&self.affine_after)
            .map(|(&k, a)| {
                let mut k = self.params[k].value.clone();
                if let Some(a) = *a {
                    let gamma = &self.params[self.affines[a].0].value;
                    for (ch, taps) in k.chunks_exact_mut(9).enumerate() {
                        taps.iter_mut().for_each(|t| *t *= gamma[ch]);
                    }
                }
                Quantized::quantize(&k, Base::Identity3x3)
            })
            .collect();
        let shifts =
            self.affines.iter().map(|&(_, b)| Quantized::quantize(&self.params[b].value, Base::Zero)).collect();
        (kernels, shifts)
    }

    /// Sets the CLR params from a stored task state ([`Self::clr_state`]): kernels as stored,
    /// the affines' scales 1. `None` when the counts or sizes do not match this net.
    pub fn set_clr_state(&mut self, kernels: &[Quantized], shifts: &[Quantized]) -> Option<()> {
        if kernels.len() != self.reprogram.len() || shifts.len() != self.affines.len() {
            return None;
        }
        let fit = |v: &[f32], q: &Quantized| (v.len() == q.len()).then_some(());
        for (&p, q) in self.reprogram.iter().zip(kernels) {
            fit(&self.params[p].value, q)?;
        }
        for (&(g, b), q) in self.affines.iter().zip(shifts) {
            fit(&self.params[b].value, q)?;
            fit(&self.params[g].value, q)?;
        }
        for (&p, q) in self.reprogram.iter().zip(kernels) {
            self.params[p].value = q.values(Base::Identity3x3);
        }
        for (&(g, b), q) in self.affines.iter().zip(shifts) {
            self.params[g].value.fill(1.0);
            self.params[b].value = q.values(Base::Zero);
        }
        Some(())
    }
}

fn param_of(src: WSrc) -> Option<usize> {
    match src {
        WSrc::Param(p) => Some(p),
        WSrc::Frozen(_) | WSrc::Dense(_) => None,
    }
}

/// The sparse form of a param's weights, if set (debug builds check it equals the value).
fn sparse_of<'s>(sparse: &'s [Option<SparseW>], params: &[Param], w: WSrc) -> Option<&'s SparseW> {
    let WSrc::Param(p) = w else { return None };
    let sp = sparse.get(p)?.as_ref()?;
    debug_assert!(sp.matches(&params[p].value), "param {p} changed after its sparse form was set");
    Some(sp)
}

/// What a node's ops read besides values and gradients ([`Net::ctx`]): shared by the
/// samples' tasks of a run that goes sample by sample.
#[derive(Clone, Copy)]
struct Ctx<'n> {
    params: &'n [Param],
    frozen: &'n [Vec<f32>],
    sparse: &'n [Option<SparseW>],
    /// Per node: the kept transpose of a frozen conv's weights, or empty.
    transposed: &'n [Vec<f32>],
    /// Per node: a batch norm's batch statistics from the forward pass.
    saved: &'n [norm::Saved],
    train_mode: bool,
}

impl<'n> Ctx<'n> {
    fn weights<'a: 'n>(&self, w: WSrc<'a>) -> Weights<'n> {
        weights(self.params, self.frozen, w)
    }
}

/// `y` = node's op of `x` (and of `other`, an add's second input) for `batch` samples; a
/// batch norm with running statistics (evaluation mode) only.
fn forward_op(k: &Kernels, ctx: Ctx, node: &Node, x: &[f32], other: &[f32], y: &mut [f32], batch: usize) {
    let params = ctx.params;
    match &node.op {
        NodeOp::Conv { s, w: src, bias, clamp } => {
            let sp = sparse_of(ctx.sparse, params, *src);
            conv::forward_clamped(k, s, ctx.weights(*src), *bias, *clamp, x, batch, y, sp)
        }
        NodeOp::Linear { in_f, out_f, w: src, bias } => {
            let sp = sparse_of(ctx.sparse, params, *src);
            linear::forward(k, *in_f, *out_f, ctx.weights(*src), *bias, x, batch, y, sp)
        }
        NodeOp::Head { in_f, out_f, w, b } => linear::forward(
            k,
            *in_f,
            *out_f,
            Weights::F32(&params[*w].value),
            Some(&params[*b].value),
            x,
            batch,
            y,
            None,
        ),
        NodeOp::Norm { c, plane, eps, mean, var, gamma, beta, residual, clamp } => norm::eval_forward(
            *c,
            *plane,
            batch,
            x,
            gamma.map(|g| &params[g].value[..]),
            beta.map(|b| &params[b].value[..]),
            *eps,
            &params[*mean].value,
            &params[*var].value,
            residual.map(|_| other),
            *clamp,
            y,
        ),
        NodeOp::Affine { c, plane, gamma, beta, clamp } => {
            norm::affine_forward(*c, *plane, batch, x, &params[*gamma].value, &params[*beta].value, *clamp, y)
        }
        NodeOp::Reprogram { s, k: kp } => {
            conv::forward(k, s, Weights::F32(&params[*kp].value), None, x, batch, y, None)
        }
        NodeOp::Clamp { lo, hi } => act::clamp_forward(x, y, *lo, *hi),
        NodeOp::Add { clamp, .. } => act::add_forward(x, other, y, *clamp),
        NodeOp::Pool { s, max } => pool::forward(s, *max, x, batch, y),
        NodeOp::GlobalPool { c, plane } => pool::global_forward(*c, *plane, x, batch, y),
        NodeOp::Flatten => y.copy_from_slice(x),
    }
}

/// The weights of a conv/linear.
fn weights<'p, 'a: 'p>(params: &'p [Param], frozen: &'p [Vec<f32>], w: WSrc<'a>) -> Weights<'p> {
    match w {
        WSrc::Frozen(w) => w,
        WSrc::Dense(d) => Weights::F32(&frozen[d]),
        WSrc::Param(p) => Weights::F32(&params[p].value),
    }
}

mod backward;
mod profile;
mod samples;
#[cfg(test)]
mod tests;
