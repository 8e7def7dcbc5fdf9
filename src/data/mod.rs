//! (std) Reading inputs and datasets from files. Every reader treats its file as hostile:
//! lengths are checked before anything is allocated from them, errors name the file's fault.

pub mod npy;
