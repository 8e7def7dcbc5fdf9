//! Where a training step's time goes: with the environment variable `EDGECL_PROFILE` set
//! (to anything), a [`Net`] adds up the wall time of every node's forward and backward pass,
//! a run that goes sample by sample counting as one entry, and prints the table to stderr
//! when it is dropped; then, for the nodes of such runs, the time of each summed over its
//! samples (CPU time when the samples go to several threads). Off (the default), each node
//! costs one branch.
//!
//! The table lists entries by share of the total, with each one's op and sizes, so that a
//! kernel's cost can be read against its work without a profiler (the virtual machines we
//! measure on offer no hardware counters).

use super::{Net, NodeOp};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per-node (or per-run) times; `None` when profiling is off.
#[derive(Default)]
pub(super) struct Profile {
    /// Keyed by the entry's first node; `(last node, forward, backward)`.
    entries: Vec<Option<(usize, Duration, Duration)>>,
    /// Per node of a sample-by-sample run: `[forward, backward]` summed over its samples.
    inside: Mutex<Vec<[Duration; 2]>>,
    passes: usize,
}

impl Profile {
    /// On when `EDGECL_PROFILE` is set.
    pub(super) fn from_env() -> Option<Profile> {
        std::env::var_os("EDGECL_PROFILE").map(|_| Profile::default())
    }

    fn entry(&mut self, nodes: core::ops::Range<usize>) -> &mut (usize, Duration, Duration) {
        if self.entries.len() <= nodes.start {
            self.entries.resize(nodes.start + 1, None);
        }
        self.entries[nodes.start].get_or_insert((nodes.end - 1, Duration::ZERO, Duration::ZERO))
    }

    pub(super) fn forward(&mut self, nodes: core::ops::Range<usize>, t0: Instant) {
        self.entry(nodes).1 += t0.elapsed();
    }

    pub(super) fn backward(&mut self, nodes: core::ops::Range<usize>, t0: Instant) {
        self.entry(nodes).2 += t0.elapsed();
    }

    /// Node `i` of a sample-by-sample run did one sample's forward (`backward` false) or
    /// backward, from `t0`.
    pub(super) fn sample(&self, i: usize, backward: bool, t0: Instant) {
        let d = t0.elapsed();
        let mut inside = self.inside.lock().unwrap_or_else(|e| e.into_inner());
        if inside.len() <= i {
            inside.resize(i + 1, [Duration::ZERO; 2]);
        }
        inside[i][backward as usize] += d;
    }

    /// One more forward pass counted (times are reported per pass).
    pub(super) fn pass(&mut self) {
        self.passes += 1;
    }
}

/// A node's op in a few words, for the table.
fn describe(op: &NodeOp) -> String {
    match op {
        NodeOp::Conv { s, w, .. } => {
            let kind = match w {
                super::WSrc::Param(_) => "conv (param)",
                _ => "conv (frozen)",
            };
            format!("{kind} {}→{} {}×{} s{} g{} on {}×{}", s.c_in, s.c_out, s.kh, s.kw, s.sh, s.groups, s.h, s.w)
        }
        NodeOp::Linear { in_f, out_f, .. } => format!("linear {in_f}→{out_f}"),
        NodeOp::Head { in_f, out_f, .. } => format!("head {in_f}→{out_f}"),
        NodeOp::Norm { c, plane, residual, clamp, .. } => {
            let add = if residual.is_some() { " + add" } else { "" };
            let clamp = if clamp.is_some() { " + clamp" } else { "" };
            format!("norm {c} ch × {plane}{add}{clamp}")
        }
        NodeOp::Affine { c, plane, .. } => format!("affine {c} ch × {plane}"),
        NodeOp::Reprogram { s, .. } => format!("reprogram {} ch on {}×{}", s.c_in, s.h, s.w),
        NodeOp::Clamp { .. } => "clamp".into(),
        NodeOp::Add { clamp, .. } => if clamp.is_some() { "add + clamp" } else { "add" }.into(),
        NodeOp::Pool { max, .. } => if *max { "max pool" } else { "avg pool" }.into(),
        NodeOp::GlobalPool { .. } => "global pool".into(),
        NodeOp::Flatten => "flatten".into(),
    }
}

impl Drop for Net<'_> {
    fn drop(&mut self) {
        let Some(p) = self.profile.take() else { return };
        if p.passes == 0 {
            return;
        }
        let per = |d: Duration| d.as_secs_f64() * 1e3 / p.passes as f64;
        let mut rows: Vec<(usize, usize, f64, f64)> =
            p.entries.iter().enumerate().filter_map(|(i, e)| e.map(|(l, f, b)| (i, l, per(f), per(b)))).collect();
        let total: f64 = rows.iter().map(|r| r.2 + r.3).sum();
        rows.sort_by(|a, b| (b.2 + b.3).total_cmp(&(a.2 + a.3)));
        let (fwd, bwd): (f64, f64) = rows.iter().fold((0.0, 0.0), |(f, b), r| (f + r.2, b + r.3));
        eprintln!(
            "edgecl profile: {} passes, batch {}; per pass {total:.2} ms (forward {fwd:.2}, backward {bwd:.2})",
            p.passes, self.batch
        );
        eprintln!("{:>9} {:>9} {:>6}  nodes    op", "fwd ms", "bwd ms", "share");
        for (first, last, f, b) in rows {
            let what = if first == last {
                describe(&self.nodes[first].op)
            } else {
                format!("run of {} nodes, sample by sample", last - first + 1)
            };
            let share = 100.0 * (f + b) / total.max(f64::MIN_POSITIVE);
            eprintln!("{f:>9.3} {b:>9.3} {share:>5.1}%  {first:>3}-{last:<3}  {what}");
        }
        let inside = p.inside.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(usize, f64, f64)> = inside
            .iter()
            .enumerate()
            .filter(|(_, t)| t[0] + t[1] > Duration::ZERO)
            .map(|(i, t)| (i, per(t[0]), per(t[1])))
            .collect();
        if rows.is_empty() {
            return;
        }
        rows.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
        eprintln!("inside the sample-by-sample runs, summed over samples:");
        eprintln!("{:>9} {:>9}  node  op", "fwd ms", "bwd ms");
        for (i, f, b) in rows {
            eprintln!("{f:>9.3} {b:>9.3}  {i:>4}  {}", describe(&self.nodes[i].op));
        }
    }
}
