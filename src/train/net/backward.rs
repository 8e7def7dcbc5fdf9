//! The backward pass of [`Net`]: from the output gradient back to the earliest trained
//! parameter, each node's gradient function from `train::ops` in reverse order.

use super::{Net, Node, NodeOp, Param, WSrc};
use crate::kernels::{Kernels, Weights};
use crate::train::ops::{act, conv, linear, norm, pool};

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

    /// Adds the gradients of the last forward's output (given `dout`) into every trained
    /// param's `grad`.
    pub fn backward(&mut self, k: &Kernels, dout: &[f32]) {
        let n = self.nodes.len();
        let batch = self.batch;
        // need[v]: some trained parameter lies at or before value v.
        let mut need = vec![false; n + 1];
        for (i, node) in self.nodes.iter().enumerate() {
            let other = if let NodeOp::Add { other } = node.op { need[other] } else { false };
            need[i + 1] = self.trains(node) || need[node.input] || other;
        }
        let mut grads = core::mem::take(&mut self.grads);
        grads.resize(n + 1, Vec::new());
        for g in &mut grads {
            g.clear();
        }
        grads[n].extend_from_slice(&dout[..batch * self.out_shape().len()]);
        for i in (0..n).rev() {
            if !need[i + 1] {
                continue;
            }
            let dy = core::mem::take(&mut grads[i + 1]);
            if dy.is_empty() {
                grads[i + 1] = dy;
                continue;
            }
            let node = &self.nodes[i];
            let input = node.input;
            let want_dx = need[input];
            let mut dx = if want_dx {
                let mut g = core::mem::take(&mut grads[input]);
                g.resize(batch * self.value_shape(input).len(), 0.0);
                Some(g)
            } else {
                None
            };
            let x = &self.values[input];
            let params = &mut self.params;
            match &node.op {
                NodeOp::Conv { s, w, .. } => {
                    let (wt, dw) = split_w(params, &self.frozen, *w);
                    conv::backward(k, s, wt, x, &dy, batch, dx.as_deref_mut(), dw, None)
                }
                NodeOp::Linear { in_f, out_f, w, .. } => {
                    let (wt, dw) = split_w(params, &self.frozen, *w);
                    linear::backward(k, *in_f, *out_f, wt, x, &dy, batch, dx.as_deref_mut(), dw, None)
                }
                NodeOp::Head { in_f, out_f, w, b } => {
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
                        Some(&mut wp.grad),
                        Some(&mut bp.grad),
                    )
                }
                NodeOp::Norm { c, plane, eps, mean, var, gamma, beta } => {
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
                            dx.as_deref_mut(),
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
                NodeOp::Affine { c, plane, gamma, beta } => {
                    let (gp, bp) = pair(params, *gamma, *beta);
                    norm::affine_backward(
                        *c,
                        *plane,
                        batch,
                        x,
                        &gp.value,
                        &dy,
                        dx.as_deref_mut(),
                        &mut gp.grad,
                        &mut bp.grad,
                    )
                }
                NodeOp::Reprogram { s, k: kp } => {
                    let p = &mut params[*kp];
                    let dk = p.trained.then_some(&mut p.grad[..]);
                    conv::backward(k, s, Weights::F32(&p.value), x, &dy, batch, dx.as_deref_mut(), dk, None)
                }
                NodeOp::Clamp { lo, hi } => {
                    if let Some(dx) = dx.as_deref_mut() {
                        act::clamp_backward(x, &dy, dx, *lo, *hi)
                    }
                }
                NodeOp::Add { other } => {
                    if need[*other] {
                        let mut g = core::mem::take(&mut grads[*other]);
                        g.resize(dy.len(), 0.0);
                        act::accumulate(&dy, &mut g);
                        grads[*other] = g;
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        act::accumulate(&dy, dx)
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
                        act::accumulate(&dy, dx)
                    }
                }
            }
            if let Some(dx) = dx {
                grads[input] = dx;
            }
            grads[i + 1] = dy;
        }
        self.grads = grads;
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
