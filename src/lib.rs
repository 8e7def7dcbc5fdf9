//! edgecl: on-device continual learning on a frozen, memory-mapped int8 backbone.
//!
//! One backbone file (`.ecb`) is mapped read-only and never copied; every learned task adds
//! only small task state on top of it. The crate is layered; a module uses only the ones
//! below it (and `format`, `kernels`), and data flows one way:
//!
//! ```text
//!  ONNX ──import (host, tract-onnx)──▶ .ecb ◀── init (random SupSup backbone)
//!                                        │ mmap (std) / flash (firmware)
//!                                        ▼
//!        format ──▶ backbone (validated view + plan + forward) ◀── kernels (math on slices)
//!                                        │
//!            adapter → infer / train → store → CLI (host) and firmware (no_std)
//! ```
//!
//! | module | owns | builds without std |
//! |---|---|---|
//! | [`format`] | bytes ⇄ typed, validated views; `.ecb` header, graph, checks, writer (alloc) | yes |
//! | [`kernels`] | reference and fast kernels, per-ISA micro-kernels, the kernel table | yes |
//! | [`backbone`] | validated backbone, shape inference, execution plan, forward pass, mmap (std) | yes |
//! | [`data`] | (std) `.npy` inputs; IDX, image-folder and embedded datasets; transforms; scenarios | no |
//! | [`import`] | (std) random SupSup backbones, quantisation, ONNX import (feature `import`) | no |
//!
//! Later layers (task components, sessions, training, the task store and evaluation) are
//! specified in `DESIGN.md` and arrive with their issues.
//!
//! Features: `std` ⊃ `alloc`; `cli` (the `edgecl` binary); `import` (tract-onnx). With no
//! default features the core (`format`, `kernels`, `backbone`) builds for bare-metal targets
//! such as `thumbv7em-none-eabihf` and allocates nothing.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod backbone;
#[cfg(feature = "std")]
pub mod data;
pub mod format;
#[cfg(feature = "std")]
pub mod import;
pub mod kernels;
pub mod rng;
