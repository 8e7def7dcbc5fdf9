//! The forward pass: follow the plan, one step at a time, over a caller-owned arena.

use super::plan::{Loc, StepKind};
use super::task::{Cursor, HeadAt, LayerWeights, NoTask, TaskParts};
use super::{conv_shape, pool_shape, Backbone};
use crate::format::graph::Op;
use crate::kernels::{fast, reference, ConvShape, Kernels, Masked, PostOp, Weights};
use core::ops::Range;

impl Backbone<'_> {
    /// Scratch floats [`Self::forward`] needs for `batch` samples with kernels `k`.
    pub fn scratch_len(&self, k: &Kernels, batch: usize) -> usize {
        self.scratch_len_for(k, batch, &NoTask)
    }

    /// Scratch floats [`Self::forward_task`] needs for `batch` samples of `task`.
    pub fn scratch_len_for(&self, k: &Kernels, batch: usize, task: &dyn TaskParts) -> usize {
        let conv = self.conv_scratch_floats(k);
        // One sample's conv output before its reprogramming.
        let clr = if task.reprograms() {
            let steps = self.plan.steps.iter().filter(|s| self.is_reprogrammed(s.layer as usize));
            steps.map(|s| self.shape(s.output).len()).max().unwrap_or(0)
        } else {
            0
        };
        let head = task.head().map_or(0, |h| (batch + 2) * h.outputs);
        self.plan.arena_per_sample * batch + 4 * self.plan.max_channels + conv + clr + head
    }

    /// Output floats per sample with `task`.
    pub fn output_len_for(&self, task: &dyn TaskParts) -> usize {
        task.head().map_or(self.output_shape().len(), |h| h.outputs)
    }

    /// Runs the network on `batch` samples of `x` (NCHW, already normalised) and returns the
    /// output (`batch × output_shape().len()`), which lives in `scratch`.
    ///
    /// # Panics
    /// If `x` or `scratch` has the wrong length.
    pub fn forward<'s>(&self, k: &Kernels, x: &[f32], batch: usize, scratch: &'s mut [f32]) -> &'s [f32] {
        self.forward_task(k, &NoTask, x, batch, scratch)
    }

    /// [`Self::forward`] as `task` sees the network: its masks and overlays applied while the
    /// weights are packed, its norms, reprogramming and head. Returns
    /// `batch × output_len_for(task)` floats.
    ///
    /// # Panics
    /// If `x` or `scratch` has the wrong length, or `task` failed [`Self::check_task`].
    pub fn forward_task<'s>(
        &self,
        k: &Kernels,
        task: &dyn TaskParts,
        x: &[f32],
        batch: usize,
        scratch: &'s mut [f32],
    ) -> &'s [f32] {
        assert_eq!(x.len(), batch * self.input_shape().len(), "input length must be batch × input shape");
        assert!(scratch.len() >= self.scratch_len_for(k, batch, task), "scratch smaller than scratch_len_for()");
        let arena_len = self.plan.arena_per_sample * batch;
        let (arena, rest) = scratch.split_at_mut(arena_len);
        let (post_buf, rest) = rest.split_at_mut(4 * self.plan.max_channels);
        let head = task.head();
        let (head_buf, rest) = rest.split_at_mut(head.map_or(0, |h| (batch + 2) * h.outputs));
        let (conv_scratch, clr_tmp) = rest.split_at_mut(self.conv_scratch_floats(k));
        let folded = task.folded_posts();
        let skip_last = head.is_some() && self.head_at() == HeadAt::Replace;
        let last_layer = self.layers.len() - 1;
        let mut cur = Cursor::default();
        let mut post_off = 0;
        for step in self.plan.steps.iter() {
            let li = step.layer as usize;
            let at = cur;
            self.advance(li, step.kind, task, &mut cur);
            if skip_last && li == last_layer {
                break;
            }
            let layer = &self.layers[li];
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
            // This step's post-ops: folded at decode, or now into `post_buf`.
            let plen = self.step_post_len(li, step.kind, step.output, task);
            let posts: &[f32] = match folded {
                Some(f) => &f[post_off..post_off + plen],
                None => {
                    self.step_posts(li, step.kind, at, task, &mut post_buf[..plen]);
                    &post_buf[..plen]
                }
            };
            post_off += plen;
            match step.kind {
                StepKind::Matmul { .. } => {
                    let w = match &layer.op {
                        Op::Conv2d(c) => self.weights(c.weight, c.scale),
                        Op::Linear(l) => self.weights(l.weight, l.scale),
                        _ => unreachable!("matmul steps are conv or linear"),
                    };
                    let row_len = self.maskable(li) / self.output_channels(li).max(1);
                    let w = match task.weights(at.maskable) {
                        LayerWeights::Backbone => w,
                        LayerWeights::Dense(d) => Weights::F32(d),
                        LayerWeights::Masked { mask, overlay } => {
                            Weights::Masked(Masked { base: &w, mask, row_len, overlay })
                        }
                    };
                    let c = ys.c;
                    let reprogram = task.reprograms() && self.is_reprogrammed(li);
                    let post = if reprogram {
                        PostOp { mul: &posts[..c], add: &posts[c..2 * c], lo: f32::NEG_INFINITY, hi: f32::INFINITY }
                    } else {
                        PostOp { mul: &posts[..c], add: &posts[c..2 * c], lo, hi }
                    };
                    for b in 0..batch {
                        let (xb, yb) = (&xin[b * xl..(b + 1) * xl], &mut y[b * yl..(b + 1) * yl]);
                        match &layer.op {
                            Op::Conv2d(cv) => {
                                let s = conv_shape(cv, xs);
                                let out = if reprogram { &mut clr_tmp[..yl] } else { &mut yb[..] };
                                conv(k, &s, w, xb, out, &post, conv_scratch);
                                if reprogram {
                                    let r = depthwise3x3(ys.c, ys.h, ys.w);
                                    let rpost = PostOp { mul: &posts[2 * c..3 * c], add: &posts[3 * c..4 * c], lo, hi };
                                    let kern = Weights::F32(task.reprogram(at.reprogram));
                                    conv(k, &r, kern, &clr_tmp[..yl], yb, &rpost, conv_scratch);
                                }
                            }
                            Op::Linear(l) => {
                                let (i, o) = (l.in_features as usize, l.out_features as usize);
                                linear(k, i, o, w, xb, yb, &post);
                            }
                            _ => unreachable!(),
                        }
                    }
                }
                StepKind::Norm => {
                    let c = xs.c;
                    let post = PostOp { mul: &posts[..c], add: &posts[c..2 * c], lo, hi };
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
        let Some(h) = head else {
            let out_len = self.output_shape().len() * batch;
            return match self.plan.value_loc(self.shapes.len() as u32 - 1) {
                Loc::Slot(s) => &arena[self.plan.slot_range(s, batch).start..][..out_len],
                Loc::Input => unreachable!("the plan rejects graphs that compute nothing"),
            };
        };
        // The head reads the final linear layer's input, or the backbone's output.
        let feat = match self.head_at() {
            HeadAt::Replace => self.layers[last_layer].input,
            HeadAt::Append => self.shapes.len() as u32 - 1,
        };
        let feats: &[f32] = match self.plan.value_loc(feat) {
            Loc::Slot(s) => &arena[self.plan.slot_range(s, batch)],
            Loc::Input => x,
        };
        let (consts, out) = head_buf.split_at_mut(2 * h.outputs);
        let (mul, add) = consts.split_at_mut(h.outputs);
        mul.fill(1.0);
        add.copy_from_slice(h.bias);
        let post = PostOp { mul, add, lo: f32::NEG_INFINITY, hi: f32::INFINITY };
        for b in 0..batch {
            let xb = &feats[b * h.inputs..(b + 1) * h.inputs];
            linear(
                k,
                h.inputs,
                h.outputs,
                Weights::F32(h.weight),
                xb,
                &mut out[b * h.outputs..(b + 1) * h.outputs],
                &post,
            );
        }
        &out[..batch * h.outputs]
    }

    /// The largest conv scratch of any step.
    fn conv_scratch_floats(&self, k: &Kernels) -> usize {
        let convs = self.plan.steps.iter().filter_map(|s| self.conv_shape(s.layer as usize));
        convs.map(|s| fast::conv_scratch_len(&s, k)).max().unwrap_or(0)
    }

    fn loc_range(&self, loc: Loc, batch: usize) -> Option<Range<usize>> {
        match loc {
            Loc::Input => None,
            Loc::Slot(s) => Some(self.plan.slot_range(s, batch)),
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

fn conv(k: &Kernels, s: &ConvShape, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp, scratch: &mut [f32]) {
    if k.fast {
        (k.conv2d)(k, s, w, x, y, post, scratch);
    } else {
        reference::conv2d(s, w, x, y, post);
    }
}

fn linear(k: &Kernels, i: usize, o: usize, w: Weights, x: &[f32], y: &mut [f32], post: &PostOp) {
    if k.fast {
        (k.linear)(k, i, o, w, x, y, post);
    } else {
        reference::linear(i, o, w, x, y, post);
    }
}

/// CLR's reprogramming: depthwise 3×3, stride 1, padding 1 over `[c][h][w]`.
pub fn depthwise3x3(c: usize, h: usize, w: usize) -> ConvShape {
    ConvShape { c_in: c, h, w, c_out: c, kh: 3, kw: 3, sh: 1, sw: 1, pad: [1; 4], dh: 1, dw: 1, groups: c }
}
