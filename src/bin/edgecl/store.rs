//! The store subcommands: `store init|install|rollback|verify|gc`, `tasks list|show|remove`,
//! and `learn --store` (learn with the store's backbone and tasks, install through a new
//! generation). The library's `edgecl::store` does the work.

use crate::cl::{self, DataArgs, TrainArgs};
use crate::{backbone, open_backbone, write_atomic};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use edgecl::format::task::{encode, TaskFile};
use edgecl::format::Hex;
use edgecl::store::{NewTask, Outcome, Store, StoreError, StoredTask, MAX_TASK_BYTES};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Create a store: a directory holding a copy of the backbone and, by generations, the
    /// tasks learned or installed on it.
    ///
    /// Example: edgecl store init /var/lib/edgecl --backbone fc1024.ecb
    ///
    /// Then: edgecl learn --store /var/lib/edgecl --task shoes --method supsup --data fashion-mnist --classes 5,7,9
    Init {
        /// The store directory (new, or empty).
        dir: PathBuf,
        /// The backbone (.ecb) every task of the store is learned on; it is validated and copied.
        #[arg(long)]
        backbone: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Install bundles (.ecbundle) or task files (.ect) all-or-nothing in one new generation.
    ///
    /// A bundle must be signed by a key trusted in STORE/keys (`edgecl keys trust`) unless
    /// --allow-unsigned is given, and made for this store's backbone; NAME.scores beside a
    /// task file is installed with it. A task replaces one of the same name only with a higher
    /// version; tasks that are installed already are skipped, so running the same install
    /// twice changes nothing the second time: the idempotent step an update system (RAUC,
    /// Mender, SWUpdate) runs.
    ///
    /// Example: edgecl store install field-update.ecbundle --store /var/lib/edgecl
    Install {
        /// Bundles and task files, in any order: dependencies are installed first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The store directory (made by `edgecl store init`).
        #[arg(long)]
        store: PathBuf,
        /// Accept bundles without a signature.
        #[arg(long)]
        allow_unsigned: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make the previous state current again (through a new generation). A second rollback
    /// undoes the first.
    ///
    /// Example: edgecl store rollback --store /var/lib/edgecl
    Rollback {
        /// The store directory (made by `edgecl store init`).
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check the current generation: the backbone's digest, every task file's checksums,
    /// backbone and dependencies. Exits with status 1 when something is wrong.
    ///
    /// Example: edgecl store verify --store /var/lib/edgecl
    Verify {
        /// The store directory (made by `edgecl store init`).
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove old generations (all but the current one and its predecessor, which rollback
    /// needs) and what interrupted changes left behind.
    ///
    /// Example: edgecl store gc --store /var/lib/edgecl
    Gc {
        /// The store directory (made by `edgecl store init`).
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum TasksCmd {
    /// List the tasks of the current generation, oldest first.
    ///
    /// Example: edgecl tasks list --store /var/lib/edgecl
    List {
        /// The store directory (made by `edgecl store init`).
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show one task: version, method, labels, dependencies, metrics, training config.
    ///
    /// Example: edgecl tasks show shoes --store /var/lib/edgecl
    Show {
        /// The task's name.
        name: String,
        /// The store directory (made by `edgecl store init`).
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove a task (through a new generation; `edgecl store rollback` brings it back).
    /// Refused while other tasks (later ExSSNeT tasks) depend on it: remove those first.
    ///
    /// Example: edgecl tasks remove shoes --store /var/lib/edgecl
    Remove {
        /// The task's name.
        name: String,
        /// The store directory (made by `edgecl store init`).
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn store_cmd(cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Init { dir, backbone, json } => init(&dir, &backbone, json),
        StoreCmd::Install { files, store, allow_unsigned, json } => install(&store, &files, allow_unsigned, json),
        StoreCmd::Rollback { store, json } => rollback(&store, json),
        StoreCmd::Verify { store, json } => verify(&store, json),
        StoreCmd::Gc { store, json } => gc(&store, json),
    }
}

pub fn tasks_cmd(cmd: TasksCmd) -> Result<()> {
    match cmd {
        TasksCmd::List { store, json } => list(&store, json),
        TasksCmd::Show { name, store, json } => show(&store, &name, json),
        TasksCmd::Remove { name, store, json } => remove(&store, &name, json),
    }
}

fn open(dir: &Path) -> Result<Store> {
    Ok(Store::open(dir)?)
}

fn gen(n: u32) -> String {
    format!("{n:06}")
}

fn init(dir: &Path, backbone: &Path, json: bool) -> Result<()> {
    let s = Store::init(dir, backbone)?;
    let digest = Hex(&s.backbone_digest()).to_string();
    if json {
        out!("{}", json!({"store": dir, "backbone": digest, "generation": s.generation()}));
    } else {
        out!("created store {} for backbone {digest} (generation {}, no tasks)", dir.display(), gen(s.generation()));
        out!("next: edgecl learn --store {} --task NAME --method METHOD --data SPEC", dir.display());
    }
    Ok(())
}

/// Prints what a change did.
fn print_outcome(o: &Outcome, json: bool) {
    if json {
        let replaced: Vec<_> = o.replaced.iter().map(|(n, a, b)| json!({"name": n, "from": a, "to": b})).collect();
        out!(
            "{}",
            json!({"generation": o.generation, "created": o.created, "added": o.added, "replaced": replaced,
                   "removed": o.removed, "unchanged": o.unchanged})
        );
        return;
    }
    if !o.created {
        out!(
            "nothing to change: {} installed already; generation {} stays current",
            o.unchanged.join(", "),
            gen(o.generation)
        );
        return;
    }
    let mut parts = Vec::new();
    if !o.added.is_empty() {
        parts.push(format!("added {}", o.added.join(", ")));
    }
    for (n, a, b) in &o.replaced {
        parts.push(format!("replaced {n} (version {a} -> {b})"));
    }
    if !o.removed.is_empty() {
        parts.push(format!("removed {}", o.removed.join(", ")));
    }
    if !o.unchanged.is_empty() {
        parts.push(format!("unchanged {}", o.unchanged.join(", ")));
    }
    out!("{}; generation {} is current", parts.join("; "), gen(o.generation));
}

/// Reads an `.ect` file (size checked first) and the `NAME.scores` beside it, if any.
fn read_new_task(path: &Path) -> Result<NewTask> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if len > MAX_TASK_BYTES {
        bail!("{} has {len} bytes, more than the {MAX_TASK_BYTES} a store accepts", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sp = cl::scores_path(path);
    let scores = match std::fs::metadata(&sp) {
        Ok(m) if m.len() <= MAX_TASK_BYTES => {
            Some(std::fs::read(&sp).with_context(|| format!("reading {}", sp.display()))?)
        }
        Ok(_) => bail!("{} is larger than {MAX_TASK_BYTES} bytes", sp.display()),
        Err(_) => None,
    };
    Ok(NewTask { bytes, scores, origin: path.display().to_string() })
}

/// The tasks of a bundle, checked: format and checksums, signature by a key in
/// `STORE/keys` (or unsigned when allowed), the store's backbone. Dependencies, versions and
/// names are the store's checks ([`Store::install_tasks`]).
fn read_bundle(store: &Store, path: &Path, allow_unsigned: bool) -> Result<Vec<NewTask>> {
    use edgecl::format::bundle;
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if len > bundle::MAX_BUNDLE_LEN {
        bail!("{} has {len} bytes, more than the {} a bundle may have", path.display(), bundle::MAX_BUNDLE_LEN);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let keys_dir = store.dir().join("keys");
    let trusted: Vec<_> = edgecl::format::keys::load_trusted(&keys_dir)
        .with_context(|| format!("reading trusted keys in {}", keys_dir.display()))?
        .into_iter()
        .map(|k| k.key)
        .collect();
    let b = bundle::open(&bytes, &trusted, allow_unsigned).with_context(|| format!("{} refused", path.display()))?;
    b.check_backbone(&store.backbone_digest()).with_context(|| format!("{} refused", path.display()))?;
    Ok(b.tasks
        .iter()
        .map(|t| NewTask {
            bytes: t.bytes.to_vec(),
            scores: None,
            origin: format!("{} (task '{}')", path.display(), t.name),
        })
        .collect())
}

fn install(dir: &Path, files: &[PathBuf], allow_unsigned: bool, json: bool) -> Result<()> {
    let store = open(dir)?;
    let mut tasks: Vec<NewTask> = Vec::new();
    for p in files {
        let is_bundle = std::fs::File::open(p)
            .and_then(|mut f| {
                let mut magic = [0u8; 8];
                std::io::Read::read_exact(&mut f, &mut magic).map(|_| magic)
            })
            .is_ok_and(|m| m == edgecl::format::bundle::MAGIC);
        if is_bundle {
            tasks.extend(read_bundle(&store, p, allow_unsigned)?);
        } else {
            tasks.push(read_new_task(p)?);
        }
    }
    let o = store.install_tasks(tasks)?;
    print_outcome(&o, json);
    Ok(())
}

fn rollback(dir: &Path, json: bool) -> Result<()> {
    let store = open(dir)?;
    let (from, to) = (store.generation(), store.predecessor());
    let o = store.rollback()?;
    if json {
        out!(
            "{}",
            json!({"generation": o.generation, "from": from, "contents_of": to, "added": o.added, "removed": o.removed})
        );
    } else {
        let mut what = Vec::new();
        if !o.added.is_empty() {
            what.push(format!("back: {}", o.added.join(", ")));
        }
        if !o.removed.is_empty() {
            what.push(format!("gone: {}", o.removed.join(", ")));
        }
        out!(
            "rolled back from generation {} to the contents of {}{}; generation {} is current (a second rollback undoes this)",
            gen(from),
            to.map_or("?".into(), gen),
            if what.is_empty() { String::new() } else { format!(" ({})", what.join("; ")) },
            gen(o.generation)
        );
    }
    Ok(())
}

fn verify(dir: &Path, json: bool) -> Result<()> {
    let store = open(dir)?;
    let v = store.verify()?;
    if json {
        out!("{}", json!({"generation": v.generation, "tasks": v.tasks, "ok": v.is_ok(), "problems": v.problems}));
    } else if v.is_ok() {
        out!(
            "{}: ok, generation {}, {} tasks, backbone {}",
            dir.display(),
            gen(v.generation),
            v.tasks,
            Hex(&store.backbone_digest())
        );
    } else {
        for p in &v.problems {
            out!("problem: {p}");
        }
    }
    if !v.is_ok() {
        bail!(
            "store {} failed verification ({} problems); `edgecl store rollback --store {}` returns to the previous generation",
            dir.display(),
            v.problems.len(),
            dir.display()
        );
    }
    Ok(())
}

fn gc(dir: &Path, json: bool) -> Result<()> {
    let store = open(dir)?;
    let g = store.gc()?;
    if json {
        out!("{}", json!({"kept": g.kept, "removed": g.removed}));
    } else {
        let kept: Vec<String> = g.kept.iter().map(|&k| gen(k)).collect();
        out!(
            "kept generations {}; removed {} entries{}",
            kept.join(", "),
            g.removed.len(),
            if g.removed.is_empty() { String::new() } else { format!(": {}", g.removed.join(", ")) }
        );
    }
    Ok(())
}

/// Names of the tasks `t` depends on (digests when a dependency is not in `all`).
fn dep_names(t: &TaskFile, all: &[StoredTask]) -> Vec<String> {
    t.task
        .depends_on
        .iter()
        .map(|d| all.iter().find(|x| &x.file.digest == d).map_or_else(|| Hex(d).to_string(), |x| x.name.clone()))
        .collect()
}

fn list(dir: &Path, json: bool) -> Result<()> {
    let store = open(dir)?;
    let tasks = store.tasks()?;
    if json {
        let rows: Vec<_> = tasks
            .iter()
            .map(|t| {
                let k = &t.file.task;
                json!({"name": t.name, "version": k.version, "method": k.method.name(), "classes": k.classes(),
                       "labels": k.labels, "bytes": t.bytes, "digest": Hex(&t.file.digest).to_string(),
                       "depends_on": dep_names(&t.file, &tasks), "created_at": k.created_at,
                       "scores": t.scores.is_some(), "file": t.path})
            })
            .collect();
        out!(
            "{}",
            json!({"generation": store.generation(), "predecessor": store.predecessor(),
                   "backbone": Hex(&store.backbone_digest()).to_string(), "tasks": rows})
        );
        return Ok(());
    }
    out!(
        "store {}: generation {}{}, {} tasks, backbone {}",
        dir.display(),
        gen(store.generation()),
        store.predecessor().map_or(String::new(), |p| format!(" (previous {})", gen(p))),
        tasks.len(),
        Hex(&store.backbone_digest())
    );
    if tasks.is_empty() {
        return Ok(());
    }
    out!("{:<24} {:>7} {:<8} {:>7} {:>10}  depends on", "name", "version", "method", "classes", "bytes");
    for t in &tasks {
        let k = &t.file.task;
        let deps = dep_names(&t.file, &tasks);
        out!(
            "{:<24} {:>7} {:<8} {:>7} {:>10}  {}",
            t.name,
            k.version,
            k.method.name(),
            k.classes(),
            t.bytes,
            if deps.is_empty() { "-".into() } else { deps.join(", ") }
        );
    }
    Ok(())
}

fn show(dir: &Path, name: &str, json: bool) -> Result<()> {
    let store = open(dir)?;
    let tasks = store.tasks()?;
    let t = tasks.iter().find(|t| t.name == name).ok_or_else(|| StoreError::NoSuchTask {
        name: name.into(),
        available: tasks.iter().map(|t| t.name.clone()).collect(),
    })?;
    let k = &t.file.task;
    let c = &k.components;
    let dependents: Vec<&str> =
        tasks.iter().filter(|x| x.file.task.depends_on.contains(&t.file.digest)).map(|x| x.name.as_str()).collect();
    let comps = json!({"masks": c.masks.len(), "overlay_values": c.overlay.iter().map(Vec::len).sum::<usize>(),
        "reprogram": c.reprogram.len(), "shifts": c.shifts.len(), "norms": c.norms.len(), "head": c.head.is_some(), "dense": c.dense.len()});
    if json {
        let config: serde_json::Value = serde_json::from_str(&k.config).unwrap_or(json!(k.config));
        out!(
            "{}",
            json!({"name": t.name, "version": k.version, "method": k.method.name(), "labels": k.labels,
                   "softmax": k.softmax.name(), "digest": Hex(&t.file.digest).to_string(), "backbone": Hex(&t.file.backbone).to_string(),
                   "depends_on": dep_names(&t.file, &tasks), "dependents": dependents, "created_at": k.created_at,
                   "metrics": k.metrics.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                   "config": config, "components": comps, "bytes": t.bytes, "file": t.path,
                   "scores": t.scores})
        );
        return Ok(());
    }
    out!("task        {} (version {})", t.name, k.version);
    out!("method      {}", k.method.name());
    out!("labels      {}", k.labels.join(", "));
    out!("softmax     {} (outputs the training softmax spanned)", k.softmax.name());
    out!("digest      {}", Hex(&t.file.digest));
    out!("file        {} ({} bytes)", t.path.display(), t.bytes);
    let deps = dep_names(&t.file, &tasks);
    out!("depends on  {}", if deps.is_empty() { "-".into() } else { deps.join(", ") });
    out!("needed by   {}", if dependents.is_empty() { "-".into() } else { dependents.join(", ") });
    out!("created at  {} (Unix seconds)", k.created_at);
    out!("components  {comps}");
    for (n, v) in &k.metrics {
        out!("metric      {n} = {v:.4}");
    }
    out!("config      {}", k.config);
    Ok(())
}

fn remove(dir: &Path, name: &str, json: bool) -> Result<()> {
    let store = open(dir)?;
    let o = store.remove(name)?;
    if json {
        out!("{}", json!({"generation": o.generation, "removed": o.removed}));
    } else {
        out!(
            "removed '{name}'; generation {} is current (`edgecl store rollback --store {}` brings it back)",
            gen(o.generation),
            dir.display()
        );
    }
    Ok(())
}

/// `learn --store DIR`: the store's backbone, every task of the current generation as a
/// prior (with its scores), and the new task installed through a new generation. A task of
/// the same name is replaced, with the next version.
pub fn learn_cmd(
    dir: &Path,
    name: &str,
    train: &TrainArgs,
    data: &DataArgs,
    no_scores: bool,
    output: Option<&Path>,
    json_out: bool,
) -> Result<()> {
    let store = open(dir)?;
    let (map, path) = open_backbone(&store.backbone_path())?;
    let bb = backbone(&map, &path)?;
    if bb.digest() != store.backbone_digest() {
        bail!("{} changed while it was being opened; try again", path.display());
    }
    let tasks = store.tasks()?;
    let old = tasks.iter().find(|t| t.name == name);
    let version = match old {
        Some(o) => {
            // Checked before training: replacing a task others depend on would be refused.
            let dependents: Vec<String> = tasks
                .iter()
                .filter(|t| t.file.task.depends_on.contains(&o.file.digest))
                .map(|t| t.name.clone())
                .collect();
            if !dependents.is_empty() {
                return Err(StoreError::HasDependents { name: name.into(), dependents, replacing: true }.into());
            }
            o.file.task.version.checked_add(1).context("the task's version cannot grow further")?
        }
        None => 1,
    };
    let priors: Vec<(TaskFile, Option<Vec<Vec<f32>>>)> = tasks
        .iter()
        .filter(|t| t.name != name)
        .map(|t| (t.file.clone(), t.scores.as_deref().and_then(cl::read_scores)))
        .collect();
    let mut t = cl::train_task(&bb, name, train, data, &priors)?;
    t.task.version = version;
    let bytes = encode(&t.task, &bb.digest());
    let scores = match (&t.scores, no_scores) {
        (Some(s), false) => Some(postcard::to_allocvec(s).context("encoding scores")?),
        _ => None,
    };
    if let Some(out) = output {
        write_atomic(out, &bytes)?;
        if let Some(s) = &scores {
            write_atomic(&cl::scores_path(out), s)?;
        }
    }
    let n = bytes.len();
    let o = store.install_tasks(vec![NewTask { bytes, scores, origin: format!("the learned task '{name}'") }])?;
    let wrote = format!("installed in {} as generation {}", dir.display(), gen(o.generation));
    let extra = json!({"store": dir, "generation": o.generation, "file": output});
    cl::print_learned(&t, &train.method, n, &wrote, extra, json_out);
    Ok(())
}
