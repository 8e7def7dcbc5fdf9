//! The training graph's gradients against PyTorch (fixtures made by
//! `tests/data/grad/make_grad_fixtures.py`, described in `tests/data/grad/README.md`):
//! a SupSup-masked GEMResNet18 (nf = 4) with training-mode batch norm, and a CLR-wrapped conv
//! net with trained norms and a head. The fixtures are float64 results of the same float32
//! inputs; edgecl computes in float32, so values are compared within 1e-3 of the largest
//! magnitude of each tensor (and logits, loss within 1e-4 relative).

use edgecl::backbone::Backbone;
use edgecl::data::npy;
use edgecl::format::graph::WeightFormat;
use edgecl::import::onnx::{import, ImportOptions};
use edgecl::kernels::Kernels;
use edgecl::train::mask::{self, MaskRule};
use edgecl::train::net::{Net, Recipe};
use edgecl::train::ops::loss;
use std::path::Path;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/grad/");

fn load(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(format!("{DIR}{name}")).unwrap();
    npy::parse(&bytes).unwrap().1
}

fn backbone(onnx: &str, input: [u32; 3]) -> Vec<u8> {
    let opts = ImportOptions { input, mean: vec![0.0; 3], std: vec![1.0; 3], drop_head: false, name: "fixture".into() };
    import(Path::new(&format!("{DIR}{onnx}")), &opts).unwrap().emit(WeightFormat::F32)
}

/// `got` equals `want` within `tol` of the largest magnitude of `want`.
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: edgecl {g} vs PyTorch {w} (scale {scale})");
    }
}

fn labels() -> Vec<u32> {
    load("gem.labels.npy").iter().map(|&v| v as u32).collect()
}

#[test]
fn masked_gemresnet18_matches_pytorch() {
    let bytes = backbone("gem.onnx", [3, 32, 32]);
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut net = Net::new(&bb, Recipe { materialise: true, ..Recipe::default() });
    let wp: Vec<usize> = net.maskable.iter().map(|m| m.1.unwrap()).collect();
    assert_eq!(wp.len(), 21);
    let scores = load("gem.scores.npy");
    let mut base = Vec::new();
    let mut off = 0;
    let mut bits = bitvec::vec::BitVec::new();
    for &p in &wp {
        let n = net.params[p].value.len();
        let w = net.params[p].value.clone();
        mask::top_k(&scores[off..off + n], 0.3, &mut bits);
        mask::apply(&w, &bits, &mut net.params[p].value);
        net.params[p].trained = true;
        base.push(w);
        off += n;
    }
    assert_eq!(off, scores.len());
    net.train_mode = true;
    let x = load("gem.x.npy");
    let y = labels();
    net.zero_grad();
    let out = net.forward(&k, &x, 4).to_vec();
    close("logits", &out, &load("gem.logits.npy"), 1e-4);
    let mut d = vec![0.0; out.len()];
    let l = loss::cross_entropy(&out, 5, 5, &y, &mut d);
    close("loss", &[l], &load("gem.loss.npy"), 1e-4);
    net.backward(&k, &d);
    let mut grads = Vec::new();
    let mut off = 0;
    for (li, &p) in wp.iter().enumerate() {
        let n = base[li].len();
        let mut g = vec![0.0; n];
        mask::score_grad(MaskRule::TopK, &scores[off..off + n], &base[li], &net.params[p].grad, &mut g);
        grads.extend(g);
        off += n;
    }
    close("score gradients", &grads, &load("gem.grad_scores.npy"), 1e-3);
    let states = net.norm_states();
    let mean: Vec<f32> = states.iter().flat_map(|s| s.mean.clone()).collect();
    let var: Vec<f32> = states.iter().flat_map(|s| s.var.clone()).collect();
    close("running mean", &mean, &load("gem.running_mean.npy"), 1e-4);
    close("running var", &var, &load("gem.running_var.npy"), 1e-4);
}

#[test]
fn clr_conv_net_matches_pytorch() {
    let bytes = backbone("clr.onnx", [3, 16, 16]);
    let bb = Backbone::open(&bytes).unwrap();
    let k = Kernels::detect();
    let mut net = Net::new(&bb, Recipe { reprogram: true, head: Some(5), ..Recipe::default() });
    assert_eq!(net.reprogram.len(), 2);
    assert!(net.affines.is_empty(), "every reprogrammed conv here has its own batch norm");
    let (rk, gm, bt) = (load("clr.reprogram.npy"), load("clr.gamma.npy"), load("clr.beta.npy"));
    let mut trained = Vec::new();
    let mut off = 0;
    for &p in &net.reprogram.clone() {
        let n = net.params[p].value.len();
        net.params[p].value.copy_from_slice(&rk[off..off + n]);
        off += n;
        trained.push(p);
    }
    let mut off = 0;
    for n in net.norms.clone() {
        let (g, b) = (n.gamma.unwrap(), n.beta.unwrap());
        let c = net.params[g].value.len();
        net.params[g].value.copy_from_slice(&gm[off..off + c]);
        net.params[b].value.copy_from_slice(&bt[off..off + c]);
        off += c;
        trained.extend([g, b]);
    }
    let (hw, hb) = net.head.unwrap();
    net.params[hw].value.copy_from_slice(&load("clr.head_w.npy"));
    net.params[hb].value.copy_from_slice(&load("clr.head_b.npy"));
    trained.extend([hw, hb]);
    for &p in &trained {
        net.params[p].trained = true;
    }
    net.train_mode = true;
    let x = load("clr.x.npy");
    let y: Vec<u32> = load("clr.labels.npy").iter().map(|&v| v as u32).collect();
    net.zero_grad();
    let out = net.forward(&k, &x, 4).to_vec();
    close("logits", &out, &load("clr.logits.npy"), 1e-4);
    let mut d = vec![0.0; out.len()];
    let mut l = loss::cross_entropy(&out, 5, 5, &y, &mut d);
    net.backward(&k, &d);
    // The CLR penalty 1e-5·Σ‖p‖₂ and its gradient p/‖p‖, as the method adds them.
    for &p in &trained {
        let prm = &mut net.params[p];
        let norm = prm.value.iter().map(|v| v * v).sum::<f32>().sqrt();
        l += 1e-5 * norm;
        for (g, v) in prm.grad.iter_mut().zip(&prm.value) {
            *g += 1e-5 * v / norm;
        }
    }
    close("loss", &[l], &load("clr.loss.npy"), 1e-4);
    let cat = |ps: &[usize]| -> Vec<f32> { ps.iter().flat_map(|&p| net.params[p].grad.clone()).collect() };
    close("reprogram gradients", &cat(&net.reprogram), &load("clr.grad_reprogram.npy"), 1e-3);
    let gammas: Vec<usize> = net.norms.iter().map(|n| n.gamma.unwrap()).collect();
    let betas: Vec<usize> = net.norms.iter().map(|n| n.beta.unwrap()).collect();
    close("gamma gradients", &cat(&gammas), &load("clr.grad_gamma.npy"), 1e-3);
    close("beta gradients", &cat(&betas), &load("clr.grad_beta.npy"), 1e-3);
    close("head weight gradients", &net.params[hw].grad, &load("clr.grad_head_w.npy"), 1e-3);
    close("head bias gradients", &net.params[hb].grad, &load("clr.grad_head_b.npy"), 1e-3);
    let states = net.norm_states();
    let mean: Vec<f32> = states.iter().flat_map(|s| s.mean.clone()).collect();
    close("running mean", &mean, &load("clr.running_mean.npy"), 1e-4);
}
