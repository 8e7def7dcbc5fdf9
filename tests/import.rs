//! ONNX import against tract (and onnxruntime fixtures) on the committed models.
#![cfg(feature = "import")]

use edgecl::backbone::Backbone;
use edgecl::format::graph::{Op, WeightFormat};
use edgecl::import::onnx::{import, ImportOptions};
use edgecl::kernels::Kernels;
use prost::Message;
use std::path::{Path, PathBuf};
use tract_onnx::pb;
use tract_onnx::prelude::*;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn opts(input: [u32; 3], mean: f32, std: f32) -> ImportOptions {
    ImportOptions { input, mean: vec![mean; 3], std: vec![std; 3], drop_head: false, name: "t".into() }
}

fn run_edgecl(bytes: &[u8], x: &[f32], batch: usize) -> Vec<f32> {
    let bb = Backbone::open(bytes).unwrap();
    let k = Kernels::detect();
    let mut scratch = vec![0.0; bb.scratch_len(&k, batch)];
    bb.forward(&k, x, batch, &mut scratch).to_vec()
}

fn run_tract(model: &Path, x: &[f32], shape: [usize; 4]) -> Vec<f32> {
    let m = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true)
        .model_for_path(model)
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let t: Tensor = tract_ndarray::Array4::from_shape_vec(shape, x.to_vec()).unwrap().into();
    let out = m.run(tvec!(t.into())).unwrap();
    out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
}

fn npy(p: &str) -> (Vec<usize>, Vec<f32>) {
    edgecl::data::npy::parse(&std::fs::read(repo(p)).unwrap()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

/// Every supported op, f32 weights: equal to tract within 1e-4 relative (of the output's
/// largest magnitude), and to onnxruntime's output committed beside the model.
#[test]
fn test_ops_model_f32_matches_tract_and_onnxruntime() {
    let model = repo("models/test-ops.onnx");
    let bytes = import(&model, &opts([3, 16, 16], 0.0, 1.0)).unwrap().emit(WeightFormat::F32);
    let (shape, x) = npy("tests/data/test-ops.input.npy");
    assert_eq!(shape, [2, 3, 16, 16]);
    let ours = run_edgecl(&bytes, &x, 2);
    let theirs = run_tract(&model, &x, [2, 3, 16, 16]);
    let (_, ort) = npy("tests/data/test-ops.expected.npy");
    let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for ((a, b), c) in ours.iter().zip(&theirs).zip(&ort) {
        assert!((a - b).abs() <= 1e-4 * scale, "edgecl {a} vs tract {b}");
        assert!((a - c).abs() <= 1e-4 * scale, "edgecl {a} vs onnxruntime {c}");
    }
    // Every supported layer kind is exercised.
    let bb = Backbone::open(&bytes).unwrap();
    let names: std::collections::BTreeSet<&str> = bb.layers().iter().map(|l| l.op.name()).collect();
    for kind in [
        "conv2d",
        "depthwise",
        "batchnorm",
        "relu",
        "relu6",
        "add",
        "maxpool",
        "avgpool",
        "global-avgpool",
        "flatten",
        "linear",
    ] {
        assert!(names.contains(kind), "test model lacks {kind}: {names:?}");
    }
}

/// A QDQ model keeps its own int8 weights and scales, and computes what onnxruntime computes
/// up to activation quantisation (which edgecl does not do).
#[test]
fn qdq_model_uses_its_own_int8_weights() {
    let path = repo("models/test-ops-qdq.onnx");
    let ir = import(&path, &opts([3, 16, 16], 0.0, 1.0)).unwrap();
    let bytes = ir.emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    // The first conv's scales are the DequantizeLinear scales of the model.
    let model = pb::ModelProto::decode(&*std::fs::read(&path).unwrap()).unwrap();
    let g = model.graph.unwrap();
    let conv = g.node.iter().find(|n| n.op_type == "Conv").unwrap();
    let dq = g.node.iter().find(|n| n.op_type == "DequantizeLinear" && n.output[0] == conv.input[1]).unwrap();
    let scale_t = g.initializer.iter().find(|t| t.name == dq.input[1]).unwrap();
    let scales: Vec<f32> = if scale_t.raw_data.is_empty() {
        scale_t.float_data.clone()
    } else {
        scale_t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let Op::Conv2d(c) = bb.layers().iter().find(|l| matches!(l.op, Op::Conv2d(_))).unwrap().op else { unreachable!() };
    let file_scales = bb.view().f32s(c.scale.unwrap());
    let want: Vec<f32> = if scales.len() == 1 { vec![scales[0]; file_scales.len()] } else { scales };
    assert_eq!(file_scales, &want[..]);
    let (_, x) = npy("tests/data/test-ops.input.npy");
    let ours = run_edgecl(&bytes, &x, 2);
    let (_, ort) = npy("tests/data/test-ops-qdq.expected.npy");
    for s in 0..2 {
        let cs = cosine(&ours[s * 10..(s + 1) * 10], &ort[s * 10..(s + 1) * 10]);
        assert!(cs > 0.98, "sample {s}: cosine {cs}");
    }
}

/// Preprocess an image exactly as `edgecl forward` does, for both engines.
fn image_input(p: &Path, size: u32, mean: &[f32; 3], std: &[f32; 3]) -> Vec<f32> {
    let img = image::open(p).unwrap().resize_exact(size, size, image::imageops::FilterType::Triangle).to_rgb32f();
    let plane = (size * size) as usize;
    let mut x = vec![0.0; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            x[c * plane + i] = (px.0[c] - mean[c]) / std[c];
        }
    }
    x
}

/// Imported int8 Lite0 at 96×96 against tract's f32 run of the original ONNX on real images:
/// Fashion-MNIST test images (grey, upscaled to RGB) and two colour photos.
#[test]
fn lite0_int8_agrees_with_tract_f32_on_real_images() {
    let model = repo("models/efficientnet-lite0.onnx");
    let (mean, std) = (lite0_norm().0, lite0_norm().1);
    let o = ImportOptions {
        input: [3, 96, 96],
        mean: mean.to_vec(),
        std: std.to_vec(),
        drop_head: false,
        name: "lite0".into(),
    };
    let bytes = import(&model, &o).unwrap().emit(WeightFormat::I8);
    let mut images: Vec<PathBuf> = std::fs::read_dir(repo("tests/data/fmnist"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    images.sort();
    images.push(repo("tests/data/china.jpg"));
    images.push(repo("tests/data/flower.jpg"));
    assert!(images.len() >= 20);
    let mut same_top1 = 0;
    let mut worst = 1.0f64;
    for p in &images {
        let x = image_input(p, 96, &mean, &std);
        let ours = run_edgecl(&bytes, &x, 1);
        let theirs = run_tract(&model, &x, [1, 3, 96, 96]);
        let cs = cosine(&ours, &theirs);
        worst = worst.min(cs);
        same_top1 += (argmax(&ours) == argmax(&theirs)) as usize;
    }
    let rate = same_top1 as f64 / images.len() as f64;
    assert!(worst >= 0.995, "worst cosine {worst}");
    assert!(rate >= 0.95, "top-1 agreement {rate}");
}

/// Lite0's input normalisation, as documented in models/README.md.
fn lite0_norm() -> ([f32; 3], [f32; 3]) {
    let readme = std::fs::read_to_string(repo("models/README.md")).unwrap();
    let grab = |key: &str| -> [f32; 3] {
        let line = readme
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("models/README.md has no `{key}` line"));
        let v: Vec<f32> =
            line.split(':').nth(1).unwrap().split(',').map(|s| s.trim().trim_matches('`').parse().unwrap()).collect();
        [v[0], v[1], v[2]]
    };
    (grab("- mean:"), grab("- std:"))
}

/// `--drop-head` removes the classifier: Lite0 then outputs 1280 features.
#[test]
fn drop_head_leaves_features() {
    let mut o = opts([3, 96, 96], 0.5, 0.5);
    o.drop_head = true;
    let bytes = import(&repo("models/efficientnet-lite0.onnx"), &o).unwrap().emit(WeightFormat::I8);
    assert_eq!(Backbone::open(&bytes).unwrap().output_shape().c, 1280);
}

fn f32_tensor(name: &str, dims: &[i64], v: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn model_with(node: pb::NodeProto, extra: Vec<pb::TensorProto>) -> Vec<u8> {
    let conv = pb::NodeProto {
        op_type: "Conv".into(),
        name: "conv0".into(),
        input: vec!["x".into(), "w".into()],
        output: vec!["y".into()],
        ..Default::default()
    };
    let mut init = vec![f32_tensor("w", &[2, 1, 3, 3], &[0.1; 18])];
    init.extend(extra);
    let graph = pb::GraphProto {
        node: vec![conv, node],
        initializer: init,
        input: vec![pb::ValueInfoProto { name: "x".into(), ..Default::default() }],
        output: vec![pb::ValueInfoProto { name: "z".into(), ..Default::default() }],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 18 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Unsupported ops and patterns fail with the op, the node and what is supported.
#[test]
fn unsupported_ops_are_named() {
    let dir = std::env::temp_dir().join(format!("edgecl-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node = |op: &str, inputs: &[&str]| pb::NodeProto {
        op_type: op.into(),
        name: format!("my_{op}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec!["z".into()],
        ..Default::default()
    };
    let cases = [
        (model_with(node("Softmax", &["y"]), vec![]), "unsupported op `Softmax`"),
        (
            model_with(
                node("Clip", &["y", "lo", "hi"]),
                vec![f32_tensor("lo", &[], &[0.0]), f32_tensor("hi", &[], &[3.0])],
            ),
            "Clip(0, 6)",
        ),
        (model_with(node("Add", &["y", "c"]), vec![f32_tensor("c", &[1], &[1.0])]), "bias of a MatMul/Gemm"),
    ];
    for (i, (bytes, needle)) in cases.into_iter().enumerate() {
        let p = dir.join(format!("m{i}.onnx"));
        std::fs::write(&p, bytes).unwrap();
        let e = import(&p, &opts([1, 4, 4], 0.0, 1.0)).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
        assert!(e.contains("node `my_"), "the node is named: {e}");
    }
    let e = import(&dir.join("m0.onnx"), &opts([1, 4, 4], 0.0, 1.0)).unwrap_err().to_string();
    assert!(e.contains("supported: Conv"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
