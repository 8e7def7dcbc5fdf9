//! (std) An allocator that asks Linux for transparent huge pages for large blocks.
//!
//! A training step streams hundreds of megabytes of activations and gradients (a Lite0 CLR
//! step at batch 16 peaks at 226 MB). In 4 KB pages every 4 KB of a stream is another page
//! walk; in 2 MB pages a walk covers 512 times as much. Kernels that leave transparent huge
//! pages to `madvise` (the default of Debian, Raspberry Pi OS and Jetson Linux) give them only
//! to memory that asks, so [`HugePages`] wraps the system allocator: every block of at least
//! [`HUGE_MIN`] bytes starts on a 2 MB boundary and gets `MADV_HUGEPAGE` before it is first
//! touched. The advice is a hint: where huge pages are off or unavailable nothing changes, and
//! memory is never moved or changed by it. Advising blocks as malloc placed them was not
//! enough: their 2 MB-aligned parts were small, and the step did not change.
//!
//! Measured (`benches/train_step.rs`, one thread, four alternating runs each): the Lite0 CLR
//! step 0.156–0.166 → 0.144–0.148 s, peak RSS 226 → 228 MB. GEMResNet18's step (compute-bound)
//! does not change, and its peak RSS grows 303 → 320 MB: a huge page is backed whole as soon
//! as any byte of it is touched.
//!
//! A binary opts in with `#[global_allocator] static A: edgecl::hugepages::HugePages =
//! edgecl::hugepages::HugePages;`, as the `edgecl` CLI and the training benchmark do.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks from this size (bytes) are placed on huge-page boundaries and advised.
pub const HUGE_MIN: usize = HUGE_PAGE;

/// The size of a transparent huge page on x86-64 and on aarch64 with 4 KB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// The system allocator, with blocks of [`HUGE_MIN`] bytes or more aligned to 2 MB and
/// advised into transparent huge pages.
pub struct HugePages;

/// The layout `System` gets for `layout`: 2 MB alignment for a large block. It depends on the
/// size and alignment only, so `dealloc` recomputes the one `alloc` used.
fn placed(layout: Layout) -> Layout {
    if layout.size() >= HUGE_MIN && layout.align() < HUGE_PAGE {
        // A power of two, and the size is under isize::MAX already (it is a valid layout of
        // at least one 2 MB block, so rounding it up to the alignment cannot overflow there).
        Layout::from_size_align(layout.size(), HUGE_PAGE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every block comes from `System` with `placed(layout)` and goes back to it with the
// same, which `dealloc` and `realloc` recompute from the caller's layout; `placed` only raises
// the alignment, so every block satisfies the caller's layout. `advise` gives the kernel a hint
// about memory that `System` just handed out, and changes no byte of it.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `placed(layout)` has the caller's non-zero size.
        let p = unsafe { System.alloc(placed(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if placed(layout) == layout {
            // SAFETY: as `alloc`.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // Advised before the zeroes touch it: zeroed first, its pages would be small.
        // SAFETY: as `alloc`; the block holds `layout.size()` writable bytes.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                p.write_bytes(0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `placed(layout)`.
        unsafe { System.dealloc(ptr, placed(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align(new_size, layout.align()).expect("the caller's valid new layout");
        if placed(layout) == layout && placed(new) == new {
            // SAFETY: small blocks are `System`'s own, with the caller's layouts.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // A large block on either side: a new block, the contents copied, the old one freed.
        // SAFETY: `new` has a non-zero size; `ptr` holds `layout.size()` readable bytes, the
        // new block `new_size`, and they do not overlap.
        unsafe {
            let q = self.alloc(new);
            if !q.is_null() {
                core::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            q
        }
    }
}

/// `MADV_HUGEPAGE` on the `size` bytes at `p` (nothing for a null pointer or a block under
/// [`HUGE_MIN`]).
fn advise(p: *mut u8, size: usize) {
    if p.is_null() || size < HUGE_MIN {
        return;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: the block was just allocated and this process owns it; `p` is 2 MB-aligned
    // (`placed`). MADV_HUGEPAGE changes how the kernel backs it, never its contents. An error
    // (huge pages not built in) leaves the block as it was, so it is ignored.
    unsafe {
        libc::madvise(p.cast(), size, libc::MADV_HUGEPAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size class come back usable and aligned, grow with their contents,
    /// and zeroed ones are zero (the advice must not change memory).
    #[test]
    fn forwards_to_the_system_allocator() {
        let a = HugePages;
        for size in [16, HUGE_MIN - 1, HUGE_MIN, HUGE_MIN + 3 * HUGE_PAGE + 5] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: a non-zero size; every pointer is checked and freed with its layout.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null() && (z as usize).is_multiple_of(64));
                if size >= HUGE_MIN {
                    assert!((z as usize).is_multiple_of(HUGE_PAGE), "a large block starts on a huge page");
                }
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0), "size {size}");
                a.dealloc(z, layout);
                let p = a.alloc(layout);
                assert!(!p.is_null());
                p.write_bytes(7, size);
                let q = a.realloc(p, layout, 2 * size);
                assert!(!q.is_null());
                assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 7), "size {size}");
                a.dealloc(q, Layout::from_size_align(2 * size, 64).unwrap());
            }
        }
    }
}
