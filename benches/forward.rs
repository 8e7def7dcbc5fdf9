//! Lite0 forward pass, edgecl against tract on the same ONNX in the same run; backbone open
//! time; GEMM throughput on Lite0's real layer shapes.
//!
//! `cargo bench --bench forward` (all), or e.g. `cargo bench --bench forward -- lite0/96`.
//! Report: edgecl/tract time ratio per (size, threads) from the criterion output, and GFLOP/s
//! from the `gemm` group's throughput (criterion prints elements/s; one element = one flop).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgecl::backbone::mmap::MappedFile;
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::import::onnx::{import, ImportOptions};
use edgecl::kernels::{gemm, Kernels, PostOp, Weights};
use std::path::Path;
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

const LITE0: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite0.onnx");

fn lite0_ecb(size: u32) -> Vec<u8> {
    let opts = ImportOptions {
        input: [3, size, size],
        mean: vec![0.5; 3],
        std: vec![0.5; 3],
        drop_head: false,
        name: "lite0".into(),
    };
    import(Path::new(LITE0), &opts).expect("import Lite0").emit(WeightFormat::I8)
}

/// `n` deterministic floats in [-1, 1].
fn floats(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect()
}

fn input(size: usize) -> Vec<f32> {
    floats(3 * size * size)
}

fn forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("lite0");
    g.sample_size(30);
    for size in [96usize, 224] {
        let bytes = lite0_ecb(size as u32);
        let bb = Backbone::open(&bytes).unwrap();
        let k = Kernels::detect();
        let x = input(size);
        let model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_path(LITE0)
            .unwrap()
            .with_input_fact(0, f32::fact([1, 3, size, size]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let tx: Tensor = tract_ndarray::Array4::from_shape_vec((1, 3, size, size), x.clone()).unwrap().into();
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut scratch = vec![0.0; bb.scratch_len(&k, 1)];
            g.bench_function(BenchmarkId::new(format!("{size}/edgecl"), threads), |b| {
                pool.install(|| b.iter(|| bb.forward(&k, &x, 1, &mut scratch)[0]))
            });
            g.bench_function(BenchmarkId::new(format!("{size}/tract"), threads), |b| {
                let run = || model.run(tvec!(tx.clone().into())).unwrap();
                if threads == 1 {
                    b.iter(run)
                } else {
                    multithread_tract_scope(Executor::multithread(threads), || b.iter(run))
                }
            });
        }
    }
    g.finish();
}

fn open(c: &mut Criterion) {
    let bytes = lite0_ecb(224);
    let path = std::env::temp_dir().join(format!("edgecl-bench-{}.ecb", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    // SAFETY: the file is private to this process and not modified while mapped.
    #[allow(unsafe_code)]
    let map = unsafe { MappedFile::open(&path) }.unwrap();
    c.bench_function("open/lite0-mapped", |b| b.iter(|| Backbone::open(map.bytes()).unwrap().layers().len()));
    let small = edgecl::import::init::random_backbone(edgecl::import::init::Arch::Lenet, 10, 0).emit(WeightFormat::I8);
    c.bench_function("open/lenet", |b| b.iter(|| Backbone::open(&small).unwrap().layers().len()));
    let _ = std::fs::remove_file(path);
}

/// Pointwise (1×1) conv shapes of Lite0 at 224×224: (M = out channels, K = in channels, N = H·W).
const SHAPES: [(usize, usize, usize); 6] =
    [(16, 32, 12544), (96, 16, 12544), (24, 144, 3136), (240, 40, 784), (480, 80, 196), (1152, 192, 49)];

fn gemm_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    let k = Kernels::best_fast();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    for (m, kk, n) in SHAPES {
        let q: Vec<i8> = (0..m * kk).map(|i| (i % 255) as i8).collect();
        let scale = vec![0.01; m];
        let b = floats(kk * n);
        let b = &b[..kk * n];
        let (mul, add) = (vec![1.0; m], vec![0.0; m]);
        let post = PostOp { mul: &mul, add: &add, lo: f32::NEG_INFINITY, hi: f32::INFINITY };
        let mut pa = vec![0.0; gemm::a_scratch_len(kk, k.micro.mr)];
        let mut pb = vec![0.0; gemm::packed_b_len(kk, n, k.micro.nr)];
        let mut cm = vec![0.0; m * n];
        let w = Weights::I8 { q: &q, scale: &scale };
        g.throughput(Throughput::Elements((2 * m * n * kk) as u64));
        g.bench_function(format!("{m}x{kk}x{n}"), |bch| {
            pool.install(|| {
                bch.iter(|| {
                    gemm::pack_b(b, kk, n, n, k.micro.nr, &mut pb);
                    gemm::gemm_packed(&k, m, n, kk, w, 0, &pb, &mut cm, &post, &mut pa);
                    cm[0]
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, forward, open, gemm_bench);
criterion_main!(benches);
