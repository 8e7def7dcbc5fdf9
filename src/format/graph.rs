//! The typed graph of a backbone file: what the postcard-encoded graph section holds.
//!
//! Every record here is plain data (`Copy`, no heap), so the same types decode on a
//! microcontroller without an allocator. Names are borrowed from the file bytes.
//! Nothing here is validated: [`super::ecb`] checks every field before anything else sees it.

use serde::{Deserialize, Serialize};

/// How the weights of conv and linear layers are stored in the data section. Each layer says
/// for itself: a layer with a scale tensor holds int8, one without holds f32.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Symmetric per-output-channel int8 (`w = scale[o] * q`, `q` in [-127, 127]) for the bulk
    /// of the weights; the importer keeps a few small, quantisation-sensitive layers in f32
    /// (see `import::keeps_f32`).
    I8,
    /// Plain f32 everywhere, for exact comparisons with a float model (`--weights f32`).
    F32,
}

/// Largest number of input channels that can carry a normalisation (RGB + alpha).
pub const MAX_NORM_CHANNELS: usize = 4;

/// Input description: per-sample shape and the normalisation `(x - mean[c]) / std[c]`
/// that turns pixels in [0, 1] into what the network expects.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct InputSpec {
    pub channels: u32,
    pub height: u32,
    pub width: u32,
    /// Only the first `channels` entries are meaningful; the rest are 0 (mean) and 1 (std).
    pub mean: [f32; MAX_NORM_CHANNELS],
    pub std: [f32; MAX_NORM_CHANNELS],
}

impl InputSpec {
    /// An input with the identity normalisation.
    pub const fn plain(channels: u32, height: u32, width: u32) -> Self {
        InputSpec { channels, height, width, mean: [0.0; 4], std: [1.0; 4] }
    }
}

/// Where the graph came from; shown by `inspect`, never interpreted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Provenance<'a> {
    /// A short model name, e.g. `lenet` or `efficientnet-lite0`.
    pub name: &'a str,
    /// Free-form origin, e.g. `init --arch lenet` or the ONNX file's name.
    pub source: &'a str,
    /// The RNG seed of a random (`init`) backbone.
    pub seed: Option<u64>,
}

/// First record of the graph section.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct GraphHeader<'a> {
    #[serde(borrow)]
    pub provenance: Provenance<'a>,
    pub input: InputSpec,
    pub weights: WeightFormat,
    /// Number of [`Layer`] records that follow.
    pub layer_count: u32,
}

/// A byte range of the data section. `offset` is relative to the section's start.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TensorRef {
    pub offset: u64,
    pub len: u64,
}

/// A value the layers read: `0` is the graph input, `i + 1` the output of layer `i`.
pub type ValueId = u32;

/// 2-D convolution, NCHW, weights `[out][in/groups][kh][kw]`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Conv2d {
    pub in_channels: u32,
    pub out_channels: u32,
    /// (kh, kw)
    pub kernel: [u32; 2],
    /// (sh, sw)
    pub stride: [u32; 2],
    /// (top, left, bottom, right)
    pub pad: [u32; 4],
    /// (dh, dw)
    pub dilation: [u32; 2],
    pub groups: u32,
    pub weight: TensorRef,
    /// One f32 per output channel; present exactly when the weights are int8.
    pub scale: Option<TensorRef>,
    pub bias: Option<TensorRef>,
}

/// Fully connected layer on a flat input: `y = W x + b`, `W` is `[out][in]`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Linear {
    pub in_features: u32,
    pub out_features: u32,
    pub weight: TensorRef,
    pub scale: Option<TensorRef>,
    pub bias: Option<TensorRef>,
}

/// Batch normalisation with running statistics: `y = (x - mean) / sqrt(var + eps) * g + b`.
/// Without `gamma`/`beta` it is SupSup's non-affine norm (`g = 1`, `b = 0`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    pub channels: u32,
    pub eps: f32,
    pub mean: TensorRef,
    pub var: TensorRef,
    pub gamma: Option<TensorRef>,
    pub beta: Option<TensorRef>,
}

/// Max or average pooling window.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    pub kernel: [u32; 2],
    pub stride: [u32; 2],
    /// (top, left, bottom, right)
    pub pad: [u32; 4],
    /// Average pooling only: divide by the whole window (true) or by its part inside the
    /// input (false, ONNX's default).
    pub count_include_pad: bool,
}

/// What a layer computes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Conv2d(Conv2d),
    Linear(Linear),
    BatchNorm(BatchNorm),
    Relu,
    Relu6,
    /// Element-wise sum of the layer's input and `other`.
    Add {
        other: ValueId,
    },
    MaxPool(Pool),
    AvgPool(Pool),
    GlobalAvgPool,
    /// `(C, H, W) -> (C*H*W, 1, 1)`; free in NCHW.
    Flatten,
}

/// One layer: an op and the value it reads.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Layer {
    pub input: ValueId,
    pub op: Op,
}

impl Op {
    /// Conv and linear layers: the ones with a weight matrix (maskable).
    pub fn is_matmul(&self) -> bool {
        matches!(self, Op::Conv2d(_) | Op::Linear(_))
    }

    /// The op's name as `inspect` prints it.
    pub const fn name(&self) -> &'static str {
        match self {
            Op::Conv2d(c) if c.groups > 1 && c.groups == c.in_channels => "depthwise",
            Op::Conv2d(_) => "conv2d",
            Op::Linear(_) => "linear",
            Op::BatchNorm(_) => "batchnorm",
            Op::Relu => "relu",
            Op::Relu6 => "relu6",
            Op::Add { .. } => "add",
            Op::MaxPool(_) => "maxpool",
            Op::AvgPool(_) => "avgpool",
            Op::GlobalAvgPool => "global-avgpool",
            Op::Flatten => "flatten",
        }
    }
}
