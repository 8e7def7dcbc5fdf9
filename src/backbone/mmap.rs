//! Read-only memory mapping of a backbone file (std only).
//!
//! The one place outside `kernels/<isa>/` that needs `unsafe`: a mapping is only sound while
//! nobody rewrites the file, which edgecl guarantees for its own files (a new backbone is a
//! new file, renamed into place) and which the caller of [`MappedFile::open`] promises for
//! everything else.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::path::Path;

/// A file mapped read-only. Pages are loaded on first touch; opening costs no reads.
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path` read-only.
    ///
    /// # Safety
    /// The file must not be truncated or written to while the mapping lives (doing so is
    /// undefined behaviour, typically SIGBUS). Replace files by renaming a new one into place.
    pub unsafe fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the caller promises the file is not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(MappedFile { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
