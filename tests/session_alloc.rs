//! Running and switching tasks allocates nothing: a counting global allocator over the whole
//! process (its own test binary, so no other test's allocations are counted; the kernels'
//! worker threads are).

use edgecl::adapter::{Components, Mask, Method, Task};
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::format::task::{decode, encode, TaskFile};
use edgecl::import::init::{random_backbone, Arch};
use edgecl::kernels::Kernels;
use edgecl::rng::SplitMix64;
use edgecl::session::Session;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A random mask-based task; ExSSNeT tasks get a value for each exclusive weight.
fn task(bb: &Backbone, method: Method, name: &str, deps: &[&TaskFile], seed: u64) -> TaskFile {
    let mut r = SplitMix64::new(seed);
    let mut c = Components::default();
    for (l, i) in (0..bb.layers().len()).filter(|&i| bb.layers()[i].op.is_matmul()).enumerate() {
        let n = bb.maskable(i);
        let mut words = vec![0u32; n.div_ceil(32)];
        for j in 0..n {
            if r.next_f32() < 0.3 {
                words[j / 32] |= 1 << (j % 32);
            }
        }
        let m = Mask { len: n as u64, words };
        if method == Method::Exssnet {
            let bits = m.bits().unwrap();
            let excl = bits
                .iter_ones()
                .filter(|&j| deps.iter().all(|d| !d.task.components.masks[l].bits().unwrap()[j]))
                .count();
            c.overlay.push((0..excl).map(|_| r.uniform(-0.3, 0.3)).collect());
        }
        c.masks.push(m);
    }
    let t = Task {
        name: name.into(),
        labels: vec!["a".into(), "b".into()],
        method,
        components: c,
        depends_on: deps.iter().map(|d| d.digest).collect(),
        config: String::new(),
        metrics: Vec::new(),
        created_at: 0,
        version: 1,
    };
    decode(&encode(&t, &bb.digest())).unwrap()
}

#[test]
fn switching_tasks_allocates_nothing() {
    let bytes = random_backbone(Arch::Fc1024, 10, 3).emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    let a = task(&bb, Method::Exssnet, "a", &[], 1);
    let b = task(&bb, Method::Exssnet, "b", &[&a], 2);
    let c = task(&bb, Method::Supsup, "c", &[], 3);
    let session = Session::new(&bb, vec![a, b, c]).unwrap();
    let k = Kernels::detect();
    let x = vec![0.5; 4 * bb.input_shape().len()];
    let mut ws = session.workspace(&k, 4);
    // As a server does: the loop runs on a worker of the pool the kernels split work over.
    // (Calls from outside a rayon pool go through its injector queue, which allocates a block
    // per 63 injected jobs whatever runs; that is rayon's, not a task switch's.)
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let per = bb.input_shape().len();
    let allocated = pool.install(|| {
        for t in 0..3 {
            session.run(&k, t, &x, 4, &mut ws); // warm up
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for i in 0..60 {
            let batch = 1 + i % 4;
            session.run(&k, i % 3, &x[..batch * per], batch, &mut ws);
        }
        ALLOCATIONS.load(Ordering::Relaxed) - before
    });
    assert_eq!(allocated, 0, "running and switching tasks allocated");
}
