//! Training throughput and peak memory of one training step, per method and backbone, for
//! comparison with PyTorch (`benches/compare/train_step.py` runs the PyTorch equivalents and
//! this program in the same session and prints the ratios).
//!
//! `cargo bench --bench train_step` runs every case, each in its own process (so that peak
//! RSS is the case's own), and prints one JSON line per case:
//! `{"case", "threads", "batch", "images_per_second", "step_seconds", "mean_step_seconds",
//! "cpu_seconds_per_step", "peak_rss_bytes"}` (`step_seconds`: the median step, as the
//! PyTorch side reports; `cpu_seconds_per_step`: user + system time of all threads, per step
//! on average; on a loaded machine it is the steadier figure).
//! `cargo bench --bench train_step -- CASE [--threads N]` runs one case in this process.
//!
//! Cases: `supsup-fc1024` (batch 128), `supsup-gemresnet18` (32×32, batch 64),
//! `clr-lite0-96` (the imported EfficientNet-Lite0 at 96×96 without its head, batch 16).
//! Each runs 2 warm-up steps, then `STEPS` steps (`--steps N` to change it, e.g. for a
//! profile dominated by the steps rather than the setup) of one epoch over synthetic data,
//! timing every step after the first (the data pipeline is not measured: samples are copied
//! from memory).

use edgecl::adapter::Method;
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::import::init::{random_backbone, Arch};
use edgecl::kernels::Kernels;
use edgecl::rng::SplitMix64;
use edgecl::train::mask::Density;
use edgecl::train::method::{learn, Config, Samples};
use std::time::Instant;

/// As the `edgecl` CLI: large blocks in transparent huge pages.
#[global_allocator]
static ALLOC: edgecl::hugepages::HugePages = edgecl::hugepages::HugePages;

const STEPS: usize = 10;
const CASES: [&str; 3] = ["supsup-fc1024", "supsup-gemresnet18", "clr-lite0-96"];

struct Synthetic {
    sample: usize,
    n: usize,
    classes: u32,
}

impl Samples for Synthetic {
    fn len(&self) -> usize {
        self.n
    }
    fn label(&self, i: usize) -> u32 {
        i as u32 % self.classes
    }
    fn load(&self, idx: &[usize], _: Option<&mut SplitMix64>, out: &mut [f32]) -> Result<(), String> {
        for (b, &i) in idx.iter().enumerate() {
            let mut r = SplitMix64::new(i as u64);
            for v in &mut out[b * self.sample..(b + 1) * self.sample] {
                *v = r.uniform(-1.0, 1.0);
            }
        }
        Ok(())
    }
}

fn lite0_96() -> Vec<u8> {
    use edgecl::import::onnx::{import, ImportOptions};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite0.onnx");
    let opts = ImportOptions {
        input: [3, 96, 96],
        mean: vec![0.5; 3],
        std: vec![0.5; 3],
        drop_head: true,
        name: "lite0".into(),
    };
    import(std::path::Path::new(path), &opts).expect("import Lite0").emit(WeightFormat::I8)
}

fn run_case(case: &str, threads: usize, steps: usize) {
    let (bytes, method, batch, classes) = match case {
        "supsup-fc1024" => (random_backbone(Arch::Fc1024, 10, 1).emit(WeightFormat::I8), Method::Supsup, 128, 10),
        "supsup-gemresnet18" => {
            (random_backbone(Arch::GemResnet18, 10, 1).emit(WeightFormat::I8), Method::Supsup, 64, 10)
        }
        "clr-lite0-96" => (lite0_96(), Method::Clr, 16, 5),
        _ => panic!("unknown case {case}; cases: {CASES:?}"),
    };
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut cfg = Config::new(method);
    cfg.batch = batch;
    cfg.epochs = 1;
    cfg.density = Density::Uniform(0.05);
    let labels: Vec<String> = (0..classes).map(|c| c.to_string()).collect();
    let len = bb.input_shape().len();
    // Warm-up (allocations, page faults, thread pool), then the timed run.
    let warm = Synthetic { sample: len, n: 2 * batch, classes: classes as u32 };
    learn(&k, &bb, &cfg, "warm", labels.clone(), &warm, &[], &mut |_| {}).unwrap();
    let data = Synthetic { sample: len, n: steps * batch, classes: classes as u32 };
    // The end of every step; the first step (buffers growing, pages faulting in) is not timed.
    let mut ends: Vec<(Instant, f64)> = Vec::with_capacity(steps);
    learn(&k, &bb, &cfg, "bench", labels, &data, &[], &mut |_| ends.push((Instant::now(), cpu_seconds()))).unwrap();
    let mut times: Vec<f64> = ends.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    // The median step, as the PyTorch side reports it; the mean beside it.
    let step = times[times.len() / 2];
    let timed = (ends.len() - 1) as f64;
    let mean = (ends[ends.len() - 1].0 - ends[0].0).as_secs_f64() / timed;
    let cpu = (ends[ends.len() - 1].1 - ends[0].1) / timed;
    println!(
        "{{\"case\": \"{case}\", \"threads\": {threads}, \"batch\": {batch}, \"images_per_second\": {:.1}, \"step_seconds\": {:.5}, \"mean_step_seconds\": {:.5}, \"cpu_seconds_per_step\": {:.5}, \"peak_rss_bytes\": {}}}",
        batch as f64 / step,
        step,
        mean,
        cpu,
        peak_rss()
    );
}

/// User + system CPU time of the whole process (every thread) so far: on a loaded machine
/// wall time measures the other processes too, CPU time much less so.
fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` into the pointer it is given, which is valid.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(u.ru_utime) + s(u.ru_stime)
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .and_then(|t| t.parse().ok())
        .filter(|&s: &usize| s >= 2)
        .unwrap_or(STEPS);
    let case = args.iter().find(|a| CASES.contains(&a.as_str()));
    match case {
        Some(c) => {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
            run_case(c, threads, steps)
        }
        None => {
            let exe = std::env::current_exe().unwrap();
            for c in CASES {
                let out =
                    std::process::Command::new(&exe).args([c, "--threads", &threads.to_string()]).output().unwrap();
                print!("{}", String::from_utf8_lossy(&out.stdout));
                if !out.status.success() {
                    eprintln!("{c} failed: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
    }
}
