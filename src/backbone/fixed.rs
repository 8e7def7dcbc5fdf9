//! Tasks decoded into caller-owned fixed buffers: what a session does for a task (DESIGN §7),
//! without an allocator, for firmware that keeps its task files in flash.
//!
//! [`FixedTask::load`] checks a task file (header, digests, payload, backbone digest, every
//! component against the backbone) and copies what the forward pass reads out of the file:
//! mask words (postcard varints in the file) into a pool of `u32`, norms and the head
//! (unaligned little-endian floats in the file) and CLR kernels and shifts (int8 steps in the
//! file, decoded) into a pool of `f32`,
//! then folds the task's post-ops once into the same pool, exactly as
//! [`crate::session::Session`] does. Names and labels stay borrowed from the file. After
//! that, running a task is [`Backbone::forward_task`] with it, and switching between loaded
//! tasks copies nothing.
//!
//! Pools are passed as `&mut &mut [T]`: each load takes the prefix it needs and leaves the
//! rest, so several tasks share one static buffer; [`needs`] says how much a task takes, for
//! sizing buffers at compile time. Per-layer lists hold at most `L` entries
//! (a `heapless::Vec`).
//!
//! Mask-based SupSup tasks, CLR and linear (head-only) tasks are supported. ExSSNeT tasks need
//! the overlays of their chain merged (see `session`) and finetune tasks dense copies of every
//! layer; both are refused with [`LoadError::Unsupported`].

use super::task::{HeadView, LayerWeights, NormView, TaskFit, TaskParts};
use super::Backbone;
use crate::format::graph::Op;
use crate::format::task_view::{self, Base, F32s, Method, PayloadError, QuantizedBytes, TaskView};
use crate::format::{Digest, FormatError, Hex};

/// Why a task file cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The file's header, length or digests.
    File(FormatError),
    /// The payload does not decode.
    Payload(PayloadError),
    /// The task was learned on another backbone.
    WrongBackbone { task: Digest, backbone: Digest },
    /// A method this loader does not run.
    Unsupported { method: Method },
    /// A component is missing, or there are more or fewer of it than the backbone needs.
    Components { what: &'static str, expected: usize, found: usize },
    /// A component has the wrong size for its layer.
    Fit(TaskFit),
    /// More per-layer entries than the loader's capacity `L`.
    TooManyLayers { what: &'static str, max: usize },
    /// A pool is too small for the task.
    OutOfMemory { pool: &'static str, needed: usize, available: usize },
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoadError::File(e) => e.fmt(f),
            LoadError::Payload(e) => e.fmt(f),
            LoadError::WrongBackbone { task, backbone } => {
                write!(f, "the task was learned on backbone {} but this backbone is {}", Hex(task), Hex(backbone))
            }
            LoadError::Unsupported { method } => {
                write!(f, "{} tasks cannot be loaded without an allocator (supsup, clr, linear can)", method.name())
            }
            LoadError::Components { what, expected, found } => {
                write!(f, "the task has {found} {what} where the backbone needs {expected}")
            }
            LoadError::Fit(e) => e.fmt(f),
            LoadError::TooManyLayers { what, max } => write!(f, "more than {max} {what} (the loader's capacity)"),
            LoadError::OutOfMemory { pool, needed, available } => {
                write!(f, "the {pool} pool holds {available} values but the task needs {needed} more")
            }
        }
    }
}

impl From<FormatError> for LoadError {
    fn from(e: FormatError) -> Self {
        LoadError::File(e)
    }
}

impl From<PayloadError> for LoadError {
    fn from(e: PayloadError) -> Self {
        LoadError::Payload(e)
    }
}

impl From<TaskFit> for LoadError {
    fn from(e: TaskFit) -> Self {
        LoadError::Fit(e)
    }
}

/// Pool sizes one task takes: mask words and floats (components and folded post-ops).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub words: usize,
    pub floats: usize,
}

/// A task decoded into fixed buffers, ready for [`Backbone::forward_task`].
#[derive(Debug)]
pub struct FixedTask<'a, const L: usize> {
    /// The task digest (SHA-256 of the payload).
    pub digest: Digest,
    view: TaskView<'a>,
    masks: heapless::Vec<&'a [u32], L>,
    norms: heapless::Vec<NormView<'a>, L>,
    reprogram: heapless::Vec<&'a [f32], L>,
    shifts: heapless::Vec<&'a [f32], L>,
    head: Option<HeadView<'a>>,
    posts: &'a [f32],
    folded: bool,
}

/// Takes the first `n` values of a pool.
fn take<'a, T>(pool: &mut &'a mut [T], n: usize, name: &'static str) -> Result<&'a mut [T], LoadError> {
    if n > pool.len() {
        return Err(LoadError::OutOfMemory { pool: name, needed: n, available: pool.len() });
    }
    let (head, rest) = core::mem::take(pool).split_at_mut(n);
    *pool = rest;
    Ok(head)
}

fn floats<'a>(pool: &mut &'a mut [f32], v: F32s) -> Result<&'a [f32], LoadError> {
    let out = take(pool, v.len(), "float")?;
    v.copy_to(out);
    Ok(out)
}

fn dequantized<'a>(pool: &mut &'a mut [f32], q: QuantizedBytes, base: Base) -> Result<&'a [f32], LoadError> {
    let out = take(pool, q.len(), "float")?;
    q.decode_to(base, out);
    Ok(out)
}

fn push<T, const L: usize>(v: &mut heapless::Vec<T, L>, x: T, what: &'static str) -> Result<(), LoadError> {
    v.push(x).map_err(|_| LoadError::TooManyLayers { what, max: L })
}

fn count(what: &'static str, expected: usize, found: usize) -> Result<(), LoadError> {
    if expected == found {
        Ok(())
    } else {
        Err(LoadError::Components { what, expected, found })
    }
}

/// The file checks and the component counts a backbone needs (the sizes of each component
/// are checked by [`Backbone::check_task`]).
fn open_checked<'a>(bb: &Backbone, file: &'a [u8]) -> Result<(Digest, TaskView<'a>), LoadError> {
    let f = task_view::open(file)?;
    if f.backbone != bb.digest() {
        return Err(LoadError::WrongBackbone { task: f.backbone, backbone: bb.digest() });
    }
    let v = f.task()?;
    let layers = bb.layers();
    let maskable = layers.iter().filter(|l| l.op.is_matmul()).count();
    let norms = layers.iter().filter(|l| matches!(l.op, Op::BatchNorm(_))).count();
    if !v.norms.is_empty() {
        count("norm states", norms, v.norms.len())?;
    }
    match v.method {
        Method::Supsup => {
            count("masks", maskable, v.masks.len())?;
            let layers = (0..layers.len()).filter(|&i| layers[i].op.is_matmul());
            for (m, i) in v.masks.iter().zip(layers) {
                // The length must be the layer's exactly (stale bits past a shorter one would
                // be read), and the words must hold it.
                let n = bb.maskable(i);
                count("mask bits", n, usize::try_from(m.len).unwrap_or(usize::MAX))?;
                count("mask words", n.div_ceil(32), m.words.len())?;
            }
        }
        Method::Clr => {
            let reprogrammed = (0..layers.len()).filter(|&i| bb.is_reprogrammed(i)).count();
            let shifts = (0..layers.len()).filter(|&i| bb.is_reprogrammed(i) && !bb.norm_follows(i)).count();
            count("reprogramming kernels", reprogrammed, v.reprogram.len())?;
            count("reprogramming shifts", shifts, v.shifts.len())?;
            count("heads", 1, usize::from(v.head.is_some()))?;
        }
        Method::Linear => count("heads", 1, usize::from(v.head.is_some()))?,
        method @ (Method::Exssnet | Method::Finetune) => return Err(LoadError::Unsupported { method }),
    }
    let outputs = match (v.method, v.head) {
        (Method::Clr | Method::Linear, Some(h)) => h.outputs as usize,
        _ => bb.output_shape().len(),
    };
    if v.classes() == 0 || v.classes() > outputs {
        return Err(LoadError::Components { what: "classes", expected: outputs, found: v.classes() });
    }
    Ok((f.digest, v))
}

/// What [`FixedTask::load`] takes from the pools for `file`, for sizing them. Checks the file
/// as `load` does except for the sizes of the components.
pub fn needs(bb: &Backbone, file: &[u8]) -> Result<Needs, LoadError> {
    let (_, v) = open_checked(bb, file)?;
    let f32s = |l: F32s| l.len();
    let mut n = Needs { words: 0, floats: 0 };
    if v.method == Method::Supsup {
        n.words = v.masks.iter().map(|m| m.words.len()).sum();
    }
    for s in v.norms.iter() {
        n.floats += s.mean.len() + s.var.len() + s.gamma.map_or(0, f32s) + s.beta.map_or(0, f32s);
    }
    if v.method == Method::Clr {
        n.floats += v.reprogram.iter().chain(v.shifts.iter()).map(|q| q.len()).sum::<usize>();
    }
    if let (Method::Clr | Method::Linear, Some(h)) = (v.method, v.head) {
        n.floats += h.weight.len() + h.bias.len();
    }
    /// Post-op sizes depend only on whether the task reprograms.
    struct Reprograms(bool);
    impl TaskParts for Reprograms {
        fn reprograms(&self) -> bool {
            self.0
        }
    }
    n.floats += bb.folded_len(&Reprograms(v.method == Method::Clr));
    Ok(n)
}

impl<'a, const L: usize> FixedTask<'a, L> {
    /// Checks `file` against `bb` and decodes it into the pools (see the module doc).
    pub fn load(
        bb: &Backbone,
        file: &'a [u8],
        words: &mut &'a mut [u32],
        floats_pool: &mut &'a mut [f32],
    ) -> Result<Self, LoadError> {
        let (digest, view) = open_checked(bb, file)?;
        let mut t = FixedTask {
            digest,
            view,
            masks: heapless::Vec::new(),
            norms: heapless::Vec::new(),
            reprogram: heapless::Vec::new(),
            shifts: heapless::Vec::new(),
            head: None,
            posts: &[],
            folded: false,
        };
        if view.method == Method::Supsup {
            for m in view.masks.iter() {
                let w = take(words, m.words.len(), "word")?;
                m.words.copy_to(w);
                push(&mut t.masks, &*w, "masks")?;
            }
        }
        for n in view.norms.iter() {
            let (mean, var) = (floats(floats_pool, n.mean)?, floats(floats_pool, n.var)?);
            let gamma = match n.gamma {
                Some(g) => Some(floats(floats_pool, g)?),
                None => None,
            };
            let beta = match n.beta {
                Some(b) => Some(floats(floats_pool, b)?),
                None => None,
            };
            push(&mut t.norms, NormView { mean, var, gamma, beta }, "norm states")?;
        }
        if view.method == Method::Clr {
            for r in view.reprogram.iter() {
                let k = dequantized(floats_pool, r, Base::Identity3x3)?;
                push(&mut t.reprogram, k, "reprogramming kernels")?;
            }
            for q in view.shifts.iter() {
                let b = dequantized(floats_pool, q, Base::Zero)?;
                push(&mut t.shifts, b, "reprogramming shifts")?;
            }
        }
        if let (Method::Clr | Method::Linear, Some(h)) = (view.method, view.head) {
            t.head = Some(HeadView {
                inputs: h.inputs as usize,
                outputs: h.outputs as usize,
                weight: floats(floats_pool, h.weight)?,
                bias: floats(floats_pool, h.bias)?,
            });
        }
        bb.check_task(&t)?;
        let posts = take(floats_pool, bb.folded_len(&t), "float")?;
        bb.fold_posts(&t, posts);
        t.posts = posts;
        t.folded = true;
        Ok(t)
    }

    pub fn name(&self) -> &'a str {
        self.view.name
    }
    pub fn method(&self) -> Method {
        self.view.method
    }
    /// Number of classes; the task's logits are the first `classes()` outputs.
    pub fn classes(&self) -> usize {
        self.view.classes()
    }
    /// The name of class `i`.
    pub fn label(&self, i: usize) -> Option<&'a str> {
        self.view.labels.get(i)
    }
    /// Everything the file says (provenance, metrics, dependencies).
    pub fn view(&self) -> &TaskView<'a> {
        &self.view
    }
}

impl<const L: usize> TaskParts for FixedTask<'_, L> {
    fn weights(&self, maskable: usize) -> LayerWeights<'_> {
        match self.masks.get(maskable) {
            Some(mask) => LayerWeights::Masked { mask, overlay: None },
            None => LayerWeights::Backbone,
        }
    }
    fn norm(&self, bn: usize) -> Option<NormView<'_>> {
        self.norms.get(bn).copied()
    }
    fn reprograms(&self) -> bool {
        self.view.method == Method::Clr
    }
    fn reprogram(&self, r: usize) -> &[f32] {
        self.reprogram.get(r).copied().unwrap_or(&[])
    }
    fn shift(&self, a: usize) -> &[f32] {
        self.shifts.get(a).copied().unwrap_or(&[])
    }
    fn head(&self) -> Option<HeadView<'_>> {
        self.head
    }
    fn folded_posts(&self) -> Option<&[f32]> {
        self.folded.then_some(self.posts)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::format::graph::{InputSpec, Op as GOp, WeightFormat};
    use crate::format::task::{encode, TaskFile};
    use crate::import::init::{random_backbone, random_task, Arch};
    use crate::import::{Ir, IrOp, IrWeights};
    use crate::kernels::Kernels;
    use crate::rng::SplitMix64;
    use crate::session::Session;
    use std::vec::Vec;

    /// conv 3×3 with bias (CLR puts a shift after it) → relu6 → conv 3×3 → BN (affine) →
    /// relu → conv 1×1 → GAP → flatten: norms, reprogramming, shifts and an appended head.
    fn conv_net() -> Vec<u8> {
        let mut r = SplitMix64::new(4);
        let mut w = |n: usize| IrWeights::F32((0..n).map(|_| r.uniform(-0.5, 0.5)).collect());
        let conv = |cin, cout, k, weight, bias| IrOp::square_conv(cin, cout, k, 1, weight, bias);
        let mut ir = Ir::new("convnet", "test", InputSpec::plain(2, 9, 7));
        let v = ir.push(0, conv(2, 5, 3, w(90), Some(vec![0.1, -0.2, 0.3, 0.0, 0.05])));
        let v = ir.push(v, IrOp::Plain(GOp::Relu6));
        let v = ir.push(v, conv(5, 6, 3, w(270), None));
        let bn = IrOp::BatchNorm {
            eps: 1e-5,
            mean: vec![0.1; 6],
            var: vec![1.5; 6],
            affine: Some((vec![1.1; 6], vec![0.1; 6])),
        };
        let v = ir.push(v, bn);
        let v = ir.push(v, IrOp::Plain(GOp::Relu));
        let v = ir.push(v, conv(6, 4, 1, w(24), None));
        let v = ir.push(v, IrOp::Plain(GOp::GlobalAvgPool));
        ir.push(v, IrOp::Plain(GOp::Flatten));
        ir.emit(WeightFormat::I8)
    }

    fn tasks(bb: &Backbone, methods: &[Method]) -> (Vec<TaskFile>, Vec<Vec<u8>>) {
        let files: Vec<TaskFile> = methods
            .iter()
            .enumerate()
            .map(|(i, &m)| random_task(bb, m, &format!("t{i}-{}", m.name()), &[], 50 + i as u64))
            .collect();
        let bytes = files.iter().map(|f| encode(&f.task, &bb.digest())).collect();
        (files, bytes)
    }

    /// Tasks loaded into exactly-sized pools give the session's logits bit for bit, run
    /// alone and interleaved, and take exactly what `needs` says.
    fn check(bb_bytes: &[u8], methods: &[Method]) {
        let bb = Backbone::open(bb_bytes).unwrap();
        let (files, bytes) = tasks(&bb, methods);
        let session = Session::new(&bb, files.clone()).unwrap();
        let need: Vec<Needs> = bytes.iter().map(|b| needs(&bb, b).unwrap()).collect();
        let mut words = vec![0u32; need.iter().map(|n| n.words).sum()];
        let mut floats = vec![0f32; need.iter().map(|n| n.floats).sum()];
        let (mut wp, mut fp) = (&mut words[..], &mut floats[..]);
        let mut fixed: Vec<FixedTask<'_, 8>> = Vec::new();
        for (b, n) in bytes.iter().zip(&need) {
            let (w0, f0) = (wp.len(), fp.len());
            fixed.push(FixedTask::load(&bb, b, &mut wp, &mut fp).unwrap());
            assert_eq!((w0 - wp.len(), f0 - fp.len()), (n.words, n.floats), "{}", fixed.last().unwrap().name());
        }
        assert!(wp.is_empty() && fp.is_empty());
        let batch = 2;
        let mut r = SplitMix64::new(7);
        let x: Vec<f32> = (0..batch * bb.input_shape().len()).map(|_| r.uniform(-1.0, 1.0)).collect();
        for k in [Kernels::generic(false), Kernels::generic(true), Kernels::detect()] {
            let mut ws = session.workspace(&k, batch);
            let most = fixed.iter().map(|t| bb.scratch_len_for(&k, batch, t)).max().unwrap();
            let mut scratch = vec![0f32; most];
            for (t, f) in fixed.iter().enumerate() {
                assert_eq!(f.name(), files[t].task.name);
                assert_eq!(f.digest, files[t].digest);
                assert_eq!(f.classes(), files[t].task.classes());
                assert_eq!(f.label(1), Some(files[t].task.labels[1].as_str()));
                assert_eq!(bb.output_len_for(f), session.output_len(t));
                let want = session.run(&k, t, &x, batch, &mut ws).to_vec();
                let got = bb.forward_task(&k, f, &x, batch, &mut scratch).to_vec();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{} with {k:?}", f.name());
                // After every other task: the same bits.
                for g in &fixed {
                    bb.forward_task(&k, g, &x, batch, &mut scratch);
                    assert_eq!(bits(bb.forward_task(&k, f, &x, batch, &mut scratch)), bits(&want));
                }
            }
        }
    }

    #[test]
    fn fixed_tasks_equal_the_session_on_lenet() {
        use Method::*;
        check(&random_backbone(Arch::Lenet, 10, 3).emit(WeightFormat::I8), &[Supsup, Linear, Clr, Supsup]);
        check(&random_backbone(Arch::Lenet, 10, 5).emit(WeightFormat::F32), &[Supsup, Linear]);
    }

    #[test]
    fn fixed_tasks_equal_the_session_with_norms_reprogramming_and_shifts() {
        use Method::*;
        check(&conv_net(), &[Supsup, Clr, Linear, Clr, Supsup]);
    }

    #[test]
    fn bad_files_and_small_pools_are_named_errors() {
        let bytes = random_backbone(Arch::Lenet, 10, 3).emit(WeightFormat::I8);
        let bb = Backbone::open(&bytes).unwrap();
        let load = |b: &[u8], words: usize, floats: usize| {
            let (mut w, mut f) = (vec![0u32; words], vec![0f32; floats]);
            FixedTask::<8>::load(&bb, b, &mut &mut w[..], &mut &mut f[..]).map(|t| t.name().to_string())
        };
        let (files, enc) = tasks(&bb, &[Method::Supsup, Method::Linear, Method::Exssnet, Method::Finetune]);
        for (t, b) in enc.iter().enumerate() {
            match files[t].task.method {
                m @ (Method::Exssnet | Method::Finetune) => {
                    assert_eq!(load(b, 1 << 20, 1 << 20), Err(LoadError::Unsupported { method: m }));
                    assert_eq!(needs(&bb, b), Err(LoadError::Unsupported { method: m }));
                }
                _ => {
                    let n = needs(&bb, b).unwrap();
                    assert_eq!(load(b, n.words, n.floats).unwrap(), files[t].task.name);
                    // Every smaller pool is refused, never overrun.
                    for (w, f) in [(n.words.saturating_sub(1), n.floats), (n.words, n.floats - 1), (0, 0)] {
                        if (w, f) != (n.words, n.floats) {
                            let e = load(b, w, f).unwrap_err();
                            assert!(matches!(e, LoadError::OutOfMemory { .. }), "{e}");
                        }
                    }
                }
            }
        }
        // Capacity: lenet has 3 maskable layers.
        let (mut w, mut f) = (vec![0u32; 1 << 14], vec![0f32; 1 << 14]);
        let e = FixedTask::<2>::load(&bb, &enc[0], &mut &mut w[..], &mut &mut f[..]).unwrap_err();
        assert_eq!(e, LoadError::TooManyLayers { what: "masks", max: 2 });
        // Another backbone, a flipped bit, a payload that lies about its masks.
        let other = Backbone::open(&random_backbone(Arch::Lenet, 10, 4).emit(WeightFormat::I8)).unwrap().digest();
        let foreign = encode(&files[0].task, &other);
        assert!(matches!(load(&foreign, 1 << 14, 1 << 14), Err(LoadError::WrongBackbone { .. })));
        let mut flipped = enc[0].clone();
        flipped[200] ^= 4;
        assert!(matches!(load(&flipped, 1 << 14, 1 << 14), Err(LoadError::File(FormatError::DigestMismatch { .. }))));
        let mut t = files[0].task.clone();
        t.components.masks.pop();
        let e = load(&encode(&t, &bb.digest()), 1 << 14, 1 << 14).unwrap_err();
        assert_eq!(e, LoadError::Components { what: "masks", expected: 3, found: 2 });
        let mut t = files[0].task.clone();
        t.components.masks[0].len -= 1;
        let e = load(&encode(&t, &bb.digest()), 1 << 14, 1 << 14).unwrap_err();
        assert!(matches!(e, LoadError::Components { what: "mask bits", .. }), "{e}");
        let mut t = files[1].task.clone();
        t.components.head.as_mut().unwrap().bias.pop();
        let e = load(&encode(&t, &bb.digest()), 1 << 14, 1 << 14).unwrap_err();
        assert!(matches!(e, LoadError::Fit(TaskFit { what: "head bias", .. })), "{e}");
        t.components.head = None;
        let e = load(&encode(&t, &bb.digest()), 1 << 14, 1 << 14).unwrap_err();
        assert_eq!(e, LoadError::Components { what: "heads", expected: 1, found: 0 });
    }
}
