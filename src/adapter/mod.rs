//! (alloc) What one task adds to the backbone (DESIGN §5), in owned form: the components a
//! method trains and the task's description. `format::task` turns it into bytes and back;
//! `train` produces it; evaluation and sessions consume it.
//!
//! Per-layer lists follow the backbone's layer order: `masks` and `overlay` have one entry per
//! maskable layer (conv and linear), `norms` one per batch-norm layer, `reprogram` one per conv
//! with a kernel larger than 1×1, `shifts` one per reprogrammed conv that no batch norm
//! follows (the backbone had it folded).

use alloc::string::String;
use alloc::vec::Vec;
use bitvec::prelude::{BitSlice, BitVec, Lsb0};
use serde::{Deserialize, Serialize};

/// What quantised values are steps from (defined beside the no_std reader).
pub use crate::format::task_view::Base;
/// How a task was learned (defined beside the no_std reader of task files).
pub use crate::format::task_view::{Method, Softmax};

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

/// One layer's values as int8 steps of one scale from a [`Base`]:
/// `value[i] = base(i) + scale · steps[i]` (`task_view::dequantize`).
///
/// CLR stores its kernels and shifts this way: in f32 they cost as much as a depthwise
/// backbone's own depthwise weights (EfficientNet-Lite0: 324 KB of kernels per task, 10 % of
/// the backbone). Steps are taken from where training started, so the error (at most
/// `scale / 2` per value, `scale = max |value − base| / 127`) is relative to how far the
/// task moved, not to the value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Quantized {
    pub scale: f32,
    pub steps: Vec<i8>,
}

impl Quantized {
    /// Rounds `values` to the nearest steps from `base`, with the smallest scale that
    /// reaches the farthest value. Non-finite values are a caller's bug (training stops on a
    /// non-finite loss before it saves anything).
    pub fn quantize(values: &[f32], base: Base) -> Self {
        let far = values.iter().enumerate().map(|(i, &v)| (v - base.at(i)).abs()).fold(0.0f32, f32::max);
        if far == 0.0 || !far.is_finite() {
            return Quantized { scale: 0.0, steps: alloc::vec![0; values.len()] };
        }
        let scale = far / 127.0;
        let steps = values
            .iter()
            .enumerate()
            .map(|(i, &v)| libm::roundf((v - base.at(i)) / scale).clamp(-127.0, 127.0) as i8)
            .collect();
        Quantized { scale, steps }
    }
    /// The values the steps stand for.
    pub fn values(&self, base: Base) -> Vec<f32> {
        let d = crate::format::task_view::dequantize;
        self.steps.iter().enumerate().map(|(i, &s)| d(base, self.scale, i, s)).collect()
    }
    pub fn len(&self) -> usize {
        self.steps.len()
    }
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// The task state proper. Empty lists mean "component absent".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Components {
    pub masks: Vec<Mask>,
    /// ExSSNeT: per maskable layer, the trained values of the task's exclusive weights in the
    /// order of the set bits of `mask AND NOT union(masks of the tasks it depends on)`.
    pub overlay: Vec<Vec<f32>>,
    /// CLR: per conv with kernel > 1, the `[channels][3][3]` kernels, steps from
    /// [`Base::Identity3x3`]. Where a shift follows, its per-channel scale γ is folded in.
    pub reprogram: Vec<Quantized>,
    pub norms: Vec<NormState>,
    /// CLR: per reprogrammed conv that no batch norm follows, the per-channel shift β added
    /// after the reprogramming, steps from [`Base::Zero`].
    pub shifts: Vec<Quantized>,
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
    /// Which outputs training's softmax spanned (format version 3; the last field, so a
    /// version 2 payload is this one without it).
    pub softmax: Softmax,
}

impl Task {
    pub fn classes(&self) -> usize {
        self.labels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn quantized_values_are_within_half_a_step_and_the_base_is_exact() {
        let mut r = SplitMix64::new(4);
        for (base, spread) in [(Base::Identity3x3, 0.3), (Base::Zero, 2.0), (Base::Identity3x3, 1e-6)] {
            let v: Vec<f32> = (0..9 * 7).map(|i| base.at(i) + r.uniform(-spread, spread)).collect();
            let q = Quantized::quantize(&v, base);
            let far = v.iter().enumerate().map(|(i, x)| (x - base.at(i)).abs()).fold(0.0, f32::max);
            assert!(q.steps.iter().any(|s| s.abs() == 127), "the farthest value uses the whole range");
            for (i, (a, b)) in v.iter().zip(q.values(base)).enumerate() {
                // Half a step, plus the f32 rounding of the subtraction and the product.
                assert!((a - b).abs() <= q.scale * 0.5 + 2.0 * f32::EPSILON * (1.0 + far), "{i}: {a} vs {b}");
            }
        }
        // Where training left a layer as it started, it decodes to exactly that.
        let id: Vec<f32> = (0..27).map(|i| Base::Identity3x3.at(i)).collect();
        let q = Quantized::quantize(&id, Base::Identity3x3);
        assert_eq!((q.scale, q.steps.iter().all(|&s| s == 0)), (0.0, true));
        assert_eq!(q.values(Base::Identity3x3), id);
        assert_eq!(Quantized::quantize(&[], Base::Zero), Quantized::default());
        // Decoding what was decoded gives the same steps back: a re-saved task keeps its bytes.
        let v: Vec<f32> = (0..50).map(|_| r.uniform(-1.0, 1.0)).collect();
        let q = Quantized::quantize(&v, Base::Zero);
        assert_eq!(Quantized::quantize(&q.values(Base::Zero), Base::Zero).steps, q.steps);
    }
}
