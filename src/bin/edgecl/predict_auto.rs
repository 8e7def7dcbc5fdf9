//! `--task auto`: choose each input's task among a session's tasks (`edgecl::infer`).

use crate::InferArg;
use anyhow::{bail, Result};
use edgecl::adapter::{Method, Task};
use edgecl::infer::{infer_task, own_network_scores, Candidate, Mode};
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
    let bb = session.backbone();
    let per = bb.input_shape().len();
    let mode = match infer {
        InferArg::Entropy => return Ok(own_networks(k, session, &index, x, n, per, together, Mode::Entropy)),
        InferArg::Info => return Ok(own_networks(k, session, &index, x, n, per, together, Mode::Information)),
        InferArg::OneShot => Mode::OneShot,
        InferArg::Binary => Mode::Binary,
    };
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

/// `--infer entropy|info`: every candidate task runs through the session (masks applied while
/// packing, no network built per task) and is ranked as `infer_task` ranks own networks in
/// `mode` (`Mode::Entropy` or `Mode::Information`; see `edgecl::infer::own_network_scores`).
#[allow(clippy::too_many_arguments)]
fn own_networks(
    k: &Kernels,
    session: &Session,
    index: &[usize],
    x: &[f32],
    n: usize,
    per: usize,
    together: bool,
    mode: Mode,
) -> Vec<(usize, Option<f32>)> {
    let group = if together { n.min(MAX_AUTO_BATCH) } else { 1 };
    let mut ws = session.workspace(k, group);
    let mut pick = |x: &[f32], m: usize| {
        let mut best = (index[0], f32::INFINITY);
        for &t in index {
            let out = session.run(k, t, x, m, &mut ws);
            let (width, classes) = (session.output_len(t), session.tasks()[t].task.classes());
            let h = own_network_scores(out, width, classes, m, mode).1;
            // NaN never wins; the first of equal scores does.
            if h < best.1 {
                best = (t, h);
            }
        }
        (best.0, Some(best.1))
    };
    if together {
        return vec![pick(&x[..group * per], group); n];
    }
    (0..n).map(|i| pick(&x[i * per..(i + 1) * per], 1)).collect()
}
