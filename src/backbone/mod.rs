//! The validated backbone: a zero-copy view of an `.ecb` file plus its execution plan.
//!
//! [`Backbone::open`] decodes and checks every layer, infers every value's shape, and plans
//! the forward pass (fusions, buffer slots, scratch sizes) once. Weights are never copied:
//! they stay in the mapped file (or in flash) and are dequantised while kernels pack them.
//! After `open`, [`Backbone::forward`] cannot fail; it panics only if the caller passes
//! buffers of the wrong size, which is a programming error.

pub mod fixed;
mod forward;
#[cfg(feature = "std")]
pub mod mmap;
mod plan;
pub mod task;

pub use plan::{Loc, Plan, Step, StepKind};

use crate::format::ecb::EcbView;
use crate::format::graph::{InputSpec, Layer, Op, TensorRef};
use crate::format::{Digest, FormatError};
use crate::kernels::{ConvShape, Weights};

/// Growable storage for per-layer records: a `Vec` with an allocator, a fixed-capacity
/// `heapless::Vec` without one.
#[cfg(feature = "alloc")]
pub type Seq<T> = alloc::vec::Vec<T>;
#[cfg(not(feature = "alloc"))]
pub type Seq<T> = heapless::Vec<T, MAX_LAYERS>;

/// Most layers a backbone may have on a build without an allocator.
#[cfg(not(feature = "alloc"))]
pub const MAX_LAYERS: usize = 128;

pub(crate) fn push<T>(s: &mut Seq<T>, x: T) -> Result<(), FormatError> {
    #[cfg(feature = "alloc")]
    {
        s.push(x);
        Ok(())
    }
    #[cfg(not(feature = "alloc"))]
    {
        s.push(x).map_err(|_| FormatError::TooManyLayers { count: MAX_LAYERS as u32 + 1, max: MAX_LAYERS as u32 })
    }
}

/// Largest number of elements of one value (per sample) that a backbone may produce.
pub const MAX_VALUE_ELEMS: usize = 1 << 28;
/// Largest input height or width.
pub const MAX_SIDE: u32 = 1 << 15;

/// Per-sample shape of a value, NCHW without the N. Flat values are `(features, 1, 1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub const fn len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub const fn plane(&self) -> usize {
        self.h * self.w
    }
}

impl core::fmt::Display for Shape {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.h == 1 && self.w == 1 {
            write!(f, "{}", self.c)
        } else {
            write!(f, "{}x{}x{}", self.c, self.h, self.w)
        }
    }
}

/// A validated backbone over borrowed bytes.
#[derive(Debug)]
pub struct Backbone<'a> {
    view: EcbView<'a>,
    layers: Seq<Layer>,
    /// Shape of every value: index 0 is the input, `i + 1` the output of layer `i`.
    shapes: Seq<Shape>,
    plan: Plan,
}

impl<'a> Backbone<'a> {
    /// Parses and validates `bytes` (structure, every layer, every shape) and plans the forward
    /// pass. Does not hash the body: see [`Self::verify`].
    pub fn open(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let view = EcbView::parse(bytes)?;
        let input = view.graph.input;
        if input.channels == 0 || input.height == 0 || input.width == 0 {
            return Err(FormatError::BadParam { layer: 0, what: "input shape has a zero dimension" });
        }
        if input.height > MAX_SIDE || input.width > MAX_SIDE || input.channels > MAX_SIDE {
            return Err(FormatError::TooLarge { layer: 0, what: "input shape" });
        }
        let in_shape = Shape { c: input.channels as usize, h: input.height as usize, w: input.width as usize };
        if in_shape.len() > MAX_VALUE_ELEMS {
            return Err(FormatError::TooLarge { layer: 0, what: "input shape" });
        }
        let mut layers = Seq::new();
        let mut shapes = Seq::new();
        push(&mut shapes, in_shape)?;
        for (i, layer) in view.layers().enumerate() {
            let layer = layer?;
            let out = infer_shape(i as u32, &layer, &shapes)?;
            push(&mut layers, layer)?;
            push(&mut shapes, out)?;
        }
        let plan = Plan::build(&layers, &shapes)?;
        Ok(Backbone { view, layers, shapes, plan })
    }

    pub fn view(&self) -> &EcbView<'a> {
        &self.view
    }
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
    /// Shape of value `v` (0 = input, `i + 1` = output of layer `i`).
    pub fn shape(&self, v: u32) -> Shape {
        self.shapes[v as usize]
    }
    pub fn input(&self) -> &InputSpec {
        &self.view.graph.input
    }
    pub fn input_shape(&self) -> Shape {
        self.shapes[0]
    }
    pub fn output_shape(&self) -> Shape {
        self.shapes[self.shapes.len() - 1]
    }
    pub fn digest(&self) -> Digest {
        self.view.header.digest
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    /// Recomputes the body's SHA-256 and compares it with the header (reads the whole file).
    pub fn verify(&self) -> Result<(), FormatError> {
        self.view.verify()
    }

    /// The weights of a conv or linear layer, as the kernels take them.
    pub fn weights(&self, w: TensorRef, scale: Option<TensorRef>) -> Weights<'a> {
        match scale {
            Some(s) => Weights::I8 { q: self.view.i8s(w), scale: self.view.f32s(s) },
            None => Weights::F32(self.view.f32s(w)),
        }
    }

    /// The dequantised weights of conv or linear layer `i`.
    #[cfg(feature = "alloc")]
    pub fn weights_of(&self, i: usize) -> Option<alloc::vec::Vec<f32>> {
        let w = match &self.layers[i].op {
            Op::Conv2d(c) => self.weights(c.weight, c.scale),
            Op::Linear(l) => self.weights(l.weight, l.scale),
            _ => return None,
        };
        Some((0..w.len()).map(|j| w.get(j / (w.len() / self.output_channels(i).max(1)).max(1), j)).collect())
    }

    /// Output channels (rows of the weight matrix) of conv or linear layer `i`, else 0.
    pub fn output_channels(&self, i: usize) -> usize {
        match &self.layers[i].op {
            Op::Conv2d(c) => c.out_channels as usize,
            Op::Linear(l) => l.out_features as usize,
            _ => 0,
        }
    }

    /// The conv geometry of layer `i` (which must be a conv).
    pub fn conv_shape(&self, i: usize) -> Option<ConvShape> {
        match &self.layers[i].op {
            Op::Conv2d(c) => Some(conv_shape(c, self.shapes[self.layers[i].input as usize])),
            _ => None,
        }
    }

    /// Parameter count of layer `i` (weights, biases, norm records; not the int8 scales).
    pub fn layer_params(&self, i: usize) -> usize {
        let n = |t: Option<TensorRef>| t.map_or(0, |t| (t.len / 4) as usize);
        self.maskable(i)
            + match &self.layers[i].op {
                Op::Conv2d(c) => n(c.bias),
                Op::Linear(l) => n(l.bias),
                Op::BatchNorm(b) => n(Some(b.mean)) + n(Some(b.var)) + n(b.gamma) + n(b.beta),
                _ => 0,
            }
    }

    /// Weights a supermask may select in layer `i` (conv and linear weights). Each layer
    /// stores int8 (with a scale) or f32 (without).
    pub fn maskable(&self, i: usize) -> usize {
        let count = |w: TensorRef, scale: Option<TensorRef>| (w.len / if scale.is_some() { 1 } else { 4 }) as usize;
        match &self.layers[i].op {
            Op::Conv2d(c) => count(c.weight, c.scale),
            Op::Linear(l) => count(l.weight, l.scale),
            _ => 0,
        }
    }

    /// Bytes layer `i` occupies in the data section.
    pub fn layer_bytes(&self, i: usize) -> u64 {
        let t = |t: Option<TensorRef>| t.map_or(0, |t| t.len);
        match &self.layers[i].op {
            Op::Conv2d(c) => c.weight.len + t(c.scale) + t(c.bias),
            Op::Linear(l) => l.weight.len + t(l.scale) + t(l.bias),
            Op::BatchNorm(b) => b.mean.len + b.var.len + t(b.gamma) + t(b.beta),
            _ => 0,
        }
    }

    /// Multiply-accumulates per sample of layer `i`.
    pub fn layer_macs(&self, i: usize) -> usize {
        match &self.layers[i].op {
            Op::Conv2d(_) => self.conv_shape(i).map_or(0, |s| s.macs()),
            Op::Linear(l) => l.in_features as usize * l.out_features as usize,
            _ => 0,
        }
    }
}

pub(crate) fn conv_shape(c: &crate::format::graph::Conv2d, x: Shape) -> ConvShape {
    let u = |v: u32| v as usize;
    ConvShape {
        c_in: x.c,
        h: x.h,
        w: x.w,
        c_out: u(c.out_channels),
        kh: u(c.kernel[0]),
        kw: u(c.kernel[1]),
        sh: u(c.stride[0]),
        sw: u(c.stride[1]),
        pad: c.pad.map(u),
        dh: u(c.dilation[0]),
        dw: u(c.dilation[1]),
        groups: u(c.groups),
    }
}

pub fn pool_shape(p: &crate::format::graph::Pool, x: Shape) -> crate::kernels::reference::PoolShape {
    let u = |v: u32| v as usize;
    crate::kernels::reference::PoolShape {
        c: x.c,
        h: x.h,
        w: x.w,
        kh: u(p.kernel[0]),
        kw: u(p.kernel[1]),
        sh: u(p.stride[0]),
        sw: u(p.stride[1]),
        pad: p.pad.map(u),
        count_include_pad: p.count_include_pad,
    }
}

/// Output shape of layer `i`, or why its input does not fit it.
fn infer_shape(i: u32, layer: &Layer, shapes: &[Shape]) -> Result<Shape, FormatError> {
    let x = shapes[layer.input as usize];
    let mismatch = |what| FormatError::ShapeMismatch { layer: i, what };
    // Kernel extents and paddings are bounded so that no index arithmetic can overflow.
    let small = |v: u32| v <= MAX_SIDE;
    let out = match &layer.op {
        Op::Conv2d(c) => {
            if c.in_channels as usize != x.c {
                return Err(mismatch("conv input channels differ from the incoming value"));
            }
            if !(c.kernel.iter().chain(&c.stride).chain(&c.pad).chain(&c.dilation).all(|&v| small(v))) {
                return Err(FormatError::TooLarge { layer: i, what: "kernel, stride, padding or dilation" });
            }
            let (oh, ow) = conv_shape(c, x).out_hw().ok_or(mismatch("conv window larger than the padded input"))?;
            Shape { c: c.out_channels as usize, h: oh, w: ow }
        }
        Op::Linear(l) => {
            if x.h != 1 || x.w != 1 {
                return Err(mismatch("linear needs a flat input (add a flatten)"));
            }
            if l.in_features as usize != x.c {
                return Err(mismatch("linear input features differ from the incoming value"));
            }
            Shape { c: l.out_features as usize, h: 1, w: 1 }
        }
        Op::BatchNorm(b) => {
            if b.channels as usize != x.c {
                return Err(mismatch("batch-norm channels differ from the incoming value"));
            }
            x
        }
        Op::Relu | Op::Relu6 => x,
        Op::Add { other } => {
            if shapes[*other as usize] != x {
                return Err(mismatch("add of values with different shapes"));
            }
            x
        }
        Op::MaxPool(p) | Op::AvgPool(p) => {
            if !(p.kernel.iter().chain(&p.stride).chain(&p.pad).all(|&v| small(v))) {
                return Err(FormatError::TooLarge { layer: i, what: "pooling window" });
            }
            let (oh, ow) = pool_shape(p, x).out_hw().ok_or(mismatch("pooling window larger than the padded input"))?;
            Shape { c: x.c, h: oh, w: ow }
        }
        Op::GlobalAvgPool => Shape { c: x.c, h: 1, w: 1 },
        Op::Flatten => Shape { c: x.len(), h: 1, w: 1 },
    };
    let elems = out.c.checked_mul(out.h).and_then(|n| n.checked_mul(out.w));
    if elems.is_none_or(|n| n > MAX_VALUE_ELEMS) {
        return Err(FormatError::TooLarge { layer: i, what: "output value" });
    }
    Ok(out)
}
