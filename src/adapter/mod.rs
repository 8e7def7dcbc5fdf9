//! (alloc) What one task adds to the backbone (DESIGN §5), in owned form: the components a
//! method trains and the task's description. `format::task` turns it into bytes and back;
//! `train` produces it; evaluation and sessions consume it.
//!
//! Per-layer lists follow the backbone's layer order: `masks` and `overlay` have one entry per
//! maskable layer (conv and linear), `norms` one per batch-norm layer, `reprogram` one per conv
//! with a kernel larger than 1×1, `affines` one per reprogrammed conv that no batch norm
//! follows (the backbone had it folded).

use alloc::string::String;
use alloc::vec::Vec;
use bitvec::prelude::{BitSlice, BitVec, Lsb0};
use serde::{Deserialize, Serialize};

/// How a task was learned (defined beside the no_std reader of task files).
pub use crate::format::task_view::Method;

/// A binary mask over one layer's weights, 1 bit per weight in the weight order, in 32-bit
/// words (bit `i` is bit `i % 32` of word `i / 32`), which every target has natively.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Mask {
    pub len: u64,
    pub words: Vec<u32>,
}

impl Mask {
    pub fn from_bits(bits: &BitSlice<u32, Lsb0>) -> Self {
        let bv: BitVec<u32, Lsb0> = bits.to_bitvec();
        Mask { len: bits.len() as u64, words: bv.into_vec() }
    }
    /// The bits, or `None` when `words` cannot hold `len` bits.
    pub fn bits(&self) -> Option<&BitSlice<u32, Lsb0>> {
        let len = usize::try_from(self.len).ok()?;
        let bits = BitSlice::<u32, Lsb0>::from_slice(&self.words);
        (self.words.len() == len.div_ceil(32)).then(|| &bits[..len])
    }
    pub fn count_ones(&self) -> usize {
        self.bits().map_or(0, |b| b.count_ones())
    }
}

/// Running statistics and, for affine norms, the task's γ and β of one batch-norm layer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct NormState {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub gamma: Option<Vec<f32>>,
    pub beta: Option<Vec<f32>>,
}

/// A dense classifier `y = W x + b`, `W` is `[outputs][inputs]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Head {
    pub inputs: u32,
    pub outputs: u32,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Per-channel `y = x·γ + β`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Affine {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// The task state proper. Empty lists mean "component absent".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Components {
    pub masks: Vec<Mask>,
    /// ExSSNeT: per maskable layer, the trained values of the task's exclusive weights in the
    /// order of the set bits of `mask AND NOT union(masks of the tasks it depends on)`.
    pub overlay: Vec<Vec<f32>>,
    /// CLR: per conv with kernel > 1, `[channels][3][3]`.
    pub reprogram: Vec<Vec<f32>>,
    pub norms: Vec<NormState>,
    pub affines: Vec<Affine>,
    pub head: Option<Head>,
    /// Finetune (evaluation only): the dense weights of every maskable layer.
    pub dense: Vec<Vec<f32>>,
}

/// One learned task.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Task {
    pub name: String,
    /// One name per class, in label order; the task's logits are the first `labels.len()`.
    pub labels: Vec<String>,
    pub method: Method,
    pub components: Components,
    /// Digests of the tasks whose masks and overlays this one relies on, oldest first.
    pub depends_on: Vec<[u8; 32]>,
    /// Training configuration as the user gave it (JSON text, for provenance).
    pub config: String,
    /// Measurements at the end of training, e.g. ("train_accuracy", 0.97).
    pub metrics: Vec<(String, f64)>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Starts at 1; a task re-learned or shipped under the same name must have a higher one
    /// to replace it (stores refuse downgrades).
    pub version: u32,
}

impl Task {
    pub fn classes(&self) -> usize {
        self.labels.len()
    }
}
