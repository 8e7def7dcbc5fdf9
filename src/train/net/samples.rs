//! Runs of nodes that go sample by sample. Early in a convolutional net the activations dwarf
//! the weights (Lite0 at 96×96: a 1×1 expansion reads 0.3 MB and writes 0.9 MB per sample, its
//! weights are 2 KB). Layer by layer over a batch, every op streams its input and output
//! gradients through memory (a Lite0 batch of 16 has tensors of 14 MB). Within a run each
//! sample goes through every node before the next sample starts: the gradients of the values
//! only the run reads then live in one sample's buffer per thread, reused by every sample and
//! so in L2, and an op finds its input where the op before left it. Samples are the parallel
//! tasks, each on one thread ([`serial`]). Lite0 CLR, batch 16, one thread: backward 90 → 79 ms,
//! forward 78.6 → 76.7 (the values are still written to their batch buffers, for the
//! backward pass).
//!
//! A value that only the next node reads, and only forward, is not kept: it passes to that
//! node in a per-thread slot, and the backward pass gets its clamp's mask (one bit per value)
//! when it was a clamped conv's output, or nothing ([`Net::kept`]).
//!
//! The results are the layer-by-layer ones bit for bit: every op computes each sample's outputs
//! and input gradients on its own in the same way whatever the batch, and a parameter's
//! gradient is a sum of per-sample partials in sample order in both (the depthwise kernel
//! gradient and the affine's sums are made so).

use super::backward::{node_backward, prepare, zero_fresh, Io, Pass, Step};
use super::{act, forward_op, Net, NodeOp, WSrc};
use crate::kernels::{serial, threads, Kernels, Store};
use core::ops::Range;

/// What the passes keep of a value ([`Net::kept`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kept {
    /// All of it, for the backward pass or for what reads it later.
    Whole,
    /// The mask of the clamp fused into the conv that makes it, one bit per value.
    Mask,
    /// Nothing: only the next node's forward reads it.
    Nothing,
}

/// Nodes the passes run one way: sample by sample, or each over the whole batch.
#[derive(Clone, Debug)]
pub(super) struct Run {
    pub nodes: Range<usize>,
    pub by_sample: bool,
}

/// A param and where its gradient lies in a sample's partials.
type Span = Option<(usize, Range<usize>)>;

/// A node goes sample by sample only when one sample's input and output together exceed this
/// many floats (128 KB): smaller ones stay in L2 over a batch anyway, and every sample's call
/// then costs a kernel's setup again.
const SAMPLE_MIN_FLOATS: usize = 1 << 15;

impl Net<'_> {
    /// How the passes run the nodes for `batch` samples: maximal runs of nodes that can go
    /// sample by sample and pay for it ([`Net::separable`]), sample by sample when one of them
    /// moves more than [`SAMPLE_MIN_FLOATS`] per sample; every other node over the whole batch.
    pub(super) fn plan(&self, batch: usize) -> Vec<Run> {
        let n = self.nodes.len();
        let moved: Vec<Option<usize>> =
            (0..n).map(|i| self.separable(i).filter(|_| batch > 1 && self.sample_runs)).collect();
        let mut runs = Vec::new();
        let mut i = 0;
        while i < n {
            let end = i + moved[i..].iter().take_while(|m| m.is_some()).count().max(1);
            let by_sample = moved[i..end].iter().flatten().any(|&m| m >= SAMPLE_MIN_FLOATS);
            runs.push(Run { nodes: i..end, by_sample });
            i = end;
        }
        runs
    }

    /// The floats one sample moves through node `i` (input and output) when it can go sample
    /// by sample: an op that treats samples apart, has no gradient that a product sums over
    /// the batch (a trained conv's weights), and has fewer weights than activations per sample.
    fn separable(&self, i: usize) -> Option<usize> {
        let node = &self.nodes[i];
        let trained = |p: usize| self.params[p].trained;
        let weights = match &node.op {
            NodeOp::Conv { w: WSrc::Param(p), .. } if trained(*p) => return None,
            NodeOp::Conv { s, .. } | NodeOp::Reprogram { s, .. } => s.c_out * s.cin_g() * s.kh * s.kw,
            NodeOp::Affine { c, .. } => 2 * c,
            NodeOp::Norm { c, gamma, beta, .. } => {
                if self.train_mode || gamma.is_some_and(trained) || beta.is_some_and(trained) {
                    return None;
                }
                4 * c
            }
            NodeOp::Clamp { .. } | NodeOp::Add { .. } | NodeOp::Pool { .. } | NodeOp::GlobalPool { .. } => 0,
            NodeOp::Flatten => 0,
            NodeOp::Linear { .. } | NodeOp::Head { .. } => return None,
        };
        let (x, y) = (self.value_shape(node.input).len(), node.out.len());
        (x > 0 && y > 0 && weights <= x + y).then_some(x + y)
    }

    /// Per value, what of it the passes keep with the nodes run as `runs` say. A value that
    /// the next node alone reads, as its input, in the same run that goes sample by sample,
    /// where that node's backward does not read it (a frozen conv's input gradient needs only
    /// its weights), is used only by that node's forward, and by its maker's backward when
    /// that reads its output: a clamped conv's, whose clamp's mask (one bit per value) tells
    /// the same. Such values pass from node to node in two per-thread slots, in cache, and
    /// the backward pass gets the mask or nothing. In Lite0 these are the 1 × 1 expansions'
    /// outputs (masks; 14 MB of a batch of 16 for the first), the affines' outputs that a
    /// frozen conv reads, the projections' that an add reads and the adds' that an expansion
    /// reads.
    pub(super) fn kept(&self, runs: &[Run]) -> Vec<Kept> {
        let n = self.nodes.len();
        let mut kept = vec![Kept::Whole; n + 1];
        if !self.pass_through {
            return kept;
        }
        for run in runs.iter().filter(|r| r.by_sample) {
            for i in run.nodes.clone() {
                let v = i + 1;
                let next = self.nodes.get(v).filter(|_| v < run.nodes.end);
                let read_by_next_alone = next.is_some_and(|m| m.input == v && m.other() != Some(v))
                    && self.nodes[v + 1..].iter().all(|m| m.input != v && m.other() != Some(v));
                if !read_by_next_alone || self.backward_reads_input(v) {
                    continue;
                }
                kept[v] = match self.nodes[i].op {
                    NodeOp::Conv { clamp: Some(_), .. } => Kept::Mask,
                    // Their clamps' gradients read the output.
                    NodeOp::Norm { clamp: Some(_), .. } | NodeOp::Add { clamp: Some(_), .. } => Kept::Whole,
                    _ => Kept::Nothing,
                };
            }
        }
        kept
    }

    /// Whether node `i`'s backward reads its input value.
    fn backward_reads_input(&self, i: usize) -> bool {
        match &self.nodes[i].op {
            // Only for the weights' gradient.
            NodeOp::Conv { w, .. } => matches!(w, WSrc::Param(p) if self.params[*p].trained),
            NodeOp::Add { .. } | NodeOp::GlobalPool { .. } | NodeOp::Flatten => false,
            _ => true,
        }
    }

    /// The forward pass of nodes `run`, sample by sample (the values are sized).
    pub(super) fn forward_samples(&mut self, k: &Kernels, run: Range<usize>) {
        let (a, b) = (run.start, run.end);
        let mut values = core::mem::take(&mut self.values);
        let mut masks = core::mem::take(&mut self.masks);
        let (before, after) = values.split_at_mut(a + 1);
        let kept = &self.kept;
        let in_slot = |v: usize| kept[v] != Kept::Whole;
        let len = |v: usize| if in_slot(v) { 0 } else { self.value_shape(v).len() };
        let words = |v: usize| if kept[v] == Kept::Mask { act::mask_words(self.value_shape(v).len()) } else { 0 };
        let pieces = per_sample(self.batch, after[..b - a].iter_mut().zip(a + 1..).map(|(y, v)| (y, len(v))));
        let bits = per_sample(self.batch, masks[a + 1..=b].iter_mut().zip(a + 1..).map(|(m, v)| (m, words(v))));
        let slot_len = (a + 1..=b).filter(|&v| in_slot(v)).map(|v| self.value_shape(v).len()).max().unwrap_or(0);
        let mut work: Vec<_> = pieces.into_iter().zip(bits).collect();
        let (net, before) = (&*self, &*before);
        let task = |(s, (parts, bits)): (usize, &mut (Pieces<f32>, Pieces<u32>))| {
            serial(|| {
                SLOTS.with_borrow_mut(|slots| {
                    if slots.len() < 2 * slot_len {
                        slots.resize(2 * slot_len, 0.0);
                    }
                    // Value `v` not kept whole is in slot `v % 2`: its maker writes the one the
                    // maker's input is not in, and its reader, the next node, reads it there.
                    let (even, odd) = slots.split_at_mut(slot_len);
                    for i in run.clone() {
                        let (done, rest) = parts.split_at_mut(i - a);
                        let node = &net.nodes[i];
                        let (v, (ours, theirs)) =
                            (i + 1, if i % 2 == 0 { (&mut *odd, &*even) } else { (&mut *even, &*odd) });
                        let val = |u: usize| -> &[f32] {
                            if u <= a {
                                let l = net.value_shape(u).len();
                                &before[u][s * l..(s + 1) * l]
                            } else if in_slot(u) {
                                &theirs[..net.value_shape(u).len()]
                            } else {
                                done[u - a - 1]
                            }
                        };
                        let other = node.other().map_or(&[][..], val);
                        let y = if in_slot(v) {
                            let y = &mut ours[..node.out.len()];
                            // Debug builds poison it, as `Net::forward` does the values'
                            // buffers (which it has filled already).
                            #[cfg(debug_assertions)]
                            y.fill(f32::NAN);
                            y
                        } else {
                            &mut *rest[0]
                        };
                        let t0 = net.profile.as_ref().map(|_| std::time::Instant::now());
                        forward_op(k, net.ctx(), node, val(node.input), other, y, 1);
                        if kept[v] == Kept::Mask {
                            let NodeOp::Conv { clamp: Some((lo, hi)), .. } = node.op else {
                                unreachable!("a value kept as a mask is a clamped conv's output")
                            };
                            act::clamp_bits(y, lo, hi, bits[i - a]);
                        }
                        if let (Some(p), Some(t0)) = (&net.profile, t0) {
                            p.sample(i, false, t0);
                        }
                    }
                })
            })
        };
        each_sample(&mut work, task);
        self.values = values;
        self.masks = masks;
    }

    /// The backward pass of nodes `run` (in reverse), sample by sample: the bookkeeping node by
    /// node first, as the layer-by-layer pass does it, then every sample's gradients, then the
    /// params' gradients as sums of the per-sample partials in sample order. The gradients of
    /// values that only the run reads live in a per-thread buffer of one sample, reused by
    /// every sample (so they stay in L2); the others in their batch buffers.
    pub(super) fn backward_samples(&mut self, k: &Kernels, run: Range<usize>, pass: &mut Pass, grads: &mut [Vec<f32>]) {
        let batch = self.batch;
        let lay = self.layout(run, pass);
        let mut partials = core::mem::take(&mut self.partials);
        partials.clear();
        partials.resize(batch * lay.total, 0.0);
        let len = |v: usize| self.value_shape(v).len();
        for t in lay.touched.iter().filter(|t| !t.own) {
            let g = &mut grads[t.v];
            g.resize(batch * len(t.v), 0.0);
            if let Some((store, sets)) = t.first {
                prepare(g, store, sets);
            }
        }
        let full = |v: usize| lay.slot[v] != usize::MAX && !lay.touched[lay.slot[v]].own;
        let bufs = grads.iter_mut().enumerate().filter(|(v, _)| full(*v));
        let pieces = per_sample(batch, bufs.map(|(v, g)| (g, len(v))));
        let parts: Vec<&mut [f32]> = if lay.total == 0 {
            (0..batch).map(|_| <&mut [f32]>::default()).collect()
        } else {
            partials.chunks_exact_mut(lay.total).collect()
        };
        let mut work: Vec<(Vec<&mut [f32]>, &mut [f32])> = pieces.into_iter().zip(parts).collect();
        let net = &*self;
        each_sample(&mut work, |(s, (full, part))| serial(|| net.sample_backward(k, &lay, s, full, part)));
        drop(work);
        // Each param's gradient: its sample partials added in sample order.
        if lay.total > 0 {
            for (p, r) in lay.spans.iter().flatten().flatten() {
                let g = &mut self.params[*p].grad;
                for part in partials.chunks_exact(lay.total) {
                    for (d, v) in g.iter_mut().zip(&part[r.clone()]) {
                        *d += v;
                    }
                }
            }
        }
        self.partials = partials;
    }

    /// The bookkeeping of a run's backward, node by node in the pass's order.
    fn layout(&mut self, run: Range<usize>, pass: &mut Pass) -> Layout {
        let (a, b) = (run.start, run.end);
        let mut lay = Layout {
            steps: vec![None; b - a],
            spans: vec![[None, None]; b - a],
            total: 0,
            touched: Vec::new(),
            slot: vec![usize::MAX; self.nodes.len() + 1],
            scratch_len: 0,
            run,
        };
        for i in lay.run.clone().rev() {
            let Some(step) = self.step(i, pass) else { continue };
            lay.steps[i - a] = Some(step);
            lay.spans[i - a] = self.grad_params(i).map(|p| {
                let p = p?;
                zero_fresh(&mut pass.fresh, &mut self.params, p);
                let len = self.params[p].grad.len();
                lay.total += len;
                Some((p, lay.total - len..lay.total))
            });
            let node = &self.nodes[i];
            let other = node.other().unwrap_or(0);
            let stores =
                [(i + 1, None), (node.input, step.dx.map(|s| (s, step.sets))), (other, step.other.map(|s| (s, true)))];
            for (v, store) in stores.into_iter().filter(|(v, st)| *v == i + 1 || st.is_some()) {
                let first = store.filter(|(s, _)| *s == Store::Set);
                match lay.touched.iter_mut().find(|t| t.v == v) {
                    Some(t) => t.first = t.first.or(first),
                    None => lay.touched.push(Touched { v, first, own: false }),
                }
            }
        }
        lay.touched.sort_unstable_by_key(|t| t.v);
        // A value is the run's own when it is made and read only inside the run.
        let outside = |v: usize| self.nodes[b..].iter().any(|n| n.input == v || n.other() == Some(v));
        for (j, t) in lay.touched.iter_mut().enumerate() {
            t.own = t.v > a && t.v < b && !outside(t.v);
            lay.slot[t.v] = j;
            if t.own {
                lay.scratch_len += self.value_shape(t.v).len();
            }
        }
        lay
    }

    /// Sample `s`'s backward through the run of `lay`: `full` holds its pieces of the batch
    /// gradient buffers the run touches, `part` its partials of the params' gradients.
    fn sample_backward(&self, k: &Kernels, lay: &Layout, s: usize, full: &mut [&mut [f32]], part: &mut [f32]) {
        let (len, slot, scratch_len) = (|v: usize| self.value_shape(v).len(), &lay.slot, lay.scratch_len);
        GRAD_SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < scratch_len {
                scratch.resize(scratch_len, 0.0);
            }
            // Per touched value, this sample's gradient: its piece of the batch buffer, or of
            // the scratch, prepared as its batch buffer would have been.
            let mut rest = &mut scratch[..scratch_len];
            let mut full = full.iter_mut();
            let mut bufs: Vec<&mut [f32]> = Vec::with_capacity(lay.touched.len());
            for t in &lay.touched {
                if t.own {
                    let (g, r) = core::mem::take(&mut rest).split_at_mut(len(t.v));
                    rest = r;
                    if let Some((store, sets)) = t.first {
                        prepare(g, store, sets);
                    }
                    bufs.push(g);
                } else {
                    bufs.push(core::mem::take(full.next().expect("a piece per batch buffer")));
                }
            }
            let a = lay.run.start;
            for i in lay.run.clone().rev() {
                let Some(step) = lay.steps[i - a] else { continue };
                let node = &self.nodes[i];
                let whole = |v: usize| self.kept[v] == Kept::Whole;
                let val = |v: usize| if whole(v) { &self.values[v][s * len(v)..(s + 1) * len(v)] } else { &[][..] };
                let y_mask = (self.kept[i + 1] == Kept::Mask).then(|| {
                    let w = act::mask_words(len(i + 1));
                    &self.masks[i + 1][s * w..(s + 1) * w]
                });
                let other = node.other().unwrap_or(0);
                let dy = core::mem::take(&mut bufs[slot[i + 1]]);
                let mut dx = step.dx.map(|st| (core::mem::take(&mut bufs[slot[node.input]]), st));
                let mut dother = step.other.map(|st| (core::mem::take(&mut bufs[slot[other]]), st));
                let [s0, s1] = &lay.spans[i - a];
                let (lo, hi) = part.split_at_mut(s1.as_ref().map_or(part.len(), |(_, r)| r.start));
                let dp = [s0.as_ref().map(|(_, r)| &mut lo[r.clone()]), s1.as_ref().map(|(_, r)| &mut hi[..r.len()])];
                let t0 = self.profile.as_ref().map(|_| std::time::Instant::now());
                node_backward(
                    k,
                    self.ctx(),
                    i,
                    node,
                    Io { x: val(node.input), y: val(i + 1), y_mask, dy: &mut *dy, batch: 1 },
                    dx.as_mut().map(|(d, st)| (&mut **d, *st)),
                    dother.as_mut().map(|(d, st)| (&mut **d, *st)),
                    dp,
                    Store::Add,
                );
                if let (Some(p), Some(t0)) = (&self.profile, t0) {
                    p.sample(i, true, t0);
                }
                bufs[slot[i + 1]] = dy;
                if let Some((d, _)) = dx {
                    bufs[slot[node.input]] = d;
                }
                if let Some((d, _)) = dother {
                    bufs[slot[other]] = d;
                }
            }
        })
    }
}

/// The bookkeeping of a run's backward ([`Net::layout`]), shared by its samples.
struct Layout {
    run: Range<usize>,
    /// Per node of the run: its step, `None` when it has nothing to do.
    steps: Vec<Option<Step>>,
    /// Per node: its params and where their gradients lie in a sample's partials.
    spans: Vec<[Span; 2]>,
    /// Floats of one sample's partials.
    total: usize,
    /// The gradients the run touches, by value.
    touched: Vec<Touched>,
    /// Per value: its index in `touched`, or `usize::MAX`.
    slot: Vec<usize>,
    /// Floats of one sample's own gradients (the per-thread scratch).
    scratch_len: usize,
}

/// A gradient a run touches.
struct Touched {
    v: usize,
    /// The (store, sets) of the first store into it, when that is in this run.
    first: Option<(Store, bool)>,
    /// Made and read only inside the run: it lives in the per-sample scratch.
    own: bool,
}

std::thread_local! {
    /// One sample's gradients of the values a run goes through ([`Net::backward_samples`]).
    static GRAD_SCRATCH: core::cell::RefCell<Vec<f32>> = const { core::cell::RefCell::new(Vec::new()) };
    /// One sample's values not kept whole ([`Net::kept`]), between the node that makes each
    /// and the next, which reads it: two slots.
    static SLOTS: core::cell::RefCell<Vec<f32>> = const { core::cell::RefCell::new(Vec::new()) };
}

/// One sample's pieces of a run's buffers.
type Pieces<'g, T> = Vec<&'g mut [T]>;

/// Each buffer (with its per-sample length) cut into its `batch` samples' pieces: per sample,
/// its piece of every buffer, in order (empty for a length of 0).
fn per_sample<'g, T>(batch: usize, bufs: impl Iterator<Item = (&'g mut Vec<T>, usize)>) -> Vec<Pieces<'g, T>> {
    let mut pieces: Vec<Pieces<T>> = (0..batch).map(|_| Vec::new()).collect();
    for (buf, len) in bufs {
        if len == 0 {
            pieces.iter_mut().for_each(|p| p.push(Default::default()));
            continue;
        }
        for (s, piece) in buf[..batch * len].chunks_exact_mut(len).enumerate() {
            pieces[s].push(piece);
        }
    }
    pieces
}

/// `task(s, sample s's item)` for every sample, samples in parallel.
fn each_sample<T: Send>(items: &mut [T], task: impl Fn((usize, &mut T)) + Sync + Send) {
    if threads() > 1 && items.len() > 1 {
        use rayon::prelude::*;
        items.par_iter_mut().enumerate().for_each(task);
    } else {
        items.iter_mut().enumerate().for_each(task);
    }
}
