//! Task switching and memory per task of a session (issue 4's benchmarks).
//!
//! `cargo bench --bench session` prints one JSON line per measurement:
//! * `{"case":"switch", "backbone", "tasks", "same_ms", "alternating_ms", "ratio",
//!   "allocations_per_run"}`: median latency of `run(A)` (batch 1, one thread) when every
//!   run is task A, against runs alternating A/B, timed A only in both; `ratio` =
//!   alternating / same (target < 1.01); allocations counted by a counting allocator.
//!   `backbone_only_ms` times the plain backbone for scale.
//!   Backbones: fc1024 (random, supsup tasks) and the imported EfficientNet-Lite0 at 96×96
//!   (supsup and CLR tasks).
//! * `{"case":"rss", "tasks", "rss_bytes", "growth_per_task_bytes", "decoded_bytes_per_task"}`:
//!   resident memory of a process holding an fc1024 session with 1, 10 and 100 supsup tasks
//!   (each in its own process, after running every task once), against the decoded size.
//!
//! Random task state stands in for learned tasks: speed and memory do not depend on what the
//! bits are.

use edgecl::adapter::Method;
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::import::init::{random_backbone, random_task, Arch};
use edgecl::kernels::Kernels;
use edgecl::session::Session;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ms of `run(a)`, with `other` run between the timed runs (`other == a`: same task).
fn time_a(session: &Session, k: &Kernels, a: usize, other: usize, x: &[f32], reps: usize) -> (f64, f64) {
    let mut ws = session.workspace(k, 1);
    for _ in 0..3 {
        session.run(k, a, x, 1, &mut ws);
        session.run(k, other, x, 1, &mut ws);
    }
    let mut times = Vec::with_capacity(reps);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..reps {
        session.run(k, other, x, 1, &mut ws);
        let t = Instant::now();
        std::hint::black_box(session.run(k, a, x, 1, &mut ws));
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let allocs = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / (2 * reps) as f64;
    (median(times), allocs)
}

fn switch(name: &str, bytes: &[u8], methods: [Method; 2], reps: usize) {
    let bb = Backbone::open(bytes).unwrap();
    let a = random_task(&bb, methods[0], "a", &[], 1);
    let b = random_task(&bb, methods[1], "b", &[], 2);
    let session = Session::new(&bb, vec![a, b]).unwrap();
    let k = Kernels::detect();
    let x: Vec<f32> = (0..bb.input_shape().len()).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
    // Interleave the two orders so that drift (frequency, other load) hits both alike.
    let (mut same, mut alt, mut allocs) = (Vec::new(), Vec::new(), 0.0f64);
    for _ in 0..5 {
        let (s, al) = time_a(&session, &k, 0, 0, &x, reps);
        let (t, bl) = time_a(&session, &k, 0, 1, &x, reps);
        same.push(s);
        alt.push(t);
        allocs = allocs.max(al).max(bl);
    }
    let (same, alt) = (median(same), median(alt));
    // The backbone alone, for scale: what applying the task's state costs on top.
    let mut scratch = vec![0.0; bb.scratch_len(&k, 1)];
    let plain = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(bb.forward(&k, &x, 1, &mut scratch));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let tasks = format!("{}/{}", methods[0].name(), methods[1].name());
    println!(
        "{{\"case\":\"switch\",\"backbone\":\"{name}\",\"tasks\":\"{tasks}\",\"same_ms\":{same:.4},\"alternating_ms\":{alt:.4},\"ratio\":{:.4},\"allocations_per_run\":{allocs},\"backbone_only_ms\":{plain:.4}}}",
        alt / same
    );
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .map_or(0, |kb: u64| kb * 1024)
}

/// One process: an fc1024 session with `n` tasks, each run once.
fn rss(n: usize) {
    let bytes = random_backbone(Arch::Fc1024, 10, 3).emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let x = vec![0.5f32; bb.input_shape().len()];
    // The baseline: backbone bytes and one run of the plain network.
    let mut s = vec![0.0; bb.scratch_len(&k, 1)];
    bb.forward(&k, &x, 1, &mut s);
    let base = rss_bytes();
    let files: Vec<_> = (0..n).map(|i| random_task(&bb, Method::Supsup, &format!("t{i}"), &[], i as u64)).collect();
    let session = Session::new(&bb, files).unwrap();
    let mut ws = session.workspace(&k, 1);
    for t in 0..n {
        session.run(&k, t, &x, 1, &mut ws);
    }
    let now = rss_bytes();
    let decoded = session.tasks().iter().map(|t| t.decoded_bytes()).sum::<usize>() / n;
    println!(
        "{{\"case\":\"rss\",\"tasks\":{n},\"rss_bytes\":{now},\"growth_per_task_bytes\":{},\"decoded_bytes_per_task\":{decoded}}}",
        now.saturating_sub(base) / n as u64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if let [case, n] = &args[..] {
        if case == "rss" {
            return rss(n.parse().expect("task count"));
        }
    }
    // One thread: the switch cost is a per-call cost; threads only add noise here.
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().unwrap();
    let fc = random_backbone(Arch::Fc1024, 10, 3).emit(WeightFormat::I8);
    switch("fc1024", &fc, [Method::Supsup, Method::Supsup], 200);
    let lite0 = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0.onnx");
    let opts = edgecl::import::onnx::ImportOptions {
        input: [3, 96, 96],
        mean: vec![0.5; 3],
        std: vec![0.5; 3],
        drop_head: true,
        name: "lite0".into(),
    };
    let lite = edgecl::import::onnx::import(&lite0, &opts).expect("import Lite0").emit(WeightFormat::I8);
    switch("lite0-96", &lite, [Method::Supsup, Method::Supsup], 40);
    switch("lite0-96", &lite, [Method::Clr, Method::Clr], 40);
    let exe = std::env::current_exe().unwrap();
    for n in [1, 10, 100] {
        let out = std::process::Command::new(&exe).args(["rss", &n.to_string()]).output().unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}
