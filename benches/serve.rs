//! `edgecl serve` under load: requests/s and p50/p99 latency with 1 and 2 worker threads,
//! one task for every request vs tasks alternating per request.
//!
//! A store with two random SupSup tasks on a random backbone (`EDGECL_BENCH_ARCH`, default
//! fc1024) is served by the real binary on loopback; `EDGECL_BENCH_CLIENTS` (default 4)
//! keep-alive clients send `EDGECL_BENCH_REQUESTS` (default 4000) JSON-tensor requests in
//! all. Latency is client-side, from writing a request to reading its whole answer.
//!
//! `cargo bench --bench serve` (release build of the binary).

use edgecl::adapter::Method;
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::format::task::encode;
use edgecl::import::init::{random_backbone, random_task, Arch};
use edgecl::rng::SplitMix64;
use edgecl::store::{NewTask, Store};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A random SupSup task file.
fn task_bytes(bb: &Backbone, name: &str, seed: u64) -> Vec<u8> {
    encode(&random_task(bb, Method::Supsup, name, &[], seed).task, &bb.digest())
}

/// One keep-alive connection: sends a request, reads the answer (Content-Length framed).
struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn request(&mut self, path: &str, body: &[u8]) -> u16 {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let s = self.r.get_mut();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut len = 0;
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut buf = vec![0; len];
        self.r.read_exact(&mut buf).unwrap();
        status
    }
}

fn main() {
    let arch = std::env::var("EDGECL_BENCH_ARCH").unwrap_or_else(|_| "fc1024".into());
    let arch = Arch::from_name(&arch).expect("EDGECL_BENCH_ARCH: lenet, fc1024 or gemresnet18");
    let clients = env_or("EDGECL_BENCH_CLIENTS", 4);
    let total = env_or("EDGECL_BENCH_REQUESTS", 4000);
    let dir = std::env::temp_dir().join(format!("edgecl-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = random_backbone(arch, 10, 1).emit(WeightFormat::I8);
    std::fs::write(dir.join("bb.ecb"), &bytes).unwrap();
    let store_dir = dir.join("store");
    let store = Store::init(&store_dir, &dir.join("bb.ecb")).unwrap();
    let bb = Backbone::open(&bytes).unwrap();
    let mut c = store.change().unwrap();
    for (name, seed) in [("a", 1), ("b", 2)] {
        c.put(NewTask { bytes: task_bytes(&bb, name, seed), scores: None, origin: name.into() }).unwrap();
    }
    c.commit().unwrap();
    let per = bb.input_shape().len();
    let mut r = SplitMix64::new(3);
    let body = serde_json::json!({ "input": (0..per).map(|_| r.uniform(-0.5, 2.5)).collect::<Vec<f32>>() }).to_string();
    println!(
        "serve bench: {} backbone, {clients} keep-alive clients, {total} requests per case, load average {}",
        arch.name(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    println!("{:>7} {:>12} {:>10} {:>10} {:>10}", "threads", "tasks", "req/s", "p50 ms", "p99 ms");
    for threads in [1, 2] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgecl"))
            .args(["serve", "--listen", "127.0.0.1:0", "--queue", "1024", "--threads", &threads.to_string(), "--store"])
            .arg(&store_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap().to_string();
        for alternate in [false, true] {
            let start = Instant::now();
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let (addr, body) = (addr.clone(), body.clone());
                    let n = total / clients;
                    std::thread::spawn(move || {
                        let mut conn = Conn { r: BufReader::new(TcpStream::connect(&addr).unwrap()) };
                        conn.r.get_mut().set_nodelay(true).unwrap();
                        let mut lat = Vec::with_capacity(n);
                        for i in 0..n {
                            let task = if alternate && (i + c) % 2 == 1 { "b" } else { "a" };
                            let t0 = Instant::now();
                            let st = conn.request(&format!("/v1/predict?task={task}"), body.as_bytes());
                            assert_eq!(st, 200);
                            lat.push(t0.elapsed());
                        }
                        lat
                    })
                })
                .collect();
            let mut lat: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
            let secs = start.elapsed().as_secs_f64();
            lat.sort();
            let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
            let mode = if alternate { "alternating" } else { "fixed" };
            println!("{threads:>7} {mode:>12} {:>10.0} {:>10.3} {:>10.3}", lat.len() as f64 / secs, q(0.5), q(0.99));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
