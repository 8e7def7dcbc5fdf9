//! `edgecl serve`: a small HTTP/1.1 JSON server over a store's tasks.
//!
//! Concurrency: one acceptor thread takes parsed requests from `tiny_http` and hands them to a
//! bounded queue; `--threads` workers, each with its own [`Workspace`] and kernels run on the
//! worker alone (a one-thread rayon pool), take them from it. When the queue is full the
//! acceptor answers 503 at once, so memory stays bounded under overload: at most `queue`
//! waiting requests, and bodies are read by workers, at most `--max-body` bytes each.
//!
//! Reload: every request reads the `current` symlink (one `readlink`); when it names another
//! generation than the loaded one, a worker decodes the new generation into a new [`Session`]
//! and swaps an `Arc`. Requests in flight keep the `Arc` they started with, so a swap never
//! fails them. If the new generation cannot be loaded the old one keeps serving, the error is
//! counted in /metrics, and loading is retried when `current` changes again or after a pause.
//! The backbone of a store never changes: it is mapped once, for the life of the process.

use crate::cl::base_transform;
use crate::predict::top;
use crate::{predict_auto, InferArg};
use anyhow::{bail, Context, Result};
use edgecl::backbone::mmap::MappedFile;
use edgecl::backbone::Backbone;
use edgecl::data::{Scratch, Transform};
use edgecl::format::task::TaskFile;
use edgecl::format::{Digest, Hex};
use edgecl::kernels::Kernels;
use edgecl::session::{Session, Workspace};
use edgecl::store::Store;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Options of `edgecl serve` (workers come from the global `--threads`).
#[derive(clap::Args)]
pub struct ServeArgs {
    /// The store to serve (made by `edgecl store init`); its current generation is followed.
    #[arg(long)]
    pub store: PathBuf,
    /// `HOST:PORT` (port 0 picks a free one) or `unix:PATH`. The bound address is printed on
    /// the first line of stdout.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Requests waiting for a worker; more are answered 503 at once.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body: usize,
    /// Test knob: every predict request holds its worker this long (to provoke 503s).
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_delay_ms: u64,
}

/// Samples one worker runs at once; a JSON batch is run in pieces of this size.
const BATCH: usize = 16;
/// Most samples in one request.
const MAX_INPUTS: usize = 4096;
/// Pause before a generation that failed to load is tried again (unless `current` changes).
const RETRY: Duration = Duration::from_secs(5);

/// The tasks of one generation, ready to run.
pub struct Loaded {
    generation: u32,
    /// What `current` pointed to when this generation was read.
    link: PathBuf,
    session: Session<'static>,
}

/// Reads the current generation of the store in `dir`: its number and its tasks, each checked
/// against the backbone `digest`.
pub fn read_current(dir: &Path, digest: &Digest) -> Result<(u32, Vec<TaskFile>)> {
    let store = Store::open(dir)?;
    if &store.backbone_digest() != digest {
        bail!("the store's backbone changed under the server (digest {})", Hex(&store.backbone_digest()));
    }
    let mut files = Vec::new();
    for t in store.tasks()? {
        t.file.check_backbone(digest).with_context(|| format!("task '{}'", t.name))?;
        files.push(t.file);
    }
    Ok((store.generation(), files))
}

fn load(dir: &Path, bb: &'static Backbone<'static>) -> Result<Loaded> {
    let link = std::fs::read_link(dir.join("current")).context("reading the store's `current` link")?;
    let (generation, files) = read_current(dir, &bb.digest())?;
    let session = Session::new(bb, files).with_context(|| format!("loading generation {generation}"))?;
    Ok(Loaded { generation, link, session })
}

/// The endpoints, as metrics label them (a fixed set, whatever clients ask for).
const ENDPOINTS: [&str; 5] = ["/v1/predict", "/v1/tasks", "/healthz", "/metrics", "other"];
/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

#[derive(Default)]
struct Metrics {
    /// (endpoint index, status) → answers.
    answers: Mutex<BTreeMap<(usize, u16), u64>>,
    latency: [Histogram; ENDPOINTS.len()],
    switches: AtomicU64,
    reloads: AtomicU64,
    reload_errors: AtomicU64,
}

impl Metrics {
    fn record(&self, endpoint: usize, status: u16, took: Duration) {
        if let Ok(mut a) = self.answers.lock() {
            *a.entry((endpoint, status)).or_default() += 1;
        }
        let s = took.as_secs_f64();
        let b = BUCKETS.iter().position(|&le| s <= le).unwrap_or(BUCKETS.len());
        let h = &self.latency[endpoint];
        h.counts[b].fetch_add(1, Relaxed);
        h.sum_ns.fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Prometheus text exposition format.
    fn render(&self, s: &Shared, loaded: &Loaded) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let answers = self.answers.lock().map(|a| a.clone()).unwrap_or_default();
        let _ = writeln!(o, "# HELP edgecl_requests_total Requests answered, by endpoint and HTTP status.");
        let _ = writeln!(o, "# TYPE edgecl_requests_total counter");
        for ((e, st), n) in &answers {
            let _ = writeln!(o, "edgecl_requests_total{{endpoint=\"{}\",status=\"{st}\"}} {n}", ENDPOINTS[*e]);
        }
        let _ = writeln!(o, "# HELP edgecl_request_errors_total Requests answered with a 4xx or 5xx status.");
        let _ = writeln!(o, "# TYPE edgecl_request_errors_total counter");
        for ((e, st), n) in answers.iter().filter(|((_, st), _)| *st >= 400) {
            let _ = writeln!(o, "edgecl_request_errors_total{{endpoint=\"{}\",status=\"{st}\"}} {n}", ENDPOINTS[*e]);
        }
        let _ =
            writeln!(o, "# HELP edgecl_request_duration_seconds From receiving a request to its reply being ready.");
        let _ = writeln!(o, "# TYPE edgecl_request_duration_seconds histogram");
        for (e, h) in self.latency.iter().enumerate() {
            let mut acc = 0;
            for (i, c) in h.counts.iter().enumerate() {
                acc += c.load(Relaxed);
                let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(
                    o,
                    "edgecl_request_duration_seconds_bucket{{endpoint=\"{}\",le=\"{le}\"}} {acc}",
                    ENDPOINTS[e]
                );
            }
            let sum = h.sum_ns.load(Relaxed) as f64 * 1e-9;
            let _ = writeln!(o, "edgecl_request_duration_seconds_sum{{endpoint=\"{}\"}} {sum}", ENDPOINTS[e]);
            let _ = writeln!(o, "edgecl_request_duration_seconds_count{{endpoint=\"{}\"}} {acc}", ENDPOINTS[e]);
        }
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            "edgecl_task_switches_total",
            "counter",
            "Predict requests for another task than their worker's previous one.",
            self.switches.load(Relaxed),
        );
        one("edgecl_generation", "gauge", "The store generation being served.", loaded.generation as u64);
        one("edgecl_tasks_loaded", "gauge", "Tasks of the served generation.", loaded.session.tasks().len() as u64);
        one("edgecl_reloads_total", "counter", "Generations loaded after the first.", self.reloads.load(Relaxed));
        one(
            "edgecl_reload_errors_total",
            "counter",
            "Generations that failed to load (the previous one kept serving).",
            self.reload_errors.load(Relaxed),
        );
        one("edgecl_workers", "gauge", "Worker threads.", s.workers as u64);
        one("edgecl_queue_capacity", "gauge", "Requests that may wait for a worker.", s.queue as u64);
        o
    }
}

/// What every thread shares.
struct Shared {
    dir: PathBuf,
    bb: &'static Backbone<'static>,
    k: Kernels,
    current: RwLock<Arc<Loaded>>,
    /// Held while a generation is being loaded; the link that last failed, and when.
    reload: Mutex<Option<(PathBuf, Instant)>>,
    metrics: Metrics,
    max_body: usize,
    workers: usize,
    queue: usize,
    delay: Duration,
}

impl Shared {
    fn loaded(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The generation to serve this request with: the loaded one, or the one `current` names
    /// now if it differs (loaded here). With `wait` false, a request that finds another thread
    /// loading does not wait for it and uses the old generation.
    fn current(&self, wait: bool) -> Arc<Loaded> {
        let cur = self.loaded();
        let link = match std::fs::read_link(self.dir.join("current")) {
            Ok(l) if l != cur.link => l,
            _ => return cur,
        };
        let mut failed = if wait {
            match self.reload.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            }
        } else {
            match self.reload.try_lock() {
                Ok(g) => g,
                Err(_) => return cur,
            }
        };
        // Another thread may have loaded it while this one waited.
        let cur = self.loaded();
        if cur.link == link {
            return cur;
        }
        if let Some((l, at)) = &*failed {
            if *l == link && at.elapsed() < RETRY {
                return cur;
            }
        }
        match load(&self.dir, self.bb) {
            Ok(new) => {
                let new = Arc::new(new);
                eprintln!(
                    "edgecl serve: now serving generation {} ({} tasks)",
                    new.generation,
                    new.session.tasks().len()
                );
                match self.current.write() {
                    Ok(mut g) => *g = new.clone(),
                    Err(p) => *p.into_inner() = new.clone(),
                }
                self.metrics.reloads.fetch_add(1, Relaxed);
                *failed = None;
                new
            }
            Err(e) => {
                eprintln!("edgecl serve: keeping generation {}: {e:#}", cur.generation);
                self.metrics.reload_errors.fetch_add(1, Relaxed);
                *failed = Some((link, Instant::now()));
                cur
            }
        }
    }
}

/// An answer: status, content type and body.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply { status, content_type: "application/json", body: v.to_string().into_bytes() }
    }
    fn error(status: u16, msg: impl std::fmt::Display) -> Reply {
        Reply::json(status, json!({ "error": msg.to_string() }))
    }
}

fn respond(req: tiny_http::Request, r: Reply) {
    let ct = tiny_http::Header::from_bytes(&b"Content-Type"[..], r.content_type.as_bytes());
    let mut resp = tiny_http::Response::from_data(r.body).with_status_code(r.status);
    if let Ok(h) = ct {
        resp = resp.with_header(h);
    }
    if r.status == 503 {
        if let Ok(h) = tiny_http::Header::from_bytes(&b"Retry-After"[..], &b"1"[..]) {
            resp = resp.with_header(h);
        }
    }
    if r.status == 413 {
        // The unread rest of the body is not worth draining.
        if let Ok(h) = tiny_http::Header::from_bytes(&b"Connection"[..], &b"close"[..]) {
            resp = resp.with_header(h);
        }
    }
    // A client that went away is not an error of ours.
    let _ = req.respond(resp);
}

fn endpoint_of(url: &str) -> usize {
    let path = url.split('?').next().unwrap_or("");
    ENDPOINTS[..4].iter().position(|&e| e == path).unwrap_or(4)
}

/// Decodes `%XX` and `+` in a query component.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(url: &str) -> Vec<(String, String)> {
    let Some((_, q)) = url.split_once('?') else { return Vec::new() };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (unescape(k), unescape(v)),
            None => (unescape(p), String::new()),
        })
        .collect()
}

/// One worker's state: its workspace (for the generation it was made for) and the task it
/// ran last.
struct Worker {
    ws: Option<(Arc<Loaded>, Workspace)>,
    last: Option<Digest>,
    scratch: Scratch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorBody {
    input: Option<Vec<f32>>,
    inputs: Option<Vec<Vec<f32>>>,
}

/// Reads the body, at most `max` bytes.
fn read_body(req: &mut tiny_http::Request, max: usize) -> Result<Vec<u8>, Reply> {
    let too_large =
        |n: String| Reply::error(413, format!("the body is {n} bytes; at most {max} are accepted (--max-body)"));
    if let Some(n) = req.body_length() {
        if n > max {
            return Err(too_large(n.to_string()));
        }
    }
    let mut body = Vec::with_capacity(req.body_length().unwrap_or(0).min(max));
    req.as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Reply::error(400, format!("reading the body: {e}")))?;
    if body.len() > max {
        return Err(too_large(format!("more than {max}")));
    }
    Ok(body)
}

fn header<'r>(req: &'r tiny_http::Request, name: &'static str) -> Option<&'r str> {
    req.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str())
}

/// Decodes PNG/JPEG bytes and transforms the image as training did.
fn image_input(bytes: &[u8], t: &Transform, scratch: &mut Scratch, out: &mut [f32]) -> Result<(), String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(128 << 20);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("cannot decode the image (PNG or JPEG expected): {e}"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err("the image has no pixels".into());
    }
    let (c, data): (usize, Vec<f32>) = if img.color().has_color() {
        let raw = img.into_rgb8();
        (3, planes(raw.as_raw(), 3))
    } else {
        let raw = img.into_luma8();
        (1, planes(raw.as_raw(), 1))
    };
    scratch.apply(t, c, h, w, &data, None, out).map_err(|e| format!("transforming the image: {e}"))
}

/// Interleaved 8-bit samples with `c` channels to channel-major planes in [0, 1].
fn planes(raw: &[u8], c: usize) -> Vec<f32> {
    let p = raw.len() / c;
    let mut out = vec![0.0; raw.len()];
    for (i, px) in raw.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            out[ch * p + i] = v as f32 / 255.0;
        }
    }
    out
}

/// Parses the body into `n` normalised samples.
fn inputs(s: &Shared, req: &tiny_http::Request, body: &[u8], w: &mut Worker) -> Result<(Vec<f32>, usize, bool), Reply> {
    let per = s.bb.input_shape().len();
    let ct = header(req, "Content-Type").unwrap_or("").to_ascii_lowercase();
    if ct.starts_with("image/") {
        let t = base_transform(s.bb);
        let mut x = vec![0.0; per];
        image_input(body, &t, &mut w.scratch, &mut x).map_err(|e| Reply::error(400, e))?;
        return Ok((x, 1, false));
    }
    if !(ct.is_empty() || ct.starts_with("application/json")) {
        return Err(Reply::error(
            415,
            format!("Content-Type '{ct}': send image/png, image/jpeg or application/json ({{\"input\": [...]}})"),
        ));
    }
    let parsed: TensorBody = serde_json::from_slice(body).map_err(|e| {
        Reply::error(
            400,
            format!(
                "the body is not the expected JSON ({{\"input\": [f32; {per}]}} or {{\"inputs\": [[...], ...]}}): {e}"
            ),
        )
    })?;
    let (rows, batch) = match (parsed.input, parsed.inputs) {
        (Some(x), None) => (vec![x], false),
        (None, Some(xs)) => (xs, true),
        _ => return Err(Reply::error(400, "give exactly one of \"input\" (one sample) and \"inputs\" (a batch)")),
    };
    if rows.is_empty() {
        return Err(Reply::error(400, "\"inputs\" is empty"));
    }
    if rows.len() > MAX_INPUTS {
        return Err(Reply::error(400, format!("{} inputs in one request; at most {MAX_INPUTS}", rows.len())));
    }
    let i = s.bb.input_shape();
    let mut x = Vec::with_capacity(rows.len() * per);
    for (n, r) in rows.iter().enumerate() {
        if r.len() != per {
            return Err(Reply::error(
                400,
                format!(
                    "input {n} has {} values; the backbone takes {per} ({}×{}×{}, normalised, channel-major)",
                    r.len(),
                    i.c,
                    i.h,
                    i.w
                ),
            ));
        }
        if r.iter().any(|v| !v.is_finite()) {
            return Err(Reply::error(400, format!("input {n} holds a value that is not finite")));
        }
        x.extend_from_slice(r);
    }
    Ok((x, rows.len(), batch))
}

fn predict(s: &Shared, req: &mut tiny_http::Request, w: &mut Worker) -> Reply {
    let q = query(req.url());
    let Some(task) = q.iter().find(|(k, _)| k == "task").map(|(_, v)| v.clone()) else {
        return Reply::error(400, "name the task: POST /v1/predict?task=NAME (GET /v1/tasks lists them)");
    };
    let infer = match q.iter().find(|(k, _)| k == "infer").map(|(_, v)| v.as_str()) {
        None | Some("one-shot") => InferArg::OneShot,
        Some("entropy") => InferArg::Entropy,
        Some("binary") => InferArg::Binary,
        Some("info") => InferArg::Info,
        Some(other) => {
            return Reply::error(
                400,
                format!("infer={other}: use infer=one-shot (the default), infer=binary, infer=info or infer=entropy"),
            )
        }
    };
    let with_logits = q.iter().any(|(k, v)| k == "logits" && matches!(v.as_str(), "" | "1" | "true"));
    let body = match read_body(req, s.max_body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (x, n, batch) = match inputs(s, req, &body, w) {
        Ok(v) => v,
        Err(r) => return r,
    };
    drop(body);
    let mut loaded = s.current(false);
    if loaded.session.find(&task).is_none() {
        // Perhaps installed a moment ago, while another thread was loading it.
        loaded = s.current(true);
    }
    let session = &loaded.session;
    // `task=auto`: one task for all inputs of the request, inferred from them together (up to
    // 256; more inputs say more, one image says little).
    let mut inferred = None;
    if task == "auto" {
        match predict_auto::choose(&s.k, session, &x, n, infer, true) {
            Ok(c) => inferred = c.first().copied(),
            Err(e) => return Reply::error(400, format!("task=auto: {e:#}")),
        }
    }
    let Some(t) = inferred.map(|c| c.0).or_else(|| session.find(&task)) else {
        let names: Vec<&str> = session.tasks().iter().map(|t| t.task.name.as_str()).collect();
        return Reply::json(
            404,
            json!({"error": format!("no task named '{task}'; installed: {}", names.join(", ")), "tasks": names}),
        );
    };
    if !s.delay.is_zero() {
        std::thread::sleep(s.delay);
    }
    let ws = match &mut w.ws {
        Some((l, ws)) if Arc::ptr_eq(l, &loaded) => ws,
        slot => &mut slot.insert((loaded.clone(), session.workspace(&s.k, BATCH))).1,
    };
    let p = &session.tasks()[t];
    if w.last.is_some_and(|d| d != p.digest) {
        s.metrics.switches.fetch_add(1, Relaxed);
    }
    w.last = Some(p.digest);
    let per = s.bb.input_shape().len();
    let width = session.output_len(t);
    let classes = p.task.classes();
    let mut preds = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let m = (n - i).min(BATCH);
        let out = session.run(&s.k, t, &x[i * per..(i + m) * per], m, ws);
        for b in 0..m {
            let logits = &out[b * width..(b + 1) * width];
            let (label, score) = top(logits, classes);
            let mut v =
                json!({"task": p.task.name, "label": p.task.labels[label], "label_index": label, "score": score});
            if with_logits {
                v["logits"] = json!(&logits[..classes]);
            }
            preds.push(v);
        }
        i += m;
    }
    let digest = Hex(&p.digest).to_string();
    let mut v = if batch {
        json!({"task": p.task.name, "task_digest": digest, "generation": loaded.generation, "predictions": preds})
    } else {
        let mut v = preds.pop().unwrap_or(Value::Null);
        v["task_digest"] = json!(digest);
        v["generation"] = json!(loaded.generation);
        v
    };
    if let Some((_, score)) = inferred {
        v["task_inferred"] = json!(true);
        v["task_score"] = json!(score);
    }
    Reply::json(200, v)
}

fn tasks(s: &Shared) -> Reply {
    let l = s.current(false);
    let tasks: Vec<Value> = l
        .session
        .tasks()
        .iter()
        .map(|p| {
            let t = &p.task;
            json!({"name": t.name, "method": t.method.name(), "classes": t.classes(), "labels": t.labels,
                "version": t.version, "digest": Hex(&p.digest).to_string(), "generation": l.generation})
        })
        .collect();
    Reply::json(200, json!({"generation": l.generation, "tasks": tasks}))
}

fn handle(s: &Shared, req: &mut tiny_http::Request, w: &mut Worker) -> Reply {
    use tiny_http::Method::*;
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (Post, "/v1/predict") => predict(s, req, w),
        (Get, "/v1/tasks") => tasks(s),
        (Get, "/healthz") => {
            let l = s.current(false);
            Reply::json(200, json!({"status": "ok", "generation": l.generation, "tasks": l.session.tasks().len()}))
        }
        (Get, "/metrics") => {
            let l = s.current(false);
            Reply { status: 200, content_type: "text/plain; version=0.0.4", body: s.metrics.render(s, &l).into_bytes() }
        }
        (_, "/v1/predict" | "/v1/tasks" | "/healthz" | "/metrics") => {
            Reply::error(405, format!("{method} {path}: use POST /v1/predict, GET for the others"))
        }
        _ => Reply::error(
            404,
            format!("no endpoint {path}: POST /v1/predict?task=NAME, GET /v1/tasks, /healthz, /metrics"),
        ),
    }
}

struct Job {
    req: tiny_http::Request,
    received: Instant,
}

fn worker(s: &Shared, rx: &Mutex<Receiver<Job>>) {
    let mut w = Worker { ws: None, last: None, scratch: Scratch::default() };
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(Job { mut req, received }) = job else { return };
        let e = endpoint_of(req.url());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(s, &mut req, &mut w))).unwrap_or_else(
            |_| {
                // A bug, not the client's fault: drop the workspace in case it is what broke.
                w.ws = None;
                Reply::error(500, "internal error (see the server's log)")
            },
        );
        // Counted before the reply is written, so that a client that has its answer
        // finds it in /metrics (CI once saw 239 of 240 counted, racing the last write).
        s.metrics.record(e, r.status, received.elapsed());
        respond(req, r);
    }
}

pub fn serve_cmd(args: &ServeArgs, threads: Option<usize>) -> Result<()> {
    let workers = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if args.queue == 0 {
        bail!("--queue must be at least 1");
    }
    let store = Store::open(&args.store)?;
    let (map, path) = crate::open_backbone(&store.backbone_path())?;
    // The backbone of a store never changes: mapped once, for the life of the process.
    let map: &'static MappedFile = Box::leak(Box::new(map));
    let bb: &'static Backbone<'static> = Box::leak(Box::new(crate::backbone(map, &path)?));
    if bb.digest() != store.backbone_digest() {
        bail!("{} does not match the store's recorded digest", path.display());
    }
    let first = load(&args.store, bb)?;
    let server = if let Some(p) = args.listen.strip_prefix("unix:") {
        let p = Path::new(p);
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                std::fs::remove_file(p).with_context(|| format!("removing the stale socket {}", p.display()))?;
            }
        }
        tiny_http::Server::http_unix(p).map_err(|e| anyhow::anyhow!("listening on {}: {e}", p.display()))?
    } else {
        tiny_http::Server::http(args.listen.as_str())
            .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?
    };
    let server = Arc::new(server);
    let addr = match server.server_addr() {
        tiny_http::ListenAddr::IP(a) => a.to_string(),
        #[cfg(unix)]
        tiny_http::ListenAddr::Unix(_) => args.listen.clone(),
    };
    out!("listening on {addr}");
    eprintln!(
        "edgecl serve: store {}, generation {} ({} tasks), {workers} workers, queue {}",
        args.store.display(),
        first.generation,
        first.session.tasks().len(),
        args.queue
    );
    let shared = Arc::new(Shared {
        dir: args.store.clone(),
        bb,
        k: Kernels::detect(),
        current: RwLock::new(Arc::new(first)),
        reload: Mutex::new(None),
        metrics: Metrics::default(),
        max_body: args.max_body,
        workers,
        queue: args.queue,
        delay: Duration::from_millis(args.test_delay_ms),
    });
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (server, stop) = (server.clone(), stop.clone());
        let mut signals =
            signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
                .context("installing signal handlers")?;
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                stop.store(true, Relaxed);
                server.unblock();
            }
        });
    }
    let (tx, rx) = sync_channel::<Job>(args.queue);
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::with_capacity(workers);
    for i in 0..workers {
        let (s, rx) = (shared.clone(), rx.clone());
        // Kernels parallelise on the rayon pool they run in; a one-thread pool per worker keeps
        // each request on its worker, so workers do not compete for the same cores.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(move |_| format!("edgecl-serve-{i}"))
            .build()
            .context("starting a worker")?;
        handles.push(std::thread::spawn(move || pool.install(|| worker(&s, &rx))));
    }
    while !stop.load(Relaxed) {
        let req = match server.recv() {
            Ok(r) => r,
            Err(e) => {
                if !stop.load(Relaxed) {
                    eprintln!("edgecl serve: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        let received = Instant::now();
        match tx.try_send(Job { req, received }) {
            Ok(()) => {}
            Err(TrySendError::Full(j) | TrySendError::Disconnected(j)) => {
                let e = endpoint_of(j.req.url());
                shared.metrics.record(e, 503, received.elapsed());
                respond(j.req, Reply::error(503, format!("busy: {} requests are waiting; try again", shared.queue)));
            }
        }
    }
    eprintln!("edgecl serve: shutting down after the requests in the queue");
    drop(tx);
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
