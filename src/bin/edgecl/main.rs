//! The `edgecl` command line: parse, then one function per subcommand. The library does the
//! work; this file only reads files, prints, and turns errors into messages.

mod input;

/// `println!` that exits quietly when stdout is closed early (`edgecl inspect f | head`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("writing to stdout: {e}");
        }
    }};
}

mod bundle;
mod cl;
mod predict;
mod predict_auto;
mod serve;
mod store;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use edgecl::backbone::mmap::MappedFile;
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::format::Hex;
use edgecl::import::init::{random_backbone, Arch};
use edgecl::kernels::Kernels;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Large blocks (a training step's activations and gradients) in transparent huge pages.
#[global_allocator]
static ALLOC: edgecl::hugepages::HugePages = edgecl::hugepages::HugePages;

#[derive(Parser)]
#[command(
    name = "edgecl",
    version,
    about = "On-device continual learning on a frozen, memory-mapped int8 backbone",
    long_about = "edgecl keeps one frozen backbone (.ecb) memory-mapped and lets a device learn \
                  classification tasks on top of it.\n\nStart with `edgecl init` (a random \
                  SupSup backbone) or `edgecl import` (an ONNX model), check the result with \
                  `edgecl inspect` and `edgecl verify`, and run it with `edgecl forward`.\n\nThen learn \
                  tasks with `edgecl learn` (supsup, exssnet, clr, linear, finetune), check them \
                  with `edgecl eval`, and measure a whole continual-learning scenario with \
                  `edgecl bench-cl`. `edgecl demo` shows all of it offline in under a minute.\n\nOn a \
                  device, keep tasks in a store: `edgecl store init`, `edgecl learn --store`, \
                  `edgecl tasks list`, `edgecl store install|rollback|verify|gc`."
)]
struct Cli {
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightsArg {
    /// int8, symmetric per output channel (the default; 4x smaller)
    I8,
    /// f32, for exact comparisons with the float model
    F32,
}

impl From<WeightsArg> for WeightFormat {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::I8 => WeightFormat::I8,
            WeightsArg::F32 => WeightFormat::F32,
        }
    }
}

/// How `--task auto` chooses (ALGORITHMS §1.4; `edgecl::infer`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum InferArg {
    /// SupSup's one-shot entropy gradient over the superposition of every mask: one pass for
    /// all supsup/exssnet tasks (clr/linear tasks: lowest entropy). For tasks that differ by
    /// their inputs, learn them with `--softmax all` on a backbone with many more outputs
    /// than classes.
    OneShot,
    /// SupSup's halving search by the same gradient.
    Binary,
    /// Run every task on the batch (with --batch-auto); the one that classifies each input
    /// confidently and spreads the batch over its classes wins (the most information, one
    /// pass per task). For tasks that differ by their inputs (permuted, rotated) learned
    /// without superfluous outputs, on batches that mix classes; a batch of one class
    /// misleads it. Single inputs: as entropy.
    Info,
    /// Run every task on the inputs; the one whose predictions have the lowest entropy wins
    /// (one pass per task). A heuristic; see the README.
    Entropy,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a random SupSup backbone (signed Kaiming constant weights, seed recorded).
    ///
    /// Example: edgecl init --arch lenet --outputs 10 -o lenet.ecb
    Init {
        /// lenet (784-300-100-N), fc1024 (784-1024-1024-N) or gemresnet18 (32x32x3 input).
        #[arg(long, value_parser = ["lenet", "fc1024", "gemresnet18"])]
        arch: String,
        /// Output units of the last layer. A task uses the first as many as it has classes;
        /// for `--task auto` over tasks that differ by their inputs, give many more (e.g. 500)
        /// and learn with `--softmax all` (SupSup's superfluous neurons).
        #[arg(long, default_value_t = 10)]
        outputs: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "i8")]
        weights: WeightsArg,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Convert an ONNX model into a backbone file (int8 per-channel by default).
    ///
    /// Example: edgecl import models/efficientnet-lite0.onnx --input 3x96x96 \
    ///   --mean 0.498,0.498,0.498 --std 0.502,0.502,0.502 --drop-head -o lite0.ecb
    #[cfg(feature = "import")]
    Import {
        /// The .onnx file (one self-contained file; float or QDQ int8).
        model: PathBuf,
        /// Per-sample input shape CxHxW, e.g. 3x224x224.
        #[arg(long)]
        input: String,
        /// Per-channel mean of pixels in [0, 1], comma-separated (default 0).
        #[arg(long, value_delimiter = ',')]
        mean: Vec<f32>,
        /// Per-channel standard deviation, comma-separated (default 1).
        #[arg(long, value_delimiter = ',')]
        std: Vec<f32>,
        /// Remove the final classifier so that tasks bring their own heads.
        #[arg(long)]
        drop_head: bool,
        #[arg(long, value_enum, default_value = "i8")]
        weights: WeightsArg,
        /// Model name recorded in the file (default: the file stem).
        #[arg(long)]
        name: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Show a backbone's layers, shapes, parameters, bytes, maskable weights and digest.
    Inspect {
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Recompute a backbone's SHA-256 digest and compare it with its header.
    Verify {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run a backbone on images (PNG/JPEG, resized and normalised as the file says) or on .npy
    /// f32 tensors of the input shape (batch dimension optional). Prints the top 5 outputs.
    Forward {
        backbone: PathBuf,
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Print the full output vector of every input as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Learn a task on a backbone and save it as a task file (.ect), or install it in a store.
    ///
    /// Example: edgecl learn --backbone fc1024.ecb --task shoes --method supsup \
    ///   --data fashion-mnist --classes 5,7,9 --density 0.05 -o shoes.ect
    ///
    /// ExSSNeT tasks build on earlier ones: pass them, oldest first, with --prior (their
    /// NAME.scores files beside them are used by --kkt when present).
    ///
    /// With --store DIR the store's backbone is used, every task of the store is a prior, and
    /// the task is installed through a new generation (replacing a task of the same name with
    /// the next version); -o then also writes a copy:
    ///
    ///   edgecl learn --store /var/lib/edgecl --task tops --method exssnet --kkt \
    ///     --data fashion-mnist --classes 0,2,6 --density 0.05
    Learn {
        /// The backbone (.ecb) to learn on (not with --store, which has its own).
        #[arg(long, required_unless_present = "store", conflicts_with = "store")]
        backbone: Option<PathBuf>,
        /// Learn on this store's backbone after its tasks, and install the task there.
        #[arg(long, conflicts_with = "prior")]
        store: Option<PathBuf>,
        /// The task's name.
        #[arg(long)]
        task: String,
        #[command(flatten)]
        train: cl::TrainArgs,
        #[command(flatten)]
        data: cl::DataArgs,
        /// Earlier task files, oldest first.
        #[arg(long)]
        prior: Vec<PathBuf>,
        /// Do not keep NAME.scores beside the task (KKT then starts from masks).
        #[arg(long)]
        no_scores: bool,
        /// The task file to write (optional with --store).
        #[arg(short, long, required_unless_present = "store")]
        output: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a task file on data (accuracy on the test split).
    ///
    /// Example: edgecl eval --backbone fc1024.ecb --task shoes.ect --data fashion-mnist --classes 5,7,9
    ///
    /// An ExSSNeT task needs the tasks it depends on: give them first, the task to evaluate last.
    Eval {
        #[arg(long)]
        backbone: PathBuf,
        #[arg(long, required = true)]
        task: Vec<PathBuf>,
        #[command(flatten)]
        data: cl::DataArgs,
        #[arg(long)]
        json: bool,
    },
    /// Learn a continual-learning scenario task by task and report the accuracy matrix, ACC,
    /// BWT, forgetting, bytes per task, training time and peak memory.
    ///
    /// Example: edgecl bench-cl --scenario split-fashion-mnist --tasks 5 --arch fc1024 \
    ///   --method supsup --density 0.05 --epochs 3 --json r.json --md r.md --svg r.svg
    #[command(name = "bench-cl")]
    BenchCl {
        #[command(flatten)]
        bench: cl::BenchArgs,
        #[command(flatten)]
        train: cl::TrainArgs,
    },
    /// Learn five Fashion-MNIST tasks with ExSSNeT on a random backbone, offline, in under a
    /// minute, and show that none is forgotten.
    Demo {
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
    /// Predict with learned tasks: a named task, or `--task auto` to infer it.
    ///
    /// Example: edgecl predict --store /var/lib/edgecl --task shoes photo.jpg
    ///          edgecl predict --store DIR --task auto --json t10k-images-idx3-ubyte.gz
    ///
    /// Inputs are images (PNG, JPEG), folders of them, .npy tensors (already normalised) or
    /// IDX image files. All tasks are decoded once and share the mapped backbone; switching
    /// between them costs nothing. `--task auto` picks each input's task: by default with
    /// SupSup's entropy gradient over all masks at once (supsup/exssnet tasks; for clr/linear
    /// tasks the head with the lowest entropy, a heuristic); `--infer entropy` runs every
    /// task and takes the most certain, which is right where tasks differ by input domain.
    /// With --batch-auto the inputs are taken to share one task and it is inferred from all
    /// of them together (far more reliable than one image).
    Predict {
        /// A store made by `edgecl store init` (its current tasks).
        #[arg(long, conflicts_with = "backbone")]
        store: Option<PathBuf>,
        /// Or a backbone file with task files (--task-file).
        #[arg(long, requires = "task_files")]
        backbone: Option<PathBuf>,
        #[arg(long = "task-file")]
        task_files: Vec<PathBuf>,
        /// The task's name, or `auto`.
        #[arg(long)]
        task: String,
        /// How `--task auto` chooses the task.
        #[arg(long, value_enum, default_value = "one-shot")]
        infer: InferArg,
        /// Infer one task for all inputs together.
        #[arg(long)]
        batch_auto: bool,
        /// One JSON object per input: input, task, label, label_index, score, task_digest
        /// (and task_inferred, task_score with --task auto).
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Make ed25519 keys that sign bundles, and trust public keys in a store.
    Keys {
        #[command(subcommand)]
        cmd: bundle::KeysCmd,
    },
    /// Make and inspect signed offline bundles of tasks (.ecbundle) for devices with no network.
    Bundle {
        #[command(subcommand)]
        cmd: bundle::BundleCmd,
    },
    /// Print the kernels chosen for this CPU (EDGECL_FORCE_GENERIC=1 forces the reference).
    Kernels {
        #[arg(long)]
        json: bool,
    },
    /// Keep a device's tasks in a store: init, install, rollback, verify, gc. A store changes
    /// only by whole generations, so a power cut leaves the old or the new state.
    ///
    /// Example: edgecl store init /var/lib/edgecl --backbone fc1024.ecb
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Serve a store's tasks over HTTP/JSON: POST /v1/predict?task=NAME|auto (image bytes,
    /// {"input": [f32…]} or {"inputs": [[f32…], …]}), GET /v1/tasks, /healthz, /metrics
    /// (Prometheus). task=auto infers one task from all inputs of the request (add
    /// infer=binary for the halving search). New generations are picked up on the next
    /// request. Workers: --threads (default: all cores).
    ///
    /// Example: edgecl serve --store /var/lib/edgecl --listen 127.0.0.1:8080 --threads 2
    Serve(serve::ServeArgs),
    /// List, show and remove the tasks of a store.
    ///
    /// Example: edgecl tasks list --store /var/lib/edgecl
    #[command(subcommand)]
    Tasks(store::TasksCmd),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(t) = cli.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().context("setting up the thread pool")?;
    }
    match cli.cmd {
        Cmd::Init { arch, outputs, seed, weights, output } => init(&arch, outputs, seed, weights.into(), &output),
        #[cfg(feature = "import")]
        Cmd::Import { model, input, mean, std, drop_head, weights, name, output } => {
            import(&model, &input, mean, std, drop_head, weights.into(), name, &output)
        }
        Cmd::Inspect { file, json } => inspect(&file, json),
        Cmd::Verify { file, json } => verify(&file, json),
        Cmd::Forward { backbone, inputs, json } => forward(&backbone, &inputs, json),
        Cmd::Kernels { json } => kernels(json),
        Cmd::Learn { backbone, store, task, train, data, prior, no_scores, output, json } => {
            match (store, backbone, output) {
                (Some(dir), _, output) => {
                    store::learn_cmd(&dir, &task, &train, &data, no_scores, output.as_deref(), json)
                }
                (None, Some(backbone), Some(output)) => {
                    cl::learn_cmd(&backbone, &task, &train, &data, &prior, no_scores, &output, json)
                }
                _ => bail!("give --backbone and -o, or --store"),
            }
        }
        Cmd::Eval { backbone, task, data, json } => cl::eval_cmd(&backbone, &task, &data, json),
        Cmd::BenchCl { bench, train } => cl::bench_cl_cmd(&bench, &train),
        Cmd::Demo { quiet } => cl::demo_cmd(quiet),
        Cmd::Predict { store, backbone, task_files, task, infer, batch_auto, json, inputs } => predict::predict_cmd(
            store.as_deref(),
            backbone.as_deref(),
            &task_files,
            &task,
            infer,
            &inputs,
            batch_auto,
            json,
        ),
        Cmd::Keys { cmd } => bundle::keys_cmd(cmd),
        Cmd::Bundle { cmd } => bundle::bundle_cmd(cmd),
        Cmd::Store(cmd) => store::store_cmd(cmd),
        Cmd::Serve(args) => serve::serve_cmd(&args, cli.threads),
        Cmd::Tasks(cmd) => store::tasks_cmd(cmd),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a crash never
/// leaves a partial file and a mapped old file is never rewritten in place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Maps and validates a backbone file.
pub(crate) fn open_backbone(path: &Path) -> Result<(MappedFile, PathBuf)> {
    // SAFETY: edgecl never rewrites a backbone in place (see write_atomic); the user is told in
    // the README not to overwrite a backbone that a running edgecl has open.
    #[allow(unsafe_code)]
    let map = unsafe { MappedFile::open(path) }.with_context(|| format!("opening {}", path.display()))?;
    Ok((map, path.to_path_buf()))
}

pub(crate) fn backbone<'a>(map: &'a MappedFile, path: &Path) -> Result<Backbone<'a>> {
    Backbone::open(map.bytes()).with_context(|| format!("{} is not a valid backbone file", path.display()))
}

fn init(arch: &str, outputs: usize, seed: u64, weights: WeightFormat, output: &Path) -> Result<()> {
    let arch = Arch::from_name(arch).context("unknown architecture")?;
    if outputs == 0 {
        bail!("--outputs must be at least 1");
    }
    let bytes = random_backbone(arch, outputs, seed).emit(weights);
    Backbone::open(&bytes).context("internal error: the new backbone does not validate")?;
    write_atomic(output, &bytes)?;
    out!("wrote {} ({} bytes, {} seed {seed})", output.display(), bytes.len(), arch.name());
    Ok(())
}

#[cfg(feature = "import")]
#[allow(clippy::too_many_arguments)]
fn import(
    model: &Path,
    input: &str,
    mean: Vec<f32>,
    std: Vec<f32>,
    drop_head: bool,
    weights: WeightFormat,
    name: Option<String>,
    output: &Path,
) -> Result<()> {
    use edgecl::import::onnx::{import, ImportOptions};
    let dims: Vec<u32> = input
        .split(['x', 'X', ','])
        .map(|d| d.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--input {input:?}: expected CxHxW, e.g. 3x224x224"))?;
    let [c, h, w] = dims[..] else { bail!("--input {input:?}: expected three dimensions CxHxW") };
    let n = c as usize;
    let fill = |v: Vec<f32>, default: f32, what: &str| -> Result<Vec<f32>> {
        match v.len() {
            0 => Ok(vec![default; n]),
            1 => Ok(vec![v[0]; n]),
            l if l == n => Ok(v),
            l => bail!("--{what} has {l} values but the input has {n} channels"),
        }
    };
    let (mean, std) = (fill(mean, 0.0, "mean")?, fill(std, 1.0, "std")?);
    if std.iter().any(|&s| s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)) {
        bail!("--std values must be positive");
    }
    if n > 4 && (mean.iter().any(|&m| m != 0.0) || std.iter().any(|&s| s != 1.0)) {
        bail!("input normalisation is recorded for at most 4 channels");
    }
    let name = name.unwrap_or_else(|| model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    let opts = ImportOptions { input: [c, h, w], mean, std, drop_head, name };
    let ir = import(model, &opts)?;
    let bytes = ir.emit(weights);
    let bb = Backbone::open(&bytes).context("the converted model does not validate")?;
    let out = bb.output_shape();
    write_atomic(output, &bytes)?;
    out!("wrote {} ({} layers, output {out}, {} bytes)", output.display(), bb.layers().len(), bytes.len());
    Ok(())
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let (map, path) = open_backbone(path)?;
    let bb = backbone(&map, &path)?;
    let g = &bb.view().graph;
    let inp = bb.input();
    let nc = (inp.channels as usize).min(4);
    let mut rows = Vec::new();
    let (mut params, mut bytes, mut maskable, mut macs) = (0usize, 0u64, 0usize, 0usize);
    for (i, l) in bb.layers().iter().enumerate() {
        let (x, y) = (bb.shape(l.input), bb.shape(i as u32 + 1));
        params += bb.layer_params(i);
        bytes += bb.layer_bytes(i);
        maskable += bb.maskable(i);
        macs += bb.layer_macs(i);
        let mut detail = String::new();
        if let Some(s) = bb.conv_shape(i) {
            detail = format!("k{}x{} s{} p{} g{}", s.kh, s.kw, s.sh, s.pad[0], s.groups);
        }
        if let edgecl::format::graph::Op::Add { other } = l.op {
            detail = format!("+ v{other}");
        }
        rows.push((i, l.op.name(), l.input, x, y, bb.layer_params(i), bb.layer_bytes(i), bb.maskable(i), detail));
    }
    let weights = match g.weights {
        WeightFormat::I8 => "int8 per-channel",
        WeightFormat::F32 => "f32",
    };
    if json {
        let layers: Vec<_> = rows
            .iter()
            .map(|(i, op, inp, x, y, p, b, m, d)| {
                json!({"index": i, "op": op, "input": inp, "in_shape": x.to_string(), "out_shape": y.to_string(),
                       "params": p, "bytes": b, "maskable": m, "detail": d})
            })
            .collect();
        let v = json!({
            "file": path, "name": g.provenance.name, "source": g.provenance.source, "seed": g.provenance.seed,
            "digest": Hex(&bb.digest()).to_string(), "weights": weights, "file_bytes": bb.view().file_len(),
            "input": {"shape": [inp.channels, inp.height, inp.width], "mean": &inp.mean[..nc], "std": &inp.std[..nc]},
            "output_shape": bb.output_shape().to_string(), "layers": layers,
            "totals": {"layers": rows.len(), "params": params, "bytes": bytes, "maskable": maskable, "macs": macs},
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    out!("{}: {} ({})", path.display(), g.provenance.name, g.provenance.source);
    if let Some(seed) = g.provenance.seed {
        out!("seed      {seed}");
    }
    out!("digest    {}", Hex(&bb.digest()));
    out!("weights   {weights}");
    out!(
        "input     {}x{}x{}  mean {:?}  std {:?}",
        inp.channels,
        inp.height,
        inp.width,
        &inp.mean[..nc],
        &inp.std[..nc]
    );
    out!(
        "\n{:>4}  {:<15} {:>5}  {:>12} -> {:<12} {:>10} {:>10} {:>10}  detail",
        "#",
        "op",
        "in",
        "shape",
        "shape",
        "params",
        "bytes",
        "maskable"
    );
    for (i, op, inp, x, y, p, b, m, d) in &rows {
        out!(
            "{i:>4}  {op:<15} {:>5}  {:>12} -> {:<12} {p:>10} {b:>10} {m:>10}  {d}",
            format!("v{inp}"),
            x.to_string(),
            y.to_string()
        );
    }
    out!(
        "\n{} layers, {params} parameters, {bytes} bytes of tensors ({} bytes file), {maskable} maskable weights, {:.1} M MACs per sample",
        rows.len(),
        bb.view().file_len(),
        macs as f64 / 1e6
    );
    Ok(())
}

fn verify(path: &Path, json: bool) -> Result<()> {
    let (map, path) = open_backbone(path)?;
    let bb = backbone(&map, &path)?;
    let result = bb.verify();
    if json {
        let computed = bb.view().compute_digest();
        out!(
            "{}",
            json!({"file": path, "ok": result.is_ok(), "recorded": Hex(&bb.digest()).to_string(), "computed": Hex(&computed).to_string()})
        );
    }
    result.with_context(|| format!("{} failed verification", path.display()))?;
    if !json {
        out!("{}: ok, digest {}", path.display(), Hex(&bb.digest()));
    }
    Ok(())
}

fn forward(path: &Path, inputs: &[PathBuf], json: bool) -> Result<()> {
    let (map, path) = open_backbone(path)?;
    let bb = backbone(&map, &path)?;
    let k = Kernels::detect();
    let mut scratch = Vec::new();
    let mut results = Vec::new();
    for p in inputs {
        let (x, batch) = input::load(p, &bb).with_context(|| format!("reading input {}", p.display()))?;
        scratch.resize(bb.scratch_len(&k, batch), 0.0);
        let y = bb.forward(&k, &x, batch, &mut scratch);
        let n = bb.output_shape().len();
        for (b, out) in y.chunks(n).enumerate() {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&a, &b| out[b].total_cmp(&out[a]));
            let top: Vec<(usize, f32)> = idx.iter().take(5).map(|&i| (i, out[i])).collect();
            if json {
                results.push(json!({"input": p, "sample": b, "top5": top, "output": out}));
            } else {
                let label = if batch > 1 { format!("{}[{b}]", p.display()) } else { p.display().to_string() };
                let tops: Vec<String> = top.iter().map(|(i, v)| format!("{i}:{v:.4}")).collect();
                out!("{label}: {}", tops.join("  "));
            }
        }
    }
    if json {
        out!("{}", serde_json::to_string(&results)?);
    }
    Ok(())
}

fn kernels(json: bool) -> Result<()> {
    let k = Kernels::detect();
    let forced = std::env::var_os("EDGECL_FORCE_GENERIC").is_some_and(|v| v == "1");
    let threads = edgecl::kernels::threads();
    if json {
        let slots: serde_json::Map<String, serde_json::Value> =
            k.describe().iter().map(|(s, d)| (s.to_string(), json!(d))).collect();
        out!("{}", json!({"fast": k.fast, "forced_generic": forced, "threads": threads, "slots": slots}));
        return Ok(());
    }
    out!("arch      {}", std::env::consts::ARCH);
    out!("threads   {threads}");
    if forced {
        out!("EDGECL_FORCE_GENERIC=1: reference kernels forced");
    }
    for (slot, desc) in k.describe() {
        out!("{slot:<18} {desc}");
    }
    Ok(())
}
