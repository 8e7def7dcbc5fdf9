//! The forward pass: follow the plan, one step at a time, over a caller-owned arena.

use super::plan::{Loc, StepKind};
use super::{conv_shape, pool_shape, Backbone};
use crate::format::graph::{BatchNorm, Op};
use crate::kernels::{fast, reference, Kernels, PostOp};
use core::ops::Range;

impl Backbone<'_> {
    /// Scratch floats [`Self::forward`] needs for `batch` samples with kernels `k`.
    pub fn scratch_len(&self, k: &Kernels, batch: usize) -> usize {
        let conv = self
            .plan
            .steps
            .iter()
            .filter_map(|s| self.conv_shape(s.layer as usize))
            .map(|s| fast::conv_scratch_len(&s, k))
            .max()
            .unwrap_or(0);
        self.plan.arena_per_sample * batch + 2 * self.plan.max_channels + conv
    }

    /// Runs the network on `batch` samples of `x` (NCHW, already normalised) and returns the
    /// output (`batch × output_shape().len()`), which lives in `scratch`.
    ///
    /// # Panics
    /// If `x` or `scratch` has the wrong length.
    pub fn forward<'s>(&self, k: &Kernels, x: &[f32], batch: usize, scratch: &'s mut [f32]) -> &'s [f32] {
        assert_eq!(x.len(), batch * self.input_shape().len(), "input length must be batch × input shape");
        assert!(scratch.len() >= self.scratch_len(k, batch), "scratch smaller than scratch_len()");
        let arena_len = self.plan.arena_per_sample * batch;
        let (arena, rest) = scratch.split_at_mut(arena_len);
        let (post_buf, conv_scratch) = rest.split_at_mut(2 * self.plan.max_channels);
        let (mul, add) = post_buf.split_at_mut(self.plan.max_channels);
        for step in self.plan.steps.iter() {
            let layer = &self.layers[step.layer as usize];
            let xs = self.shape(step.input);
            let ys = self.shape(step.output);
            let (xl, yl) = (xs.len(), ys.len());
            let out_range = match step.out_loc {
                Loc::Slot(s) => self.plan.slot_range(s, batch),
                Loc::Input => unreachable!("the plan materialises every step output"),
            };
            let (ins, y) =
                split_io(arena, [self.loc_range(step.in_loc, batch), self.loc_range(step.other_loc, batch)], out_range);
            let xin = ins[0].unwrap_or(x);
            let (lo, hi) = step.act.bounds();
            match step.kind {
                StepKind::Matmul { bn } => {
                    let bn = bn.map(|b| match &self.layers[b as usize].op {
                        Op::BatchNorm(b) => *b,
                        _ => unreachable!("the plan fuses only batch norms"),
                    });
                    let (w, bias) = match &layer.op {
                        Op::Conv2d(c) => (self.weights(c.weight, c.scale), c.bias),
                        Op::Linear(l) => (self.weights(l.weight, l.scale), l.bias),
                        _ => unreachable!("matmul steps are conv or linear"),
                    };
                    let c = ys.c;
                    self.fill_post(bias.map(|b| self.view.f32s(b)), bn.as_ref(), &mut mul[..c], &mut add[..c]);
                    let post = PostOp { mul: &mul[..c], add: &add[..c], lo, hi };
                    for b in 0..batch {
                        let (xb, yb) = (&xin[b * xl..(b + 1) * xl], &mut y[b * yl..(b + 1) * yl]);
                        match &layer.op {
                            Op::Conv2d(cv) => {
                                let s = conv_shape(cv, xs);
                                if k.fast {
                                    (k.conv2d)(k, &s, w, xb, yb, &post, conv_scratch);
                                } else {
                                    reference::conv2d(&s, w, xb, yb, &post);
                                }
                            }
                            Op::Linear(l) => {
                                let (i, o) = (l.in_features as usize, l.out_features as usize);
                                if k.fast {
                                    (k.linear)(k, i, o, w, xb, yb, &post);
                                } else {
                                    reference::linear(i, o, w, xb, yb, &post);
                                }
                            }
                            _ => unreachable!(),
                        }
                    }
                }
                StepKind::Norm => {
                    let Op::BatchNorm(bn) = &layer.op else { unreachable!("norm steps are batch norms") };
                    let c = xs.c;
                    self.fill_post(None, Some(bn), &mut mul[..c], &mut add[..c]);
                    let post = PostOp { mul: &mul[..c], add: &add[..c], lo, hi };
                    for b in 0..batch {
                        reference::channel_affine(
                            c,
                            xs.plane(),
                            &xin[b * xl..(b + 1) * xl],
                            &mut y[b * yl..(b + 1) * yl],
                            &post,
                        );
                    }
                }
                StepKind::Act => reference::clamp(&xin[..batch * xl], &mut y[..batch * yl], lo, hi),
                StepKind::Add => {
                    let other = ins[1].unwrap_or(x);
                    reference::add(&xin[..batch * xl], &other[..batch * xl], &mut y[..batch * yl], lo, hi);
                }
                StepKind::MaxPool | StepKind::AvgPool => {
                    let (Op::MaxPool(p) | Op::AvgPool(p)) = &layer.op else { unreachable!() };
                    let ps = pool_shape(p, xs);
                    for b in 0..batch {
                        reference::pool(
                            &ps,
                            step.kind == StepKind::MaxPool,
                            &xin[b * xl..(b + 1) * xl],
                            &mut y[b * yl..(b + 1) * yl],
                        );
                    }
                }
                StepKind::GlobalAvgPool => {
                    for b in 0..batch {
                        reference::global_avg_pool(
                            xs.c,
                            xs.plane(),
                            &xin[b * xl..(b + 1) * xl],
                            &mut y[b * yl..(b + 1) * yl],
                        );
                    }
                }
            }
        }
        let out_len = self.output_shape().len() * batch;
        match self.plan.value_loc(self.shapes.len() as u32 - 1) {
            Loc::Slot(s) => &arena[self.plan.slot_range(s, batch).start..][..out_len],
            Loc::Input => unreachable!("the plan rejects graphs that compute nothing"),
        }
    }

    fn loc_range(&self, loc: Loc, batch: usize) -> Option<Range<usize>> {
        match loc {
            Loc::Input => None,
            Loc::Slot(s) => Some(self.plan.slot_range(s, batch)),
        }
    }

    /// Folds bias and batch norm into `y = acc * mul + add`:
    /// `mul = g / sqrt(var + eps)`, `add = (bias - mean) * mul + b`.
    fn fill_post(&self, bias: Option<&[f32]>, bn: Option<&BatchNorm>, mul: &mut [f32], add: &mut [f32]) {
        match bias {
            Some(b) => add.copy_from_slice(b),
            None => add.fill(0.0),
        }
        mul.fill(1.0);
        if let Some(bn) = bn {
            let (mean, var) = (self.view.f32s(bn.mean), self.view.f32s(bn.var));
            let gamma = bn.gamma.map(|t| self.view.f32s(t));
            let beta = bn.beta.map(|t| self.view.f32s(t));
            for c in 0..mul.len() {
                let g = gamma.map_or(1.0, |g| g[c]);
                // libm, not std: the same bits on the host and on a microcontroller.
                let s = g / libm::sqrtf(var[c] + bn.eps);
                mul[c] = s;
                add[c] = (add[c] - mean[c]) * s + beta.map_or(0.0, |b| b[c]);
            }
        }
    }
}

/// Borrows up to two input ranges and one output range of the arena at once. The plan never
/// lets an output slot overlap a slot read by the same step.
fn split_io(arena: &mut [f32], ins: [Option<Range<usize>>; 2], out: Range<usize>) -> ([Option<&[f32]>; 2], &mut [f32]) {
    let (left, rest) = arena.split_at_mut(out.start);
    let (y, right) = rest.split_at_mut(out.end - out.start);
    let (left, right): (&[f32], &[f32]) = (left, right);
    let pick = |r: Option<Range<usize>>| {
        r.map(|r| {
            if r.end <= out.start {
                &left[r]
            } else {
                assert!(r.start >= out.end, "plan error: a step reads its own output slot");
                &right[r.start - out.end..r.end - out.end]
            }
        })
    };
    ([pick(ins[0].clone()), pick(ins[1].clone())], y)
}
