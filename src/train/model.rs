//! A task's network: the training graph of [`super::net`] with a task's components loaded.
//! The same construction serves training (from fresh components) and evaluation (from a task
//! file), so what was measured at the end of training is what a later evaluation computes.

use super::net::{Net, Recipe};
use crate::adapter::{Method, Task};
use crate::backbone::Backbone;
use bitvec::prelude::{BitSlice, BitVec, Lsb0};

/// Why a task's components do not fit a backbone (or its dependencies).
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentError(pub String);

impl std::fmt::Display for ComponentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task does not fit the backbone: {}", self.0)
    }
}

impl std::error::Error for ComponentError {}

/// The training-graph shape a method needs.
pub fn recipe(method: Method, classes: usize) -> Recipe {
    match method {
        Method::Supsup | Method::Exssnet | Method::Finetune => Recipe { materialise: true, ..Recipe::default() },
        Method::Clr => Recipe { reprogram: true, head: Some(classes), ..Recipe::default() },
        Method::Linear => Recipe { head: Some(classes), ..Recipe::default() },
    }
}

/// Writes the overlays of an ExSSNeT chain (oldest first) into the dense weights `w` (one
/// vector per maskable layer) and returns the union of the chain's masks per layer.
pub fn apply_chain(w: &mut [Vec<f32>], chain: &[&Task]) -> Result<Vec<BitVec<u32, Lsb0>>, ComponentError> {
    let layers = w.len();
    w.iter_mut().enumerate().map(|(l, wl)| apply_chain_layer(wl, chain, l, layers)).collect()
}

/// [`apply_chain`] for maskable layer `l` alone (of `layers`), so that a caller can hold one
/// layer's weights at a time: writes the chain's overlay values of that layer into `wl` and
/// returns the union of the chain's masks of that layer.
pub fn apply_chain_layer(
    wl: &mut [f32],
    chain: &[&Task],
    l: usize,
    layers: usize,
) -> Result<BitVec<u32, Lsb0>, ComponentError> {
    let mut union: BitVec<u32, Lsb0> = BitVec::repeat(false, wl.len());
    for t in chain {
        let c = &t.components;
        if c.masks.len() != layers || (!c.overlay.is_empty() && c.overlay.len() != layers) {
            return Err(ComponentError(format!(
                "task '{}' has masks for {} layers, the backbone has {layers}",
                t.name,
                c.masks.len()
            )));
        }
        let m = mask_bits(t, l, wl.len())?;
        if let Some(values) = c.overlay.get(l) {
            let mut it = values.iter();
            for i in m.iter_ones().filter(|&i| !union[i]) {
                wl[i] = *it.next().ok_or_else(|| short(t, l))?;
            }
            if it.next().is_some() {
                return Err(short(t, l));
            }
        }
        union |= m;
    }
    Ok(union)
}

fn short(t: &Task, l: usize) -> ComponentError {
    ComponentError(format!(
        "task '{}': the overlay of maskable layer {l} does not match its exclusive weights (wrong dependencies?)",
        t.name
    ))
}

/// Mask `l` of `t`, checked against the layer's weight count.
pub fn mask_bits(t: &Task, l: usize, n: usize) -> Result<&BitSlice<u32, Lsb0>, ComponentError> {
    let m = t.components.masks.get(l).and_then(|m| m.bits());
    match m {
        Some(b) if b.len() == n => Ok(b),
        _ => Err(ComponentError(format!("task '{}': mask of maskable layer {l} is not {n} bits", t.name))),
    }
}

/// The network of `task` (whose dependencies, oldest first, are `deps`), ready to evaluate.
pub fn build<'a>(bb: &'a Backbone<'a>, deps: &[&Task], task: &Task) -> Result<Net<'a>, ComponentError> {
    let classes = task.classes();
    let mut net = Net::new(bb, recipe(task.method, classes));
    if classes == 0 || classes > net.out_shape().len() {
        return Err(ComponentError(format!(
            "task '{}' has {classes} classes; the network gives {} outputs",
            task.name,
            net.out_shape().len()
        )));
    }
    let c = &task.components;
    let weight_params: Vec<usize> = net.maskable.iter().filter_map(|m| m.1).collect();
    match task.method {
        Method::Supsup | Method::Exssnet => {
            let mut w: Vec<Vec<f32>> = weight_params.iter().map(|&p| net.params[p].value.clone()).collect();
            let mut chain: Vec<&Task> = deps.to_vec();
            chain.push(task);
            if task.method == Method::Exssnet {
                apply_chain(&mut w, &chain)?;
            }
            for (l, (&p, wl)) in weight_params.iter().zip(&w).enumerate() {
                let m = mask_bits(task, l, wl.len())?;
                super::mask::apply(wl, m, &mut net.params[p].value);
            }
        }
        Method::Finetune => {
            if c.dense.len() != weight_params.len() {
                return Err(ComponentError(format!("task '{}' lacks dense weights for every layer", task.name)));
            }
            for (&p, d) in weight_params.iter().zip(&c.dense) {
                if d.len() != net.params[p].value.len() {
                    return Err(ComponentError(format!("task '{}': dense weights of the wrong size", task.name)));
                }
                net.params[p].value.clone_from(d);
            }
        }
        Method::Clr | Method::Linear => {}
    }
    if task.method == Method::Clr && net.set_clr_state(&c.reprogram, &c.shifts).is_none() {
        return Err(ComponentError(format!("task '{}': reprogramming layers do not match the backbone", task.name)));
    }
    if !c.norms.is_empty() {
        if c.norms.len() != net.norms.len() {
            return Err(ComponentError(format!(
                "task '{}' has {} norm states, the backbone {} norms",
                task.name,
                c.norms.len(),
                net.norms.len()
            )));
        }
        for (n, s) in net.norms.clone().iter().zip(&c.norms) {
            set(&mut net, n.mean, &s.mean, "norm mean")?;
            set(&mut net, n.var, &s.var, "norm variance")?;
            if let (Some(p), Some(v)) = (n.gamma, &s.gamma) {
                set(&mut net, p, v, "norm gamma")?;
            }
            if let (Some(p), Some(v)) = (n.beta, &s.beta) {
                set(&mut net, p, v, "norm beta")?;
            }
        }
    }
    if let Some((w, b)) = net.head {
        let h = c.head.as_ref().ok_or_else(|| ComponentError(format!("task '{}' has no head", task.name)))?;
        set(&mut net, w, &h.weight, "head weights")?;
        set(&mut net, b, &h.bias, "head bias")?;
    }
    Ok(net)
}

fn set(net: &mut Net, p: usize, v: &[f32], what: &str) -> Result<(), ComponentError> {
    let dst = &mut net.params[p].value;
    if dst.len() != v.len() {
        return Err(ComponentError(format!("{what}: {} values where the backbone needs {}", v.len(), dst.len())));
    }
    dst.copy_from_slice(v);
    Ok(())
}
