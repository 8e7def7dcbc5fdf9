//! Running and switching tasks allocates nothing: a counting global allocator over the whole
//! process (its own test binary, so no other test's allocations are counted; the kernels'
//! worker threads are).

use edgecl::adapter::Method;
use edgecl::backbone::Backbone;
use edgecl::format::graph::WeightFormat;
use edgecl::import::init::{random_backbone, random_task, Arch};
use edgecl::kernels::Kernels;
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

#[test]
fn switching_tasks_allocates_nothing() {
    let bytes = random_backbone(Arch::Fc1024, 10, 3).emit(WeightFormat::I8);
    let bb = Backbone::open(&bytes).unwrap();
    let a = random_task(&bb, Method::Exssnet, "a", &[], 1);
    let b = random_task(&bb, Method::Exssnet, "b", &[&a], 2);
    let c = random_task(&bb, Method::Supsup, "c", &[], 3);
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
