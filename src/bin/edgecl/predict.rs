//! `edgecl predict`: run learned tasks on inputs through a session — tasks decoded once,
//! switched per request at no cost.

use crate::{backbone, open_backbone};
use anyhow::{bail, Context, Result};
use edgecl::backbone::mmap::MappedFile;
use edgecl::backbone::Backbone;
use edgecl::data::{Image, Scratch};
use edgecl::format::task::TaskFile;
use edgecl::format::Hex;
use edgecl::kernels::Kernels;
use edgecl::session::Session;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Samples to run: a name per sample (a file, or `file#i` inside an IDX file) and the
/// normalised inputs, `names.len() × input length`.
pub struct Inputs {
    pub names: Vec<String>,
    pub x: Vec<f32>,
}

/// Most samples one `predict` call reads (IDX files can hold many).
const MAX_SAMPLES: usize = 1 << 20;

/// Reads images (PNG, JPEG), folders of images (sorted by name, not recursive), `.npy`
/// tensors (already normalised) and IDX image files (`*-idx3-ubyte`, gzipped or not).
pub fn load_inputs(paths: &[PathBuf], bb: &Backbone) -> Result<Inputs> {
    let t = crate::cl::base_transform(bb);
    let per = t.sample_len();
    let mut scratch = Scratch::default();
    let mut out = Inputs { names: Vec::new(), x: Vec::new() };
    let mut push = |out: &mut Inputs, name: String, img: &Image| -> Result<()> {
        if out.names.len() >= MAX_SAMPLES {
            bail!("more than {MAX_SAMPLES} inputs in one call; split them");
        }
        let at = out.x.len();
        out.x.resize(at + per, 0.0);
        scratch.apply(&t, img.c, img.h, img.w, &img.data, None, &mut out.x[at..]).with_context(|| name.clone())?;
        out.names.push(name);
        Ok(())
    };
    for p in paths {
        let name = p.display().to_string();
        let fname = p.file_name().map(|f| f.to_string_lossy().to_lowercase()).unwrap_or_default();
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading folder {name}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    let e = f.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
                    f.is_file() && matches!(e.as_str(), "png" | "jpg" | "jpeg")
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("folder {name} holds no PNG or JPEG images");
            }
            for f in files {
                let img = edgecl::data::folder::decode(&f)?;
                push(&mut out, f.display().to_string(), &img)?;
            }
        } else if fname.ends_with(".npy") {
            let (x, batch) = crate::input::load(p, bb)?;
            for b in 0..batch {
                out.names.push(if batch == 1 { name.clone() } else { format!("{name}#{b}") });
            }
            out.x.extend_from_slice(&x);
        } else if fname.contains("idx3") || fname.contains("-images") {
            let images = edgecl::data::idx::read_images(p)?;
            for i in 0..images.count {
                let px = images.image(i).context("IDX image out of range")?;
                let img = Image {
                    c: 1,
                    h: images.rows,
                    w: images.cols,
                    data: px.iter().map(|&v| v as f32 / 255.0).collect(),
                };
                push(&mut out, format!("{name}#{i}"), &img)?;
            }
        } else {
            let img = edgecl::data::folder::decode(p)?;
            push(&mut out, name, &img)?;
        }
    }
    if out.names.is_empty() {
        bail!("no inputs");
    }
    Ok(out)
}

/// Tasks from the current generation of a store, each checked against its backbone.
pub fn store_tasks(dir: &Path) -> Result<(MappedFile, PathBuf, Vec<TaskFile>)> {
    let store = edgecl::store::Store::open(dir)?;
    let (map, path) = open_backbone(&store.backbone_path())?;
    let tasks = store.tasks()?.into_iter().map(|t| t.file).collect();
    Ok((map, path, tasks))
}

/// Index and probability of the largest of `logits[..classes]`.
pub fn top(logits: &[f32], classes: usize) -> (usize, f32) {
    let l = &logits[..classes];
    let (mut best, mut max) = (0, f32::NEG_INFINITY);
    for (i, &v) in l.iter().enumerate() {
        if v > max {
            (best, max) = (i, v);
        }
    }
    let sum: f32 = l.iter().map(|&v| (v - max).exp()).sum();
    (best, 1.0 / sum)
}

#[allow(clippy::too_many_arguments)]
pub fn predict_cmd(
    store: Option<&Path>,
    backbone_path: Option<&Path>,
    task_files: &[PathBuf],
    task: &str,
    infer: crate::InferArg,
    inputs: &[PathBuf],
    batch_auto: bool,
    json_out: bool,
) -> Result<()> {
    let (map, path, files) = match (store, backbone_path) {
        (Some(dir), None) => {
            let (map, path, tasks) = store_tasks(dir)?;
            (map, path, Ok(tasks))
        }
        (None, Some(b)) => {
            let (map, path) = open_backbone(b)?;
            (map, path, Err(task_files))
        }
        _ => bail!("give either --store DIR, or --backbone FILE.ecb with --task-file T.ect …"),
    };
    let bb = backbone(&map, &path)?;
    let tasks = match files {
        Ok(tasks) => tasks,
        Err(paths) => paths.iter().map(|p| crate::cl::read_task(p, &bb)).collect::<Result<_>>()?,
    };
    if tasks.is_empty() {
        bail!("no tasks installed: learn one with `edgecl learn --store DIR …` or install a bundle");
    }
    let session = Session::new(&bb, tasks).context("loading the tasks")?;
    let k = Kernels::detect();
    let inputs = load_inputs(inputs, &bb)?;
    let per = bb.input_shape().len();
    let n = inputs.names.len();
    // The task of every sample, and how it was chosen.
    let chosen: Vec<(usize, Option<f32>)> = if task == "auto" {
        crate::predict_auto::choose(&k, &session, &inputs.x, n, infer, batch_auto)?
    } else {
        let t = session.find(task).with_context(|| {
            let names: Vec<&str> = session.tasks().iter().map(|t| t.task.name.as_str()).collect();
            format!("no task named '{task}'; installed: {}", names.join(", "))
        })?;
        vec![(t, None); n]
    };
    const BATCH: usize = 32;
    let mut ws = session.workspace(&k, BATCH);
    let mut rows = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        // Consecutive samples of one task run as one batch.
        let t = chosen[i].0;
        let mut j = i + 1;
        while j < n && j - i < BATCH && chosen[j].0 == t {
            j += 1;
        }
        let out = session.run(&k, t, &inputs.x[i * per..j * per], j - i, &mut ws);
        let width = session.output_len(t);
        let p = &session.tasks()[t];
        for b in 0..j - i {
            let (label, score) = top(&out[b * width..(b + 1) * width], p.task.classes());
            rows.push((i + b, t, label, score));
        }
        i = j;
    }
    for (s, t, label, score) in rows {
        let p = &session.tasks()[t];
        let name = &p.task.labels[label];
        if json_out {
            let mut v = json!({"input": inputs.names[s], "task": p.task.name, "label": name, "label_index": label,
                "score": score, "task_digest": Hex(&p.digest).to_string()});
            if let Some(ts) = chosen[s].1 {
                v["task_inferred"] = json!(true);
                v["task_score"] = json!(ts);
            }
            out!("{v}");
        } else {
            let how = chosen[s].1.map_or(String::new(), |ts| format!(", inferred, score {ts:.4}"));
            out!("{}: {name} (p {score:.3}) [task {}{how}]", inputs.names[s], p.task.name);
        }
    }
    Ok(())
}
