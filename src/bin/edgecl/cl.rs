//! The continual-learning subcommands: `learn`, `eval`, `bench-cl` and `demo`.

use crate::{backbone, open_backbone, write_atomic};
use anyhow::{bail, Context, Result};
use clap::Args;
use edgecl::adapter::{Method, Softmax, Task};
use edgecl::backbone::Backbone;
use edgecl::data::scenario::{self, Scenario, TaskData, TaskView};
use edgecl::data::{Dataset, Source, Split, Transform};
use edgecl::eval::{evaluate, Matrix};
use edgecl::format::task::{decode, encode, TaskFile};
use edgecl::format::Hex;
use edgecl::kernels::Kernels;
use edgecl::rng::SplitMix64;
use edgecl::train::mask::{Density, MaskRule};
use edgecl::train::method::{learn, Config, Learned, Prior, Progress, Samples};
use edgecl::train::optim::{Kind, Schedule};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Samples per evaluation batch: every value of the network is kept for a batch, so this
/// bounds evaluation memory (256 took 3.4 GB on Lite0 at 96×96).
const EVAL_BATCH: usize = 32;

/// Training options shared by `learn` and `bench-cl`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// supsup, exssnet, clr, linear or finetune.
    #[arg(long, value_parser = ["supsup", "exssnet", "clr", "linear", "finetune"])]
    pub method: String,
    /// Kept fraction of every maskable layer (supsup, exssnet; edge-popup top-k).
    #[arg(long, default_value_t = 0.1)]
    pub density: f64,
    /// Use the Erdős–Rényi per-layer budget with this knob s instead of a uniform density.
    #[arg(long)]
    pub er: Option<f64>,
    /// Threshold-at-zero masks (M = 1[S >= 0]) instead of top-k; density is then not controlled.
    #[arg(long)]
    pub threshold: bool,
    /// Epochs of the mask phase (supsup, exssnet) or of training (clr, linear, finetune).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Epochs of ExSSNeT's exclusive-weight phase (default 3 for exssnet).
    #[arg(long)]
    pub weight_epochs: Option<usize>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Learning rate of ExSSNeT's weight phase.
    #[arg(long, default_value_t = 1e-3)]
    pub weight_lr: f32,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// adam, sgd (momentum 0.9) or rmsprop.
    #[arg(long, default_value = "adam", value_parser = ["adam", "sgd", "rmsprop"])]
    pub optimizer: String,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// constant, cosine, or step:EVERY:GAMMA (e.g. step:20:0.1).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// ExSSNeT: start the scores from the most useful earlier task (KNN transfer).
    #[arg(long)]
    pub kkt: bool,
    /// KKT's K (clipped to the number of reference samples).
    #[arg(long, default_value_t = 200)]
    pub knn_k: usize,
    /// Random crop (padding 4) and horizontal flip while training.
    #[arg(long)]
    pub augment: bool,
    /// Which outputs the training softmax spans. `all` also puts the backbone's outputs beyond
    /// the task's classes in it, never as targets (SupSup's superfluous neurons): training
    /// pushes them down on the task's own inputs, which is what lets `predict --task auto`
    /// tell apart tasks that differ by their inputs (permuted, rotated, another sensor). Use
    /// it with a backbone that has many more outputs than classes (`init --outputs 500`) and
    /// a low rate (rmsprop 1e-4). Keep `classes` for tasks that add new classes over the same
    /// inputs. Kept in the task file.
    #[arg(long, default_value = "classes", value_parser = ["classes", "all"])]
    pub softmax: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl TrainArgs {
    pub fn config(&self) -> Result<Config> {
        let method = Method::from_name(&self.method).context("unknown method")?;
        let mut c = Config::new(method);
        if !(self.density > 0.0 && self.density <= 1.0) {
            bail!("--density must be in (0, 1], got {}", self.density);
        }
        c.density = match self.er {
            Some(s) if s > 0.0 => Density::ErdosRenyi(s),
            Some(s) => bail!("--er must be positive, got {s}"),
            None => Density::Uniform(self.density),
        };
        c.rule = if self.threshold { MaskRule::Threshold } else { MaskRule::TopK };
        c.epochs = self.epochs;
        c.weight_epochs = self.weight_epochs.unwrap_or(if method == Method::Exssnet { 3 } else { 0 });
        for (name, v) in [("--lr", self.lr), ("--weight-lr", self.weight_lr)] {
            if !(v > 0.0 && v.is_finite()) {
                bail!("{name} must be a positive number, got {v}");
            }
        }
        c.lr = self.lr;
        c.weight_lr = self.weight_lr;
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        c.batch = self.batch;
        c.optimizer = Kind::from_name(&self.optimizer).context("unknown optimizer")?;
        c.weight_decay = self.weight_decay;
        c.schedule = parse_schedule(&self.schedule)?;
        c.seed = self.seed;
        c.kkt = self.kkt;
        c.knn_k = self.knn_k.max(1);
        c.augment = self.augment;
        c.softmax = Softmax::from_name(&self.softmax).context("unknown softmax")?;
        if self.kkt && method != Method::Exssnet && method != Method::Supsup {
            bail!("--kkt applies to exssnet (and supsup) tasks only");
        }
        Ok(c)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "method": self.method, "density": self.density, "er": self.er, "threshold": self.threshold,
            "epochs": self.epochs, "weight_epochs": self.weight_epochs, "lr": self.lr, "weight_lr": self.weight_lr,
            "batch": self.batch, "optimizer": self.optimizer, "weight_decay": self.weight_decay,
            "schedule": self.schedule, "kkt": self.kkt, "knn_k": self.knn_k, "augment": self.augment, "seed": self.seed,
            "softmax": self.softmax,
        })
    }
}

fn parse_schedule(s: &str) -> Result<Schedule> {
    Ok(match s {
        "constant" => Schedule::Constant,
        "cosine" => Schedule::Cosine,
        _ => {
            let p: Vec<&str> = s.split(':').collect();
            match p[..] {
                ["step", every, gamma] => Schedule::Step {
                    every: every.parse().context("--schedule step:EVERY:GAMMA: EVERY is not a whole number")?,
                    gamma: gamma.parse().context("--schedule step:EVERY:GAMMA: GAMMA is not a number")?,
                },
                _ => bail!("--schedule {s:?}: use constant, cosine or step:EVERY:GAMMA"),
            }
        }
    })
}

/// Samples of one task view, decoded on demand.
pub struct ViewSamples<'d> {
    pub ds: &'d Dataset,
    pub view: &'d TaskView,
    /// At most this many samples (CI-sized runs).
    pub limit: usize,
}

impl Samples for ViewSamples<'_> {
    fn len(&self) -> usize {
        self.view.indices.len().min(self.limit)
    }
    fn label(&self, i: usize) -> u32 {
        self.view.labels[i]
    }
    fn load(&self, idx: &[usize], augment: Option<&mut SplitMix64>, out: &mut [f32]) -> Result<(), String> {
        let src: Vec<usize> = idx.iter().map(|&i| self.view.indices[i]).collect();
        self.ds.load(&src, &self.view.transform, augment, out).map_err(|e| e.to_string())
    }
}

/// The backbone's input as a dataset transform: what training, `predict` and `serve` all feed
/// the network.
pub(crate) fn base_transform(bb: &Backbone) -> Transform {
    let i = bb.input();
    let mut t = Transform::new(i.channels as usize, i.height as usize, i.width as usize, i.mean, i.std);
    // 28×28 digits into a 32×32 network are padded, not stretched (the SupSup convention).
    t.pad = true;
    t
}

/// A progress bar over a training run.
fn progress_bar(cfg: &Config, samples: usize, task: &str) -> (indicatif::ProgressBar, impl FnMut(&Progress)) {
    let steps = samples.div_ceil(cfg.batch) as u64;
    let phases = (cfg.epochs + if cfg.method == Method::Exssnet { cfg.weight_epochs } else { 0 }) as u64;
    let pb = indicatif::ProgressBar::new(steps * phases);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(task.to_string());
    let start = Instant::now();
    let bar = pb.clone();
    let cb = move |p: &Progress| {
        bar.inc(1);
        let rate = p.images as f64 / start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{} epoch {}/{} loss {:.4} acc {:.3} {:.0} img/s",
            p.phase,
            p.epoch + 1,
            p.epochs,
            p.loss,
            p.accuracy,
            rate
        ));
    };
    (pb, cb)
}

/// The creation time recorded in task files: `SOURCE_DATE_EPOCH` when set (the
/// reproducible-builds convention, so that reruns give byte-identical files), else now.
fn now() -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()) {
        return t;
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads and validates a task file against a backbone.
pub(crate) fn read_task(path: &Path, bb: &Backbone) -> Result<TaskFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let f = decode(&bytes).with_context(|| format!("{} is not a valid task file", path.display()))?;
    f.check_backbone(&bb.digest()).with_context(|| format!("{}", path.display()))?;
    Ok(f)
}

/// Scores kept beside a task file for KKT (`NAME.scores`: postcard, one vector per layer).
pub fn scores_path(task: &Path) -> PathBuf {
    task.with_extension("scores")
}

/// Resolves `file`'s dependencies among `all` (oldest first), or names the missing one.
fn deps_of<'t>(file: &TaskFile, all: &'t [TaskFile]) -> Result<Vec<&'t Task>> {
    file.task
        .depends_on
        .iter()
        .map(|d| {
            all.iter().find(|f| &f.digest == d).map(|f| &f.task).with_context(|| {
                format!(
                    "task '{}' depends on task {} which was not given (pass it with --task)",
                    file.task.name,
                    Hex(d)
                )
            })
        })
        .collect()
}

/// How `learn` and `eval` pick their samples: all classes of the source, or `--classes`,
/// optionally permuted or rotated.
#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// fashion-mnist, embedded, idx:DIR or folder:DIR.
    #[arg(long)]
    pub data: String,
    /// Source class ids of the task, in label order (default: all classes).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<u32>,
    /// Permute the pixels with this seed (permuted-MNIST style tasks).
    #[arg(long)]
    pub permute: Option<u64>,
    /// Rotate the images by this many degrees.
    #[arg(long)]
    pub rotate: Option<f32>,
    /// Use at most this many training (or evaluation) samples.
    #[arg(long)]
    pub limit: Option<usize>,
}

fn view_of(args: &DataArgs, ds: &Dataset, base: &Transform) -> Result<TaskView> {
    let classes: Vec<u32> =
        if args.classes.is_empty() { (0..ds.num_classes() as u32).collect() } else { args.classes.clone() };
    let mut t = base.clone();
    if let Some(seed) = args.permute {
        let mut p: Vec<u32> = (0..t.sample_len() as u32).collect();
        SplitMix64::new(seed).shuffle(&mut p);
        t.permutation = Some(std::sync::Arc::new(p));
    }
    if let Some(r) = args.rotate {
        t.rotate_deg = r;
    }
    Ok(scenario::classes_view(ds, &classes, &t)?)
}

/// A task learned by [`train_task`], not yet written anywhere.
pub struct Trained {
    pub task: Task,
    /// Final scores (supsup, exssnet), kept as `NAME.scores` for KKT of later tasks.
    pub scores: Option<Vec<Vec<f32>>>,
    pub notes: Vec<String>,
    pub secs: f64,
}

/// Earlier tasks given to `learn`, oldest first, with their KKT scores when kept.
pub type Priors = [(TaskFile, Option<Vec<Vec<f32>>>)];

/// Reads the KKT scores kept in `path` (absent or unreadable scores: KKT starts from masks).
pub fn read_scores(path: &Path) -> Option<Vec<Vec<f32>>> {
    std::fs::read(path).ok().and_then(|b| postcard::from_bytes(&b).ok())
}

/// Learns task `name` on `bb` from `data`, after `priors`; the shared core of `learn` with
/// `-o` and `learn --store`.
pub fn train_task(bb: &Backbone, name: &str, train: &TrainArgs, data: &DataArgs, priors: &Priors) -> Result<Trained> {
    let cfg = train.config()?;
    let k = Kernels::detect();
    let src = Source::parse(&data.data)?;
    let ds = Dataset::open(&src, Split::Train)?;
    let view = view_of(data, &ds, &base_transform(bb))?;
    let samples = ViewSamples { ds: &ds, view: &view, limit: data.limit.unwrap_or(usize::MAX) };
    let labels: Vec<String> = view.classes.iter().map(|&c| ds.class_names()[c as usize].clone()).collect();
    let prior: Vec<Prior> =
        priors.iter().map(|(f, s)| Prior { task: &f.task, digest: f.digest, scores: s.as_deref() }).collect();
    let (pb, mut cb) = progress_bar(&cfg, samples.len(), name);
    let start = Instant::now();
    let learned = learn(&k, bb, &cfg, name, labels, &samples, &prior, &mut cb);
    pb.finish_and_clear();
    let Learned { mut task, scores, notes } = learned?;
    task.config = train.json().to_string();
    task.created_at = now();
    Ok(Trained { task, scores, notes, secs: start.elapsed().as_secs_f64() })
}

/// Prints what `learn` did; `wrote` says where the task went, `extra` adds JSON fields.
pub fn print_learned(t: &Trained, method: &str, bytes: usize, wrote: &str, extra: serde_json::Value, json_out: bool) {
    let metric = |n: &str| t.task.metrics.iter().find(|m| m.0 == n).map_or(0.0, |m| m.1);
    if json_out {
        let mut v = json!({"task": t.task.name, "bytes": bytes, "method": method, "version": t.task.version,
            "train_loss": metric("train_loss"), "train_accuracy": metric("train_accuracy"), "train_seconds": t.secs,
            "softmax": t.task.softmax.name(), "notes": t.notes});
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        out!("{v}");
    } else {
        for n in &t.notes {
            out!("{n}");
        }
        out!(
            "learned '{}' ({} classes, {}) in {:.1} s: train loss {:.4}, accuracy {:.4}; {wrote} ({bytes} bytes)",
            t.task.name,
            t.task.classes(),
            method,
            t.secs,
            metric("train_loss"),
            metric("train_accuracy"),
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn learn_cmd(
    backbone_path: &Path,
    name: &str,
    train: &TrainArgs,
    data: &DataArgs,
    prior_paths: &[PathBuf],
    no_scores: bool,
    output: &Path,
    json_out: bool,
) -> Result<()> {
    let (map, path) = open_backbone(backbone_path)?;
    let bb = backbone(&map, &path)?;
    let priors: Vec<(TaskFile, Option<Vec<Vec<f32>>>)> =
        prior_paths.iter().map(|p| Ok((read_task(p, &bb)?, read_scores(&scores_path(p))))).collect::<Result<_>>()?;
    let t = train_task(&bb, name, train, data, &priors)?;
    let bytes = encode(&t.task, &bb.digest());
    write_atomic(output, &bytes)?;
    if let (Some(s), false) = (&t.scores, no_scores) {
        write_atomic(&scores_path(output), &postcard::to_allocvec(s).context("encoding scores")?)?;
    }
    let wrote = format!("wrote {}", output.display());
    print_learned(&t, &train.method, bytes.len(), &wrote, json!({"file": output.display().to_string()}), json_out);
    Ok(())
}

pub fn eval_cmd(backbone_path: &Path, tasks: &[PathBuf], data: &DataArgs, json_out: bool) -> Result<()> {
    let (map, path) = open_backbone(backbone_path)?;
    let bb = backbone(&map, &path)?;
    let k = Kernels::detect();
    let files: Vec<TaskFile> = tasks.iter().map(|p| read_task(p, &bb)).collect::<Result<_>>()?;
    let src = Source::parse(&data.data)?;
    let ds = Dataset::open(&src, Split::Test)?;
    let view = view_of(data, &ds, &base_transform(&bb))?;
    let samples = ViewSamples { ds: &ds, view: &view, limit: data.limit.unwrap_or(usize::MAX) };
    // The last task given is evaluated; the others may be its dependencies.
    let f = files.last().context("give at least one --task")?;
    let deps = deps_of(f, &files)?;
    if view.classes.len() != f.task.classes() {
        bail!("the data selects {} classes but task '{}' has {}", view.classes.len(), f.task.name, f.task.classes());
    }
    let (acc, _) = evaluate(&k, &bb, &deps, &f.task, &samples, EVAL_BATCH)?;
    if json_out {
        out!("{}", json!({"task": f.task.name, "samples": samples.len(), "accuracy": acc}));
    } else {
        out!("{}: accuracy {:.4} on {} samples", f.task.name, acc, samples.len());
    }
    Ok(())
}

/// Options of `bench-cl`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// split-fashion-mnist, permuted-fashion-mnist, rotated-fashion-mnist or folder:DIR.
    #[arg(long)]
    pub scenario: String,
    #[arg(long, default_value_t = 5)]
    pub tasks: usize,
    /// Random backbone to create (lenet, fc1024, gemresnet18); or give --backbone.
    #[arg(long)]
    pub arch: Option<String>,
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Where the Fashion-MNIST scenarios read from: fashion-mnist (Debian package), embedded
    /// (the subset shipped in the binary) or idx:DIR.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Training samples per task at most (small runs).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Test samples per task at most.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Rotation step in degrees for rotated-fashion-mnist.
    #[arg(long, default_value_t = 10.0)]
    pub rotate_step: f32,
    /// Directory for the task files (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub keep: Option<PathBuf>,
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub md: Option<PathBuf>,
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Print no progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The result of a continual-learning run.
pub struct BenchResult {
    pub names: Vec<String>,
    pub matrix: Matrix,
    pub bytes_per_task: Vec<usize>,
    pub train_seconds: Vec<f64>,
    pub images: usize,
    pub switch_ns: f64,
    pub run_ns: f64,
}

pub fn bench_cl_cmd(b: &BenchArgs, train: &TrainArgs) -> Result<()> {
    let cfg = train.config()?;
    let tmp;
    let dir = match &b.keep {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let backbone_path = match (&b.backbone, &b.arch) {
        (Some(p), None) => p.clone(),
        (None, Some(a)) => {
            let arch = edgecl::import::init::Arch::from_name(a).with_context(|| format!("unknown --arch {a}"))?;
            let p = dir.join("backbone.ecb");
            let bytes =
                edgecl::import::init::random_backbone(arch, 10, cfg.seed).emit(edgecl::format::graph::WeightFormat::I8);
            write_atomic(&p, &bytes)?;
            p
        }
        _ => bail!("give exactly one of --arch and --backbone"),
    };
    let r = run_scenario(&backbone_path, b, &cfg, train, &dir)?;
    report(b, train, &r)
}

/// Learns the scenario's tasks in order; after each, evaluates every task so far from its
/// saved task file.
pub fn run_scenario(
    backbone_path: &Path,
    b: &BenchArgs,
    cfg: &Config,
    train: &TrainArgs,
    dir: &Path,
) -> Result<BenchResult> {
    let (map, path) = open_backbone(backbone_path)?;
    let bb = backbone(&map, &path)?;
    let k = Kernels::detect();
    let (src, scen) = match b.scenario.as_str() {
        "split-fashion-mnist" => (Source::parse(&b.data)?, Scenario::Split { tasks: b.tasks }),
        "permuted-fashion-mnist" => (Source::parse(&b.data)?, Scenario::Permuted { tasks: b.tasks, seed: cfg.seed }),
        "rotated-fashion-mnist" => (Source::parse(&b.data)?, Scenario::Rotated { tasks: b.tasks, step_deg: b.rotate_step }),
        s if s.starts_with("folder:") => (Source::parse(s)?, Scenario::Split { tasks: b.tasks }),
        s => bail!("unknown --scenario {s:?}: use split-fashion-mnist, permuted-fashion-mnist, rotated-fashion-mnist or folder:DIR"),
    };
    let train_ds = Dataset::open(&src, Split::Train)?;
    let test_ds = Dataset::open(&src, Split::Test)?;
    let base = base_transform(&bb);
    let datas: Vec<TaskData> =
        (0..b.tasks).map(|t| scenario::task(&scen, t, &train_ds, &test_ds, &base)).collect::<Result<_, _>>()?;
    let n = datas.len();
    let mut r = BenchResult {
        names: datas.iter().map(|d| d.name.clone()).collect(),
        matrix: Matrix::new(n),
        bytes_per_task: Vec::new(),
        train_seconds: Vec::new(),
        images: 0,
        switch_ns: 0.0,
        run_ns: 0.0,
    };
    let (limit, test_limit) = (b.limit.unwrap_or(usize::MAX), b.test_limit.unwrap_or(usize::MAX));
    let mut files: Vec<TaskFile> = Vec::new();
    let mut scores: Vec<Option<Vec<Vec<f32>>>> = Vec::new();
    for (t, d) in datas.iter().enumerate() {
        let samples = ViewSamples { ds: &train_ds, view: &d.train, limit };
        let prior: Vec<Prior> = files
            .iter()
            .zip(&scores)
            .map(|(f, s)| Prior { task: &f.task, digest: f.digest, scores: s.as_deref() })
            .collect();
        let labels = d.class_names.clone();
        let (pb, mut cb) = progress_bar(cfg, samples.len(), &d.name);
        if b.quiet {
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let start = Instant::now();
        let learned = learn(&k, &bb, cfg, &d.name, labels, &samples, &prior, &mut cb);
        pb.finish_and_clear();
        let Learned { mut task, scores: s, notes } = learned?;
        r.train_seconds.push(start.elapsed().as_secs_f64());
        r.images += samples.len() * (cfg.epochs + if cfg.method == Method::Exssnet { cfg.weight_epochs } else { 0 });
        task.config = train.json().to_string();
        task.created_at = now();
        for n in notes {
            eprintln!("{}: {n}", d.name);
        }
        let bytes = encode(&task, &bb.digest());
        let p = dir.join(format!("{}.ect", d.name));
        write_atomic(&p, &bytes)?;
        r.bytes_per_task.push(bytes.len());
        // Every evaluation reads the task back from its file.
        files.push(read_task(&p, &bb)?);
        scores.push(s);
        for (j, dj) in datas.iter().enumerate().take(t + 1) {
            let test = ViewSamples { ds: &test_ds, view: &dj.test, limit: test_limit };
            let f = &files[if cfg.method == Method::Finetune { t } else { j }];
            let deps = deps_of(f, &files)?;
            let (acc, _) = evaluate(&k, &bb, &deps, &f.task, &test, EVAL_BATCH)?;
            r.matrix.0[t][j] = Some(acc);
        }
        if !b.quiet {
            let row: Vec<String> = r.matrix.0[t][..=t].iter().map(|a| format!("{:.4}", a.unwrap_or(0.0))).collect();
            eprintln!("after {}: {}", d.name, row.join(" "));
        }
    }
    (r.switch_ns, r.run_ns) = switch_cost(&bb, &files);
    Ok(r)
}

/// Measured cost of a task switch in a session: median latency of one-sample runs of the
/// first task when each follows a run of the second, minus the same when each follows a run
/// of the first (ns; noise makes it scatter around 0). Also the plain run latency.
fn switch_cost(bb: &Backbone, files: &[TaskFile]) -> (f64, f64) {
    if files.len() < 2 {
        return (0.0, 0.0);
    }
    let Ok(session) = edgecl::session::Session::new(bb, files.to_vec()) else { return (0.0, 0.0) };
    let k = Kernels::detect();
    let x = vec![0.0f32; bb.input_shape().len()];
    let mut ws = session.workspace(&k, 1);
    let mut time = |other: usize| {
        let mut t: Vec<f64> = (0..101)
            .map(|_| {
                session.run(&k, other, &x, 1, &mut ws);
                let start = Instant::now();
                std::hint::black_box(session.run(&k, 0, &x, 1, &mut ws));
                start.elapsed().as_nanos() as f64
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let (same, _) = (time(0), time(1));
    let (same2, alt) = (time(0), time(1));
    let same = same.min(same2);
    (alt - same, same)
}

fn report(b: &BenchArgs, train: &TrainArgs, r: &BenchResult) -> Result<()> {
    let secs: f64 = r.train_seconds.iter().sum();
    let peak = peak_rss();
    let j = json!({
        "scenario": b.scenario,
        "method": train.method,
        "tasks": r.names.len(),
        "matrix": r.matrix.0,
        "acc": r.matrix.acc(),
        "bwt": r.matrix.bwt(),
        "forgetting": r.matrix.forgetting(),
        "bytes_per_task": r.bytes_per_task,
        "train_seconds": secs,
        "images_per_second": r.images as f64 / secs.max(1e-9),
        "peak_rss_bytes": peak,
        "config": train.json(),
    });
    if let Some(p) = &b.json {
        write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    if let Some(p) = &b.md {
        let md = format!(
            "# {} · {} · {} tasks\n\n{}\nACC {:.4} · BWT {:.4} · forgetting {:.4} · bytes per task {:?} · {:.1} s training\n",
            b.scenario,
            train.method,
            r.names.len(),
            r.matrix.markdown(&r.names),
            r.matrix.acc(),
            r.matrix.bwt(),
            r.matrix.forgetting(),
            r.bytes_per_task,
            secs
        );
        write_atomic(p, md.as_bytes())?;
    }
    if let Some(p) = &b.svg {
        write_atomic(p, r.matrix.svg(&r.names, &format!("{} · {}", b.scenario, train.method)).as_bytes())?;
    }
    out!("{}", r.matrix.markdown(&r.names));
    out!(
        "ACC {:.4}  BWT {:.4}  forgetting {:.4}  bytes/task {:?}  train {:.1} s ({:.0} img/s)  peak RSS {} MB",
        r.matrix.acc(),
        r.matrix.bwt(),
        r.matrix.forgetting(),
        r.bytes_per_task,
        secs,
        r.images as f64 / secs.max(1e-9),
        peak / (1 << 20)
    );
    Ok(())
}

/// Peak resident set size of this process (VmHWM), 0 where unknown.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let p = std::env::temp_dir().join(format!("edgecl-{}-{}", std::process::id(), now()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `edgecl demo`: five split tasks of the embedded Fashion-MNIST subset on a random fc1024
/// backbone with exssnet, then the accuracy matrix and the cost of a task switch.
pub fn demo_cmd(quiet: bool) -> Result<()> {
    let train = TrainArgs {
        method: "exssnet".into(),
        density: 0.05,
        er: None,
        threshold: false,
        epochs: 2,
        weight_epochs: Some(1),
        lr: 1e-2,
        weight_lr: 1e-3,
        batch: 64,
        optimizer: "adam".into(),
        weight_decay: 0.0,
        schedule: "cosine".into(),
        kkt: false,
        knn_k: 200,
        augment: false,
        softmax: "classes".into(),
        seed: 1,
    };
    let cfg = train.config()?;
    let tmp = TempDir::new()?;
    let bytes = edgecl::import::init::random_backbone(edgecl::import::init::Arch::Fc1024, 10, 1)
        .emit(edgecl::format::graph::WeightFormat::I8);
    let bp = tmp.0.join("fc1024.ecb");
    write_atomic(&bp, &bytes)?;
    out!("edgecl demo: 5 tasks of 2 Fashion-MNIST classes each (embedded subset), exssnet at 5 % density,");
    out!("on a random fc1024 backbone ({} bytes, mapped read-only). Each task is saved to a file and", bytes.len());
    out!("every evaluation reads the tasks back from their files.\n");
    let b = BenchArgs {
        scenario: "split-fashion-mnist".into(),
        tasks: 5,
        arch: None,
        backbone: None,
        data: "embedded".into(),
        limit: None,
        test_limit: None,
        rotate_step: 10.0,
        keep: None,
        json: None,
        md: None,
        svg: None,
        quiet,
    };
    let start = Instant::now();
    let r = run_scenario(&bp, &b, &cfg, &train, &tmp.0)?;
    out!("{}", r.matrix.markdown(&r.names));
    out!(
        "ACC {:.4}   BWT {:.4} (earlier tasks are bit-for-bit unchanged)   forgetting {:.4}",
        r.matrix.acc(),
        r.matrix.bwt(),
        r.matrix.forgetting()
    );
    let mean_bytes = r.bytes_per_task.iter().sum::<usize>() / r.bytes_per_task.len().max(1);
    out!(
        "bytes per task {:?} (mean {} = {:.1} % of the backbone file); one image {:.1} µs, task switch adds {:.1} µs (all tasks decoded once, masks applied while packing)",
        r.bytes_per_task,
        mean_bytes,
        100.0 * mean_bytes as f64 / bytes.len() as f64,
        r.run_ns / 1e3,
        r.switch_ns / 1e3
    );
    out!("total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
