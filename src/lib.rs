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
//!            adapter → train / eval (→ infer, store) → CLI (host) and firmware (no_std)
//! ```
//!
//! | module | owns | builds without std |
//! |---|---|---|
//! | [`format`] | bytes ⇄ typed, validated views; `.ecb` header, graph, checks, writer (alloc); `.ect` task files read in place (`task_view`), decoded and written (alloc); `.ecbundle` signed bundles and key files (alloc) | yes |
//! | [`kernels`] | reference and fast kernels, per-ISA micro-kernels, the kernel table (with training's depthwise backward, sparse × dense product and, on AVX-512, a conv weight gradient with positions in the lanes); strided matmul (alloc); the threads: [`kernels::threads`], [`kernels::serial`], [`kernels::busy`] (std) | yes |
//! | [`backbone`] | validated backbone, shape inference, execution plan, forward pass (plain, or as a task sees it through `task::TaskParts`), tasks decoded into fixed buffers for firmware (`fixed`), mmap (std) | yes |
//! | [`adapter`] | (alloc) a task's components in owned form: bit-vector masks, overlays, reprogramming, norms, heads | with alloc |
//! | [`train`] | (std) training graph with kept values (run layer by layer, or sample by sample where activations outweigh weights), hand-written backward passes (sparse products under a mask; Winograd weight gradients for small planes of many channels), masks, optimisers, methods, KKT | no |
//! | [`eval`] | (std) accuracy from task files, accuracy matrix, ACC/BWT/forgetting, reports | no |
//! | [`infer`] | (std) task inference: entropy gradient over superposed masks (one-shot, binary); each task's own network by lowest entropy or most information (batches that mix classes) | no |
//! | [`data`] | (std) `.npy` inputs; IDX, image-folder and embedded datasets; transforms; scenarios | no |
//! | [`import`] | (std) random SupSup backbones, quantisation, ONNX import (feature `import`) | no |
//! | [`session`] | (std) tasks decoded once over a mapped backbone; runs any task with switching that allocates and copies nothing | no |
//! | [`store`] | (std) the task store: backbone copy, generations swapped atomically, install/remove/rollback/verify/gc | no |
//! | [`rng`] | SplitMix64, the one source of randomness | yes |
//! | [`hugepages`] | (std) a global allocator asking Linux for transparent huge pages for large blocks | no |
//!
//! Data flow for learning: `data` yields samples → `train` builds a task's network over the
//! backbone and trains its components → `format::task` writes the `.ect` file → `eval` rebuilds
//! the network from the file and measures it. A device keeps its tasks in a [`store`], which
//! changes only by whole generations (a power cut leaves the old or the new state); tasks
//! travel between devices as signed bundles (`format::bundle`, `format::keys`). Serving: a
//! [`session`] decodes the store's tasks once and runs any of them through
//! `Backbone::forward_task`, masks and overlays applied while the weights are packed.
//!
//! Features: `std` ⊃ `alloc`; `cli` (the `edgecl` binary); `import` (tract-onnx). With no
//! default features the core (`format`, `kernels`, `backbone`) builds for bare-metal targets
//! such as `thumbv7em-none-eabihf` and allocates nothing.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod adapter;
pub mod backbone;
#[cfg(feature = "std")]
pub mod data;
#[cfg(feature = "std")]
pub mod eval;
pub mod format;
#[cfg(feature = "std")]
pub mod hugepages;
#[cfg(feature = "std")]
pub mod import;
#[cfg(feature = "std")]
pub mod infer;
pub mod kernels;
pub mod rng;
#[cfg(feature = "std")]
pub mod session;
#[cfg(feature = "std")]
pub mod store;
#[cfg(feature = "std")]
pub mod train;
