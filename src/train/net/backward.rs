//! The backward pass of [`Net`]: from the output gradient back to the earliest trained
//! parameter, each node's gradient function from `train::ops` in reverse order, over the
//! whole batch or, in the runs the forward pass took so, sample by sample
//! ([`super::samples`]).

use super::{sparse_of, Ctx, Net, Node, NodeOp, Param, WSrc};
use crate::kernels::{Kernels, Weights};
use crate::train::ops::{act, conv, linear, norm, pool, Store};

impl Net<'_> {
    fn trains(&self, node: &Node) -> bool {
        let t = |p: usize| self.params[p].trained;
        match &node.op {
            NodeOp::Conv { w: WSrc::Param(p), .. } | NodeOp::Linear { w: WSrc::Param(p), .. } => t(*p),
            NodeOp::Head { w, b, .. } => t(*w) || t(*b),
            NodeOp::Norm { gamma, beta, .. } => gamma.is_some_and(t) || beta.is_some_and(t),
            NodeOp::Affine { gamma, beta, .. } => t(*gamma) || t(*beta),
            NodeOp::Reprogram { k, .. } => t(*k),
            _ => false,
        }
    }

    /// Whether `node`'s backward can write its input gradient over the buffer
    /// ([`Store::Set`]) rather than only add into it.
    fn sets_dx(&self, node: &Node) -> bool {
        match node.op {
            NodeOp::Clamp { .. }
            | NodeOp::Add { .. }
            | NodeOp::Flatten
            | NodeOp::Affine { .. }
            | NodeOp::Conv { .. }
            | NodeOp::Reprogram { .. } => true,
            NodeOp::Norm { .. } => self.train_mode,
            _ => false,
        }
    }

    /// Adds the gradients of the last forward's output (given `dout`) into every trained
    /// param's `grad`.
    pub fn backward(&mut self, k: &Kernels, dout: &[f32]) {
        self.backward_pass(k, dout, false)
    }

    /// The gradients of the last forward's output written over every trained param's
    /// `grad`: [`Net::zero_grad`] then [`Net::backward`], without first clearing the buffers
    /// that a product then writes over (clearing fc1024's was 3 % of its step).
    pub fn backward_over(&mut self, k: &Kernels, dout: &[f32]) {
        self.backward_pass(k, dout, true)
    }

    fn backward_pass(&mut self, k: &Kernels, dout: &[f32], over: bool) {
        let n = self.nodes.len();
        // need[v]: some trained parameter lies at or before value v.
        let mut need = vec![false; n + 1];
        for (i, node) in self.nodes.iter().enumerate() {
            let other = node.other().is_some_and(|o| need[o]);
            need[i + 1] = self.trains(node) || need[node.input] || other;
        }
        let mut pass =
            Pass { fresh: self.params.iter().map(|p| over && p.trained).collect(), need, written: vec![false; n + 1] };
        // Gradient buffers are kept between passes with what they held.
        let mut grads = core::mem::take(&mut self.grads);
        grads.resize(n + 1, Vec::new());
        self.transposed.resize(n, Vec::new());
        grads[n].clear();
        grads[n].extend_from_slice(&dout[..self.batch * self.out_shape().len()]);
        pass.written[n] = true;
        let runs = core::mem::take(&mut self.runs);
        let on = self.profile.is_some();
        for run in runs.iter().rev() {
            if run.by_sample {
                let t0 = on.then(std::time::Instant::now);
                self.backward_samples(k, run.nodes.clone(), &mut pass, &mut grads);
                if let (Some(p), Some(t0)) = (&mut self.profile, t0) {
                    p.backward(run.nodes.clone(), t0);
                }
            } else {
                for i in run.nodes.clone().rev() {
                    let t0 = on.then(std::time::Instant::now);
                    self.backward_layer(k, i, &mut pass, &mut grads);
                    if let (Some(p), Some(t0)) = (&mut self.profile, t0) {
                        p.backward(i..i + 1, t0);
                    }
                }
            }
        }
        self.runs = runs;
        self.grads = grads;
        // Trained params no node reached: zero, as after `zero_grad`.
        for (p, _) in pass.fresh.iter().enumerate().filter(|(_, &f)| f) {
            self.params[p].grad.fill(0.0);
        }
    }

    /// The bookkeeping before node `i`'s backward, in the pass's order: `None` when it has
    /// nothing to do; else how it stores into its input gradients. The first gradient a value
    /// gets is written over its buffer by the ops that can ([`Store::Set`]); for the others
    /// the buffer is zeroed first ([`prepare`]) and they add.
    pub(super) fn step(&mut self, i: usize, pass: &mut Pass) -> Option<Step> {
        let node = &self.nodes[i];
        if !pass.need[i + 1] || !pass.written[i + 1] {
            return None;
        }
        let input = node.input;
        let store = |v: usize, pass: &mut Pass| {
            let s = if pass.written[v] { Store::Add } else { Store::Set };
            pass.written[v] = true;
            s
        };
        let dx = pass.need[input].then(|| store(input, pass));
        let other = match node.other() {
            Some(other) if pass.need[other] && other != input => Some(store(other, pass)),
            _ => None,
        };
        // Frozen weights never change: their transpose is kept from the first input gradient.
        if let (NodeOp::Conv { s, w: w @ (WSrc::Frozen(_) | WSrc::Dense(_)), .. }, Some(_)) = (&node.op, dx) {
            if !s.is_depthwise() && self.transposed[i].is_empty() {
                let wf = conv::dense(self.ctx().weights(*w)).into_owned();
                let mut t = vec![0.0; wf.len()];
                conv::transpose_groups(s, &wf, &mut t);
                self.transposed[i] = t;
            }
        }
        Some(Step { dx, other, sets: self.sets_dx(node) })
    }

    /// Node `i`'s input gradient buffers sized and prepared for `step`.
    fn prepare_layer(&self, i: usize, step: Step, grads: &mut [Vec<f32>]) {
        let node = &self.nodes[i];
        let len = |v: usize| self.batch * self.value_shape(v).len();
        if let Some(store) = step.dx {
            let g = &mut grads[node.input];
            g.resize(len(node.input), 0.0);
            prepare(g, store, step.sets);
        }
        if let (Some(store), Some(other)) = (step.other, node.other()) {
            let g = &mut grads[other];
            g.resize(len(other), 0.0);
            prepare(g, store, true);
        }
    }

    /// The params node `i` computes gradients for: its weight-like and bias-like ones.
    pub(super) fn grad_params(&self, i: usize) -> [Option<usize>; 2] {
        let t = |p: usize| self.params[p].trained.then_some(p);
        match self.nodes[i].op {
            NodeOp::Conv { w: WSrc::Param(p), .. } | NodeOp::Linear { w: WSrc::Param(p), .. } => [t(p), None],
            NodeOp::Head { w, b, .. } => [Some(w), Some(b)],
            NodeOp::Norm { gamma, beta, .. } => [gamma.and_then(t), beta.and_then(t)],
            NodeOp::Affine { gamma, beta, .. } => [Some(gamma), Some(beta)],
            NodeOp::Reprogram { k, .. } => [t(k), None],
            _ => [None, None],
        }
    }

    /// Node `i`'s backward over the whole batch.
    fn backward_layer(&mut self, k: &Kernels, i: usize, pass: &mut Pass, grads: &mut [Vec<f32>]) {
        let Some(step) = self.step(i, pass) else { return };
        self.prepare_layer(i, step, grads);
        let slots = self.grad_params(i);
        // A product writes a linear layer's weight gradient over its buffer when nothing has
        // stored into it yet in an overwriting pass; every other param gradient is added into.
        let mut wstore = Store::Add;
        for (j, p) in slots.iter().enumerate().filter_map(|(j, p)| Some((j, (*p)?))) {
            if j == 0 && matches!(self.nodes[i].op, NodeOp::Linear { .. } | NodeOp::Head { .. }) {
                wstore = first_store(&mut pass.fresh, &mut self.params, p);
            } else {
                zero_fresh(&mut pass.fresh, &mut self.params, p);
            }
        }
        let mut dp = slots.map(|p| p.map(|p| core::mem::take(&mut self.params[p].grad)));
        let node = &self.nodes[i];
        let input = node.input;
        let mut dy = core::mem::take(&mut grads[i + 1]);
        let mut dx = step.dx.map(|st| (core::mem::take(&mut grads[input]), st));
        let other = node.other().unwrap_or(0);
        let mut dother = step.other.map(|st| (core::mem::take(&mut grads[other]), st));
        let [d0, d1] = &mut dp;
        node_backward(
            k,
            self.ctx(),
            i,
            node,
            Io { x: &self.values[input], y: &self.values[i + 1], y_mask: None, dy: &mut dy, batch: self.batch },
            dx.as_mut().map(|(d, st)| (&mut d[..], *st)),
            dother.as_mut().map(|(d, st)| (&mut d[..], *st)),
            [d0.as_deref_mut(), d1.as_deref_mut()],
            wstore,
        );
        for (p, g) in slots.into_iter().zip(dp) {
            if let (Some(p), Some(g)) = (p, g) {
                self.params[p].grad = g;
            }
        }
        if let Some((d, _)) = dx {
            grads[input] = d;
        }
        if let Some((d, _)) = dother {
            grads[other] = d;
        }
        grads[i + 1] = dy;
    }
}

/// The bookkeeping of one backward pass.
pub(super) struct Pass {
    /// need[v]: some trained parameter lies at or before value v.
    need: Vec<bool>,
    /// written[v]: value v has had a gradient stored in this pass.
    written: Vec<bool>,
    /// fresh[p]: an overwriting pass has not yet stored into param p's gradient.
    pub(super) fresh: Vec<bool>,
}

/// How a node's backward stores into its input gradients ([`Net::step`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Step {
    /// Into its input's gradient, when that is wanted.
    pub dx: Option<Store>,
    /// An add's, into its other input's gradient, when that is wanted and another value.
    pub other: Option<Store>,
    /// The op can write its input gradient over the buffer ([`Net::sets_dx`]).
    pub sets: bool,
}

/// A gradient buffer before the first store into it in a pass (`store` is [`Store::Set`]):
/// zeroed for an op that only adds (not `sets`); debug builds poison it for one that sets, so
/// that the tests catch an op that leaves some of it unwritten.
pub(super) fn prepare(g: &mut [f32], store: Store, sets: bool) {
    match (store, sets) {
        (Store::Set, false) => g.fill(0.0),
        (Store::Set, true) if cfg!(debug_assertions) => g.fill(f32::NAN),
        _ => {}
    }
}

/// A node's input and output values and its output gradient, for `batch` samples. A value
/// not kept whole ([`Net::kept`]) is empty; the output's clamp mask, when that is what is kept
/// of it, is in `y_mask`.
pub(super) struct Io<'v> {
    pub x: &'v [f32],
    pub y: &'v [f32],
    pub y_mask: Option<&'v [u32]>,
    pub dy: &'v mut [f32],
    pub batch: usize,
}

/// Node `i`'s gradient function: into its input gradients `dx` and `dother` (an add's other
/// input, a norm's fused residual) by their stores, and into its params' gradients `dp`
/// ([`Net::grad_params`]), the weights of a linear layer or head by `wstore`, the others added
/// into.
#[allow(clippy::too_many_arguments)]
pub(super) fn node_backward(
    k: &Kernels,
    ctx: Ctx,
    i: usize,
    node: &Node,
    io: Io,
    dx: Option<(&mut [f32], Store)>,
    dother: Option<(&mut [f32], Store)>,
    dp: [Option<&mut [f32]>; 2],
    wstore: Store,
) {
    let Io { x, y, y_mask, dy, batch } = io;
    let params = ctx.params;
    let [d0, d1] = dp;
    match &node.op {
        NodeOp::Conv { s, w, clamp, .. } => {
            // The fused clamp's gradient, in place: `dy` is not read again.
            match (*clamp, y_mask) {
                (Some(_), Some(bits)) => act::clamp_mask_bits(bits, dy),
                (Some((lo, hi)), None) => act::clamp_mask(y, dy, lo, hi),
                (None, _) => {}
            }
            let sp = sparse_of(ctx.sparse, params, *w);
            let t = &ctx.transposed[i];
            let kept = (dx.is_some() && !t.is_empty()).then_some(&t[..]);
            conv::backward(k, s, ctx.weights(*w), x, dy, batch, dx, d0, None, sp, kept)
        }
        NodeOp::Linear { in_f, out_f, w, .. } => {
            let sp = sparse_of(ctx.sparse, params, *w);
            let dw = d0.map(|d| (d, wstore));
            linear::backward(k, *in_f, *out_f, ctx.weights(*w), x, dy, batch, plain(dx), dw, None, sp)
        }
        NodeOp::Head { in_f, out_f, w, .. } => {
            let dw = d0.map(|d| (d, wstore));
            let wt = Weights::F32(&params[*w].value);
            linear::backward(k, *in_f, *out_f, wt, x, dy, batch, plain(dx), dw, d1, None)
        }
        NodeOp::Norm { c, plane, eps, mean, var, gamma, clamp, .. } => {
            let clamped = clamp.map(|(lo, hi)| norm::Clamped { y, lo, hi });
            let g = gamma.map(|g| &params[g].value[..]);
            if ctx.train_mode {
                norm::train_backward(*c, *plane, batch, x, &ctx.saved[i], g, dy, clamped, dx, dother, d0, d1);
            } else {
                let (m, v) = (&params[*mean].value, &params[*var].value);
                norm::eval_backward(*c, *plane, batch, x, g, *eps, m, v, dy, clamped, plain(dx), dother, d0, d1);
            }
        }
        NodeOp::Affine { c, plane, gamma, beta, clamp } => {
            let (g, b) = (&params[*gamma].value, &params[*beta].value);
            let (dg, db) = (d0.expect("affine's gamma gradient"), d1.expect("affine's beta gradient"));
            norm::affine_backward(*c, *plane, batch, x, g, b, dy, *clamp, dx, dg, db)
        }
        NodeOp::Reprogram { s, k: kp } => {
            conv::backward(k, s, Weights::F32(&params[*kp].value), x, dy, batch, dx, d0, None, None, None)
        }
        NodeOp::Clamp { lo, hi } => {
            if let Some((dx, store)) = dx {
                act::clamp_backward(x, dy, dx, *lo, *hi, store)
            }
        }
        NodeOp::Add { other, clamp } => match (*clamp, dx, dother) {
            // Two operands under a clamp: its mask applied on the way into both, in one pass.
            (Some((lo, hi)), Some(dx), Some(dother)) => act::accumulate_both(y, lo, hi, dy, dx, dother),
            (clamp, dx, dother) => {
                // The fused clamp's gradient, in place: `dy` is not read again.
                if let Some((lo, hi)) = clamp {
                    act::clamp_mask(y, dy, lo, hi);
                }
                if let Some((g, store)) = dother {
                    act::accumulate(dy, g, store);
                }
                if let Some((dx, store)) = dx {
                    act::accumulate(dy, dx, store);
                    // `x + x`: the gradient twice into the one buffer.
                    if *other == node.input {
                        act::accumulate(dy, dx, Store::Add);
                    }
                }
            }
        },
        NodeOp::Pool { s, max } => {
            if let Some(dx) = plain(dx) {
                pool::backward(s, *max, x, dy, batch, dx)
            }
        }
        NodeOp::GlobalPool { c, plane } => {
            if let Some(dx) = plain(dx) {
                pool::global_backward(*c, *plane, dy, batch, dx)
            }
        }
        NodeOp::Flatten => {
            if let Some((dx, store)) = dx {
                act::accumulate(dy, dx, store)
            }
        }
    }
}

/// The input gradient of an op that only adds into it (not [`Net::sets_dx`]: its buffer was
/// zeroed when it was to be set).
fn plain(dx: Option<(&mut [f32], Store)>) -> Option<&mut [f32]> {
    dx.map(|(d, _)| d)
}

/// How the first op of a pass to reach param `p` stores its gradient: over the buffer when
/// the pass overwrites and nothing has stored into it yet.
fn first_store(fresh: &mut [bool], params: &mut [Param], p: usize) -> Store {
    if !core::mem::replace(&mut fresh[p], false) {
        return Store::Add;
    }
    // Debug builds poison the buffer, so that the tests catch an op that leaves some unwritten.
    if cfg!(debug_assertions) {
        params[p].grad.fill(f32::NAN);
    }
    Store::Set
}

/// Zeroes param `p`'s gradient before an op that only adds into it, when the pass
/// overwrites and nothing has stored into it yet.
pub(super) fn zero_fresh(fresh: &mut [bool], params: &mut [Param], p: usize) {
    if core::mem::replace(&mut fresh[p], false) {
        params[p].grad.fill(0.0);
    }
}
