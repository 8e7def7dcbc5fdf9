//! `--task auto`: choose each input's task among a session's tasks (`edgecl::infer`).

use crate::InferArg;
use anyhow::{bail, Result};
use edgecl::adapter::{Method, Task};
use edgecl::infer::{infer_task, Candidate, Mode};
use edgecl::kernels::Kernels;
use edgecl::session::Session;

/// Largest batch inferred in one pass with `--batch-auto` (the superposed network keeps
/// every value of the batch for its backward pass).
const MAX_AUTO_BATCH: usize = 256;

/// Per sample: the chosen task (an index into the session) and its inference score. With
/// `together`, one task for all `n` samples, inferred from (up to 256 of) them at once.
pub fn choose(
    k: &Kernels,
    session: &Session,
    x: &[f32],
    n: usize,
    infer: InferArg,
    together: bool,
) -> Result<Vec<(usize, Option<f32>)>> {
    let all: Vec<&Task> = session.tasks().iter().map(|p| &p.task).collect();
    // Fine-tuned tasks are an evaluation baseline: they never serve inference.
    let index: Vec<usize> = (0..all.len()).filter(|&i| all[i].method != Method::Finetune).collect();
    if index.is_empty() {
        bail!("--task auto needs supsup, exssnet, clr or linear tasks; this store has none");
    }
    let candidates: Vec<Candidate> = index
        .iter()
        .map(|&i| {
            let deps = all[i]
                .depends_on
                .iter()
                .filter_map(|d| session.tasks().iter().find(|p| &p.digest == d).map(|p| &p.task))
                .collect();
            Candidate::new(all[i], deps)
        })
        .collect();
    let mode = match infer {
        InferArg::OneShot => Mode::OneShot,
        InferArg::Binary => Mode::Binary,
    };
    let bb = session.backbone();
    let per = bb.input_shape().len();
    if together {
        let m = n.min(MAX_AUTO_BATCH);
        let r = infer_task(k, bb, &candidates, &x[..m * per], m, mode)?;
        return Ok(vec![(index[r.index], Some(r.scores[r.index])); n]);
    }
    (0..n)
        .map(|i| {
            let r = infer_task(k, bb, &candidates, &x[i * per..(i + 1) * per], 1, mode)?;
            Ok((index[r.index], Some(r.scores[r.index])))
        })
        .collect()
}
