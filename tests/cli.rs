//! The real binary, end to end: init, inspect (golden output), verify, forward, and errors.

use std::path::Path;

mod common;
use common::{edgecl, ok, tempdir};

/// `inspect` of a seeded backbone is a golden file: any change to the format, the init
/// stream or the report shows up here. Regenerate deliberately with
/// `edgecl init --arch lenet --outputs 10 --seed 1 -o lenet.ecb && edgecl inspect lenet.ecb`.
#[test]
fn init_then_inspect_matches_the_golden_output() {
    let d = tempdir("golden");
    ok(&edgecl(&d, &["init", "--arch", "lenet", "--outputs", "10", "--seed", "1", "-o", "lenet.ecb"]));
    let text = ok(&edgecl(&d, &["inspect", "lenet.ecb"]));
    let golden =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/lenet-seed1.inspect.txt")).unwrap();
    assert_eq!(text, golden);
    let json: serde_json::Value = serde_json::from_str(&ok(&edgecl(&d, &["inspect", "--json", "lenet.ecb"]))).unwrap();
    assert_eq!(json["totals"]["maskable"], 784 * 300 + 300 * 100 + 100 * 10);
    assert_eq!(json["seed"], 1);
    assert_eq!(json["layers"].as_array().unwrap().len(), 6);
}

#[test]
fn verify_fails_on_a_modified_file_and_names_both_digests() {
    let d = tempdir("verify");
    ok(&edgecl(&d, &["init", "--arch", "lenet", "-o", "a.ecb"]));
    ok(&edgecl(&d, &["verify", "a.ecb"]));
    let mut b = std::fs::read(d.join("a.ecb")).unwrap();
    let n = b.len();
    b[n - 3] ^= 1;
    std::fs::write(d.join("b.ecb"), &b).unwrap();
    let o = edgecl(&d, &["verify", "b.ecb"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("digest mismatch"), "{err}");
    let json: serde_json::Value = serde_json::from_slice(&edgecl(&d, &["verify", "--json", "b.ecb"]).stdout).unwrap();
    assert_eq!(json["ok"], false);
    for key in ["recorded", "computed"] {
        assert!(err.contains(json[key].as_str().unwrap()), "stderr names the {key} digest");
    }
}

#[test]
fn forward_on_npy_and_images_prints_top5_and_json() {
    let d = tempdir("forward");
    ok(&edgecl(&d, &["init", "--arch", "lenet", "--outputs", "10", "-o", "l.ecb"]));
    let x: Vec<f32> = (0..2 * 784).map(|i| (i % 17) as f32 / 17.0).collect();
    std::fs::write(d.join("x.npy"), edgecl::data::npy::write(&[2, 1, 28, 28], &x)).unwrap();
    let text = ok(&edgecl(&d, &["forward", "l.ecb", "x.npy"]));
    assert_eq!(text.lines().count(), 2, "{text}");
    assert_eq!(text.lines().next().unwrap().split_whitespace().count(), 6, "name + 5 entries");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["forward", "--json", "l.ecb", "x.npy"]))).unwrap();
    let out = json[1]["output"].as_array().unwrap();
    assert_eq!(out.len(), 10);
    // Same numbers through the library.
    let bytes = std::fs::read(d.join("l.ecb")).unwrap();
    let bb = edgecl::backbone::Backbone::open(&bytes).unwrap();
    let k = edgecl::kernels::Kernels::detect();
    let mut s = vec![0.0; bb.scratch_len(&k, 2)];
    let y = bb.forward(&k, &x, 2, &mut s);
    for (a, b) in out.iter().zip(&y[10..]) {
        assert!((a.as_f64().unwrap() as f32 - b).abs() <= 1e-6 * (1.0 + b.abs()));
    }
    // A grayscale PNG of another size is resized and normalised.
    let png = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fmnist/00-9.png");
    if Path::new(png).exists() {
        let t = ok(&edgecl(&d, &["forward", "l.ecb", png]));
        assert_eq!(t.lines().count(), 1);
    }
}

/// `edgecl kernels` names every slot of the table this CPU runs (on aarch64 the NEON
/// kernels, on x86-64 the AVX2/AVX-512 ones), as text and as JSON.
#[test]
fn kernels_names_the_detected_table() {
    let d = tempdir("kernels");
    let k = edgecl::kernels::Kernels::detect();
    let text = ok(&edgecl(&d, &["kernels"]));
    assert!(text.contains(&format!("arch      {}", std::env::consts::ARCH)), "{text}");
    for (slot, desc) in k.describe() {
        assert!(text.lines().any(|l| l.starts_with(slot) && l.ends_with(desc)), "{slot}: {desc} missing in\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok(&edgecl(&d, &["kernels", "--json"]))).unwrap();
    assert_eq!(json["fast"], k.fast);
    for (slot, desc) in k.describe() {
        assert_eq!(json["slots"][slot], desc, "{json}");
    }
}

#[test]
fn bad_inputs_give_messages_not_panics() {
    let d = tempdir("errors");
    std::fs::write(d.join("junk.ecb"), b"definitely not a backbone").unwrap();
    ok(&edgecl(&d, &["init", "--arch", "lenet", "-o", "l.ecb"]));
    std::fs::write(d.join("bad.npy"), b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f8'}").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["inspect", "junk.ecb"], "not a valid backbone"),
        (&["inspect", "missing.ecb"], "missing.ecb"),
        (&["forward", "l.ecb", "bad.npy"], "bad.npy"),
        (&["forward", "l.ecb", "l.ecb"], "not a readable PNG or JPEG"),
        (&["init", "--arch", "lenet", "--outputs", "0", "-o", "z.ecb"], "--outputs"),
    ];
    for (args, needle) in cases {
        let o = edgecl(&d, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!d.join("z.ecb").exists(), "nothing written on error");
}
