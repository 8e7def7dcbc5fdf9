//! The backward pass of [`Net`]: from the output gradient back to the earliest trained
//! parameter, each node's gradient function from `train::ops` in reverse order.

use super::{sparse_of, Net, Node, NodeOp, Param, WSrc};
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
        // fresh[p]: an overwriting pass has not yet stored into param p's gradient.
        let mut fresh: Vec<bool> = self.params.iter().map(|p| over && p.trained).collect();
        let batch = self.batch;
        // need[v]: some trained parameter lies at or before value v.
        let mut need = vec![false; n + 1];
        for (i, node) in self.nodes.iter().enumerate() {
            let other = if let NodeOp::Add { other } = node.op { need[other] } else { false };
            need[i + 1] = self.trains(node) || need[node.input] || other;
        }
        // Gradient buffers are kept between passes with what they held; `written[v]`: value
        // v has had a gradient stored in this pass. The first gradient a value gets is
        // written over its buffer by the ops that can ([`Store::Set`]); for the others the
        // buffer is zeroed first and they add.
        let mut grads = core::mem::take(&mut self.grads);
        grads.resize(n + 1, Vec::new());
        self.transposed.resize(n, Vec::new());
        let mut written = vec![false; n + 1];
        grads[n].clear();
        grads[n].extend_from_slice(&dout[..batch * self.out_shape().len()]);
        written[n] = true;
        for i in (0..n).rev() {
            if !need[i + 1] || !written[i + 1] {
                continue;
            }
            let mut dy = core::mem::take(&mut grads[i + 1]);
            let node = &self.nodes[i];
            let input = node.input;
            let want_dx = need[input];
            let store = if written[input] { Store::Add } else { Store::Set };
            let mut dx = if want_dx {
                let mut g = core::mem::take(&mut grads[input]);
                let len = batch * self.value_shape(input).len();
                if store == Store::Set && !self.sets_dx(node) {
                    g.clear();
                }
                g.resize(len, 0.0);
                // Debug builds poison a buffer its op writes over, so that the tests catch an
                // op that leaves some of it unwritten.
                #[cfg(debug_assertions)]
                if store == Store::Set && self.sets_dx(node) {
                    g.fill(f32::NAN);
                }
                written[input] = true;
                Some(g)
            } else {
                None
            };
            let x = &self.values[input];
            let params = &mut self.params;
            match &node.op {
                NodeOp::Conv { s, w, clamp, .. } => {
                    // The fused clamp's gradient, in place: `dy` is not read again.
                    if let Some((lo, hi)) = *clamp {
                        act::clamp_mask(&self.values[i + 1], &mut dy, lo, hi);
                    }
                    if let WSrc::Param(p) = w {
                        zero_fresh(&mut fresh, params, *p);
                    }
                    let sp = sparse_of(&self.sparse, params, *w);
                    let (wt, dw) = split_w(params, &self.frozen, *w);
                    // Frozen weights never change: their transpose is kept from the first use.
                    let frozen = matches!(w, WSrc::Frozen(_) | WSrc::Dense(_));
                    let kept = if frozen && dx.is_some() && sp.is_none() && !s.is_depthwise() {
                        let t = &mut self.transposed[i];
                        if t.is_empty() {
                            let wf = conv::dense(wt);
                            t.resize(wf.len(), 0.0);
                            conv::transpose_groups(s, &wf, t);
                        }
                        Some(&t[..])
                    } else {
                        None
                    };
                    let dx = dx.as_deref_mut().map(|d| (d, store));
                    conv::backward(k, s, wt, x, &dy, batch, dx, dw, None, sp, kept)
                }
                NodeOp::Linear { in_f, out_f, w, .. } => {
                    let store = if let WSrc::Param(p) = w { first_store(&mut fresh, params, *p) } else { Store::Add };
                    let sp = sparse_of(&self.sparse, params, *w);
                    let (wt, dw) = split_w(params, &self.frozen, *w);
                    let dw = dw.map(|d| (d, store));
                    linear::backward(k, *in_f, *out_f, wt, x, &dy, batch, dx.as_deref_mut(), dw, None, sp)
                }
                NodeOp::Head { in_f, out_f, w, b } => {
                    let store = first_store(&mut fresh, params, *w);
                    zero_fresh(&mut fresh, params, *b);
                    let (wp, bp) = pair(params, *w, *b);
                    linear::backward(
                        k,
                        *in_f,
                        *out_f,
                        Weights::F32(&wp.value),
                        x,
                        &dy,
                        batch,
                        dx.as_deref_mut(),
                        Some((&mut wp.grad, store)),
                        Some(&mut bp.grad),
                        None,
                    )
                }
                NodeOp::Norm { c, plane, eps, mean, var, gamma, beta, clamp } => {
                    let clamped = clamp.map(|(lo, hi)| norm::Clamped { y: &self.values[i + 1], lo, hi });
                    for p in gamma.iter().chain(beta) {
                        zero_fresh(&mut fresh, params, *p);
                    }
                    let g = gamma.map(|g| params[g].value.clone());
                    let mut dg = gamma.filter(|&g| params[g].trained).map(|g| core::mem::take(&mut params[g].grad));
                    let mut db = beta.filter(|&b| params[b].trained).map(|b| core::mem::take(&mut params[b].grad));
                    if self.train_mode {
                        norm::train_backward(
                            *c,
                            *plane,
                            batch,
                            x,
                            &self.saved[i],
                            g.as_deref(),
                            &dy,
                            clamped,
                            dx.as_deref_mut().map(|d| (d, store)),
                            dg.as_deref_mut(),
                            db.as_deref_mut(),
                        );
                    } else {
                        norm::eval_backward(
                            *c,
                            *plane,
                            batch,
                            x,
                            g.as_deref(),
                            *eps,
                            &params[*mean].value,
                            &params[*var].value,
                            &dy,
                            clamped,
                            dx.as_deref_mut(),
                            dg.as_deref_mut(),
                            db.as_deref_mut(),
                        );
                    }
                    if let (Some(p), Some(v)) = (*gamma, dg) {
                        params[p].grad = v;
                    }
                    if let (Some(p), Some(v)) = (*beta, db) {
                        params[p].grad = v;
                    }
                }
                NodeOp::Affine { c, plane, gamma, beta, clamp } => {
                    zero_fresh(&mut fresh, params, *gamma);
                    zero_fresh(&mut fresh, params, *beta);
                    let (gp, bp) = pair(params, *gamma, *beta);
                    norm::affine_backward(
                        *c,
                        *plane,
                        batch,
                        x,
                        &gp.value,
                        &bp.value,
                        &dy,
                        *clamp,
                        dx.as_deref_mut().map(|d| (d, store)),
                        &mut gp.grad,
                        &mut bp.grad,
                    )
                }
                NodeOp::Reprogram { s, k: kp } => {
                    zero_fresh(&mut fresh, params, *kp);
                    let p = &mut params[*kp];
                    let dk = p.trained.then_some(&mut p.grad[..]);
                    conv::backward(
                        k,
                        s,
                        Weights::F32(&p.value),
                        x,
                        &dy,
                        batch,
                        dx.as_deref_mut().map(|d| (d, store)),
                        dk,
                        None,
                        None,
                        None,
                    )
                }
                NodeOp::Clamp { lo, hi } => {
                    if let Some(dx) = dx.as_deref_mut() {
                        act::clamp_backward(x, &dy, dx, *lo, *hi, store)
                    }
                }
                NodeOp::Add { other } => {
                    if need[*other] && *other != input {
                        let mut g = core::mem::take(&mut grads[*other]);
                        let st = if written[*other] { Store::Add } else { Store::Set };
                        g.resize(dy.len(), 0.0);
                        #[cfg(debug_assertions)]
                        if st == Store::Set {
                            g.fill(f32::NAN);
                        }
                        act::accumulate(&dy, &mut g, st);
                        written[*other] = true;
                        grads[*other] = g;
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        act::accumulate(&dy, dx, store);
                        // `x + x`: the gradient twice into the one buffer.
                        if *other == input {
                            act::accumulate(&dy, dx, Store::Add);
                        }
                    }
                }
                NodeOp::Pool { s, max } => {
                    if let Some(dx) = dx.as_deref_mut() {
                        pool::backward(s, *max, x, &dy, batch, dx)
                    }
                }
                NodeOp::GlobalPool { c, plane } => {
                    if let Some(dx) = dx.as_deref_mut() {
                        pool::global_backward(*c, *plane, &dy, batch, dx)
                    }
                }
                NodeOp::Flatten => {
                    if let Some(dx) = dx.as_deref_mut() {
                        act::accumulate(&dy, dx, store)
                    }
                }
            }
            if let Some(dx) = dx {
                grads[input] = dx;
            }
            grads[i + 1] = dy;
        }
        self.grads = grads;
        // Trained params no node reached: zero, as after `zero_grad`.
        for (p, _) in fresh.iter().enumerate().filter(|(_, &f)| f) {
            self.params[p].grad.fill(0.0);
        }
    }
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
fn zero_fresh(fresh: &mut [bool], params: &mut [Param], p: usize) {
    if core::mem::replace(&mut fresh[p], false) {
        params[p].grad.fill(0.0);
    }
}

/// The weights of a conv/linear and, when they are a trained param, its gradient buffer.
fn split_w<'p, 'a: 'p>(
    params: &'p mut [Param],
    frozen: &'p [Vec<f32>],
    w: WSrc<'a>,
) -> (Weights<'p>, Option<&'p mut [f32]>) {
    match w {
        WSrc::Frozen(w) => (w, None),
        WSrc::Dense(d) => (Weights::F32(&frozen[d]), None),
        WSrc::Param(p) => {
            let p = &mut params[p];
            let trained = p.trained;
            let (v, g) = (&p.value, &mut p.grad);
            (Weights::F32(v), trained.then_some(&mut g[..]))
        }
    }
}

/// Two distinct params, mutably.
fn pair(params: &mut [Param], a: usize, b: usize) -> (&mut Param, &mut Param) {
    assert_ne!(a, b);
    if a < b {
        let (l, r) = params.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = params.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}
