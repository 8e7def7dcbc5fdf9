//! (std) Sessions: a set of tasks decoded once over one mapped backbone, each run as the
//! network its task sees, with switching between tasks that allocates and copies nothing.
//!
//! Per task, decoding keeps the components as they are in the file (masks stay bit vectors)
//! and adds only what makes a switch free: the post-ops of every step folded with the task's
//! norms (DESIGN §7), and for ExSSNeT tasks the overlay of their chain merged into one sparse
//! overlay per layer (a bit vector of which weights have values, a rank per output row, the
//! values in bit order). Because a task's exclusive set is disjoint from those of the tasks
//! it depends on, and a later task's exclusive set never meets an earlier task's mask, one
//! merged overlay serves every task of a chain; tasks whose chain is a prefix of another's
//! share its overlay. Masks and overlays are applied while the weights are packed
//! ([`crate::kernels::Masked`]), so memory for N tasks is the backbone pages touched plus N
//! decoded tasks, and running task A after task B costs exactly what running A after A does.

use crate::adapter::{Base, Method, Task};
use crate::backbone::task::{HeadView, LayerWeights, NormView, TaskFit, TaskParts};
use crate::backbone::Backbone;
use crate::format::task::TaskFile;
use crate::format::{Digest, Hex};
use crate::kernels::{Kernels, Overlay};
use bitvec::prelude::{BitSlice, BitVec, Lsb0};
use std::sync::Arc;

/// Why a set of tasks cannot be served.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionError {
    /// Task `task` depends on a task that is not in the set.
    MissingDependency { task: String, digest: Digest },
    /// The task's components do not fit the backbone.
    Fit { task: String, fit: TaskFit },
    /// The task's stored components are inconsistent (e.g. an overlay that does not match its
    /// exclusive weights).
    Components { task: String, what: String },
    /// Two tasks share a name.
    DuplicateName(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::MissingDependency { task, digest } => write!(
                f,
                "task '{task}' depends on task {} which is not installed; install it (or a bundle holding it) first",
                Hex(digest)
            ),
            SessionError::Fit { task, fit } => write!(f, "task '{task}': {fit}"),
            SessionError::Components { task, what } => write!(f, "task '{task}' is inconsistent: {what}"),
            SessionError::DuplicateName(n) => write!(f, "two tasks are named '{n}'"),
        }
    }
}

impl std::error::Error for SessionError {}

/// One layer of a merged overlay.
#[derive(Debug, Default)]
struct LayerOverlay {
    present: Vec<u32>,
    row_rank: Vec<u32>,
    values: Vec<f32>,
}

/// A chain's merged overlay: per maskable layer, shared by the tasks of the chain.
type Merged = Arc<Vec<Option<LayerOverlay>>>;

/// A task ready to run.
#[derive(Debug)]
pub struct Prepared {
    pub digest: Digest,
    pub task: Task,
    /// Per maskable layer (ExSSNeT only), shared along a chain.
    overlay: Option<Merged>,
    /// CLR: the kernels and shifts decoded from their int8 steps.
    kernels: Vec<Vec<f32>>,
    shifts: Vec<Vec<f32>>,
    posts: Vec<f32>,
    folded: bool,
}

impl Prepared {
    /// Bytes this task adds in memory (components, folded post-ops, its share of overlays
    /// counted in full).
    pub fn decoded_bytes(&self) -> usize {
        let c = &self.task.components;
        let v = |x: &[f32]| x.len() * 4;
        let masks: usize = c.masks.iter().map(|m| m.words.len() * 4).sum();
        let norms: usize = c
            .norms
            .iter()
            .map(|n| v(&n.mean) + v(&n.var) + n.gamma.as_deref().map_or(0, v) + n.beta.as_deref().map_or(0, v))
            .sum();
        let other: usize = c.overlay.iter().chain(&c.dense).map(|x| v(x)).sum::<usize>()
            + c.reprogram.iter().chain(&c.shifts).map(|q| q.len() + 4).sum::<usize>()
            + self.kernels.iter().chain(&self.shifts).map(|x| v(x)).sum::<usize>()
            + c.head.as_ref().map_or(0, |h| v(&h.weight) + v(&h.bias));
        let overlay: usize = self.overlay.as_ref().map_or(0, |o| {
            o.iter().flatten().map(|l| l.present.len() * 4 + l.row_rank.len() * 4 + l.values.len() * 4).sum()
        });
        masks + norms + other + overlay + v(&self.posts)
    }
}

impl TaskParts for Prepared {
    fn weights(&self, maskable: usize) -> LayerWeights<'_> {
        let c = &self.task.components;
        match self.task.method {
            Method::Supsup | Method::Exssnet => LayerWeights::Masked {
                mask: &c.masks[maskable].words,
                overlay: self.overlay.as_ref().and_then(|o| o[maskable].as_ref()).map(|l| Overlay {
                    present: &l.present,
                    row_rank: &l.row_rank,
                    values: &l.values,
                }),
            },
            Method::Finetune => LayerWeights::Dense(&c.dense[maskable]),
            Method::Clr | Method::Linear => LayerWeights::Backbone,
        }
    }
    fn norm(&self, bn: usize) -> Option<NormView<'_>> {
        self.task.components.norms.get(bn).map(|n| NormView {
            mean: &n.mean,
            var: &n.var,
            gamma: n.gamma.as_deref(),
            beta: n.beta.as_deref(),
        })
    }
    fn reprograms(&self) -> bool {
        self.task.method == Method::Clr
    }
    fn reprogram(&self, r: usize) -> &[f32] {
        &self.kernels[r]
    }
    fn shift(&self, a: usize) -> &[f32] {
        &self.shifts[a]
    }
    fn head(&self) -> Option<HeadView<'_>> {
        match self.task.method {
            Method::Clr | Method::Linear => self.task.components.head.as_ref().map(|h| HeadView {
                inputs: h.inputs as usize,
                outputs: h.outputs as usize,
                weight: &h.weight,
                bias: &h.bias,
            }),
            _ => None,
        }
    }
    fn folded_posts(&self) -> Option<&[f32]> {
        self.folded.then_some(&self.posts[..])
    }
}

/// Scratch for runs of one session at a fixed maximum batch; one per thread.
#[derive(Debug)]
pub struct Workspace {
    scratch: Vec<f32>,
    batch: usize,
}

impl Workspace {
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Tasks over one backbone.
pub struct Session<'a> {
    bb: &'a Backbone<'a>,
    tasks: Vec<Prepared>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("tasks", &self.tasks.iter().map(|t| &t.task.name).collect::<Vec<_>>()).finish()
    }
}

impl<'a> Session<'a> {
    /// Decodes `files` (any order; dependencies must be among them) for `bb`. The caller has
    /// checked each file's backbone digest.
    pub fn new(bb: &'a Backbone<'a>, files: Vec<TaskFile>) -> Result<Self, SessionError> {
        for (i, f) in files.iter().enumerate() {
            if files[..i].iter().any(|g| g.task.name == f.task.name) {
                return Err(SessionError::DuplicateName(f.task.name.clone()));
            }
        }
        // Chains (dependencies oldest first, then the task) of ExSSNeT tasks, by file index.
        let mut chains: Vec<Option<Vec<usize>>> = Vec::with_capacity(files.len());
        for f in &files {
            chains.push(if f.task.method == Method::Exssnet {
                let mut c = Vec::new();
                for d in &f.task.depends_on {
                    let j = files
                        .iter()
                        .position(|g| &g.digest == d)
                        .ok_or_else(|| SessionError::MissingDependency { task: f.task.name.clone(), digest: *d })?;
                    c.push(j);
                }
                c.push(c.len()); // placeholder for the task itself, fixed below
                Some(c)
            } else {
                None
            });
        }
        for (i, c) in chains.iter_mut().enumerate() {
            if let Some(c) = c {
                *c.last_mut().expect("a chain holds its task") = i;
            }
        }
        // Longest chains first: a chain that is a prefix of a built one shares its overlay.
        let mut order: Vec<usize> = (0..files.len()).filter(|&i| chains[i].is_some()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(chains[i].as_ref().map_or(0, |c| c.len())));
        let mut built: Vec<(Vec<usize>, Merged)> = Vec::new();
        let mut overlays: Vec<Option<Merged>> = (0..files.len()).map(|_| None).collect();
        for &i in &order {
            let chain = chains[i].as_ref().expect("ordered tasks have chains");
            let shared = built.iter().find(|(c, _)| c.starts_with(chain)).map(|(_, o)| o.clone());
            let o = match shared {
                Some(o) => o,
                None => {
                    let tasks: Vec<&Task> = chain.iter().map(|&j| &files[j].task).collect();
                    let o = Arc::new(merge_overlays(bb, &tasks)?);
                    built.push((chain.clone(), o.clone()));
                    o
                }
            };
            overlays[i] = Some(o);
        }
        let mut tasks = Vec::with_capacity(files.len());
        for (f, overlay) in files.into_iter().zip(overlays) {
            check_components(bb, &f.task)?;
            let c = &f.task.components;
            let kernels = c.reprogram.iter().map(|q| q.values(Base::Identity3x3)).collect();
            let shifts = c.shifts.iter().map(|q| q.values(Base::Zero)).collect();
            let mut p =
                Prepared { digest: f.digest, task: f.task, overlay, kernels, shifts, posts: Vec::new(), folded: false };
            bb.check_task(&p).map_err(|fit| SessionError::Fit { task: p.task.name.clone(), fit })?;
            let mut posts = vec![0.0; bb.folded_len(&p)];
            bb.fold_posts(&p, &mut posts);
            p.posts = posts;
            p.folded = true;
            tasks.push(p);
        }
        Ok(Session { bb, tasks })
    }

    pub fn backbone(&self) -> &'a Backbone<'a> {
        self.bb
    }

    pub fn tasks(&self) -> &[Prepared] {
        &self.tasks
    }

    /// The index of the task named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.tasks.iter().position(|t| t.task.name == name)
    }

    /// Scratch for runs of up to `batch` samples of any task of this session.
    pub fn workspace(&self, k: &Kernels, batch: usize) -> Workspace {
        let plain = self.bb.scratch_len(k, batch);
        let most = self.tasks.iter().map(|t| self.bb.scratch_len_for(k, batch, t)).fold(plain, usize::max);
        Workspace { scratch: vec![0.0; most], batch }
    }

    /// Logits of task `task` for `batch` samples of `x` (normalised NCHW): `batch ×` the
    /// task's output width, of which the first `classes()` are the task's classes. Allocates
    /// nothing.
    ///
    /// # Panics
    /// If `task` is out of range, `batch` exceeds the workspace's, or `x` has the wrong length.
    pub fn run<'w>(&self, k: &Kernels, task: usize, x: &[f32], batch: usize, ws: &'w mut Workspace) -> &'w [f32] {
        assert!(batch <= ws.batch, "batch {batch} exceeds the workspace's {}", ws.batch);
        self.bb.forward_task(k, &self.tasks[task], x, batch, &mut ws.scratch)
    }

    /// Output floats per sample of task `task`.
    pub fn output_len(&self, task: usize) -> usize {
        self.bb.output_len_for(&self.tasks[task])
    }
}

/// Components a method must have, beyond the sizes [`Backbone::check_task`] checks.
fn check_components(bb: &Backbone, t: &Task) -> Result<(), SessionError> {
    let c = &t.components;
    let bad = |what: &str| Err(SessionError::Components { task: t.name.clone(), what: what.to_string() });
    let maskable = bb.layers().iter().filter(|l| l.op.is_matmul()).count();
    let norms = bb.layers().iter().filter(|l| matches!(l.op, crate::format::graph::Op::BatchNorm(_))).count();
    if !c.norms.is_empty() && c.norms.len() != norms {
        return bad(&format!("{} norm states for {} batch norms", c.norms.len(), norms));
    }
    match t.method {
        Method::Supsup | Method::Exssnet if c.masks.len() != maskable => {
            bad(&format!("{} masks for {} maskable layers", c.masks.len(), maskable))
        }
        Method::Supsup | Method::Exssnet => {
            if c.masks.iter().any(|m| m.bits().is_none()) {
                return bad("a mask's length does not match its words");
            }
            let layers = (0..bb.layers().len()).filter(|&i| bb.layers()[i].op.is_matmul());
            if let Some((l, _)) = layers.enumerate().find(|&(l, i)| c.masks[l].len != bb.maskable(i) as u64) {
                return bad(&format!("the mask of maskable layer {l} does not cover its weights"));
            }
            Ok(())
        }
        Method::Finetune if c.dense.len() != maskable => bad("dense weights missing for some layers"),
        Method::Clr => {
            let reprogrammed = (0..bb.layers().len()).filter(|&i| bb.is_reprogrammed(i)).count();
            let shifts = (0..bb.layers().len()).filter(|&i| bb.is_reprogrammed(i) && !bb.norm_follows(i)).count();
            if c.reprogram.len() != reprogrammed || c.shifts.len() != shifts {
                return bad("reprogramming kernels or shifts do not match the backbone's convs");
            }
            if c.head.is_none() {
                return bad("no head");
            }
            Ok(())
        }
        Method::Linear if c.head.is_none() => bad("no head"),
        _ => Ok(()),
    }?;
    let outputs = match t.method {
        Method::Clr | Method::Linear => c.head.as_ref().map_or(0, |h| h.outputs as usize),
        _ => bb.output_shape().len(),
    };
    if t.classes() == 0 || t.classes() > outputs {
        return bad(&format!("{} classes but {outputs} outputs", t.classes()));
    }
    Ok(())
}

/// The merged overlay of an ExSSNeT chain (oldest first): per maskable layer, the weights
/// some task of the chain trained, with their values.
fn merge_overlays(bb: &Backbone, chain: &[&Task]) -> Result<Vec<Option<LayerOverlay>>, SessionError> {
    let layers: Vec<usize> = (0..bb.layers().len()).filter(|&i| bb.layers()[i].op.is_matmul()).collect();
    let mut out = Vec::with_capacity(layers.len());
    for (l, &li) in layers.iter().enumerate() {
        let n = bb.maskable(li);
        let rows = bb.output_channels(li).max(1);
        let mut union: BitVec<u32, Lsb0> = BitVec::repeat(false, n);
        let mut present: BitVec<u32, Lsb0> = BitVec::repeat(false, n);
        let mut dense: Vec<f32> = Vec::new();
        for t in chain {
            let bad = |what: String| SessionError::Components { task: t.name.clone(), what };
            let mask: &BitSlice<u32, Lsb0> = t
                .components
                .masks
                .get(l)
                .and_then(|m| m.bits())
                .filter(|b| b.len() == n)
                .ok_or_else(|| bad(format!("the mask of maskable layer {l} is not {n} bits")))?;
            if let Some(values) = t.components.overlay.get(l).filter(|v| !v.is_empty()) {
                if dense.is_empty() {
                    dense = vec![0.0; n];
                }
                let mut it = values.iter();
                for i in mask.iter_ones().filter(|&i| !union[i]) {
                    dense[i] = *it.next().ok_or_else(|| bad(format!("the overlay of maskable layer {l} is short")))?;
                    present.set(i, true);
                }
                if it.next().is_some() {
                    return Err(bad(format!("the overlay of maskable layer {l} is too long (wrong dependencies?)")));
                }
            }
            union |= mask;
        }
        if dense.is_empty() {
            out.push(None);
            continue;
        }
        let row = n / rows;
        let mut row_rank = Vec::with_capacity(rows);
        let mut rank = 0u32;
        for r in 0..rows {
            row_rank.push(rank);
            rank += present[r * row..(r + 1) * row].count_ones() as u32;
        }
        let values = present.iter_ones().map(|i| dense[i]).collect();
        out.push(Some(LayerOverlay { present: present.into_vec(), row_rank, values }));
    }
    Ok(out)
}
