//! How the kernels use threads: the rayon pool with std (a kernel splits its work when it is
//! worth it, [`PAR_MIN_WORK`]), the calling thread alone without; [`serial`] keeps a call on
//! its thread, [`busy`] keeps the pool's other workers polling while a step runs.

/// Work (multiply-adds) below which a kernel stays on the calling thread: handing a task to
/// another thread costs a few microseconds, as much as ~100 k multiply-adds. Measured on Lite0
/// at 96×96: splitting every layer made 2 threads slower than 1 (4.9 ms against 4.6 ms).
pub const PAR_MIN_WORK: usize = 1 << 18;

/// Runs `f(index, chunk)` over `chunk`-sized pieces of `data`, on the rayon pool when std is
/// available, the pool has more than one thread, and `work` (multiply-adds) is worth it.
#[inline(always)]
pub fn for_each_chunk<F>(data: &mut [f32], chunk: usize, work: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let chunk = chunk.max(1);
    #[cfg(feature = "std")]
    if work >= PAR_MIN_WORK && data.len() > chunk && threads() > 1 {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    let _ = work;
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i, c);
    }
}

/// [`for_each_chunk`] with a second slice cut into `aux_chunk`-sized pieces, one per piece of
/// `data` (per-task scratch). `aux` must hold at least as many pieces as `data`.
#[inline(always)]
pub fn for_each_chunk_with<F>(data: &mut [f32], chunk: usize, aux: &mut [f32], aux_chunk: usize, work: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
{
    let (chunk, aux_chunk) = (chunk.max(1), aux_chunk.max(1));
    assert!(aux.len() / aux_chunk >= data.len().div_ceil(chunk), "scratch for too few tasks");
    #[cfg(feature = "std")]
    if work >= PAR_MIN_WORK && data.len() > chunk && threads() > 1 {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk).zip(aux.par_chunks_mut(aux_chunk)).enumerate().for_each(|(i, (c, a))| f(i, c, a));
        return;
    }
    let _ = work;
    for (i, (c, a)) in data.chunks_mut(chunk).zip(aux.chunks_mut(aux_chunk)).enumerate() {
        f(i, c, a);
    }
}

/// How many pieces to split `work` multiply-adds into: about two per thread, one if the work
/// is too small to share.
pub fn tasks_for(work: usize) -> usize {
    if work < PAR_MIN_WORK {
        1
    } else {
        threads() * 2
    }
}

/// Number of worker threads the kernels will split work over: the rayon pool's, or 1 inside
/// [`serial`].
pub fn threads() -> usize {
    #[cfg(feature = "std")]
    {
        if SERIAL.get() {
            1
        } else {
            rayon::current_num_threads()
        }
    }
    #[cfg(not(feature = "std"))]
    {
        1
    }
}

#[cfg(feature = "std")]
std::thread_local! {
    static SERIAL: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Runs `f` with every kernel on the calling thread ([`threads`] is 1 inside): for work that
/// is already one of several parallel tasks. Nothing inside then waits on the pool, so this
/// thread never picks up another task while it holds a per-thread buffer.
#[cfg(feature = "std")]
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _restore = Restore(SERIAL.replace(true));
    f()
}

/// Runs `f` on the pool with the pool's other workers polling for work until it returns,
/// instead of going to sleep between parallel regions: for work made of many short regions
/// with serial code between them, such as a training step (a few hundred regions).
///
/// An idle rayon worker sleeps after a few tens of microseconds, and waking it again took
/// about 60 µs per region on a 2-vCPU VM (a tight loop of two 500 µs jobs with 50 µs of
/// serial code between them ran 60 µs over the ideal per region; with the others polling, 9 µs);
/// the caller, when outside the pool, also sleeps and is woken at the end of every region.
/// Polling is OpenMP's active wait (libgomp spins before it sleeps), which PyTorch's
/// kernels run on. It costs the other workers' cores while `f` runs, so it is for work
/// that uses them. With one thread (or inside [`serial`]), or more workers than cores, `f`
/// just runs.
#[cfg(feature = "std")]
pub fn busy<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    /// How long a poller spins with nothing to run before it returns (see `poll` below). In
    /// the training benchmark at two threads, pollers gave up once or twice per run of each
    /// case, in the warm-up steps only (as often with 5 measured steps as with 30); a step's
    /// serial stretches between regions are shorter.
    const POLL_IDLE: std::time::Duration = std::time::Duration::from_millis(20);
    use core::sync::atomic::{AtomicBool, Ordering};
    // More workers than cores: a poller would take a core from a worker with work. (Asked
    // once: on Linux the answer reads the affinity mask and the cgroup's CPU quota files.)
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = threads();
    if threads <= 1 || threads > cores {
        return f();
    }
    // One at a time in the process: a worker that waits inside a task may pick up a queued
    // poller and poll there until that poller's `f` ends, with its own task suspended below;
    // were that `f` another's, waiting on the suspended task, neither would end. The others
    // (and `busy` inside `f`) run as they would without it.
    static HELD: AtomicBool = AtomicBool::new(false);
    if HELD.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return f();
    }
    let _held = Stop(&HELD, false);
    /// Stores its value when dropped, as `f` returns or unwinds: ends the polling (the
    /// scope waits for the pollers) and releases [`busy`] for the next caller.
    struct Stop<'a>(&'a AtomicBool, bool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(self.1, Ordering::Release);
        }
    }
    let done = AtomicBool::new(false);
    // A poller gives up after `POLL_IDLE` with nothing to run. A worker waiting inside another
    // caller's join can pick up a poller and poll on top of the job it waits for; were that
    // job stolen from worker 0 (which then waits for it before it can run `f`), nothing would
    // end the polling. Seen: `concurrent_callers_all_finish` hung once in CI, a poller over a
    // stolen job of another test's parallel sum, worker 0 asleep in that sum's join.
    let poll = || {
        let mut idle = 0u32;
        let mut since = std::time::Instant::now();
        while !done.load(Ordering::Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                idle = 0;
                continue;
            }
            core::hint::spin_loop();
            // The clock is read once every 256 idle tries.
            idle = idle.wrapping_add(1);
            if idle == 1 {
                since = std::time::Instant::now();
            } else if idle.is_multiple_of(256) && since.elapsed() > POLL_IDLE {
                return;
            }
        }
    };
    if rayon::current_thread_index().is_none() {
        // From outside the pool, `f` always runs on worker 0: the buffers a step keeps on its
        // calling thread then stay on one thread (and in one allocator arena) across steps.
        let (job, out) = (std::sync::Mutex::new(Some(f)), std::sync::Mutex::new(None));
        rayon::broadcast(|ctx| {
            if ctx.index() == 0 {
                let f = job.lock().expect("taken once").take().expect("one worker 0");
                let _stop = Stop(&done, true);
                let r = f();
                *out.lock().expect("set once") = Some(r);
            } else {
                poll();
            }
        });
        return out.into_inner().expect("set once").expect("worker 0 ran f");
    }
    rayon::scope(|s| {
        let (me, poll) = (rayon::current_thread_index(), &poll);
        s.spawn_broadcast(move |_, ctx| {
            // `f`'s own thread may run its copy while it waits inside `f`: it must return.
            if Some(ctx.index()) != me {
                poll();
            }
        });
        let _stop = Stop(&done, true);
        f()
    })
}

#[cfg(all(test, feature = "std"))]
mod busy_tests {
    use super::busy;
    use rayon::prelude::*;

    /// A sum over a parallel region, as a step has hundreds of.
    fn regions() -> u64 {
        (0..20u64).map(|r| (0..10_000u64).into_par_iter().map(|i| i * r).sum::<u64>()).sum()
    }

    #[test]
    fn busy_returns_what_f_returns_on_any_pool() {
        let want: u64 = (0..20u64).map(|r| r * (10_000 * 9_999 / 2)).sum();
        // From outside any pool (the global one) and inside pools of one, two and three
        // workers, nested in itself too.
        assert_eq!(busy(regions), want);
        for threads in 1..=3 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (a, b) = pool.install(|| (busy(regions), busy(|| busy(regions) + 1)));
            assert_eq!((a, b), (want, want + 1), "{threads} threads");
        }
    }

    #[test]
    fn busy_runs_f_on_a_worker_when_it_polls() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let on = pool.install(|| busy(rayon::current_thread_index));
        assert!(on.is_some());
        // From outside the pool, f goes to worker 0 when the others poll; while another
        // test's call polls (one at a time), it runs where it was called. Tried until the
        // other tests leave it free.
        let polls = rayon::current_num_threads() > 1 && rayon::current_num_threads() <= cores;
        let mut seen = Vec::new();
        for _ in 0..5000 {
            let on = busy(rayon::current_thread_index);
            seen.push(on);
            if on.is_some() || !polls {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(seen.iter().all(|&on| on.is_none() || on == Some(0)), "{seen:?}");
        assert_eq!(seen.last().copied().flatten(), polls.then_some(0), "{seen:?}");
    }

    /// Several threads calling at once, as tests that train do, with joins nested in the
    /// regions (a waiting worker runs whatever is queued, pollers included): one polls, the
    /// others run their nested work beside it. Two hangs came from such interleavings: two
    /// callers polling at once (tests/infer.rs once in four runs; one poller at a time since),
    /// and this test once in CI, a poller on top of a job that worker 0 waited for (pollers
    /// give up after `POLL_IDLE` idle since). Neither reproduced on demand here, with or
    /// without its guard; the test checks that concurrent callers get their results and finish.
    #[test]
    fn concurrent_callers_all_finish() {
        let nested = || -> u64 {
            (0..8u64)
                .map(|r| {
                    (0..64u64)
                        .into_par_iter()
                        .map(|i| (0..100u64).into_par_iter().map(|j| i * j + r).sum::<u64>())
                        .sum::<u64>()
                })
                .sum()
        };
        let want = nested();
        std::thread::scope(|s| {
            let callers: Vec<_> = (0..3).map(|_| s.spawn(|| (0..300).all(|_| busy(nested) == want))).collect();
            for c in callers {
                assert!(c.join().unwrap());
            }
        });
    }

    #[test]
    fn a_panic_in_f_reaches_the_caller_and_stops_the_pollers() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for _ in 0..2 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| busy(|| -> u64 { panic!("step failed") }))
            }));
            assert!(r.is_err());
            let r = std::panic::catch_unwind(|| busy(|| -> u64 { panic!("step failed") }));
            assert!(r.is_err());
        }
        // The pools still run work: no poller was left behind.
        assert_eq!(pool.install(|| busy(|| 7)), 7);
        assert_eq!(busy(|| 7), 7);
    }
}
