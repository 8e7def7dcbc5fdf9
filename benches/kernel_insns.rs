//! Runs one kernel workload `reps` times with one kernel table, on one thread, for counting
//! instructions under an emulator (`benches/qemu/insn_ratio.sh`): the count of a run with
//! `reps = R` minus that with `reps = 0` is R times the workload's instructions, setup and
//! warm-up cancelled. Emulated wall time is no measure of a real core's speed; instruction
//! counts at least compare two kernels on the same ISA (not cache misses, nor latencies).
//!
//! `kernel_insns <table> <workload> <reps>`, table `baseline` (the portable fast path) or an
//! `isa` of `Kernels::available()` such as `aarch64 neon`; `kernel_insns list` names the
//! workloads.

use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::import::init::{random_backbone, Arch};
use edgecl::kernels::gemm::{self, a_scratch_len, gemm_packed, pack_b, packed_b_len};
use edgecl::kernels::{ConvShape, Kernels, Masked, Overlay, PostOp, Weights};
use std::hint::black_box;

const WORKLOADS: [&str; 13] = [
    "pack-i8",
    "pack-masked",
    "pack-overlay",
    "gemm-f32",
    "gemm-i8",
    "gemm-masked",
    "gemm-overlay",
    "dw-mid",
    "dw-small",
    "dw-rows",
    "linear-i8",
    "linear-masked",
    "gemresnet18",
];

/// Deterministic floats in [-1, 1).
fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut r = edgecl::rng::SplitMix64::new(seed);
    (0..n).map(|_| r.uniform(-1.0, 1.0)).collect()
}

/// A bit vector of `n` bits, each set with probability `p`.
fn bits(n: usize, p: f32, seed: u64) -> Vec<u32> {
    let mut r = edgecl::rng::SplitMix64::new(seed);
    let mut v = vec![0u32; n.div_ceil(32)];
    for i in 0..n {
        v[i / 32] |= u32::from(r.next_f32() < p) << (i % 32);
    }
    v
}

/// Layer weights of `rows × row_len`: int8 with scales, f32, a SupSup mask (half the weights)
/// and an ExSSNeT overlay (5 % of them).
struct Layer {
    q: Vec<i8>,
    scale: Vec<f32>,
    wf: Vec<f32>,
    mask: Vec<u32>,
    present: Vec<u32>,
    row_rank: Vec<u32>,
    values: Vec<f32>,
    row_len: usize,
}

impl Layer {
    fn new(rows: usize, row_len: usize) -> Self {
        let n = rows * row_len;
        let wf = floats(n, 1);
        let q = wf.iter().map(|v| (v * 127.0) as i8).collect();
        let (mask, present) = (bits(n, 0.5, 2), bits(n, 0.05, 3));
        let row_rank = (0..rows).map(|o| edgecl::kernels::count_ones(&present, 0, o * row_len) as u32).collect();
        let values = floats(edgecl::kernels::count_ones(&present, 0, n), 4);
        Layer { q, scale: vec![0.01; rows], wf, mask, present, row_rank, values, row_len }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("list") {
        println!("{}", WORKLOADS.join("\n"));
        return;
    }
    // `cargo bench` runs every bench target with `--bench`: this one is a tool for the
    // instruction-count script, not a timing, so it says so and stops.
    if args.len() == 2 && args[1] == "--bench" {
        println!("kernel_insns: run by benches/qemu/insn_ratio.sh under qemu; nothing to time here");
        return;
    }
    let [_, table, workload, reps] = &args[..] else {
        eprintln!("usage: kernel_insns <table> <workload> <reps> | kernel_insns list");
        std::process::exit(2);
    };
    let reps: usize = reps.parse().expect("reps: a number");
    let kern = Kernels::available()
        .into_iter()
        .filter(|k| k.fast)
        .find(|k| k.isa == table)
        .unwrap_or_else(|| panic!("no table {table:?} on this CPU"));
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().unwrap();

    // Every workload is built once; `run` is called once to warm up, then `reps` times.
    let mut run: Box<dyn FnMut()> = match workload.as_str() {
        "pack-i8" | "pack-masked" | "pack-overlay" => {
            // The A packing alone (dequantise, mask, overlay) of a 3×3 conv with 128 input and
            // 256 output channels, in panels of 8 rows: the portable `gemm::pack_a` as the
            // compiler vectorises it, or an ISA's own.
            let (m, k, mr) = (256, 1152, 8);
            let pack: gemm::PackAFn = match kern.isa {
                "baseline" => gemm::pack_a,
                #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
                "aarch64 neon" => edgecl::kernels::aarch64::pack_a,
                other => panic!("no packing kernel of its own in {other:?}"),
            };
            let layer = Box::leak(Box::new(Layer::new(m, k)));
            let base = Box::leak(Box::new(Weights::I8 { q: &layer.q, scale: &layer.scale }));
            let ov = Overlay { present: &layer.present, row_rank: &layer.row_rank, values: &layer.values };
            let w = match workload.as_str() {
                "pack-i8" => *base,
                "pack-masked" => Weights::Masked(Masked { base, mask: &layer.mask, row_len: k, overlay: None }),
                _ => Weights::Masked(Masked { base, mask: &layer.mask, row_len: k, overlay: Some(ov) }),
            };
            let mut a = vec![0.0; mr * k];
            Box::new(move || {
                for r0 in (0..m).step_by(mr) {
                    pack(black_box(w), r0, mr, k, mr, &mut a);
                    black_box(&a);
                }
            })
        }
        "gemm-f32" | "gemm-i8" | "gemm-masked" | "gemm-overlay" => {
            // 256 × 256 × 256 with B packed once: the micro-kernel and the A packing.
            let (m, n, k) = (256, 256, 256);
            let layer = Box::leak(Box::new(Layer::new(m, k)));
            let src = floats(k * n, 5);
            let mut b = vec![0.0; packed_b_len(k, n, kern.micro.nr)];
            pack_b(&src, k, n, n, kern.micro.nr, &mut b);
            let base = Box::leak(Box::new(Weights::I8 { q: &layer.q, scale: &layer.scale }));
            let ov = Overlay { present: &layer.present, row_rank: &layer.row_rank, values: &layer.values };
            let w = match workload.as_str() {
                "gemm-f32" => Weights::F32(&layer.wf),
                "gemm-i8" => *base,
                "gemm-masked" => Weights::Masked(Masked { base, mask: &layer.mask, row_len: k, overlay: None }),
                _ => Weights::Masked(Masked { base, mask: &layer.mask, row_len: k, overlay: Some(ov) }),
            };
            let (mul, add) = (vec![1.0; m], vec![0.0; m]);
            let mut c = vec![0.0; m * n];
            let mut a = vec![0.0; a_scratch_len(k, kern.micro.mr)];
            Box::new(move || {
                let post = PostOp { mul: &mul, add: &add, lo: 0.0, hi: 6.0 };
                gemm_packed(&kern, m, n, k, w, 0, black_box(&b), &mut c, &post, &mut a);
                black_box(&c);
            })
        }
        "dw-mid" | "dw-small" | "dw-rows" => {
            // A MobileNet-style 3×3 stride-1 layer on a 56×56 plane (the padded mid-size path),
            // 5×5 stride 2 / 3×3 stride 1 layers on 14×14 and 7×7 planes (interleaved), and a
            // 3×3 layer on a plane too large to copy padded (the row-wise path).
            let shapes: Vec<ConvShape> = match workload.as_str() {
                "dw-mid" => vec![dw(96, 56, 3, 1)],
                "dw-small" => vec![dw(240, 14, 5, 2), dw(480, 7, 3, 1)],
                _ => vec![dw(16, 150, 3, 1)],
            };
            let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = shapes
                .iter()
                .map(|s| (floats(s.c_out * s.kh * s.kw, 6), floats(s.c_in * s.h * s.w, 7), floats(s.c_out, 8)))
                .collect();
            let mut outs: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; s.c_out * s.oh() * s.ow()]).collect();
            Box::new(move || {
                for ((s, (w, x, mul)), y) in shapes.iter().zip(&data).zip(&mut outs) {
                    let post = PostOp { mul, add: mul, lo: 0.0, hi: 6.0 };
                    (kern.conv2d)(&kern, s, Weights::F32(w), black_box(x), y, &post, &mut []);
                    black_box(&y);
                }
            })
        }
        "linear-i8" | "linear-masked" => {
            let (i, o) = (1024, 1024);
            let layer = Box::leak(Box::new(Layer::new(o, i)));
            let base = Box::leak(Box::new(Weights::I8 { q: &layer.q, scale: &layer.scale }));
            let w = if workload == "linear-i8" {
                *base
            } else {
                Weights::Masked(Masked { base, mask: &layer.mask, row_len: layer.row_len, overlay: None })
            };
            let x = floats(i, 9);
            let (mul, add) = (vec![1.0; o], vec![0.0; o]);
            let mut y = vec![0.0; o];
            Box::new(move || {
                let post = PostOp { mul: &mul, add: &add, lo: 0.0, hi: f32::INFINITY };
                (kern.linear)(&kern, i, o, w, black_box(&x), &mut y, &post);
                black_box(&y);
            })
        }
        "gemresnet18" => {
            // A whole forward pass (im2col, packing, GEMM, pooling, the rest) at batch 1.
            let bytes: &'static [u8] =
                Box::leak(random_backbone(Arch::GemResnet18, 10, 11).emit(WeightFormat::I8).into());
            let bb = Backbone::open(bytes).unwrap();
            let x = floats(bb.input_shape().len(), 10);
            let mut scratch = vec![0.0; bb.scratch_len(&kern, 1)];
            Box::new(move || {
                black_box(bb.forward(&kern, black_box(&x), 1, &mut scratch));
            })
        }
        other => panic!("unknown workload {other:?}; `kernel_insns list` names them"),
    };
    run();
    for _ in 0..reps {
        run();
    }
}

/// A depthwise layer: `c` channels, `side × side`, `k × k`, stride `s`, "same" padding.
fn dw(c: usize, side: usize, k: usize, s: usize) -> ConvShape {
    let p = k / 2;
    ConvShape { c_in: c, h: side, w: side, c_out: c, kh: k, kw: k, sh: s, sw: s, pad: [p; 4], dh: 1, dw: 1, groups: c }
}
