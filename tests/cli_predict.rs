//! `edgecl predict` over a store, end to end with the real binary: named tasks, `--task
//! auto`, the same answers from task files and from a second device's store that installed
//! the tasks from a signed bundle, and the errors a user meets.

use std::path::Path;

mod common;
use common::{edgecl, fails, ok, tempdir};

fn rows(out: &str) -> Vec<serde_json::Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The committed Fashion-MNIST test images of the given classes (file names end in `-CLASS`).
fn images(classes: &[u32]) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fmnist");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            p.extension().is_some_and(|e| e == "png")
                && stem.rsplit('-').next().and_then(|c| c.parse().ok()).is_some_and(|c: u32| classes.contains(&c))
        })
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

fn learn(d: &Path, store: &str, task: &str, classes: &str) {
    ok(&edgecl(
        d,
        &[
            "learn",
            "--store",
            store,
            "--task",
            task,
            "--method",
            "exssnet",
            "--data",
            "embedded",
            "--classes",
            classes,
            "--limit",
            "600",
            "--density",
            "0.1",
            "--lr",
            "0.01",
            "--epochs",
            "1",
            "--weight-epochs",
            "1",
            "--batch",
            "32",
            "--threads",
            "2",
        ],
    ));
}

#[test]
fn predict_named_auto_and_after_a_bundle_install() {
    let d = tempdir("e2e");
    ok(&edgecl(&d, &["init", "--arch", "lenet", "--seed", "1", "-o", "lenet.ecb"]));
    ok(&edgecl(&d, &["store", "init", "s1", "--backbone", "lenet.ecb"]));
    learn(&d, "s1", "tops", "0,2,4,6");
    learn(&d, "s1", "shoes", "5,7,9");
    let shoes = images(&[5, 7, 9]);
    let tops = images(&[0, 2, 4, 6]);
    assert_eq!((shoes.len(), tops.len()), (8, 10), "the committed test images changed");

    // A named task: one row per input, labels from the task, probabilities.
    let mut a = vec!["predict", "--store", "s1", "--task", "shoes", "--json"];
    a.extend(shoes.iter().map(String::as_str));
    let named = rows(&ok(&edgecl(&d, &a)));
    assert_eq!(named.len(), 8);
    let labels = ["Sandal", "Sneaker", "Ankle boot"];
    let mut right = 0;
    for (r, img) in named.iter().zip(&shoes) {
        assert_eq!(r["input"], img.as_str());
        assert_eq!(r["task"], "shoes");
        let label = r["label"].as_str().unwrap();
        assert!(labels.contains(&label), "{label}");
        let score = r["score"].as_f64().unwrap();
        assert!(score > 1.0 / 3.0 - 1e-6 && score <= 1.0, "{score}");
        let class: u32 = img.rsplit('-').next().unwrap().trim_end_matches(".png").parse().unwrap();
        right += usize::from(r["label_index"] == [5, 7, 9].iter().position(|&c| c == class).unwrap());
    }
    assert!(right >= 5, "only {right} of 8 shoes right");

    // The same through task files and a backbone: identical answers.
    let gen = std::fs::read_link(d.join("s1/current")).unwrap();
    let files = d.join("s1").join(gen);
    let (tops_f, shoes_f) = (files.join("tops.ect"), files.join("shoes.ect"));
    let mut b = vec!["predict", "--backbone", "lenet.ecb", "--task-file"];
    b.extend([tops_f.to_str().unwrap(), "--task-file", shoes_f.to_str().unwrap(), "--task", "shoes", "--json"]);
    b.extend(shoes.iter().map(String::as_str));
    assert_eq!(rows(&ok(&edgecl(&d, &b))), named);

    // Task inference from a batch of one task's images.
    for (imgs, want) in [(&shoes, "shoes"), (&tops, "tops")] {
        let mut c = vec!["predict", "--store", "s1", "--task", "auto", "--batch-auto", "--json"];
        c.extend(imgs.iter().map(String::as_str));
        for r in rows(&ok(&edgecl(&d, &c))) {
            assert_eq!(r["task"], want, "{r}");
            assert_eq!(r["task_inferred"], true);
        }
    }
    // Per image (harder: one image each); every row names an installed task.
    let mut c = vec!["predict", "--store", "s1", "--task", "auto", "--infer", "binary", "--json"];
    c.extend(shoes.iter().map(String::as_str));
    for r in rows(&ok(&edgecl(&d, &c))) {
        assert!(r["task"] == "shoes" || r["task"] == "tops", "{r}");
    }

    // Another device: same backbone, tasks from a signed bundle.
    ok(&edgecl(&d, &["keys", "gen", "rel"]));
    ok(&edgecl(&d, &["bundle", "create", "--store", "s1", "--key", "rel.key", "shoes", "-o", "u.ecbundle"]));
    ok(&edgecl(&d, &["store", "init", "s2", "--backbone", "lenet.ecb"]));
    fails(&edgecl(&d, &["store", "install", "u.ecbundle", "--store", "s2"]), "u.ecbundle refused");
    ok(&edgecl(&d, &["keys", "trust", "rel.pub", "--store", "s2"]));
    ok(&edgecl(&d, &["store", "install", "u.ecbundle", "--store", "s2"]));
    let gen2 = std::fs::read_link(d.join("s2/current")).unwrap();
    ok(&edgecl(&d, &["store", "install", "u.ecbundle", "--store", "s2"]));
    assert_eq!(std::fs::read_link(d.join("s2/current")).unwrap(), gen2, "a re-install made a generation");
    let mut e = vec!["predict", "--store", "s2", "--task", "shoes", "--json"];
    e.extend(shoes.iter().map(String::as_str));
    assert_eq!(rows(&ok(&edgecl(&d, &e))), named, "the installed task answers differently");

    // Errors.
    fails(&edgecl(&d, &["predict", "--store", "s1", "--task", "hats", &shoes[0]]), "no task named 'hats'");
    fails(&edgecl(&d, &["predict", "--store", "nowhere", "--task", "shoes", &shoes[0]]), "no store");
    fails(&edgecl(&d, &["predict", "--store", "s1", "--task", "shoes", "missing.png"]), "missing.png");
    std::fs::write(d.join("bad.png"), b"not an image").unwrap();
    fails(&edgecl(&d, &["predict", "--store", "s1", "--task", "shoes", "bad.png"]), "bad.png");
    ok(&edgecl(&d, &["store", "init", "empty", "--backbone", "lenet.ecb"]));
    fails(&edgecl(&d, &["predict", "--store", "empty", "--task", "auto", &shoes[0]]), "no tasks installed");
    let _ = std::fs::remove_dir_all(&d);
}
