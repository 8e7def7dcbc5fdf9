//! `edgecl serve`, the real binary over loopback: answers equal the library's `Session::run`
//! while requests alternate between tasks and another writer installs a task (a new store
//! generation); the new task is served after the swap without a restart; a generation that
//! fails to load leaves the old one serving; 400 / 404 / 405 / 413 / 415 / 503 answers; a
//! clean exit on SIGTERM.
//!
//! Tasks are random SupSup masks on a random LeNet backbone: every answer is checked against
//! the library, so what the tasks would predict does not matter. Logits are compared with a
//! tolerance of 1e-5 · (1 + |v|) (the server's kernels run on one thread, the reference's on
//! the rayon pool); labels must be equal.

mod common;

use common::TempDir;
use edgecl::adapter::Method;
use edgecl::backbone::Backbone;
use edgecl::data::Transform;
use edgecl::format::graph::WeightFormat;
use edgecl::format::task::{decode, encode, TaskFile};
use edgecl::import::init::{random_backbone, random_task, Arch};
use edgecl::infer::{infer_task, Candidate, Mode};
use edgecl::kernels::Kernels;
use edgecl::rng::SplitMix64;
use edgecl::session::Session;
use edgecl::store::{NewTask, Store};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn temp_dir(name: &str) -> TempDir {
    TempDir::new(&format!("edgecl-serve-{name}"))
}

/// A random SupSup task with three classes named zero, one, two.
fn supsup_task(bb: &Backbone, name: &str, seed: u64) -> TaskFile {
    let mut task = random_task(bb, Method::Supsup, name, &[], seed).task;
    task.labels = vec!["zero".into(), "one".into(), "two".into()];
    decode(&encode(&task, &bb.digest())).unwrap()
}

fn install(dir: &Path, bb: &Backbone, t: &TaskFile) -> u32 {
    let store = Store::open(dir).unwrap();
    let mut c = store.change().unwrap();
    c.put(NewTask { bytes: encode(&t.task, &bb.digest()), scores: None, origin: t.task.name.clone() }).unwrap();
    c.commit().unwrap().generation
}

/// A store with tasks `a` and `b`, and task `c` (not installed); the backbone bytes.
struct Fixture {
    dir: PathBuf,
    bb_bytes: Vec<u8>,
    tasks: Vec<TaskFile>,
    /// Holds the files; removed with the fixture.
    _tmp: TempDir,
}

fn fixture(name: &str) -> Fixture {
    let dir = temp_dir(name);
    let bb_bytes = random_backbone(Arch::Lenet, 10, 7).emit(WeightFormat::I8);
    let bb_path = dir.join("lenet.ecb");
    std::fs::write(&bb_path, &bb_bytes).unwrap();
    let store_dir = dir.join("store");
    Store::init(&store_dir, &bb_path).unwrap();
    let bb = Backbone::open(&bb_bytes).unwrap();
    let tasks: Vec<TaskFile> = ["a", "b", "c"].iter().zip(1..).map(|(n, s)| supsup_task(&bb, n, s)).collect();
    install(&store_dir, &bb, &tasks[0]);
    install(&store_dir, &bb, &tasks[1]);
    Fixture { dir: store_dir, bb_bytes, tasks, _tmp: dir }
}

/// The running server; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `edgecl serve --store STORE --listen 127.0.0.1:0 ARGS…` and reads its address.
fn start(store: &Path, args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgecl"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(store)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("first line: {line:?}")).to_string();
    Server { child, addr }
}

/// One HTTP/1.1 request on a new connection: (status, body).
fn http(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A server that answers early (413) may close before reading everything.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header end in {out:?}"));
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line {head}"));
    (status, out[split + 4..].to_vec())
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn predict(addr: &str, task: &str, x: &[f32]) -> (u16, Value) {
    let body = serde_json::json!({ "input": x }).to_string();
    let (st, b) = http(addr, "POST", &format!("/v1/predict?task={task}&logits=1"), "application/json", body.as_bytes());
    (st, json_of(&b))
}

/// Checks one answer against the expected logits of its task; `Err` says what differs.
fn check(v: &Value, task: &TaskFile, want: &[f32]) -> Result<(), String> {
    let got: Vec<f32> = v["logits"]
        .as_array()
        .ok_or_else(|| format!("no logits in {v}"))?
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
        .collect();
    let classes = task.task.classes();
    if got.len() != classes {
        return Err(format!("{} logits, want {classes}", got.len()));
    }
    for (g, w) in got.iter().zip(want) {
        if (g - w).abs() > 1e-5 * (1.0 + w.abs()) {
            return Err(format!("logits {got:?}, want {:?}", &want[..classes]));
        }
    }
    let best = (0..classes).fold(0, |b, i| if want[i] > want[b] { i } else { b });
    if v["label_index"] != best || v["label"] != task.task.labels[best].as_str() || v["task"] != task.task.name.as_str()
    {
        return Err(format!("answer {v}, want label {best}"));
    }
    Ok(())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn random_inputs(n: usize, per: usize) -> Vec<Vec<f32>> {
    let mut r = SplitMix64::new(99);
    (0..n).map(|_| (0..per).map(|_| r.uniform(-0.5, 2.5)).collect()).collect()
}

#[test]
fn load_alternating_tasks_while_a_new_generation_is_installed() {
    let f = fixture("load");
    let bb = Backbone::open(&f.bb_bytes).unwrap();
    let k = Kernels::detect();
    let per = bb.input_shape().len();
    let xs = random_inputs(6, per);
    // Expected logits of every task (installed or not) for every input, from the library.
    let session = Session::new(&bb, f.tasks.clone()).unwrap();
    let mut ws = session.workspace(&k, 1);
    let want: Vec<Vec<Vec<f32>>> =
        (0..3).map(|t| xs.iter().map(|x| session.run(&k, t, x, 1, &mut ws).to_vec()).collect()).collect();
    let server = start(&f.dir, &["--threads", "2"]);
    let addr = Arc::new(server.addr.clone());
    let (tasks, want, xs) = (Arc::new(f.tasks.clone()), Arc::new(want), Arc::new(xs));
    let swapped = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 60;
    let start_time = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (addr, tasks, want, xs, swapped, done) =
                (addr.clone(), tasks.clone(), want.clone(), xs.clone(), swapped.clone(), done.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut new_task_served = 0;
                for i in 0..PER_CLIENT {
                    // Alternate a, b; once the swap is published, a, b, c.
                    let after = swapped.load(SeqCst);
                    let t = if after { (c + i) % 3 } else { (c + i) % 2 };
                    let x = (c * 7 + i) % xs.len();
                    let (st, v) = predict(&addr, &tasks[t].task.name, &xs[x]);
                    if st != 200 {
                        failures.push(format!("task {t} input {x} (after swap: {after}): status {st} {v}"));
                    } else if let Err(e) = check(&v, &tasks[t], &want[t][x]) {
                        failures.push(format!("task {t} input {x}: {e}"));
                    } else if t == 2 {
                        new_task_served += 1;
                    }
                    done.fetch_add(1, SeqCst);
                }
                (failures, new_task_served)
            })
        })
        .collect();
    // Install task c (generation 4) once a third of the requests are answered.
    while done.load(SeqCst) < CLIENTS * PER_CLIENT / 3 {
        std::thread::sleep(Duration::from_millis(5));
        assert!(start_time.elapsed() < Duration::from_secs(120), "the load test is too slow");
    }
    let generation = install(&f.dir, &bb, &f.tasks[2]);
    assert_eq!(generation, 4);
    swapped.store(true, SeqCst);
    let mut failures = Vec::new();
    let mut new_served = 0;
    for c in clients {
        let (f, n) = c.join().unwrap();
        failures.extend(f);
        new_served += n;
    }
    assert!(failures.is_empty(), "{} failed requests, first: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(new_served > 0, "task c was never served after the swap");
    // The swap is visible everywhere, and counted.
    let (st, b) = http(&server.addr, "GET", "/v1/tasks", "", b"");
    assert_eq!(st, 200);
    let v = json_of(&b);
    assert_eq!(v["generation"], 4);
    let names: Vec<&str> = v["tasks"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(v["tasks"][0]["method"], "supsup");
    assert_eq!(v["tasks"][2]["labels"][1], "one");
    assert_eq!(v["tasks"][1]["digest"], edgecl::format::Hex(&f.tasks[1].digest).to_string());
    let (st, b) = http(&server.addr, "GET", "/metrics", "", b"");
    assert_eq!(st, 200);
    let m = String::from_utf8(b).unwrap();
    let ok = metric(&m, "edgecl_requests_total{endpoint=\"/v1/predict\",status=\"200\"}");
    assert_eq!(ok as usize, CLIENTS * PER_CLIENT, "{m}");
    assert!(metric(&m, "edgecl_task_switches_total") > 0.0, "{m}");
    assert_eq!(metric(&m, "edgecl_generation"), 4.0, "{m}");
    assert_eq!(metric(&m, "edgecl_tasks_loaded"), 3.0, "{m}");
    assert!(metric(&m, "edgecl_reloads_total") >= 1.0, "{m}");
    assert_eq!(metric(&m, "edgecl_reload_errors_total"), 0.0, "{m}");
    let count = metric(&m, "edgecl_request_duration_seconds_count{endpoint=\"/v1/predict\"}");
    assert_eq!(count as usize, CLIENTS * PER_CLIENT);
    eprintln!("{} requests in {:?}", CLIENTS * PER_CLIENT, start_time.elapsed());

    // A generation that cannot be loaded (a corrupt task file): the old one keeps serving.
    let gens = f.dir.join("generations");
    let bad = gens.join("000009");
    std::fs::create_dir_all(&bad).unwrap();
    for e in std::fs::read_dir(gens.join("000004")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let mut bytes = std::fs::read(bad.join("a.ect")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(bad.join("a.ect"), bytes).unwrap();
    let tmp = f.dir.join(".current-test");
    std::os::unix::fs::symlink("generations/000009", &tmp).unwrap();
    std::fs::rename(&tmp, f.dir.join("current")).unwrap();
    let (st, v) = predict(&server.addr, "a", &xs[0]);
    assert_eq!(st, 200, "{v}");
    check(&v, &tasks[0], &want[0][0]).unwrap();
    assert_eq!(v["generation"], 4);
    let (_, b) = http(&server.addr, "GET", "/metrics", "", b"");
    let m = String::from_utf8(b).unwrap();
    assert_eq!(metric(&m, "edgecl_reload_errors_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "edgecl_generation"), 4.0, "{m}");
}

#[test]
fn images_batches_and_bad_requests() {
    let f = fixture("errors");
    let bb = Backbone::open(&f.bb_bytes).unwrap();
    let k = Kernels::detect();
    let per = bb.input_shape().len();
    let session = Session::new(&bb, f.tasks[..2].to_vec()).unwrap();
    let mut ws = session.workspace(&k, 4);
    let server = start(&f.dir, &["--threads", "1", "--max-body", "100000"]);
    let a = &server.addr;

    // An image, transformed as `edgecl predict` and training do.
    let png_path = f.dir.join("..").join("digit.png");
    let img = image::GrayImage::from_fn(20, 24, |x, y| image::Luma([((x * 13 + y * 7) % 256) as u8]));
    img.save(&png_path).unwrap();
    let decoded = edgecl::data::folder::decode(&png_path).unwrap();
    let i = bb.input();
    let mut t = Transform::new(i.channels as usize, i.height as usize, i.width as usize, i.mean, i.std);
    t.pad = true;
    let mut x = vec![0.0; per];
    t.apply(&decoded, None, &mut x).unwrap();
    let want = session.run(&k, 1, &x, 1, &mut ws).to_vec();
    let png = std::fs::read(&png_path).unwrap();
    let (st, b) = http(a, "POST", "/v1/predict?task=b&logits=true", "image/png", &png);
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let v = json_of(&b);
    check(&v, &f.tasks[1], &want).unwrap();
    assert!(v["score"].as_f64().unwrap() > 1.0 / 3.0 - 1e-6 && v["score"].as_f64().unwrap() <= 1.0);

    // A batch: one answer per input, in order.
    let xs = random_inputs(3, per);
    let flat: Vec<f32> = xs.concat();
    let want = session.run(&k, 0, &flat, 3, &mut ws).to_vec();
    let width = session.output_len(0);
    let body = serde_json::json!({ "inputs": xs }).to_string();
    let (st, b) = http(a, "POST", "/v1/predict?task=a&logits", "application/json", body.as_bytes());
    assert_eq!(st, 200);
    let v = json_of(&b);
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    for (j, p) in preds.iter().enumerate() {
        check(p, &f.tasks[0], &want[j * width..(j + 1) * width]).unwrap();
    }
    assert_eq!(v["generation"], 3);
    // task=auto: the task the library infers from the same three inputs, and its answers.
    let cands: Vec<Candidate> = f.tasks[..2].iter().map(|t| Candidate::new(&t.task, vec![])).collect();
    for (mode, query) in [
        (Mode::OneShot, "task=auto&logits"),
        (Mode::Entropy, "task=auto&infer=entropy&logits"),
        (Mode::Binary, "task=auto&infer=binary&logits"),
        (Mode::Information, "task=auto&infer=info&logits"),
    ] {
        let r = infer_task(&k, &bb, &cands, &flat, 3, mode).unwrap();
        let t = r.index;
        let want = session.run(&k, t, &flat, 3, &mut ws).to_vec();
        let (st, b) = http(a, "POST", &format!("/v1/predict?{query}"), "application/json", body.as_bytes());
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
        let v = json_of(&b);
        assert_eq!(
            (v["task"].as_str(), &v["task_inferred"]),
            (Some(f.tasks[t].task.name.as_str()), &Value::Bool(true))
        );
        let score = v["task_score"].as_f64().unwrap() as f32;
        assert!((score - r.scores[t]).abs() <= 1e-4 * (1.0 + r.scores[t].abs()), "{score} vs {:?}", r.scores);
        for (j, p) in v["predictions"].as_array().unwrap().iter().enumerate() {
            check(p, &f.tasks[t], &want[j * width..(j + 1) * width]).unwrap();
        }
    }

    let err = |st: u16, b: &[u8], want_status: u16, needle: &str| {
        let v = json_of(b);
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("no error message in {v}"));
        assert_eq!(st, want_status, "{msg}");
        assert!(msg.contains(needle), "'{msg}' does not say '{needle}'");
    };
    let one = serde_json::json!({ "input": vec![0.5f32; per] }).to_string();
    // 413: a body over --max-body, announced by Content-Length, is refused unread.
    let big = vec![b' '; 150_000];
    let (st, b) = http(a, "POST", "/v1/predict?task=a", "application/json", &big);
    err(st, &b, 413, "at most 100000");
    // 400: malformed JSON, wrong length, both or neither field, non-images, no task, bad infer=.
    let (st, b) = http(a, "POST", "/v1/predict?task=a", "application/json", b"{\"input\": [1, 2,");
    err(st, &b, 400, "not the expected JSON");
    let (st, b) = http(a, "POST", "/v1/predict?task=a", "application/json", b"{\"input\": [1, 2, 3]}");
    err(st, &b, 400, &format!("3 values; the backbone takes {per}"));
    let (st, b) = http(a, "POST", "/v1/predict?task=a", "application/json", b"{\"input\": [1], \"inputs\": [[1]]}");
    err(st, &b, 400, "exactly one");
    let (st, b) = http(a, "POST", "/v1/predict?task=a", "application/json", b"{\"pixels\": [1]}");
    err(st, &b, 400, "unknown field");
    let (st, b) = http(a, "POST", "/v1/predict?task=a", "image/png", b"not a png at all");
    err(st, &b, 400, "image");
    let (st, b) = http(a, "POST", "/v1/predict", "application/json", one.as_bytes());
    err(st, &b, 400, "name the task");
    let (st, b) = http(a, "POST", "/v1/predict?task=auto&infer=fast", "application/json", one.as_bytes());
    err(st, &b, 400, "infer=one-shot");
    let (st, b) = http(a, "POST", "/v1/predict?task=a", "text/plain", one.as_bytes());
    err(st, &b, 415, "Content-Type");
    // 404: an unknown task names the installed ones; unknown endpoints; 405: wrong method.
    let (st, b) = http(a, "POST", "/v1/predict?task=zebra", "application/json", one.as_bytes());
    err(st, &b, 404, "installed: a, b");
    assert_eq!(json_of(&b)["tasks"], serde_json::json!(["a", "b"]));
    let (st, b) = http(a, "GET", "/v2/everything", "", b"");
    err(st, &b, 404, "no endpoint");
    let (st, b) = http(a, "GET", "/v1/predict?task=a", "", b"");
    err(st, &b, 405, "POST");
    // Still healthy, and every error counted.
    let (st, b) = http(a, "GET", "/healthz", "", b"");
    assert_eq!((st, json_of(&b)["status"].as_str()), (200, Some("ok")));
    let (_, b) = http(a, "GET", "/metrics", "", b"");
    let m = String::from_utf8(b).unwrap();
    assert_eq!(metric(&m, "edgecl_request_errors_total{endpoint=\"/v1/predict\",status=\"400\"}"), 7.0, "{m}");
    assert_eq!(metric(&m, "edgecl_request_errors_total{endpoint=\"/v1/predict\",status=\"413\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "edgecl_request_errors_total{endpoint=\"other\",status=\"404\"}"), 1.0, "{m}");

    // SIGTERM: a clean exit.
    let mut server = server;
    let pid = server.child.id() as i32;
    // SAFETY: plain kill(2) on the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn overload_answers_503_at_once_and_recovers() {
    let f = fixture("overload");
    let bb = Backbone::open(&f.bb_bytes).unwrap();
    let per = bb.input_shape().len();
    // One worker holding each request 500 ms, one waiting place: of 8 simultaneous requests
    // at most 2 can be taken, the rest must be refused right away.
    let server = start(&f.dir, &["--threads", "1", "--queue", "1", "--test-delay-ms", "500"]);
    let x = Arc::new(vec![0.25f32; per]);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (addr, x) = (server.addr.clone(), x.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let (st, v) = predict(&addr, "a", &x);
                (st, v, t0.elapsed())
            })
        })
        .collect();
    let answers: Vec<(u16, Value, Duration)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let busy: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(ok + busy.len(), 8, "only 200 or 503: {answers:?}");
    assert!(ok >= 1 && busy.len() >= 4, "{ok} answered, {} refused", busy.len());
    for b in &busy {
        assert!(b.1["error"].as_str().unwrap().contains("busy"), "{}", b.1);
        assert!(b.2 < Duration::from_millis(450), "a refusal took {:?}", b.2);
    }
    // The server recovers.
    let (st, _) = predict(&server.addr, "b", &x);
    assert_eq!(st, 200);
    let (_, b) = http(&server.addr, "GET", "/metrics", "", b"");
    let m = String::from_utf8(b).unwrap();
    let refused = metric(&m, "edgecl_requests_total{endpoint=\"/v1/predict\",status=\"503\"}");
    assert_eq!(refused as usize, busy.len(), "{m}");
}
