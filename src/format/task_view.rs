//! Task files (`.ect`, spec in `models/README.md`) read in place, without an allocator: the
//! header and both digests are checked ([`open`]), then the postcard payload is walked once
//! ([`TaskView::parse`]) and every field is validated; what remains are borrowed views of the
//! file's bytes that a microcontroller can copy into its own fixed buffers.
//!
//! The walker accepts exactly what `postcard` accepts for `adapter::Task` (varints of at most
//! 5 bytes for `u32` and 10 for `u64` and lengths, the top bits of the last byte clear,
//! `Option` tags 0 or 1, UTF-8 strings, no bytes after the last field); the tests hold it to
//! the alloc decoder on mutated payloads. It never panics and never trusts a length: every
//! count is checked against the bytes that are left before anything is sliced.
//!
//! Floats inside a payload are at arbitrary byte offsets, so they are exposed as [`F32s`]
//! (little-endian bytes, read one value at a time or copied out), never cast in place.
//! Mask words are postcard varints and are decoded the same way ([`U32s`]). CLR's kernels and
//! shifts are int8 steps of one scale per layer ([`QuantizedBytes`], [`Base`]).

use super::{sha256, Digest, FormatError, Section};
use core::fmt;
use core::marker::PhantomData;
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 8] = *b"EDGECLT\0";
/// 3: the payload ends with [`Softmax`]. 2: CLR kernels and shifts as int8 steps
/// ([`Quantized`]); version 1 stored them as f32.
pub const VERSION: u16 = 3;
/// The oldest version still read: a version 2 payload is a version 3 payload without its last
/// field, and reads as [`Softmax::Classes`] (which is how every version 2 task was trained).
pub const OLDEST_READ: u16 = 2;
pub const HEADER_LEN: usize = 96;
pub const TRAILER_LEN: usize = 32;

/// How a task was learned; decides which components it has. Its postcard encoding is the
/// variant index, in this order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Supsup,
    Exssnet,
    Clr,
    Linear,
    Finetune,
}

/// Which outputs the softmax of a task's training spanned.
///
/// A task's logits are the backbone's first `classes` outputs. With [`Softmax::All`] training
/// also put the outputs beyond them in the softmax, never as targets: SupSup's superfluous
/// neurons (paper §3.6), which training pushes down on the task's own inputs, so that task
/// inference over a superposition can tell the task whose inputs these are (`infer`). The
/// postcard encoding is the variant index, in this order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Softmax {
    /// Only the task's classes (its own outputs).
    #[default]
    Classes,
    /// Every output of the network.
    All,
}

impl Softmax {
    pub const ALL: [Softmax; 2] = [Softmax::Classes, Softmax::All];
    pub fn name(self) -> &'static str {
        match self {
            Softmax::Classes => "classes",
            Softmax::All => "all",
        }
    }
    pub fn from_name(s: &str) -> Option<Softmax> {
        Softmax::ALL.into_iter().find(|m| m.name() == s)
    }
}

impl Method {
    pub const ALL: [Method; 5] = [Method::Supsup, Method::Exssnet, Method::Clr, Method::Linear, Method::Finetune];
    pub fn name(self) -> &'static str {
        match self {
            Method::Supsup => "supsup",
            Method::Exssnet => "exssnet",
            Method::Clr => "clr",
            Method::Linear => "linear",
            Method::Finetune => "finetune",
        }
    }
    pub fn from_name(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// A task file whose header, length, trailer and task digest have been checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskFileView<'a> {
    /// The `.ecb` digest the task was learned on.
    pub backbone: Digest,
    /// SHA-256 of the payload: the task's identity.
    pub digest: Digest,
    /// The postcard payload (not yet decoded).
    pub payload: &'a [u8],
    /// The format version of the file ([`OLDEST_READ`] to [`VERSION`]).
    pub version: u16,
}

impl<'a> TaskFileView<'a> {
    /// Walks and validates the payload as its version lays it out.
    pub fn task(&self) -> PResult<TaskView<'a>> {
        TaskView::parse_version(self.payload, self.version)
    }
}

/// Checks a task file's header, length, trailer and task digest (in that order) and returns
/// its payload. Hashes the whole file once.
pub fn open(bytes: &[u8]) -> Result<TaskFileView<'_>, FormatError> {
    let trunc = |section, needed: usize| FormatError::Truncated {
        section,
        needed: needed as u64,
        available: bytes.len() as u64,
    };
    let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        return Err(trunc(Section::Header, HEADER_LEN + TRAILER_LEN));
    };
    if header[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(trunc(Section::Header, HEADER_LEN + TRAILER_LEN));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if !(OLDEST_READ..=VERSION).contains(&version) {
        return Err(FormatError::UnsupportedVersion { found: version, supported: VERSION });
    }
    if header[10..16].iter().any(|&b| b != 0) {
        return Err(FormatError::BadHeader { field: "flags/reserved" });
    }
    if header[88..96].iter().any(|&b| b != 0) {
        return Err(FormatError::BadHeader { field: "reserved" });
    }
    let len = u64::from_le_bytes(digest_at::<8>(header, 16));
    let total = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(HEADER_LEN + TRAILER_LEN))
        .ok_or(FormatError::BadHeader { field: "payload length" })?;
    if total > bytes.len() {
        return Err(trunc(Section::Data, total));
    }
    if total < bytes.len() {
        return Err(FormatError::TrailingBytes { extra: (bytes.len() - total) as u64 });
    }
    let end = total - TRAILER_LEN;
    let (body, trailer) = bytes.split_at(end);
    let recorded: Digest = digest_at(trailer, 0);
    let computed = sha256(body);
    if recorded != computed {
        return Err(FormatError::DigestMismatch { recorded, computed });
    }
    let payload = &body[HEADER_LEN..];
    let digest: Digest = digest_at(header, 56);
    let computed = sha256(payload);
    if digest != computed {
        return Err(FormatError::DigestMismatch { recorded: digest, computed });
    }
    Ok(TaskFileView { backbone: digest_at(header, 24), digest, payload, version })
}

/// `N` bytes at `at` of a buffer known to hold them.
fn digest_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        out.copy_from_slice(s);
    }
    out
}

/// What is wrong with a payload byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadErrorKind {
    /// The payload ends inside the field.
    Truncated,
    /// A varint longer than its type allows, or with bits beyond it.
    BadVarint,
    /// A string that is not UTF-8.
    BadUtf8,
    /// An `Option` tag other than 0 or 1.
    BadTag,
    /// An enum index beyond the known variants (`method`, `softmax`).
    BadVariant,
    /// Bytes after the last field.
    Trailing,
}

/// Why a task payload does not decode: the field, what is wrong, the payload offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadError {
    pub field: &'static str,
    pub kind: PayloadErrorKind,
    pub offset: usize,
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            PayloadErrorKind::Truncated => "ends inside",
            PayloadErrorKind::BadVarint => "has an invalid varint in",
            PayloadErrorKind::BadUtf8 => "has text that is not UTF-8 in",
            PayloadErrorKind::BadTag => "has an option tag other than 0 or 1 in",
            PayloadErrorKind::BadVariant => "has an unknown variant index in",
            PayloadErrorKind::Trailing => "has bytes after",
        };
        write!(f, "corrupt task payload: it {what} field `{}` (payload byte {})", self.field, self.offset)
    }
}

impl core::error::Error for PayloadError {}

type PResult<T> = core::result::Result<T, PayloadError>;

/// A bounded cursor over payload bytes.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn err(&self, field: &'static str, kind: PayloadErrorKind) -> PayloadError {
        PayloadError { field, kind, offset: self.pos }
    }

    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, field: &'static str) -> PResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let s = end.and_then(|e| self.buf.get(self.pos..e)).ok_or(self.err(field, PayloadErrorKind::Truncated))?;
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self, field: &'static str) -> PResult<u8> {
        Ok(self.take(1, field)?[0])
    }

    /// A varint of at most `max` bytes whose last byte is at most `last_max` when it is the
    /// `max`-th (postcard's rule).
    fn varint(&mut self, field: &'static str, max: usize, last_max: u8) -> PResult<u64> {
        let start = self.pos;
        let mut out = 0u64;
        for i in 0..max {
            let b = self.byte(field)?;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i == max - 1 && b > last_max {
                    return Err(PayloadError { field, kind: PayloadErrorKind::BadVarint, offset: start });
                }
                return Ok(out);
            }
        }
        Err(PayloadError { field, kind: PayloadErrorKind::BadVarint, offset: start })
    }

    fn u32(&mut self, field: &'static str) -> PResult<u32> {
        // 5 bytes carry 35 bits; the last may hold only the top 4.
        self.varint(field, 5, 0x0f).map(|v| v as u32)
    }

    fn u64(&mut self, field: &'static str) -> PResult<u64> {
        self.varint(field, 10, 0x01)
    }

    /// A unit enum: postcard's variant index, one of `all`.
    fn variant<T: Copy>(&mut self, field: &'static str, all: &[T]) -> PResult<T> {
        let at = self.pos;
        let i = self.u32(field)?;
        all.get(i as usize).copied().ok_or(PayloadError { field, kind: PayloadErrorKind::BadVariant, offset: at })
    }

    /// A length or count (postcard's `usize`, read as on 64-bit hosts). A value that cannot
    /// be an index on this target cannot fit in the bytes left either.
    fn len(&mut self, field: &'static str) -> PResult<usize> {
        let at = self.pos;
        let v = self.u64(field)?;
        usize::try_from(v).map_err(|_| PayloadError { field, kind: PayloadErrorKind::Truncated, offset: at })
    }

    fn option(&mut self, field: &'static str) -> PResult<bool> {
        let at = self.pos;
        match self.byte(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(PayloadError { field, kind: PayloadErrorKind::BadTag, offset: at }),
        }
    }

    fn str(&mut self, field: &'static str) -> PResult<&'a str> {
        let n = self.len(field)?;
        let at = self.pos;
        let b = self.take(n, field)?;
        core::str::from_utf8(b).map_err(|_| PayloadError { field, kind: PayloadErrorKind::BadUtf8, offset: at })
    }

    fn f32s(&mut self, field: &'static str) -> PResult<F32s<'a>> {
        let n = self.len(field)?;
        let bytes = n.checked_mul(4).ok_or(self.err(field, PayloadErrorKind::Truncated))?;
        Ok(F32s { bytes: self.take(bytes, field)? })
    }
}

/// Little-endian f32 values inside the payload (not aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct F32s<'a> {
    bytes: &'a [u8],
}

impl<'a> F32s<'a> {
    pub fn len(&self) -> usize {
        self.bytes.len() / 4
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.len() < 4
    }
    pub fn get(&self, i: usize) -> Option<f32> {
        let at = i.checked_mul(4)?;
        let b = self.bytes.get(at..at.checked_add(4)?)?;
        Some(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn iter(&self) -> impl Iterator<Item = f32> + 'a {
        self.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Copies the values into `out[..self.len()]`; returns false (copying nothing) if `out`
    /// is shorter.
    pub fn copy_to(&self, out: &mut [f32]) -> bool {
        let Some(out) = out.get_mut(..self.len()) else { return false };
        for (o, v) in out.iter_mut().zip(self.iter()) {
            *o = v;
        }
        true
    }
}

/// `u32` values stored as postcard varints (already validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct U32s<'a> {
    count: usize,
    bytes: &'a [u8],
}

impl<'a> U32s<'a> {
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        let mut r = Reader::new(self.bytes);
        (0..self.count).map_while(move |_| r.u32("").ok())
    }
    /// Decodes the values into `out[..self.len()]`; returns false (leaving `out` partly
    /// written) if `out` is shorter.
    pub fn copy_to(&self, out: &mut [u32]) -> bool {
        let Some(out) = out.get_mut(..self.count) else { return false };
        for (o, v) in out.iter_mut().zip(self.iter()) {
            *o = v;
        }
        true
    }
}

/// One mask: `len` bits in `words` (bit `i` is bit `i % 32` of word `i / 32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskView<'a> {
    pub len: u64,
    pub words: U32s<'a>,
}

/// One batch-norm state of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormBytes<'a> {
    pub mean: F32s<'a>,
    pub var: F32s<'a>,
    pub gamma: Option<F32s<'a>>,
    pub beta: Option<F32s<'a>>,
}

/// What CLR's stored values are steps from: a reprogramming kernel from the identity kernel
/// (1 at the centre tap of each channel's 3×3, which the task starts from), a shift from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Identity3x3,
    Zero,
}

impl Base {
    /// The base value of element `i`.
    pub fn at(self, i: usize) -> f32 {
        match self {
            Base::Identity3x3 if i % 9 == 4 => 1.0,
            _ => 0.0,
        }
    }
}

/// `value[i] = base(i) + scale · step[i]`: the one decoding rule of quantised task values.
pub fn dequantize(base: Base, scale: f32, i: usize, step: i8) -> f32 {
    base.at(i) + scale * f32::from(step)
}

/// One layer's quantised values (`adapter::Quantized`): a scale and one int8 step per value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantizedBytes<'a> {
    pub scale: f32,
    steps: &'a [u8],
}

impl QuantizedBytes<'_> {
    pub fn len(&self) -> usize {
        self.steps.len()
    }
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
    pub fn step(&self, i: usize) -> Option<i8> {
        self.steps.get(i).map(|&b| b as i8)
    }
    /// Decodes the values into `out[..self.len()]`; returns false (writing nothing) if `out`
    /// is shorter.
    pub fn decode_to(&self, base: Base, out: &mut [f32]) -> bool {
        let Some(out) = out.get_mut(..self.steps.len()) else { return false };
        for (i, (o, &s)) in out.iter_mut().zip(self.steps).enumerate() {
            *o = dequantize(base, self.scale, i, s as i8);
        }
        true
    }
}

/// A task's head `y = W x + b`, `W` is `[outputs][inputs]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadBytes<'a> {
    pub inputs: u32,
    pub outputs: u32,
    pub weight: F32s<'a>,
    pub bias: F32s<'a>,
}

/// A record that can be read from a payload.
pub trait Item<'a>: Sized {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self>;
}

impl<'a> Item<'a> for &'a str {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        r.str(field)
    }
}

impl<'a> Item<'a> for F32s<'a> {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        r.f32s(field)
    }
}

impl<'a> Item<'a> for MaskView<'a> {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        let len = r.u64(field)?;
        let count = r.len(field)?;
        let start = r.pos;
        for _ in 0..count {
            r.u32(field)?;
        }
        Ok(MaskView { len, words: U32s { count, bytes: &r.buf[start..r.pos] } })
    }
}

impl<'a> Item<'a> for NormBytes<'a> {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        let mean = r.f32s(field)?;
        let var = r.f32s(field)?;
        let gamma = if r.option(field)? { Some(r.f32s(field)?) } else { None };
        let beta = if r.option(field)? { Some(r.f32s(field)?) } else { None };
        Ok(NormBytes { mean, var, gamma, beta })
    }
}

impl<'a> Item<'a> for QuantizedBytes<'a> {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        let scale = f32::from_le_bytes(digest_at(r.take(4, field)?, 0));
        // postcard writes an i8 as one byte.
        let n = r.len(field)?;
        Ok(QuantizedBytes { scale, steps: r.take(n, field)? })
    }
}

impl<'a> Item<'a> for Digest {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        Ok(digest_at(r.take(32, field)?, 0))
    }
}

impl<'a> Item<'a> for (&'a str, f64) {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        let name = r.str(field)?;
        let v = r.take(8, field)?;
        Ok((name, f64::from_le_bytes(digest_at(v, 0))))
    }
}

/// A validated postcard sequence of `T`, decoded lazily.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct List<'a, T> {
    count: usize,
    bytes: &'a [u8],
    field: &'static str,
    _t: PhantomData<T>,
}

impl<'a, T: Item<'a>> List<'a, T> {
    fn read(r: &mut Reader<'a>, field: &'static str) -> PResult<Self> {
        let count = r.len(field)?;
        let start = r.pos;
        for _ in 0..count {
            T::read(r, field)?;
        }
        Ok(List { count, bytes: &r.buf[start..r.pos], field, _t: PhantomData })
    }
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = T> + 'a {
        let mut r = Reader::new(self.bytes);
        let field = self.field;
        (0..self.count).map_while(move |_| T::read(&mut r, field).ok())
    }
    /// Item `i` (walks the items before it).
    pub fn get(&self, i: usize) -> Option<T> {
        self.iter().nth(i)
    }
}

/// A validated task payload (`adapter::Task`), every field borrowed from the file bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskView<'a> {
    pub name: &'a str,
    /// One name per class, in label order.
    pub labels: List<'a, &'a str>,
    pub method: Method,
    pub masks: List<'a, MaskView<'a>>,
    pub overlay: List<'a, F32s<'a>>,
    /// CLR kernels, steps from [`Base::Identity3x3`].
    pub reprogram: List<'a, QuantizedBytes<'a>>,
    pub norms: List<'a, NormBytes<'a>>,
    /// CLR shifts, steps from [`Base::Zero`].
    pub shifts: List<'a, QuantizedBytes<'a>>,
    pub head: Option<HeadBytes<'a>>,
    pub dense: List<'a, F32s<'a>>,
    pub depends_on: List<'a, Digest>,
    pub config: &'a str,
    pub metrics: List<'a, (&'a str, f64)>,
    pub created_at: u64,
    pub version: u32,
    pub softmax: Softmax,
}

impl<'a> TaskView<'a> {
    /// Walks and validates a payload of the current format version (field order of
    /// `adapter::Task`).
    pub fn parse(payload: &'a [u8]) -> PResult<Self> {
        Self::parse_version(payload, VERSION)
    }

    /// Walks and validates a payload of format `version` (a version 2 payload has no
    /// `softmax`; it reads as [`Softmax::Classes`]).
    pub fn parse_version(payload: &'a [u8], version: u16) -> PResult<Self> {
        let mut r = Reader::new(payload);
        let name = r.str("name")?;
        let labels = List::read(&mut r, "labels")?;
        let method = r.variant("method", &Method::ALL)?;
        let masks = List::read(&mut r, "components.masks")?;
        let overlay = List::read(&mut r, "components.overlay")?;
        let reprogram = List::read(&mut r, "components.reprogram")?;
        let norms = List::read(&mut r, "components.norms")?;
        let shifts = List::read(&mut r, "components.shifts")?;
        let head = if r.option("components.head")? {
            let f = "components.head";
            Some(HeadBytes { inputs: r.u32(f)?, outputs: r.u32(f)?, weight: r.f32s(f)?, bias: r.f32s(f)? })
        } else {
            None
        };
        let dense = List::read(&mut r, "components.dense")?;
        let depends_on = List::read(&mut r, "depends_on")?;
        let config = r.str("config")?;
        let metrics = List::read(&mut r, "metrics")?;
        let created_at = r.u64("created_at")?;
        let task_version = r.u32("version")?;
        let softmax = if version >= 3 { r.variant("softmax", &Softmax::ALL)? } else { Softmax::Classes };
        if r.left() != 0 {
            return Err(r.err(if version >= 3 { "softmax" } else { "version" }, PayloadErrorKind::Trailing));
        }
        Ok(TaskView {
            name,
            labels,
            method,
            masks,
            overlay,
            reprogram,
            norms,
            shifts,
            head,
            dense,
            depends_on,
            config,
            metrics,
            created_at,
            version: task_version,
            softmax,
        })
    }

    /// Number of classes (labels).
    pub fn classes(&self) -> usize {
        self.labels.len()
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests;
