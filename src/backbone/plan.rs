//! The execution plan: which layers fuse, where every value lives, how much scratch a forward
//! pass needs. Built once at open; the forward pass only follows it.
//!
//! Fusions (each only when the intermediate value has no other reader):
//! conv/linear → batch-norm → relu/relu6, a lone batch-norm → relu/relu6, add → relu/relu6.
//! Flatten is a view: its output shares its input's buffer. Buffers are slots in one arena,
//! reused once every reader of their value has run (greedy best fit); a slot is never both
//! read and written by the same step.

use super::{push, Seq, Shape};
use crate::format::graph::{Layer, Op};
use crate::format::FormatError;
use crate::kernels::Act;

/// Where a value lives during a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// The caller's input.
    Input,
    /// Arena slot `n`.
    Slot(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Conv or linear layer `layer`, with an optional fused batch-norm layer.
    Matmul {
        bn: Option<u32>,
    },
    /// A batch norm that follows no conv: per-channel affine.
    Norm,
    /// A lone ReLU / ReLU6.
    Act,
    Add,
    MaxPool,
    AvgPool,
    GlobalAvgPool,
}

/// One step of the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub kind: StepKind,
    /// The layer whose op this step runs (the first layer of a fused group).
    pub layer: u32,
    /// Value read (and, for add, the second one).
    pub input: u32,
    pub other: u32,
    /// Value written (the last layer of a fused group).
    pub output: u32,
    pub act: Act,
    pub in_loc: Loc,
    pub other_loc: Loc,
    pub out_loc: Loc,
}

/// The plan: steps in order, and the arena layout per sample.
#[derive(Debug)]
pub struct Plan {
    pub steps: Seq<Step>,
    /// Offset (per sample, in floats) and capacity of each slot.
    slot_off: Seq<usize>,
    slot_cap: Seq<usize>,
    /// Location of every value that is materialised.
    value_loc: Seq<Loc>,
    /// Arena floats per sample.
    pub arena_per_sample: usize,
    /// Largest channel count a post-op needs.
    pub max_channels: usize,
}

const NEVER: usize = usize::MAX;

impl Plan {
    pub(super) fn build(layers: &[Layer], shapes: &[Shape]) -> Result<Plan, FormatError> {
        let nv = shapes.len();
        // Readers per value and the last step index (= layer index) reading it.
        let mut readers: Seq<u32> = Seq::new();
        let mut last_use: Seq<usize> = Seq::new();
        for _ in 0..nv {
            push(&mut readers, 0)?;
            push(&mut last_use, 0)?;
        }
        for (i, l) in layers.iter().enumerate() {
            let mut read = |v: u32| {
                readers[v as usize] += 1;
                last_use[v as usize] = i;
            };
            read(l.input);
            if let Op::Add { other } = l.op {
                read(other);
            }
        }
        last_use[nv - 1] = NEVER; // the output is read by the caller
        let only_reader_is_next = |v: usize, next: usize| {
            readers[v] == 1
                && next < layers.len()
                && layers[next].input as usize == v
                && !matches!(layers[next].op, Op::Add { .. })
        };
        let act_of = |op: &Op| match op {
            Op::Relu => Some(Act::Relu),
            Op::Relu6 => Some(Act::Relu6),
            _ => None,
        };

        let mut steps: Seq<Step> = Seq::new();
        let mut value_loc: Seq<Loc> = Seq::new();
        push(&mut value_loc, Loc::Input)?;
        for _ in 1..nv {
            push(&mut value_loc, Loc::Input)?; // placeholder until the value is produced
        }
        let mut slot_cap: Seq<usize> = Seq::new();
        let mut slot_end: Seq<usize> = Seq::new(); // last step reading the slot's occupant
        let mut max_channels = 1;

        let mut i = 0;
        while i < layers.len() {
            let l = &layers[i];
            let (kind, mut last) = match &l.op {
                Op::Conv2d(_) | Op::Linear(_) => {
                    let bn = match layers.get(i + 1) {
                        Some(n) if matches!(n.op, Op::BatchNorm(_)) && only_reader_is_next(i + 1, i + 1) => {
                            Some(i as u32 + 1)
                        }
                        _ => None,
                    };
                    (StepKind::Matmul { bn }, i + bn.map_or(0, |_| 1))
                }
                Op::BatchNorm(_) => (StepKind::Norm, i),
                Op::Relu | Op::Relu6 => (StepKind::Act, i),
                Op::Add { .. } => (StepKind::Add, i),
                Op::MaxPool(_) => (StepKind::MaxPool, i),
                Op::AvgPool(_) => (StepKind::AvgPool, i),
                Op::GlobalAvgPool => (StepKind::GlobalAvgPool, i),
                Op::Flatten => {
                    // A view: same buffer, extended lifetime.
                    let loc = value_loc[l.input as usize];
                    value_loc[i + 1] = loc;
                    if let Loc::Slot(s) = loc {
                        let s = s as usize;
                        slot_end[s] = slot_end[s].max(last_use[i + 1]);
                    }
                    i += 1;
                    continue;
                }
            };
            let mut act = match &l.op {
                Op::Relu => Act::Relu,
                Op::Relu6 => Act::Relu6,
                _ => Act::None,
            };
            if act == Act::None && kind != StepKind::Act {
                if let Some(a) = layers.get(last + 1).and_then(|n| act_of(&n.op)) {
                    if only_reader_is_next(last + 1, last + 1) {
                        act = a;
                        last += 1;
                    }
                }
            }
            let out_v = last + 1;
            let need = shapes[out_v].len();
            max_channels = max_channels.max(shapes[out_v].c);
            // Best-fit free slot: its occupant's last reader ran before this step.
            let free = |s: usize| slot_end[s] < i;
            let mut best: Option<usize> = None;
            for s in 0..slot_cap.len() {
                if !free(s) {
                    continue;
                }
                best = match best {
                    None => Some(s),
                    Some(b) => {
                        let (cb, cs) = (slot_cap[b], slot_cap[s]);
                        let better = if cs >= need { cb < need || cs < cb } else { cb < need && cs > cb };
                        Some(if better { s } else { b })
                    }
                };
            }
            let slot = match best {
                Some(s) => {
                    slot_cap[s] = slot_cap[s].max(need);
                    slot_end[s] = last_use[out_v];
                    s
                }
                None => {
                    push(&mut slot_cap, need)?;
                    push(&mut slot_end, last_use[out_v])?;
                    slot_cap.len() - 1
                }
            };
            if slot > u16::MAX as usize {
                return Err(FormatError::TooLarge { layer: i as u32, what: "number of live buffers" });
            }
            value_loc[out_v] = Loc::Slot(slot as u16);
            let other = match l.op {
                Op::Add { other } => other,
                _ => 0,
            };
            push(
                &mut steps,
                Step {
                    kind,
                    layer: i as u32,
                    input: l.input,
                    other,
                    output: out_v as u32,
                    act,
                    in_loc: value_loc[l.input as usize],
                    other_loc: value_loc[other as usize],
                    out_loc: Loc::Slot(slot as u16),
                },
            )?;
            i = last + 1;
        }
        // The graph output must be materialised (a graph ending in a flatten of the input is not).
        if value_loc[nv - 1] == Loc::Input {
            return Err(FormatError::ShapeMismatch {
                layer: layers.len() as u32 - 1,
                what: "the graph computes nothing",
            });
        }
        let mut slot_off: Seq<usize> = Seq::new();
        let mut total: usize = 0;
        for &c in slot_cap.iter() {
            push(&mut slot_off, total)?;
            total = total.checked_add(c).ok_or(FormatError::TooLarge { layer: 0, what: "activation memory" })?;
        }
        Ok(Plan { steps, slot_off, slot_cap, value_loc, arena_per_sample: total, max_channels })
    }

    /// Arena range of slot `s` for a batch.
    pub fn slot_range(&self, s: u16, batch: usize) -> core::ops::Range<usize> {
        let s = s as usize;
        self.slot_off[s] * batch..(self.slot_off[s] + self.slot_cap[s]) * batch
    }

    /// Where value `v` lives, if it is materialised.
    pub fn value_loc(&self, v: u32) -> Loc {
        self.value_loc[v as usize]
    }
}
