//! (std) Reading inputs and datasets from files. Every reader treats its file as hostile:
//! lengths are checked before anything is allocated from them, errors name the file's fault.
//!
//! - [`npy`]: `.npy` tensors, for comparing against PyTorch and onnxruntime;
//! - [`idx`]: IDX image and label files (MNIST, Fashion-MNIST), plain or gzipped;
//! - [`folder`]: `DIR/<class>/*` image folders, decoded on demand;
//! - [`Transform`]: decoded image → backbone input (resize or pad, rotation, augmentation,
//!   normalisation, pixel permutation).

pub mod folder;
pub mod idx;
pub mod npy;
mod transform;

use std::fmt;
pub use transform::{Augment, Image, Scratch, Transform};

/// Why a source or sample could not be read; the message names the file or folder, what is
/// wrong with it and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError(pub String);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    /// A fresh, empty folder under the system temp folder, unique per test and process.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgecl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
