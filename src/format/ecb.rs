//! The backbone file, `.ecb` version 1 (normative spec: `models/README.md`).
//!
//! ```text
//! 0    8  magic  "EDGECLB\0"
//! 8    2  version (1)                 u16 LE
//! 10   2  header length (128)         u16 LE
//! 12   4  flags (0)                   u32 LE
//! 16   8  graph section offset (128)  u64 LE
//! 24   8  graph section length        u64 LE
//! 32   8  data section offset         u64 LE, multiple of 64, < 64 bytes after the graph
//! 40   8  data section length         u64 LE, the file ends exactly where the data ends
//! 48  32  SHA-256 of bytes [128, end)
//! 80  48  reserved, zero
//! ```
//!
//! The graph section is postcard: one [`GraphHeader`] then `layer_count` [`Layer`]s.
//! [`EcbView::parse`] checks the header and the layout of the sections without hashing the body
//! (that is O(file), see [`EcbView::verify`]); [`EcbView::layers`] decodes and checks each layer
//! (parameters, tensor bounds, alignment, lengths, order, and the per-channel values).

use super::graph::{GraphHeader, Layer, Op, TensorRef, WeightFormat};
use super::{sha256, Digest, FormatError, Section};

pub const MAGIC: [u8; 8] = *b"EDGECLB\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 128;
/// Alignment of the data section in the file and of every tensor inside it.
pub const ALIGN: u64 = 64;

/// The fixed-size header, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub graph_offset: u64,
    pub graph_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
    pub digest: Digest,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Header {
    /// Reads and checks the header against the length of the whole file.
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        Header::parse_prefix(bytes, bytes.len() as u64)
    }

    /// Reads and checks the header from the first bytes of a file of `file_len` bytes (at
    /// least [`HEADER_LEN`] of them), without the rest: enough to learn a backbone's digest and
    /// check its layout against the file's length, as a store does when it is opened.
    pub fn parse_prefix(bytes: &[u8], file_len: u64) -> Result<Header, FormatError> {
        let avail = file_len;
        if bytes.len() < HEADER_LEN {
            return Err(FormatError::Truncated {
                section: Section::Header,
                needed: HEADER_LEN as u64,
                available: avail,
            });
        }
        let h = &bytes[..HEADER_LEN];
        if h[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16_at(h, 8);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion { found: version, supported: VERSION });
        }
        if u16_at(h, 10) as usize != HEADER_LEN {
            return Err(FormatError::BadHeader { field: "header length" });
        }
        if u32_at(h, 12) != 0 {
            return Err(FormatError::BadHeader { field: "flags" });
        }
        if h[80..].iter().any(|&b| b != 0) {
            return Err(FormatError::BadHeader { field: "reserved" });
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&h[48..80]);
        let hdr = Header {
            version,
            graph_offset: u64_at(h, 16),
            graph_len: u64_at(h, 24),
            data_offset: u64_at(h, 32),
            data_len: u64_at(h, 40),
            digest,
        };
        if hdr.graph_offset != HEADER_LEN as u64 || hdr.graph_len == 0 {
            return Err(FormatError::BadLayout { section: Section::Graph });
        }
        let graph_end =
            hdr.graph_offset.checked_add(hdr.graph_len).ok_or(FormatError::BadLayout { section: Section::Graph })?;
        if graph_end > avail {
            return Err(FormatError::Truncated { section: Section::Graph, needed: graph_end, available: avail });
        }
        if hdr.data_offset < graph_end || !hdr.data_offset.is_multiple_of(ALIGN) || hdr.data_offset - graph_end >= ALIGN
        {
            return Err(FormatError::BadLayout { section: Section::Data });
        }
        let end = hdr.data_offset.checked_add(hdr.data_len).ok_or(FormatError::BadLayout { section: Section::Data })?;
        if end > avail {
            return Err(FormatError::Truncated { section: Section::Data, needed: end, available: avail });
        }
        if end < avail {
            return Err(FormatError::TrailingBytes { extra: avail - end });
        }
        Ok(hdr)
    }

    /// The 128 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&self.version.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[16..24].copy_from_slice(&self.graph_offset.to_le_bytes());
        h[24..32].copy_from_slice(&self.graph_len.to_le_bytes());
        h[32..40].copy_from_slice(&self.data_offset.to_le_bytes());
        h[40..48].copy_from_slice(&self.data_len.to_le_bytes());
        h[48..80].copy_from_slice(&self.digest);
        h
    }
}

/// A structurally checked backbone file over borrowed bytes (a mapping, flash, or a buffer).
#[derive(Clone, Copy, Debug)]
pub struct EcbView<'a> {
    pub header: Header,
    pub graph: GraphHeader<'a>,
    bytes: &'a [u8],
    /// The postcard bytes of the layer records.
    layer_bytes: &'a [u8],
    data: &'a [u8],
}

impl<'a> EcbView<'a> {
    /// Checks the header, the section layout and the graph header. Does not hash the body.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let header = Header::parse(bytes)?;
        // Header::parse bounded every offset by bytes.len(), so these casts and slices hold.
        let g0 = header.graph_offset as usize;
        let g1 = g0 + header.graph_len as usize;
        let d0 = header.data_offset as usize;
        if bytes[g1..d0].iter().any(|&b| b != 0) {
            return Err(FormatError::BadLayout { section: Section::Data });
        }
        let data = &bytes[d0..];
        if !(data.as_ptr() as usize).is_multiple_of(4) {
            return Err(FormatError::BufferMisaligned);
        }
        let (graph, layer_bytes) = postcard::take_from_bytes::<GraphHeader<'a>>(&bytes[g0..g1])
            .map_err(|_| FormatError::GraphDecode { layer: None })?;
        if graph.layer_count == 0 {
            return Err(FormatError::EmptyGraph);
        }
        Ok(EcbView { header, graph, bytes, layer_bytes, data })
    }

    /// Decodes and checks every layer, in order. Yields at most `layer_count` items; a graph
    /// with trailing bytes after them yields [`FormatError::GraphTrailing`] last.
    pub fn layers(&self) -> LayerIter<'a> {
        LayerIter {
            rest: self.layer_bytes,
            index: 0,
            count: self.graph.layer_count,
            weights: self.graph.weights,
            data: self.data,
            cursor: [0, 0],
            small_end: 0,
            bulk_start: u64::MAX,
            done: false,
        }
    }

    /// The data section.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Bytes of a tensor that [`Self::layers`] has checked.
    pub fn tensor(&self, t: TensorRef) -> &'a [u8] {
        &self.data[t.offset as usize..(t.offset + t.len) as usize]
    }

    /// A checked f32 tensor (scales, biases, norm records, f32 weights).
    pub fn f32s(&self, t: TensorRef) -> &'a [f32] {
        bytemuck::cast_slice(self.tensor(t))
    }

    /// A checked int8 tensor.
    pub fn i8s(&self, t: TensorRef) -> &'a [i8] {
        bytemuck::cast_slice(self.tensor(t))
    }

    /// SHA-256 of everything after the header (reads the whole file).
    pub fn compute_digest(&self) -> Digest {
        sha256(&self.bytes[HEADER_LEN..])
    }

    /// Recomputes the digest and compares it with the recorded one.
    pub fn verify(&self) -> Result<(), FormatError> {
        let computed = self.compute_digest();
        if computed != self.header.digest {
            return Err(FormatError::DigestMismatch { recorded: self.header.digest, computed });
        }
        Ok(())
    }

    /// Total file length in bytes.
    pub fn file_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Decodes layers one at a time and checks each; see [`EcbView::layers`].
pub struct LayerIter<'a> {
    rest: &'a [u8],
    index: u32,
    count: u32,
    weights: WeightFormat,
    data: &'a [u8],
    /// Next free offset in each region: 0 = per-channel records, 1 = bulk weights.
    cursor: [u64; 2],
    /// End of the last record and start of the first weight tensor seen so far.
    small_end: u64,
    bulk_start: u64,
    done: bool,
}

impl Iterator for LayerIter<'_> {
    type Item = Result<Layer, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.index == self.count {
            self.done = true;
            return if self.rest.is_empty() { None } else { Some(Err(FormatError::GraphTrailing)) };
        }
        let i = self.index;
        let item = match postcard::take_from_bytes::<Layer>(self.rest) {
            Ok((layer, rest)) => {
                self.rest = rest;
                self.check(i, &layer).map(|()| layer)
            }
            Err(_) => Err(FormatError::GraphDecode { layer: Some(i) }),
        };
        self.index += 1;
        if item.is_err() {
            self.done = true;
        }
        Some(item)
    }
}

/// Product of small counts, or a `TooLarge` error.
fn product(layer: u32, what: &'static str, xs: &[u64]) -> Result<u64, FormatError> {
    xs.iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(x))
        .filter(|&n| n <= u32::MAX as u64 * 16)
        .ok_or(FormatError::TooLarge { layer, what })
}

impl LayerIter<'_> {
    fn check(&mut self, i: u32, layer: &Layer) -> Result<(), FormatError> {
        let produced = i + 1; // values 0..=i exist before layer i runs
        if layer.input >= produced {
            return Err(FormatError::BadValueRef { layer: i, value: layer.input });
        }
        let bad = |what| FormatError::BadParam { layer: i, what };
        match &layer.op {
            Op::Conv2d(c) => {
                if c.in_channels == 0 || c.out_channels == 0 {
                    return Err(bad("zero channels"));
                }
                if c.kernel.contains(&0) || c.stride.contains(&0) || c.dilation.contains(&0) {
                    return Err(bad("zero kernel size, stride or dilation"));
                }
                if c.groups == 0 || c.in_channels % c.groups != 0 || c.out_channels % c.groups != 0 {
                    return Err(bad("groups must divide input and output channels"));
                }
                let n = product(
                    i,
                    "weight count",
                    &[c.out_channels as u64, (c.in_channels / c.groups) as u64, c.kernel[0] as u64, c.kernel[1] as u64],
                )?;
                self.weights(i, c.weight, c.scale, n, c.out_channels)?;
                self.optional(i, "bias", c.bias, c.out_channels, Finite)?;
            }
            Op::Linear(l) => {
                if l.in_features == 0 || l.out_features == 0 {
                    return Err(bad("zero features"));
                }
                let n = product(i, "weight count", &[l.out_features as u64, l.in_features as u64])?;
                self.weights(i, l.weight, l.scale, n, l.out_features)?;
                self.optional(i, "bias", l.bias, l.out_features, Finite)?;
            }
            Op::BatchNorm(b) => {
                if b.channels == 0 {
                    return Err(bad("zero channels"));
                }
                if !(b.eps.is_finite() && b.eps >= 0.0) {
                    return Err(bad("eps must be finite and non-negative"));
                }
                if b.gamma.is_some() != b.beta.is_some() {
                    return Err(bad("gamma and beta must both be present or both absent"));
                }
                self.values(i, "mean", b.mean, b.channels, Finite)?;
                self.values(i, "var", b.var, b.channels, NonNegative)?;
                // With eps = 0 a zero variance would divide by zero.
                if b.eps == 0.0 && self.f32s(b.var).iter().any(|&v| v <= 0.0) {
                    return Err(FormatError::BadValue { layer: i, tensor: "var" });
                }
                self.optional(i, "gamma", b.gamma, b.channels, Finite)?;
                self.optional(i, "beta", b.beta, b.channels, Finite)?;
            }
            Op::Add { other } => {
                if *other >= produced {
                    return Err(FormatError::BadValueRef { layer: i, value: *other });
                }
            }
            Op::MaxPool(p) | Op::AvgPool(p) => {
                if p.kernel.contains(&0) || p.stride.contains(&0) {
                    return Err(bad("zero pooling kernel or stride"));
                }
                if p.pad[0] >= p.kernel[0]
                    || p.pad[2] >= p.kernel[0]
                    || p.pad[1] >= p.kernel[1]
                    || p.pad[3] >= p.kernel[1]
                {
                    return Err(bad("pooling padding must be smaller than the kernel"));
                }
            }
            Op::Relu | Op::Relu6 | Op::GlobalAvgPool | Op::Flatten => {}
        }
        Ok(())
    }

    /// Checks bounds, alignment, length and placement of one tensor. Weight tensors (`bulk`)
    /// come after every per-channel record, so opening a file touches only the small region
    /// and the weights' pages stay untouched until a kernel reads them.
    fn tensor(&mut self, layer: u32, name: &'static str, t: TensorRef, expected: u64) -> Result<(), FormatError> {
        // Conv and linear weights are the bulk region; everything else is a record.
        let bulk = name == WEIGHT;
        if !t.offset.is_multiple_of(ALIGN) {
            return Err(FormatError::TensorMisaligned { layer, tensor: name });
        }
        let end = t.offset.checked_add(t.len);
        if end.is_none_or(|e| e > self.data.len() as u64) {
            return Err(FormatError::TensorOutOfBounds { layer, tensor: name });
        }
        if t.len != expected {
            return Err(FormatError::TensorLength { layer, tensor: name, expected, found: t.len });
        }
        let region = bulk as usize;
        if t.offset < self.cursor[region] {
            return Err(FormatError::TensorOrder { layer, tensor: name });
        }
        self.cursor[region] = t.offset + t.len;
        if bulk {
            self.bulk_start = self.bulk_start.min(t.offset);
        } else {
            self.small_end = self.small_end.max(t.offset + t.len);
        }
        if self.small_end > self.bulk_start {
            return Err(FormatError::TensorOrder { layer, tensor: name });
        }
        Ok(())
    }

    fn f32s(&self, t: TensorRef) -> &[f32] {
        bytemuck::cast_slice(&self.data[t.offset as usize..(t.offset + t.len) as usize])
    }

    fn values(&mut self, layer: u32, name: &'static str, t: TensorRef, n: u32, rule: Rule) -> Result<(), FormatError> {
        self.tensor(layer, name, t, n as u64 * 4)?;
        let ok = |v: f32| match rule {
            Finite => v.is_finite(),
            NonNegative => v.is_finite() && v >= 0.0,
        };
        if !self.f32s(t).iter().all(|&v| ok(v)) {
            return Err(FormatError::BadValue { layer, tensor: name });
        }
        Ok(())
    }

    fn optional(
        &mut self,
        layer: u32,
        name: &'static str,
        t: Option<TensorRef>,
        n: u32,
        rule: Rule,
    ) -> Result<(), FormatError> {
        match t {
            Some(t) => self.values(layer, name, t, n, rule),
            None => Ok(()),
        }
    }

    /// Checks a layer's weights: with a scale tensor they are int8 (`n` bytes), without one
    /// f32 (`4n` bytes). An all-f32 file may not hold int8 layers.
    fn weights(
        &mut self,
        layer: u32,
        w: TensorRef,
        scale: Option<TensorRef>,
        n: u64,
        rows: u32,
    ) -> Result<(), FormatError> {
        match (self.weights, scale) {
            (_, None) => self.tensor(layer, WEIGHT, w, n * 4),
            (WeightFormat::I8, Some(s)) => {
                self.tensor(layer, WEIGHT, w, n)?;
                self.values(layer, "scale", s, rows, NonNegative)
            }
            (WeightFormat::F32, Some(_)) => {
                Err(FormatError::BadParam { layer, what: "an all-f32 file holds an int8 layer" })
            }
        }
    }
}

/// The tensor name of conv and linear weights (in errors, and the bulk region's marker).
const WEIGHT: &str = "weight";

#[derive(Clone, Copy)]
enum Rule {
    Finite,
    NonNegative,
}
use Rule::*;

#[cfg(feature = "alloc")]
pub use writer::EcbWriter;

#[cfg(feature = "alloc")]
mod writer {
    use super::*;
    use crate::format::graph::{InputSpec, Provenance, ValueId};
    use alloc::string::String;
    use alloc::vec::Vec;

    /// Builds a backbone file in memory: add tensors, then the layers that reference them,
    /// in the same order (the reader requires increasing offsets), then [`Self::finish`].
    pub struct EcbWriter {
        pub name: String,
        pub source: String,
        pub seed: Option<u64>,
        pub input: InputSpec,
        pub weights: WeightFormat,
        layers: Vec<Layer>,
        /// Per-channel records (scales, biases, norms) and the bulk weights; the file stores
        /// the first, then the second.
        small: Vec<u8>,
        bulk: Vec<u8>,
    }

    fn push_aligned(buf: &mut Vec<u8>, bytes: &[u8]) -> TensorRef {
        let offset = buf.len().next_multiple_of(ALIGN as usize);
        buf.resize(offset, 0);
        buf.extend_from_slice(bytes);
        TensorRef { offset: offset as u64, len: bytes.len() as u64 }
    }

    impl EcbWriter {
        pub fn new(name: &str, source: &str, input: InputSpec, weights: WeightFormat) -> Self {
            EcbWriter {
                name: name.into(),
                source: source.into(),
                seed: None,
                input,
                weights,
                layers: Vec::new(),
                small: Vec::new(),
                bulk: Vec::new(),
            }
        }

        /// Appends a per-channel record (scale, bias, norm statistics) at the next 64-byte
        /// boundary of the small region.
        pub fn add_f32(&mut self, xs: &[f32]) -> TensorRef {
            push_aligned(&mut self.small, bytemuck::cast_slice(xs))
        }

        /// Appends int8 weights to the bulk region. The returned offset is relative to the bulk
        /// region until [`Self::finish`] relocates it.
        pub fn add_weight_i8(&mut self, xs: &[i8]) -> TensorRef {
            push_aligned(&mut self.bulk, bytemuck::cast_slice(xs))
        }

        /// Appends f32 weights to the bulk region (see [`Self::add_weight_i8`]).
        pub fn add_weight_f32(&mut self, xs: &[f32]) -> TensorRef {
            push_aligned(&mut self.bulk, bytemuck::cast_slice(xs))
        }

        /// Appends a layer and returns the id of the value it produces.
        pub fn push(&mut self, input: ValueId, op: Op) -> ValueId {
            self.layers.push(Layer { input, op });
            self.layers.len() as ValueId
        }

        /// Serialises the whole file, digest included.
        pub fn finish(&self) -> Vec<u8> {
            let bulk_base = self.small.len().next_multiple_of(ALIGN as usize) as u64;
            let mut layers = self.layers.clone();
            for l in &mut layers {
                match &mut l.op {
                    Op::Conv2d(c) => c.weight.offset += bulk_base,
                    Op::Linear(c) => c.weight.offset += bulk_base,
                    _ => {}
                }
            }
            let mut data = self.small.clone();
            data.resize(bulk_base as usize, 0);
            data.extend_from_slice(&self.bulk);
            let header = GraphHeader {
                provenance: Provenance { name: &self.name, source: &self.source, seed: self.seed },
                input: self.input,
                weights: self.weights,
                layer_count: layers.len() as u32,
            };
            let mut graph = postcard::to_allocvec(&header).expect("graph header serialises");
            for l in &layers {
                graph.extend(postcard::to_allocvec(l).expect("layer serialises"));
            }
            let graph_end = HEADER_LEN + graph.len();
            let data_offset = graph_end.next_multiple_of(ALIGN as usize);
            let mut out = Vec::with_capacity(data_offset + data.len());
            out.resize(HEADER_LEN, 0);
            out.extend_from_slice(&graph);
            out.resize(data_offset, 0);
            out.extend_from_slice(&data);
            let h = Header {
                version: VERSION,
                graph_offset: HEADER_LEN as u64,
                graph_len: graph.len() as u64,
                data_offset: data_offset as u64,
                data_len: data.len() as u64,
                digest: sha256(&out[HEADER_LEN..]),
            };
            out[..HEADER_LEN].copy_from_slice(&h.to_bytes());
            out
        }
    }
}
