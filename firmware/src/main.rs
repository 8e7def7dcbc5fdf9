//! edgecl on a Cortex-M4F: one backbone and several learned tasks in flash, every task decoded
//! once into static buffers sized at build time, then a fixed set of test images predicted by
//! every task in turn (a task switch before every prediction), printed over semihosting.
//!
//! Nothing here allocates: the backbone is validated in place in flash (`Backbone::open`, its
//! records in fixed-capacity lists), each task file is checked (header, digests, backbone,
//! components) and copied into the word and float pools (`FixedTask::load`: masks stay bit
//! vectors, post-ops are folded once), and `Backbone::forward_task` runs in one scratch
//! buffer. `build.rs` measures the pools by loading the same files with the same code.
//!
//! Output, one line per prediction (compared with `edgecl predict` by `check.sh`):
//! `predict image=I task=NAME label_index=L score=P label=TEXT`, where `P` is the softmax
//! probability of the top class, computed as the host does, and `TEXT` (the class name, which
//! may hold spaces) is the rest of the line.
#![no_std]
#![no_main]

use core::ptr::addr_of_mut;
use cortex_m_rt::{entry, exception, ExceptionFrame};
use cortex_m_semihosting::{debug, hprintln};
use edgecl::backbone::fixed::FixedTask;
use edgecl::backbone::Backbone;
use edgecl::kernels::Kernels;

/// Bytes placed at a 64-byte boundary (backbone tensors are read in place as f32).
#[repr(C, align(64))]
pub struct Aligned<T: ?Sized>(pub T);

mod fixtures {
    use super::Aligned;
    include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));
}
use fixtures::*;

type Task = FixedTask<'static, LAYERS>;

/// The pools every task is decoded into, and the forward pass's memory.
static mut WORDS_POOL: [u32; WORDS] = [0; WORDS];
static mut FLOATS_POOL: [f32; FLOATS] = [0.0; FLOATS];
static mut SCRATCH_BUF: [f32; SCRATCH] = [0.0; SCRATCH];
static mut INPUT: [f32; INPUT_LEN] = [0.0; INPUT_LEN];

/// Written over the free stack at start; the first word found changed from the bottom tells
/// how deep the stack went.
const PAINT: u32 = 0xC0DE_F00D;

extern "C" {
    static mut _stack_end: u32;
    static mut _stack_start: u32;
}

/// Paints the stack below the current frame (minus a margin for this function's own calls).
fn paint_stack() {
    let bottom = addr_of_mut!(_stack_end);
    let here = cortex_m::register::msp::read() as *mut u32;
    // SAFETY: `[_stack_end, here - 64 words)` is unused stack: nothing lives below the stack
    // pointer, and the margin covers this function's callees.
    unsafe {
        let top = here.wrapping_sub(64);
        let mut p = bottom;
        while p < top {
            p.write_volatile(PAINT);
            p = p.add(1);
        }
    }
}

/// Deepest stack use so far, in bytes, and whether it reached the painted region's bottom.
fn stack_used() -> (usize, bool) {
    let (bottom, top) = (addr_of_mut!(_stack_end), addr_of_mut!(_stack_start));
    // SAFETY: reads words of the stack region below the live frames.
    unsafe {
        let mut p = bottom;
        while p < top && p.read_volatile() == PAINT {
            p = p.add(1);
        }
        (top as usize - p as usize, p == bottom)
    }
}

/// Ends the QEMU run with `code` (semihosting exit); on a board without a debugger, sleeps.
fn halt(code: debug::ExitStatus) -> ! {
    debug::exit(code);
    loop {
        cortex_m::asm::wfi();
    }
}

fn fail(what: &str, e: &dyn core::fmt::Display) -> ! {
    hprintln!("error: {}: {}", what, e);
    halt(debug::EXIT_FAILURE)
}

/// Index and probability of the largest of `logits` (the host's `predict::top`).
fn top(logits: &[f32]) -> (usize, f32) {
    let (mut best, mut max) = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > max {
            (best, max) = (i, v);
        }
    }
    let sum: f32 = logits.iter().map(|&v| libm::expf(v - max)).sum();
    (best, 1.0 / sum)
}

#[entry]
fn main() -> ! {
    paint_stack();
    hprintln!(
        "edgecl firmware on Cortex-M4F: backbone {} bytes, {} tasks, {} images",
        BACKBONE.0.len(),
        TASKS.len(),
        IMAGES
    );
    // SAFETY: `main` runs once and these are its only references to the buffers.
    let (words, floats, scratch, input) = unsafe {
        (
            &mut *addr_of_mut!(WORDS_POOL),
            &mut *addr_of_mut!(FLOATS_POOL),
            &mut *addr_of_mut!(SCRATCH_BUF),
            &mut *addr_of_mut!(INPUT),
        )
    };
    let (mut words, mut floats): (&mut [u32], &mut [f32]) = (words, floats);

    let bb = Backbone::open(&BACKBONE.0).unwrap_or_else(|e| fail("backbone", &e));
    bb.verify().unwrap_or_else(|e| fail("backbone digest", &e));
    let mut tasks: heapless::Vec<Task, { TASKS.len() }> = heapless::Vec::new();
    for file in TASKS {
        let t = Task::load(&bb, file, &mut words, &mut floats).unwrap_or_else(|e| fail("task", &e));
        hprintln!("task {}: {}, {} classes", t.name(), t.method().name(), t.classes());
        if tasks.push(t).is_err() {
            fail("tasks", &"more tasks than TASKS");
        }
    }

    let k = Kernels::generic(true);
    for i in 0..IMAGES {
        let at = IMAGES_OFFSET + i * INPUT_LEN * 4;
        for (x, b) in input.iter_mut().zip(INPUTS[at..at + INPUT_LEN * 4].chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        for t in &tasks {
            let logits = bb.forward_task(&k, t, &input[..], 1, &mut scratch[..]);
            let (label, score) = top(&logits[..t.classes()]);
            hprintln!(
                "predict image={} task={} label_index={} score={} label={}",
                i,
                t.name(),
                label,
                // Printed as the f64 of the f32, as the host's JSON does, so equal floats
                // print equal digits.
                score as f64,
                t.label(label).unwrap_or("?")
            );
        }
    }

    let (stack, overflow) = stack_used();
    hprintln!(
        "memory: pools {} mask words + {} floats, scratch {} floats, input {} floats; backbone {} bytes and tasks {} bytes on the stack; stack peak {} bytes",
        WORDS,
        FLOATS,
        SCRATCH,
        INPUT_LEN,
        core::mem::size_of::<Backbone>(),
        core::mem::size_of_val(&tasks),
        stack
    );
    if overflow {
        fail("stack", &"the stack reached the static buffers");
    }
    halt(debug::EXIT_SUCCESS)
}

#[exception]
unsafe fn HardFault(ef: &ExceptionFrame) -> ! {
    hprintln!("hard fault at pc {:#010x}", ef.pc());
    halt(debug::EXIT_FAILURE)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("panic: {}", info);
    halt(debug::EXIT_FAILURE)
}
