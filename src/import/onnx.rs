//! ONNX → backbone, reading the protobuf through tract-onnx and mapping node by node.
//!
//! Supported (anything else fails naming the op, the node and this list): Conv (groups,
//! depthwise, pads, strides, dilations), BatchNormalization (kept as a norm record), Relu,
//! Clip(0, 6) → relu6 (Clip(0, ∞) → relu), Add (of two values; a constant added to a
//! MatMul/Gemm output becomes its bias), GlobalAveragePool, ReduceMean over H and W, Flatten and
//! Reshape to (N, features), Gemm, MatMul (+ Add), MaxPool, AveragePool, and the no-ops
//! Identity, Dropout, Constant. Quantised (QDQ) models: a DequantizeLinear of an int8 constant
//! with zero point 0 gives int8 weights with the model's own scales (per channel along the
//! output axis, or per tensor); other DequantizeLinear constants are dequantised to f32;
//! QuantizeLinear → DequantizeLinear pairs on activations are dropped (edgecl keeps
//! activations in f32).

use super::{ImportError, Ir, IrOp, IrWeights};
use crate::format::graph::{InputSpec, Op, Pool, ValueId};
use std::collections::HashMap;
use std::path::Path;
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

/// Options of `edgecl import`.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Per-sample input shape (C, H, W).
    pub input: [u32; 3],
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Remove the final linear classifier.
    pub drop_head: bool,
    pub name: String,
}

const SUPPORTED: &str = "Conv, BatchNormalization, Relu, Clip(0,6), Add, GlobalAveragePool, \
ReduceMean (axes 2,3), Flatten, Reshape to (N, features), Gemm, MatMul(+Add), MaxPool, AveragePool, \
Identity, Dropout, Constant, QuantizeLinear/DequantizeLinear (QDQ)";

fn err(msg: impl Into<String>) -> ImportError {
    ImportError(msg.into())
}

/// A constant tensor, with its int8 form when the model is quantised.
#[derive(Clone, Debug)]
struct Const {
    dims: Vec<usize>,
    data: Vec<f32>,
    /// int8 values, per-channel scales and the channel axis, when this came out of a
    /// DequantizeLinear of an int8 tensor with zero point 0.
    quant: Option<(Vec<i8>, Vec<f32>, usize)>,
    /// Stored as uint8 (the zero-point type of an unsigned QuantizeLinear).
    unsigned: bool,
}

#[derive(Clone, Debug)]
enum Val {
    Value(ValueId),
    Const(Const),
}

/// Reads `path` and converts it. The input normalisation and shape come from `opts`.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Ir, ImportError> {
    let model = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| err(format!("cannot read ONNX model {}: {e}", path.display())))?;
    let graph = model.graph.as_ref().ok_or_else(|| err("the ONNX model has no graph"))?;
    let [c, h, w] = opts.input;
    let mut input = InputSpec::plain(c, h, w);
    for (i, (&m, &s)) in opts.mean.iter().zip(&opts.std).enumerate().take(4) {
        input.mean[i] = m;
        input.std[i] = s;
    }
    let source = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let mut cx =
        Converter { ir: Ir::new(&opts.name, &format!("onnx import of {source}"), input), vals: HashMap::new() };
    for t in &graph.initializer {
        cx.vals.insert(t.name.clone(), Val::Const(load_tensor(t)?));
    }
    let mut inputs = graph.input.iter().filter(|i| !cx.vals.contains_key(&i.name));
    let first = inputs.next().ok_or_else(|| err("the ONNX graph has no runtime input"))?;
    if let Some(extra) = inputs.next() {
        return Err(err(format!(
            "the ONNX graph has more than one runtime input (`{}` and `{}`)",
            first.name, extra.name
        )));
    }
    cx.vals.insert(first.name.clone(), Val::Value(0));
    for node in &graph.node {
        cx.node(node).map_err(|e| {
            let name =
                if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
            err(format!("node `{name}` ({}): {}", node.op_type, e.0))
        })?;
    }
    let out = graph.output.first().ok_or_else(|| err("the ONNX graph has no output"))?;
    match cx.vals.get(&out.name) {
        Some(Val::Value(v)) if *v == cx.ir.last() && *v > 0 => {}
        Some(Val::Value(_)) => {
            return Err(err(format!("the graph output `{}` is not produced by the last node; only single-output chains and residual DAGs are supported", out.name)))
        }
        _ => return Err(err(format!("the graph output `{}` is not computed from the input", out.name))),
    }
    if opts.drop_head {
        match cx.ir.layers.last() {
            Some((_, IrOp::Linear { .. })) => {
                cx.ir.layers.pop();
            }
            _ => return Err(err("--drop-head: the model does not end in a linear (Gemm/MatMul) layer")),
        }
    }
    Ok(cx.ir)
}

struct Converter {
    ir: Ir,
    vals: HashMap<String, Val>,
}

impl Converter {
    fn get(&self, node: &pb::NodeProto, i: usize) -> Result<Val, ImportError> {
        let name = node.input.get(i).filter(|n| !n.is_empty()).ok_or_else(|| err(format!("missing input {i}")))?;
        self.vals.get(name).cloned().ok_or_else(|| err(format!("input `{name}` is not defined before this node")))
    }

    fn opt_const(&self, node: &pb::NodeProto, i: usize) -> Result<Option<Const>, ImportError> {
        if node.input.get(i).is_none_or(|n| n.is_empty()) {
            return Ok(None);
        }
        match self.get(node, i)? {
            Val::Const(c) => Ok(Some(c)),
            Val::Value(_) => Err(err(format!("input {i} must be a constant (an initializer)"))),
        }
    }

    fn value(&self, node: &pb::NodeProto, i: usize) -> Result<ValueId, ImportError> {
        match self.get(node, i)? {
            Val::Value(v) => Ok(v),
            Val::Const(_) => Err(err(format!("input {i} must be computed from the model input, not a constant"))),
        }
    }

    fn set(&mut self, node: &pb::NodeProto, v: Val) -> Result<(), ImportError> {
        let out = node.output.first().ok_or_else(|| err("node has no output"))?;
        self.vals.insert(out.clone(), v);
        Ok(())
    }

    fn push(&mut self, node: &pb::NodeProto, input: ValueId, op: IrOp) -> Result<(), ImportError> {
        let v = self.ir.push(input, op);
        self.set(node, Val::Value(v))
    }

    fn node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let plain = |op| IrOp::Plain(op);
        match node.op_type.as_str() {
            "Constant" => {
                let t = attr(node, "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| err("Constant without a tensor `value`"))?;
                let c = load_tensor(t)?;
                self.set(node, Val::Const(c))
            }
            "Identity" | "Dropout" => {
                let v = self.get(node, 0)?;
                self.set(node, v)
            }
            "QuantizeLinear" => {
                // Activations stay f32, so the quantise/dequantise pair becomes an identity,
                // except for its lower saturation: quantisers drop a Relu/Clip before an
                // activation whose zero point is the type's minimum, and rely on the
                // quantised range to clamp at 0. That clamp is kept as a Relu (the upper
                // saturation, a calibration artefact, is not).
                let v = self.value(node, 0)?;
                let clamps_at_zero = match self.opt_const(node, 2)? {
                    None => true, // the default zero point is uint8 0
                    Some(z) => !z.data.is_empty() && z.data.iter().all(|&q| q == if z.unsigned { 0.0 } else { -128.0 }),
                };
                let after_act = v > 0
                    && v == self.ir.last()
                    && matches!(self.ir.layers.last(), Some((_, IrOp::Plain(Op::Relu | Op::Relu6))));
                if clamps_at_zero && !after_act && v > 0 {
                    self.push(node, v, plain(Op::Relu))
                } else {
                    self.set(node, Val::Value(v))
                }
            }
            "DequantizeLinear" => match self.get(node, 0)? {
                Val::Value(v) => self.set(node, Val::Value(v)),
                Val::Const(_) => {
                    let c = self.dequantize(node)?;
                    self.set(node, Val::Const(c))
                }
            },
            "Conv" => self.conv(node),
            "BatchNormalization" => {
                let x = self.value(node, 0)?;
                if attr_i(node, "training_mode", 0) != 0 {
                    return Err(err("training_mode=1 is not supported"));
                }
                let eps = attr(node, "epsilon").map_or(1e-5, |a| a.f);
                let mut t = Vec::new();
                for i in 1..5 {
                    t.push(self.opt_const(node, i)?.ok_or_else(|| err("needs scale, B, mean and var constants"))?.data);
                }
                let (var, mean, beta, gamma) = (t.pop().unwrap(), t.pop().unwrap(), t.pop().unwrap(), t.pop().unwrap());
                if [&gamma, &beta, &var].iter().any(|v| v.len() != mean.len()) {
                    return Err(err("scale, B, mean and var must have one value per channel"));
                }
                self.push(node, x, IrOp::BatchNorm { eps, mean, var, affine: Some((gamma, beta)) })
            }
            "Relu" => {
                let x = self.value(node, 0)?;
                self.push(node, x, plain(Op::Relu))
            }
            "Clip" => {
                let x = self.value(node, 0)?;
                let scalar = |c: Option<Const>| c.and_then(|c| c.data.first().copied());
                let (lo, hi) = if node.input.len() > 1 {
                    (scalar(self.opt_const(node, 1)?), scalar(self.opt_const(node, 2)?))
                } else {
                    (attr(node, "min").map(|a| a.f), attr(node, "max").map(|a| a.f))
                };
                match (lo, hi.unwrap_or(f32::INFINITY)) {
                    (Some(l), h) if l == 0.0 && h == 6.0 => self.push(node, x, plain(Op::Relu6)),
                    (Some(l), h) if l == 0.0 && h == f32::INFINITY => self.push(node, x, plain(Op::Relu)),
                    _ => {
                        Err(err(format!("only Clip(0, 6) and Clip(0, inf) are supported, found Clip({lo:?}, {hi:?})")))
                    }
                }
            }
            "Add" => self.add(node),
            "GlobalAveragePool" => {
                let x = self.value(node, 0)?;
                self.push(node, x, plain(Op::GlobalAvgPool))
            }
            "ReduceMean" => {
                let x = self.value(node, 0)?;
                let axes: Vec<i64> = match self.opt_const(node, 1)? {
                    Some(c) => c.data.iter().map(|&v| v as i64).collect(),
                    None => attr(node, "axes").map(|a| a.ints.clone()).unwrap_or_default(),
                };
                let mut axes: Vec<i64> = axes.iter().map(|&a| if a < 0 { a + 4 } else { a }).collect();
                axes.sort();
                if axes != [2, 3] {
                    return Err(err(format!("ReduceMean is supported over axes [2, 3] (H, W) only, found {axes:?}")));
                }
                self.push(node, x, plain(Op::GlobalAvgPool))
            }
            "Flatten" => {
                let x = self.value(node, 0)?;
                if attr_i(node, "axis", 1) != 1 {
                    return Err(err("Flatten is supported with axis = 1 only"));
                }
                self.push(node, x, plain(Op::Flatten))
            }
            "Reshape" => {
                let x = self.value(node, 0)?;
                let shape = self.opt_const(node, 1)?.ok_or_else(|| err("Reshape needs a constant shape"))?;
                let s: Vec<i64> = shape.data.iter().map(|&v| v as i64).collect();
                // (N, features) written as [0, -1], [N, -1], [-1, F], [N, F] or [1, F].
                if s.len() != 2 {
                    return Err(err(format!("Reshape is supported to (N, features) only, found shape {s:?}")));
                }
                self.push(node, x, plain(Op::Flatten))
            }
            "Gemm" => self.gemm(node),
            "MatMul" => {
                let x = self.value(node, 0)?;
                let b = self.opt_const(node, 1)?.ok_or_else(|| err("MatMul needs a constant right-hand side"))?;
                if b.dims.len() != 2 {
                    return Err(err("MatMul weights must be 2-D"));
                }
                let weight = weights_transposed(&b)?;
                let (i, o) = (b.dims[0] as u32, b.dims[1] as u32);
                self.push(node, x, IrOp::Linear { in_features: i, out_features: o, weight, bias: None })
            }
            "MaxPool" | "AveragePool" => {
                let x = self.value(node, 0)?;
                let k = attr_ints(node, "kernel_shape");
                if k.len() != 2 {
                    return Err(err("pooling needs a 2-D kernel_shape"));
                }
                if attr_i(node, "ceil_mode", 0) != 0 {
                    return Err(err("ceil_mode = 1 is not supported"));
                }
                if attr_ints(node, "dilations").iter().any(|&d| d != 1) {
                    return Err(err("dilated pooling is not supported"));
                }
                check_auto_pad(node)?;
                let p = Pool {
                    kernel: pair(&k, 1)?,
                    stride: pair(&attr_ints(node, "strides"), 1)?,
                    pad: pads(node)?,
                    count_include_pad: attr_i(node, "count_include_pad", 0) != 0,
                };
                let op = if node.op_type == "MaxPool" { Op::MaxPool(p) } else { Op::AvgPool(p) };
                if node.output.len() > 1 && !node.output[1].is_empty() {
                    return Err(err("MaxPool indices output is not supported"));
                }
                self.push(node, x, plain(op))
            }
            other => Err(err(format!("unsupported op `{other}`; supported: {SUPPORTED}"))),
        }
    }

    fn conv(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let x = self.value(node, 0)?;
        let w = self.opt_const(node, 1)?.ok_or_else(|| err("Conv weights must be a constant"))?;
        if w.dims.len() != 4 {
            return Err(err("only 2-D convolutions (4-D weights) are supported"));
        }
        check_auto_pad(node)?;
        let groups = attr_i(node, "group", 1);
        let (o, ig, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        if groups < 1 {
            return Err(err("group must be positive"));
        }
        let ks = attr_ints(node, "kernel_shape");
        if !ks.is_empty() && ks != [kh as i64, kw as i64] {
            return Err(err("kernel_shape disagrees with the weight tensor"));
        }
        let bias = self.opt_const(node, 2)?.map(|b| b.data);
        if bias.as_ref().is_some_and(|b| b.len() != o) {
            return Err(err("bias length differs from the output channels"));
        }
        let weight = weights_rows(&w)?;
        let op = IrOp::Conv {
            in_channels: (ig as i64 * groups) as u32,
            out_channels: o as u32,
            kernel: [kh as u32, kw as u32],
            stride: pair(&attr_ints(node, "strides"), 1)?,
            pad: pads(node)?,
            dilation: pair(&attr_ints(node, "dilations"), 1)?,
            groups: groups as u32,
            weight,
            bias,
        };
        self.push(node, x, op)
    }

    fn gemm(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let x = self.value(node, 0)?;
        if attr_i(node, "transA", 0) != 0 {
            return Err(err("transA = 1 is not supported"));
        }
        let b = self.opt_const(node, 1)?.ok_or_else(|| err("Gemm needs constant weights (input B)"))?;
        if b.dims.len() != 2 {
            return Err(err("Gemm weights must be 2-D"));
        }
        let alpha = attr(node, "alpha").map_or(1.0, |a| a.f);
        let beta = attr(node, "beta").map_or(1.0, |a| a.f);
        let trans_b = attr_i(node, "transB", 0) != 0;
        let (i, o) = if trans_b { (b.dims[1], b.dims[0]) } else { (b.dims[0], b.dims[1]) };
        let mut weight = if trans_b { weights_rows(&b)? } else { weights_transposed(&b)? };
        if alpha != 1.0 {
            match &mut weight {
                IrWeights::F32(v) => v.iter_mut().for_each(|x| *x *= alpha),
                IrWeights::I8 { scale, .. } => scale.iter_mut().for_each(|s| *s *= alpha),
            }
        }
        let bias = match self.opt_const(node, 2)? {
            Some(c) => Some(broadcast(&c.data, o)?.into_iter().map(|v| v * beta).collect()),
            None => None,
        };
        self.push(node, x, IrOp::Linear { in_features: i as u32, out_features: o as u32, weight, bias })
    }

    fn add(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        match (self.get(node, 0)?, self.get(node, 1)?) {
            (Val::Value(a), Val::Value(b)) => self.push(node, a, IrOp::Plain(Op::Add { other: b })),
            (Val::Value(v), Val::Const(c)) | (Val::Const(c), Val::Value(v)) => {
                // A bias after MatMul/Gemm: fold it into that layer if nothing else read its output.
                let last = self.ir.last();
                match self.ir.layers.last_mut() {
                    Some((_, IrOp::Linear { out_features, bias, .. })) if v == last => {
                        let add = broadcast(&c.data, *out_features as usize)?;
                        match bias {
                            Some(b) => b.iter_mut().zip(&add).for_each(|(b, a)| *b += a),
                            None => *bias = Some(add),
                        }
                        self.set(node, Val::Value(v))
                    }
                    _ => Err(err("adding a constant is supported only as the bias of a MatMul/Gemm")),
                }
            }
            (Val::Const(_), Val::Const(_)) => Err(err("Add of two constants is not supported (fold it before export)")),
        }
    }

    fn dequantize(&self, node: &pb::NodeProto) -> Result<Const, ImportError> {
        let Val::Const(x) = self.get(node, 0)? else { unreachable!("checked by the caller") };
        let scale = self.opt_const(node, 1)?.ok_or_else(|| err("DequantizeLinear needs a constant scale"))?.data;
        let zero = self.opt_const(node, 2)?.map(|z| z.data).unwrap_or_else(|| vec![0.0]);
        let rank = x.dims.len() as i64;
        let axis = attr_i(node, "axis", 1);
        let axis = if axis < 0 { axis + rank } else { axis };
        let per_channel = scale.len() > 1;
        if per_channel && (axis < 0 || axis >= rank || x.dims[axis as usize] != scale.len()) {
            return Err(err("per-channel scale length does not match the axis"));
        }
        if zero.len() != 1 && zero.len() != scale.len() {
            return Err(err("zero point length does not match the scale"));
        }
        let axis = if per_channel { axis as usize } else { 0 };
        let inner: usize = x.dims[axis + 1..].iter().product();
        let chan = |i: usize| {
            if per_channel {
                (i / inner.max(1)) % scale.len()
            } else {
                0
            }
        };
        let zp = |i: usize| {
            if zero.len() == 1 {
                zero[0]
            } else {
                zero[chan(i)]
            }
        };
        let data: Vec<f32> = x.data.iter().enumerate().map(|(i, &q)| (q - zp(i)) * scale[chan(i)]).collect();
        // Keep the model's own int8 values when they are symmetric (zero point 0) and int8.
        let quant = x.quant.as_ref().filter(|_| zero.iter().all(|&z| z == 0.0)).map(|(q, _, _)| {
            let s = if per_channel { scale.clone() } else { vec![scale[0]; x.dims.first().copied().unwrap_or(1)] };
            (q.clone(), s, axis)
        });
        Ok(Const { dims: x.dims, data, quant, unsigned: false })
    }
}

/// Weights `[out][rest…]` as stored rows: keeps int8 when the quantisation axis is 0.
fn weights_rows(c: &Const) -> Result<IrWeights, ImportError> {
    match &c.quant {
        Some((q, s, 0)) if s.len() == c.dims[0] => Ok(IrWeights::I8 { q: q.clone(), scale: s.clone() }),
        _ => Ok(IrWeights::F32(c.data.clone())),
    }
}

/// A `[in][out]` matrix stored as `[out][in]` rows; int8 is kept when quantised along `out`.
fn weights_transposed(c: &Const) -> Result<IrWeights, ImportError> {
    let (i, o) = (c.dims[0], c.dims[1]);
    let t = |v: &dyn Fn(usize) -> f32| (0..o * i).map(|n| v((n % i) * o + n / i)).collect::<Vec<f32>>();
    match &c.quant {
        Some((q, s, 1)) if s.len() == o => {
            let qt = (0..o * i).map(|n| q[(n % i) * o + n / i]).collect();
            Ok(IrWeights::I8 { q: qt, scale: s.clone() })
        }
        _ => Ok(IrWeights::F32(t(&|k| c.data[k]))),
    }
}

fn broadcast(v: &[f32], n: usize) -> Result<Vec<f32>, ImportError> {
    match v.len() {
        1 => Ok(vec![v[0]; n]),
        l if l == n => Ok(v.to_vec()),
        l => Err(err(format!("bias of length {l} does not match {n} outputs"))),
    }
}

fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_i(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn attr_ints(node: &pb::NodeProto, name: &str) -> Vec<i64> {
    attr(node, name).map(|a| a.ints.clone()).unwrap_or_default()
}

fn check_auto_pad(node: &pb::NodeProto) -> Result<(), ImportError> {
    match attr(node, "auto_pad").map(|a| String::from_utf8_lossy(&a.s).into_owned()) {
        None => Ok(()),
        Some(s) if s == "NOTSET" || s == "VALID" || s.is_empty() => Ok(()),
        Some(s) => Err(err(format!("auto_pad = {s} is not supported; export with explicit pads"))),
    }
}

fn pair(v: &[i64], default: u32) -> Result<[u32; 2], ImportError> {
    match v {
        [] => Ok([default; 2]),
        [a, b] if *a > 0 && *b > 0 && *a <= u32::MAX as i64 && *b <= u32::MAX as i64 => Ok([*a as u32, *b as u32]),
        _ => Err(err(format!("expected two positive values, found {v:?}"))),
    }
}

/// ONNX pads `[top, left, bottom, right]` (begins, then ends).
fn pads(node: &pb::NodeProto) -> Result<[u32; 4], ImportError> {
    let p = attr_ints(node, "pads");
    match p.as_slice() {
        [] => Ok([0; 4]),
        [a, b, c, d] if [a, b, c, d].iter().all(|&&v| (0..=u32::MAX as i64).contains(&v)) => {
            Ok([*a as u32, *b as u32, *c as u32, *d as u32])
        }
        _ => Err(err(format!("expected four non-negative pads, found {p:?}"))),
    }
}

/// Decodes an initializer (float, int8, uint8, int32, int64; raw or typed fields).
fn load_tensor(t: &pb::TensorProto) -> Result<Const, ImportError> {
    use pb::tensor_proto::DataType as D;
    if t.data_location == Some(1) {
        return Err(err(format!("tensor `{}` uses external data; re-save the model as one file", t.name)));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| err(format!("tensor `{}` has a negative dimension", t.name))))
        .collect::<Result<_, _>>()?;
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| err("tensor too large"))?;
    let raw = &t.raw_data;
    let dt = D::try_from(t.data_type)
        .map_err(|_| err(format!("tensor `{}` has unknown data type {}", t.name, t.data_type)))?;
    let check = |len: usize, what: &str| {
        if len == n {
            Ok(())
        } else {
            Err(err(format!("tensor `{}` ({what}) has {len} values, its shape needs {n}", t.name)))
        }
    };
    let unsigned = dt == D::Uint8;
    let (data, quant): (Vec<f32>, Option<Vec<i8>>) = match dt {
        D::Float if !raw.is_empty() => {
            check(raw.len() / 4, "float")?;
            (raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(), None)
        }
        D::Float => {
            check(t.float_data.len(), "float")?;
            (t.float_data.clone(), None)
        }
        D::Int8 => {
            let q: Vec<i8> = if raw.is_empty() {
                t.int32_data.iter().map(|&v| v as i8).collect()
            } else {
                raw.iter().map(|&b| b as i8).collect()
            };
            check(q.len(), "int8")?;
            (q.iter().map(|&v| v as f32).collect(), Some(q))
        }
        D::Uint8 => {
            let q: Vec<u8> = if raw.is_empty() { t.int32_data.iter().map(|&v| v as u8).collect() } else { raw.clone() };
            check(q.len(), "uint8")?;
            (q.iter().map(|&v| v as f32).collect(), None)
        }
        D::Int32 => {
            let v: Vec<i32> = if raw.is_empty() {
                t.int32_data.clone()
            } else {
                raw.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            };
            check(v.len(), "int32")?;
            (v.iter().map(|&x| x as f32).collect(), None)
        }
        D::Int64 => {
            let v: Vec<i64> = if raw.is_empty() {
                t.int64_data.clone()
            } else {
                raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
            };
            check(v.len(), "int64")?;
            (v.iter().map(|&x| x as f32).collect(), None)
        }
        other => return Err(err(format!("tensor `{}` has unsupported data type {other:?}", t.name))),
    };
    Ok(Const { dims, data, quant: quant.map(|q| (q, Vec::new(), usize::MAX)), unsigned })
}
