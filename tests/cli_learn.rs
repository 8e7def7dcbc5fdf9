//! The continual-learning commands end to end on the embedded Fashion-MNIST subset, at CI
//! size: learn → eval, bench-cl's reports (JSON keys, no forgetting, accuracy well above
//! chance), determinism of task files, and the errors a user meets.

mod common;
use common::{edgecl, fails, ok, tempdir};

const LEARN: [&str; 14] = [
    "learn",
    "--backbone",
    "lenet.ecb",
    "--method",
    "supsup",
    "--data",
    "embedded",
    "--classes",
    "0,1",
    "--limit",
    "400",
    "--density",
    "0.1",
    "--lr",
];

#[test]
fn learn_then_eval_and_files_are_deterministic() {
    let d = tempdir("learn");
    ok(&edgecl(&d, &["init", "--arch", "lenet", "--seed", "1", "-o", "lenet.ecb"]));
    let mut a: Vec<&str> = LEARN.to_vec();
    a.extend(["0.01", "--epochs", "1", "--batch", "32", "--task", "tops", "--threads", "2"]);
    let mut a1 = a.clone();
    a1.extend(["-o", "a.ect", "--json"]);
    let out: serde_json::Value = serde_json::from_str(&ok(&edgecl(&d, &a1))).unwrap();
    assert!(out["train_accuracy"].as_f64().unwrap() > 0.7, "{out}");
    let mut a2 = a.clone();
    a2.extend(["-o", "b.ect"]);
    ok(&edgecl(&d, &a2));
    // Same seed, threads and data (and SOURCE_DATE_EPOCH for the creation time): the same bytes.
    let (fa, fb) = (std::fs::read(d.join("a.ect")).unwrap(), std::fs::read(d.join("b.ect")).unwrap());
    assert!(fa == fb, "identical runs wrote different task files");
    let ta = edgecl::format::task::decode(&fa).unwrap().task;
    assert_eq!(ta.created_at, 1_700_000_000);
    assert!(ta.components.masks.iter().all(|m| m.count_ones() > 0));
    let e: serde_json::Value = serde_json::from_str(&ok(&edgecl(
        &d,
        &["eval", "--backbone", "lenet.ecb", "--task", "a.ect", "--data", "embedded", "--classes", "0,1", "--json"],
    )))
    .unwrap();
    assert!(e["accuracy"].as_f64().unwrap() > 0.8, "{e}");
    // `--softmax all` is kept in the task file; over a head of the task's own width it changes
    // nothing, and learn says so.
    let mut a3 = a.clone();
    a3.extend(["--softmax", "all", "-o", "c.ect", "--json"]);
    let out: serde_json::Value = serde_json::from_str(&ok(&edgecl(&d, &a3))).unwrap();
    assert_eq!(out["softmax"], "all", "{out}");
    let tc = edgecl::format::task::decode(&std::fs::read(d.join("c.ect")).unwrap()).unwrap().task;
    assert_eq!(tc.softmax, edgecl::adapter::Softmax::All);
    assert_eq!(ta.softmax, edgecl::adapter::Softmax::Classes);
    let mut a4: Vec<&str> = a.iter().map(|&s| if s == "supsup" { "linear" } else { s }).collect();
    a4.extend(["--softmax", "all", "-o", "h.ect", "--json"]);
    let out: serde_json::Value = serde_json::from_str(&ok(&edgecl(&d, &a4))).unwrap();
    assert_eq!(out["softmax"], "classes", "{out}");
    assert!(out["notes"][0].as_str().unwrap().contains("--softmax all changes nothing"), "{out}");
    fails(&edgecl(&d, &[&a[..], &["--softmax", "every", "-o", "x.ect"]].concat()), "every");
    // A task checked against another backbone names both digests.
    ok(&edgecl(&d, &["init", "--arch", "lenet", "--seed", "2", "-o", "other.ecb"]));
    fails(
        &edgecl(&d, &["eval", "--backbone", "other.ecb", "--task", "a.ect", "--data", "embedded", "--classes", "0,1"]),
        "learned on backbone",
    );
    // Corrupt task files are named.
    let mut bad = fa.clone();
    bad[100] ^= 4;
    std::fs::write(d.join("bad.ect"), &bad).unwrap();
    fails(
        &edgecl(
            &d,
            &["eval", "--backbone", "lenet.ecb", "--task", "bad.ect", "--data", "embedded", "--classes", "0,1"],
        ),
        "bad.ect",
    );
}

#[test]
fn bench_cl_reports_every_key_and_no_forgetting() {
    let d = tempdir("bench");
    let o = edgecl(
        &d,
        &[
            "bench-cl",
            "--scenario",
            "split-fashion-mnist",
            "--tasks",
            "5",
            "--arch",
            "lenet",
            "--method",
            "exssnet",
            "--data",
            "embedded",
            "--limit",
            "300",
            "--test-limit",
            "100",
            "--epochs",
            "1",
            "--weight-epochs",
            "1",
            "--lr",
            "0.01",
            "--batch",
            "32",
            "--density",
            "0.1",
            "--json",
            "r.json",
            "--md",
            "r.md",
            "--svg",
            "r.svg",
            "--quiet",
        ],
    );
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("r.json")).unwrap()).unwrap();
    for key in [
        "scenario",
        "method",
        "tasks",
        "matrix",
        "acc",
        "bwt",
        "forgetting",
        "bytes_per_task",
        "train_seconds",
        "images_per_second",
        "peak_rss_bytes",
    ] {
        assert!(j.get(key).is_some(), "missing {key}: {j}");
    }
    assert_eq!(j["tasks"], 5);
    assert_eq!(j["bwt"].as_f64(), Some(0.0), "exssnet forgot: {j}");
    assert!(j["acc"].as_f64().unwrap() > 0.75, "ACC not well above chance (0.5): {j}");
    assert!(std::fs::read_to_string(d.join("r.svg")).unwrap().starts_with("<svg"));
    assert!(std::fs::read_to_string(d.join("r.md")).unwrap().contains("ACC"));
}

#[test]
fn bad_options_and_data_give_named_errors() {
    let d = tempdir("errors");
    ok(&edgecl(&d, &["init", "--arch", "lenet", "--seed", "1", "-o", "lenet.ecb"]));
    let run = |extra: &[&str]| {
        let mut a = vec!["learn", "--backbone", "lenet.ecb", "--task", "t", "-o", "t.ect"];
        a.extend(extra);
        edgecl(&d, &a)
    };
    fails(&run(&["--method", "supsup", "--data", "nowhere"]), "unknown data source");
    fails(&run(&["--method", "supsup", "--data", "idx:/does/not/exist"]), "/does/not/exist");
    fails(&run(&["--method", "supsup", "--data", "embedded", "--density", "0"]), "--density");
    fails(&run(&["--method", "supsup", "--data", "embedded", "--classes", "3"]), "2 classes");
    fails(&run(&["--method", "supsup", "--data", "embedded", "--classes", "0,42"]), "42");
    fails(&run(&["--method", "supsup", "--data", "embedded", "--lr", "nan"]), "--lr");
    fails(
        &run(&[
            "--method",
            "linear",
            "--optimizer",
            "sgd",
            "--data",
            "embedded",
            "--lr",
            "1e38",
            "--classes",
            "0,1",
            "--limit",
            "64",
        ]),
        "diverged",
    );
    assert!(!d.join("t.ect").exists(), "a failed run left a task file");
    // A folder with one class only.
    std::fs::create_dir_all(d.join("imgs/only")).unwrap();
    image::RgbImage::new(4, 4).save(d.join("imgs/only/a.png")).unwrap();
    fails(&run(&["--method", "linear", "--data", "folder:imgs"]), "class");
}
