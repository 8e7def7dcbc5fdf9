//! The task store: power cuts at every file operation of learn / install / remove / rollback
//! (through the real binary and its `EDGECL_FAULT_AFTER` hook, and SIGKILL at random
//! times), install checks (downgrades, idempotence, dependencies, hostile bytes), removal
//! with dependents, rollback and gc.

use edgecl::adapter::{Components, Method, Softmax, Task};
use edgecl::format::task::encode;
use edgecl::format::Digest;
use edgecl::store::{NewTask, Store, StoreError};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

mod common;
use common::{bin, edgecl, fails, ok, tempdir, TempDir};

/// `learn` arguments for a small, fast task on the embedded data.
fn learn_args<'a>(task: &'a str, method: &'a str, classes: &'a str) -> Vec<&'a str> {
    vec![
        "learn",
        "--task",
        task,
        "--method",
        method,
        "--data",
        "embedded",
        "--classes",
        classes,
        "--limit",
        "64",
        "--epochs",
        "1",
        "--weight-epochs",
        "1",
        "--batch",
        "32",
        "--density",
        "0.1",
        "--lr",
        "0.01",
        "--threads",
        "1",
    ]
}

/// Copies a directory tree, keeping symlinks as symlinks (hard links become copies).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type().unwrap();
        if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if t.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The tasks of a store's current generation, in order, after checking that the store opens
/// and verifies completely.
fn state(dir: &Path) -> Vec<(String, Digest)> {
    let s = Store::open(dir).unwrap_or_else(|e| panic!("the store does not open: {e}"));
    let v = s.verify().unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    let tasks = s.tasks().unwrap();
    for t in &tasks {
        assert!(t.path.starts_with(s.generation_dir()), "{}", t.path.display());
        assert!(!t.name.starts_with('.'), "{}", t.name);
    }
    tasks.into_iter().map(|t| (t.name, t.file.digest)).collect()
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in [dir.to_path_buf(), dir.join("generations")] {
        for e in std::fs::read_dir(d).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            if n.starts_with(".tmp-") || n.starts_with(".current-") {
                out.push(n);
            }
        }
    }
    out
}

/// A store with three learned tasks: a (supsup, with KKT scores), b (exssnet), c (exssnet,
/// depends on b); plus x.ect, a task learned outside the store on its backbone.
fn fixture(name: &str) -> TempDir {
    let d = tempdir(name);
    ok(&edgecl(&d, &["init", "--arch", "lenet", "--seed", "1", "-o", "lenet.ecb"]));
    ok(&edgecl(&d, &["store", "init", "s", "--backbone", "lenet.ecb"]));
    let mut a = learn_args("a", "supsup", "0,1");
    a.extend(["--store", "s"]);
    ok(&edgecl(&d, &a));
    for (t, c) in [("b", "2,3"), ("c", "4,5")] {
        let mut a = learn_args(t, "exssnet", c);
        a.extend(["--store", "s", "--no-scores"]);
        ok(&edgecl(&d, &a));
    }
    let mut x = learn_args("x", "supsup", "6,7");
    x.extend(["--backbone", "s/backbone.ecb", "-o", "x.ect", "--no-scores"]);
    ok(&edgecl(&d, &x));
    d
}

/// Runs `args` on fresh copies of the fixture's store with `EDGECL_FAULT_AFTER=k` for
/// k = 1, 2, … until the command completes; after every abort the store must hold exactly the
/// old or the new generation, verify, and be cleaned by the next writer.
fn power_cut_everywhere(d: &Path, args: &[&str]) {
    let base = d.join("s");
    let old = state(&base);
    let clean = d.join("clean");
    let _ = std::fs::remove_dir_all(&clean);
    copy_tree(&base, &clean);
    let mut full = args.to_vec();
    full.extend(["--store", "clean"]);
    ok(&edgecl(d, &full));
    let new = state(&clean);
    assert_ne!(old, new, "{args:?} changed nothing");
    let (mut saw_old, mut saw_new, mut saw_tmp) = (false, false, false);
    let mut full = args.to_vec();
    full.extend(["--store", "w"]);
    for k in 1.. {
        assert!(k < 200, "{args:?} never completed");
        let w = d.join("w");
        let _ = std::fs::remove_dir_all(&w);
        copy_tree(&base, &w);
        let o = bin(d, &full).env("EDGECL_FAULT_AFTER", k.to_string()).output().unwrap();
        let now = state(&w);
        if o.status.success() {
            assert_eq!(now, new, "{args:?} completed but the store holds something else");
            break;
        }
        assert_eq!(o.status.signal(), Some(6), "{args:?} with fault {k}: {}", String::from_utf8_lossy(&o.stderr));
        if now == old {
            saw_old = true;
        } else if now == new {
            saw_new = true;
        } else {
            panic!("{args:?} cut after {k} operations left a mix: {now:?}");
        }
        saw_tmp |= !leftovers(&w).is_empty();
        // The next writer removes what the cut left behind, and changes nothing else.
        Store::open(&w).unwrap().gc().unwrap();
        assert!(leftovers(&w).is_empty(), "{:?}", leftovers(&w));
        assert_eq!(state(&w), now);
    }
    assert!(saw_old && saw_new, "{args:?}: cuts never showed both states (old {saw_old}, new {saw_new})");
    assert!(saw_tmp, "{args:?}: no cut ever left a temporary directory behind");
}

#[test]
fn power_cut_at_every_file_operation_leaves_the_old_or_the_new_generation() {
    let d = fixture("cut");
    let learn_new = learn_args("d", "supsup", "8,9");
    power_cut_everywhere(&d, &learn_new);
    // Re-learning 'a' replaces it with version 2 (and keeps its scores beside it).
    power_cut_everywhere(&d, &learn_args("a", "supsup", "0,1"));
    power_cut_everywhere(&d, &["tasks", "remove", "c"]);
    power_cut_everywhere(&d, &["store", "rollback"]);
    power_cut_everywhere(&d, &["store", "install", "x.ect"]);
}

#[test]
fn sigkill_at_random_times_leaves_the_old_or_the_new_generation() {
    let d = fixture("kill");
    let base = d.join("s");
    let old = state(&base);
    let w = d.join("w");
    copy_tree(&base, &w);
    let start = std::time::Instant::now();
    ok(&edgecl(&d, &["store", "install", "x.ect", "--store", "w"]));
    let span = start.elapsed();
    let new = state(&w);
    let mut seen = [0usize; 2];
    for i in 0..24u32 {
        let _ = std::fs::remove_dir_all(&w);
        copy_tree(&base, &w);
        let mut child = bin(&d, &["store", "install", "x.ect", "--store", "w"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Delays up to about twice the measured run, so that the last ones let it finish
        // even when a run takes longer than the measured one (as under emulation).
        std::thread::sleep(span * i / 12);
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        let now = state(&w);
        assert!(now == old || now == new, "killed after {:?}: a mix {now:?}", span * i / 12);
        seen[usize::from(now == new)] += 1;
    }
    assert!(seen[1] > 0, "the install never completed, even with the longest delay");
}

// --- the library API on synthetic tasks (the store does not look inside components) ---

fn lib_store(name: &str) -> (TempDir, Store) {
    let d = tempdir(name);
    let bytes = edgecl::import::init::random_backbone(edgecl::import::init::Arch::Lenet, 10, 3)
        .emit(edgecl::format::graph::WeightFormat::I8);
    std::fs::write(d.join("bb.ecb"), &bytes).unwrap();
    let s = Store::init(&d.join("s"), &d.join("bb.ecb")).unwrap();
    (d, s)
}

fn task(name: &str, version: u32, deps: &[Digest], tag: u64) -> Task {
    Task {
        name: name.into(),
        labels: vec!["p".into(), "q".into()],
        method: Method::Exssnet,
        components: Components::default(),
        depends_on: deps.to_vec(),
        config: "{}".into(),
        metrics: vec![],
        created_at: tag,
        version,
        softmax: Softmax::Classes,
    }
}

fn new(t: &Task, s: &Store) -> NewTask {
    NewTask { bytes: encode(t, &s.backbone_digest()), scores: None, origin: format!("test task '{}'", t.name) }
}

fn digest(t: &Task, s: &Store) -> Digest {
    edgecl::format::task::decode(&encode(t, &s.backbone_digest())).unwrap().digest
}

fn names(s: &Store) -> Vec<String> {
    s.entries().iter().map(|e| e.name.clone()).collect()
}

fn generations(s: &Store) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(s.dir().join("generations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that `r` is a refusal and that the store is as it was: same generation, same
/// tasks, no new directory.
fn refused(s: &mut Store, r: Result<edgecl::store::Outcome, StoreError>, needle: &str) -> StoreError {
    let (g, n, dirs) = (s.generation(), names(s), generations(s));
    let e = r.expect_err("the change was accepted");
    assert!(e.to_string().contains(needle), "{e} does not mention {needle:?}");
    s.reload().unwrap();
    assert_eq!((s.generation(), names(s), generations(s)), (g, n, dirs), "a refused change changed the store");
    e
}

#[test]
fn install_is_all_or_nothing_refuses_downgrades_and_is_idempotent() {
    let (_d, mut s) = lib_store("install");
    assert_eq!(s.generation(), 1);
    let a1 = task("a", 1, &[], 1);
    let o = s.install_tasks(vec![new(&a1, &s)]).unwrap();
    assert!(o.created && o.generation == 2 && o.added == ["a"], "{o:?}");
    s.reload().unwrap();
    // The same set again: no new generation.
    let dirs = generations(&s);
    let o = s.install_tasks(vec![new(&a1, &s)]).unwrap();
    assert!(!o.created && o.generation == 2 && o.unchanged == ["a"], "{o:?}");
    assert_eq!(generations(&s), dirs);
    // Same version, other contents; lower version: refused.
    let r = s.install_tasks(vec![new(&task("a", 1, &[], 2), &s)]);
    refused(&mut s, r, "higher version than 1");
    let a2 = task("a", 2, &[], 3);
    let o = s.install_tasks(vec![new(&a2, &s)]).unwrap();
    assert_eq!(o.replaced, [("a".to_string(), 1, 2)]);
    s.reload().unwrap();
    let r = s.install_tasks(vec![new(&a1, &s)]);
    let e = refused(&mut s, r, "downgrade");
    assert!(matches!(e, StoreError::Downgrade { installed: 2, offered: 1, .. }), "{e:?}");
    // A missing dependency, alone or with a good task: nothing installed.
    let orphan = task("b", 1, &[[7; 32]], 4);
    let r = s.install_tasks(vec![new(&orphan, &s)]);
    refused(&mut s, r, "depends on task 0707");
    let good = task("g", 1, &[], 5);
    let r = s.install_tasks(vec![new(&good, &s), new(&orphan, &s)]);
    refused(&mut s, r, "neither installed nor part of this change");
    // A dependency given in the same set, even after its dependent: installed first.
    let c = task("c", 1, &[], 6);
    let e = task("e", 1, &[digest(&c, &s)], 7);
    let o = s.install_tasks(vec![new(&e, &s), new(&c, &s)]).unwrap();
    assert_eq!(o.added, ["c", "e"]);
    s.reload().unwrap();
    assert_eq!(names(&s), ["a", "c", "e"]);
    // The same name twice with different contents; another backbone.
    let r = s.install_tasks(vec![new(&task("h", 1, &[], 8), &s), new(&task("h", 2, &[], 9), &s)]);
    refused(&mut s, r, "appears twice");
    let other = NewTask { bytes: encode(&task("o", 1, &[], 1), &[5; 32]), scores: None, origin: "o".into() };
    let r = s.install_tasks(vec![other]);
    refused(&mut s, r, &"05".repeat(32));
    // Names that could escape the store directory.
    for bad in ["../x", "/etc/x", "a/b", "", &"n".repeat(10_000), ".hidden"] {
        let r = s.install_tasks(vec![new(&task(bad, 1, &[], 1), &s)]);
        let e = refused(&mut s, r, "cannot be used in a store");
        assert!(matches!(e, StoreError::BadName { .. }), "{e:?}");
    }
    assert!(s.verify().unwrap().is_ok());
}

#[test]
fn hostile_task_bytes_are_refused_without_panic_and_change_nothing() {
    let (_d, mut s) = lib_store("hostile");
    s.install_tasks(vec![new(&task("a", 1, &[], 1), &s)]).unwrap();
    s.reload().unwrap();
    let good = encode(&task("b", 1, &[], 2), &s.backbone_digest());
    let mut cases: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
    let mut r = edgecl::rng::SplitMix64::new(9);
    for _ in 0..1000 {
        let mut b = good.clone();
        for _ in 0..1 + r.below(3) {
            let i = r.below(b.len());
            b[i] ^= 1 << r.below(8);
        }
        cases.push(b);
    }
    // A payload length of 2^40 bytes.
    let mut huge = good.clone();
    huge[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(huge);
    let mut extra = good.clone();
    extra.push(0);
    cases.push(extra);
    for bytes in cases {
        let t = NewTask { bytes, scores: None, origin: "hostile.ect".into() };
        let r = s.install_tasks(vec![t]);
        let e = refused(&mut s, r, "hostile.ect is not a valid task file");
        assert!(matches!(e, StoreError::BadTask { .. }), "{e:?}");
    }
    assert_eq!(names(&s), ["a"]);
}

#[test]
fn remove_and_replace_are_refused_while_dependents_exist_and_name_them() {
    let (_d, mut s) = lib_store("deps");
    let a = task("a", 1, &[], 1);
    let b = task("b", 1, &[digest(&a, &s)], 2);
    let c = task("c", 1, &[digest(&a, &s), digest(&b, &s)], 3);
    s.install_tasks(vec![new(&a, &s), new(&b, &s), new(&c, &s)]).unwrap();
    s.reload().unwrap();
    assert_eq!(s.dependents("a").unwrap(), ["b", "c"]);
    let r = s.remove("a");
    let e = refused(&mut s, r, "cannot remove task 'a': 'b', 'c' depend on it");
    assert!(matches!(&e, StoreError::HasDependents { dependents, replacing: false, .. } if dependents == &["b", "c"]));
    let r = s.install_tasks(vec![new(&task("a", 2, &[], 4), &s)]);
    refused(&mut s, r, "cannot replace task 'a'");
    let r = s.remove("zz");
    refused(&mut s, r, "no task 'zz' in the store; it holds a, b, c");
    // Newest first works.
    for t in ["c", "b", "a"] {
        let o = s.remove(t).unwrap();
        assert_eq!(o.removed, [t]);
        s.reload().unwrap();
    }
    assert!(names(&s).is_empty());
}

#[test]
fn rollback_swaps_the_two_latest_states_and_gc_keeps_current_and_predecessor() {
    let (_d, mut s) = lib_store("rollback");
    let r = s.rollback();
    refused(&mut s, r, "no previous generation");
    let (a, b) = (task("a", 1, &[], 1), task("b", 1, &[], 2));
    s.install_tasks(vec![new(&a, &s)]).unwrap(); // 2: a
    s.install_tasks(vec![new(&b, &s)]).unwrap(); // 3: a b
    s.reload().unwrap();
    let o = s.rollback().unwrap(); // 4: a (as 2)
    assert_eq!((o.generation, o.removed.clone()), (4, vec!["b".to_string()]));
    s.reload().unwrap();
    assert_eq!((names(&s), s.predecessor()), (vec!["a".to_string()], Some(3)));
    let o = s.rollback().unwrap(); // 5: a b (as 3): the second rollback undoes the first
    assert_eq!(o.added, ["b"]);
    s.reload().unwrap();
    assert_eq!(names(&s), ["a", "b"]);
    assert!(s.verify().unwrap().is_ok());
    // Leftovers of an interrupted writer, and old generations, go; current and predecessor stay.
    std::fs::create_dir(s.dir().join("generations/.tmp-000006-1")).unwrap();
    std::os::unix::fs::symlink("generations/000001", s.dir().join(".current-1.tmp")).unwrap();
    let g = s.gc().unwrap();
    assert_eq!(g.kept, [5, 4]);
    assert_eq!(generations(&s), ["000004", "000005"]);
    assert!(g.removed.len() == 5, "{:?}", g.removed);
    assert!(s.verify().unwrap().is_ok());
    // The kept predecessor still serves a rollback after gc.
    s.rollback().unwrap();
    s.reload().unwrap();
    assert_eq!(names(&s), ["a"]);
    assert!(s.verify().unwrap().is_ok());
}

#[test]
fn cli_store_commands_end_to_end() {
    let d = fixture("cli");
    fails(&edgecl(&d, &["tasks", "list", "--store", "nope"]), "store init");
    fails(&edgecl(&d, &["store", "init", "s", "--backbone", "lenet.ecb"]), "already holds a store");
    let l: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["tasks", "list", "--store", "s", "--json"]))).unwrap();
    let tasks = l["tasks"].as_array().unwrap();
    let names: Vec<&str> = tasks.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(tasks[2]["depends_on"], serde_json::json!(["b"]), "{l}");
    assert_eq!(tasks[0]["scores"], true);
    assert_eq!(l["generation"], 4);
    let text = ok(&edgecl(&d, &["tasks", "list", "--store", "s"]));
    assert!(text.contains("generation 000004") && text.contains("exssnet"), "{text}");
    // Re-learning a task replaces it with the next version (and moves it to the end: the
    // order is that of installation).
    let mut a = learn_args("a", "supsup", "0,1");
    a.extend(["--store", "s", "--json"]);
    let o: serde_json::Value = serde_json::from_str(&ok(&edgecl(&d, &a))).unwrap();
    assert_eq!((o["version"].as_u64(), o["generation"].as_u64()), (Some(2), Some(5)), "{o}");
    // Re-learning b would orphan c: refused before training.
    let mut b = learn_args("b", "exssnet", "2,3");
    b.extend(["--store", "s"]);
    fails(&edgecl(&d, &b), "cannot replace task 'b': 'c' depends on it");
    fails(&edgecl(&d, &["tasks", "remove", "b", "--store", "s"]), "'c' depends on it");
    let show: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["tasks", "show", "b", "--store", "s", "--json"]))).unwrap();
    assert_eq!(show["dependents"], serde_json::json!(["c"]));
    assert_eq!(show["method"], "exssnet");
    fails(&edgecl(&d, &["tasks", "show", "zz", "--store", "s"]), "it holds b, c, a");
    // Install, then the same install again: a no-op.
    let i: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["store", "install", "x.ect", "--store", "s", "--json"]))).unwrap();
    assert_eq!((i["created"].as_bool(), i["generation"].as_u64()), (Some(true), Some(6)), "{i}");
    let i: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["store", "install", "x.ect", "--store", "s", "--json"]))).unwrap();
    assert_eq!((i["created"].as_bool(), i["generation"].as_u64()), (Some(false), Some(6)), "{i}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["store", "verify", "--store", "s", "--json"]))).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let r: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["store", "rollback", "--store", "s", "--json"]))).unwrap();
    assert_eq!((r["generation"].as_u64(), r["removed"].clone()), (Some(7), serde_json::json!(["x"])), "{r}");
    let g: serde_json::Value =
        serde_json::from_str(&ok(&edgecl(&d, &["store", "gc", "--store", "s", "--json"]))).unwrap();
    assert_eq!(g["kept"], serde_json::json!([7, 6]), "{g}");
    // A damaged task file is found by verify, which names it and fails.
    let f = d.join("s/generations/000007/c.ect");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, &bytes).unwrap();
    let o = edgecl(&d, &["store", "verify", "--store", "s"]);
    let err = fails(&o, "failed verification");
    assert!(String::from_utf8_lossy(&o.stdout).contains("c.ect"), "{err}");
}

#[test]
fn init_refuses_foreign_directories_and_finishes_an_interrupted_init() {
    let (d, s) = lib_store("init");
    assert_eq!((s.generation(), s.predecessor(), s.entries().len()), (1, None, 0));
    assert!(s.dir().join("keys").is_dir());
    let e = Store::init(s.dir(), &d.join("bb.ecb")).unwrap_err();
    assert!(matches!(e, StoreError::AlreadyStore { .. }), "{e}");
    // A directory with other files is not taken over.
    std::fs::create_dir(d.join("foreign")).unwrap();
    std::fs::write(d.join("foreign/notes.txt"), b"mine").unwrap();
    let e = Store::init(&d.join("foreign"), &d.join("bb.ecb")).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    // An init cut before `current` was published: opening says what to do, init again works.
    std::fs::remove_file(s.dir().join("current")).unwrap();
    let e = Store::open(s.dir()).unwrap_err();
    assert!(e.to_string().contains("edgecl store init"), "{e}");
    let s = Store::init(s.dir(), &d.join("bb.ecb")).unwrap();
    assert_eq!(s.generation(), 1);
    assert!(s.verify().unwrap().is_ok());
    // Not a backbone: refused with the file named, nothing created.
    std::fs::write(d.join("junk.ecb"), b"EDGECLB\0 not really").unwrap();
    let e = Store::init(&d.join("s2"), &d.join("junk.ecb")).unwrap_err();
    assert!(e.to_string().contains("junk.ecb is not a valid backbone"), "{e}");
    assert!(!d.join("s2").exists());
}
