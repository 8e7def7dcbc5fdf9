//! Bytes in, typed and validated views out (and back, on hosts with an allocator).
//!
//! This module is the only place that indexes raw file bytes. Every offset, length and count
//! read from a file is checked with bounded arithmetic before it is used; after a view is
//! built, its accessors cannot fail or panic. Nothing here allocates while parsing, so the
//! same code validates a backbone in flash on a microcontroller.
//!
//! It knows nothing about how a network is executed: shapes across layers are checked by
//! [`crate::backbone`], which is the first user of these views.

// Tensors are read in place as little-endian f32/i8; every supported target is little-endian.
#[cfg(target_endian = "big")]
compile_error!("edgecl's file formats are read in place and need a little-endian target");

#[cfg(feature = "alloc")]
pub mod bundle;
pub mod ecb;
pub mod graph;
#[cfg(feature = "alloc")]
pub mod keys;
#[cfg(feature = "alloc")]
pub mod task;
pub mod task_view;

use core::fmt;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// Lower-case hex of a digest, without allocating.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Which part of a file an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Header,
    Graph,
    Data,
}

/// Everything that can be wrong with a file's bytes. Small and `Copy` so that no_std code can
/// return it; the message says what is wrong and, where it helps, what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// The file is shorter than its header or than a section it declares.
    Truncated { section: Section, needed: u64, available: u64 },
    /// The first eight bytes are not this format's magic.
    BadMagic,
    /// A version this build does not read.
    UnsupportedVersion { found: u16, supported: u16 },
    /// A header field that must hold a fixed value does not.
    BadHeader { field: &'static str },
    /// A section starts before the previous one ends, or is not aligned.
    BadLayout { section: Section },
    /// Bytes after the last section.
    TrailingBytes { extra: u64 },
    /// The buffer the file was loaded into is not aligned for f32 reads.
    BufferMisaligned,
    /// The graph section could not be decoded.
    GraphDecode { layer: Option<u32> },
    /// The graph section has bytes after its last layer.
    GraphTrailing,
    /// More layers than this build can hold (only without an allocator).
    TooManyLayers { count: u32, max: u32 },
    /// A graph with no layers.
    EmptyGraph,
    /// A layer reads a value that does not exist yet (not topological) or never will.
    BadValueRef { layer: u32, value: u32 },
    /// A layer parameter out of range, e.g. a zero stride.
    BadParam { layer: u32, what: &'static str },
    /// A tensor lies outside the data section.
    TensorOutOfBounds { layer: u32, tensor: &'static str },
    /// A tensor is not 64-byte aligned inside the data section.
    TensorMisaligned { layer: u32, tensor: &'static str },
    /// A tensor's byte length does not match the layer's parameters.
    TensorLength { layer: u32, tensor: &'static str, expected: u64, found: u64 },
    /// Tensors overlap or are not stored in the order the graph references them.
    TensorOrder { layer: u32, tensor: &'static str },
    /// A stored value is not finite, or a variance is negative, or a scale is not positive.
    BadValue { layer: u32, tensor: &'static str },
    /// Shapes of consecutive layers do not fit.
    ShapeMismatch { layer: u32, what: &'static str },
    /// A dimension or buffer size beyond what this build accepts.
    TooLarge { layer: u32, what: &'static str },
    /// The body's SHA-256 is not the one the header records.
    DigestMismatch { recorded: Digest, computed: Digest },
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Header => "header",
            Section::Graph => "graph section",
            Section::Data => "data section",
        })
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match *self {
            Truncated { section, needed, available } => write!(
                f,
                "file is truncated: the {section} needs {needed} bytes but only {available} are \
                 there (copy the file again)"
            ),
            BadMagic => f.write_str("not an edgecl file of this kind (wrong magic bytes)"),
            UnsupportedVersion { found, supported } if found < supported => write!(
                f,
                "format version {found} is older than the version {supported} this build reads; \
                 re-create the file with this edgecl (a task: learn it again) or use the edgecl that wrote it"
            ),
            UnsupportedVersion { found, supported } => write!(
                f,
                "format version {found} is not supported (this build reads version {supported}); \
                 use a matching edgecl"
            ),
            BadHeader { field } => write!(f, "corrupt header: field `{field}` is invalid"),
            BadLayout { section } => {
                write!(f, "corrupt file layout: the {section} overlaps another or is misaligned")
            }
            TrailingBytes { extra } => write!(f, "{extra} unexpected bytes after the last section"),
            BufferMisaligned => f.write_str(
                "the file's bytes are not 4-byte aligned in memory (map the file, or place it \
                 at an aligned address)",
            ),
            GraphDecode { layer: Some(l) } => {
                write!(f, "corrupt graph: layer {l} cannot be decoded")
            }
            GraphDecode { layer: None } => f.write_str("corrupt graph: the graph header cannot be decoded"),
            GraphTrailing => f.write_str("corrupt graph: bytes after the last layer"),
            TooManyLayers { count, max } => {
                write!(f, "the graph has {count} layers; this build holds at most {max}")
            }
            EmptyGraph => f.write_str("the graph has no layers"),
            BadValueRef { layer, value } => {
                write!(f, "layer {layer} reads value {value}, which is not produced before it")
            }
            BadParam { layer, what } => write!(f, "layer {layer}: invalid parameter: {what}"),
            TensorOutOfBounds { layer, tensor } => {
                write!(f, "layer {layer}: tensor `{tensor}` lies outside the data section")
            }
            TensorMisaligned { layer, tensor } => {
                write!(f, "layer {layer}: tensor `{tensor}` is not 64-byte aligned")
            }
            TensorLength { layer, tensor, expected, found } => {
                write!(f, "layer {layer}: tensor `{tensor}` has {found} bytes, its shape needs {expected}")
            }
            TensorOrder { layer, tensor } => {
                write!(f, "layer {layer}: tensor `{tensor}` overlaps an earlier tensor or is out of order")
            }
            BadValue { layer, tensor } => {
                write!(f, "layer {layer}: tensor `{tensor}` holds a value out of range")
            }
            ShapeMismatch { layer, what } => write!(f, "layer {layer}: shape mismatch: {what}"),
            TooLarge { layer, what } => write!(f, "layer {layer}: {what} is too large"),
            DigestMismatch { recorded, computed } => write!(
                f,
                "digest mismatch: the header records {} but the contents hash to {} (the file \
                 is corrupt or was modified)",
                Hex(&recorded),
                Hex(&computed)
            ),
        }
    }
}

impl core::error::Error for FormatError {}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}
