//! The built-in plugins' allocator inside the component: a free list per small size class in
//! front of the system allocator (wasi-libc's dlmalloc). Each plugin installs it as its
//! `#[global_allocator]` for `wasm32` only.
//!
//! Why: regorus allocates and frees a few hundred small values per evaluation, and inside the
//! component about a third of an evaluation's time went to `dlmalloc`/`dlfree` and the shims
//! that lead to them (`__rust_alloc` → `__rdl_alloc` → `malloc` → `dlmalloc`, each a real call
//! in WebAssembly). A freed small block is pushed on its class's list and the next request of
//! that class pops it: a handful of instructions.
//!
//! Bounds: a freed small block is never handed back to dlmalloc, so each class keeps the most
//! blocks it ever had live at once. The instance's linear memory limit still caps the whole,
//! and the host recycles an instance after a bounded number of calls.
//!
//! Only for `wasm32` (one thread per instance: the lists need no lock); native builds (tests,
//! the policy's native benchmark) keep the system allocator. This module must never hand out a block smaller than,
//! or aligned less than, what was asked.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Size classes are multiples of this (and every small block is aligned to it).
const GRANULE: usize = 16;
/// Requests up to this size (and alignment up to [`GRANULE`]) are served from the lists.
const SMALL_MAX: usize = 1024;
const CLASSES: usize = SMALL_MAX / GRANULE;

/// The free lists: the first word of a free block points to the next free block of its class.
pub struct SizeClasses {
    heads: UnsafeCell<[*mut u8; CLASSES]>,
}

// SAFETY: a wasm32 component instance runs on one thread; nothing shares the lists.
unsafe impl Sync for SizeClasses {}

impl SizeClasses {
    /// Empty lists.
    pub const fn new() -> Self {
        Self {
            heads: UnsafeCell::new([ptr::null_mut(); CLASSES]),
        }
    }
}

impl Default for SizeClasses {
    fn default() -> Self {
        Self::new()
    }
}

/// The class of a small request, or `None` for one the system allocator serves.
#[inline]
fn class_of(layout: Layout) -> Option<usize> {
    if layout.size() <= SMALL_MAX && layout.align() <= GRANULE {
        // A zero-sized request still takes the smallest class.
        Some(layout.size().max(1).div_ceil(GRANULE) - 1)
    } else {
        None
    }
}

/// The layout of every block of `class`.
#[inline]
fn block_layout(class: usize) -> Layout {
    // SAFETY: (class + 1) * GRANULE ≤ SMALL_MAX and GRANULE is a power of two.
    unsafe { Layout::from_size_align_unchecked((class + 1) * GRANULE, GRANULE) }
}

unsafe impl GlobalAlloc for SizeClasses {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => {
                // SAFETY: single-threaded (see `Sync` above); no reference to the lists
                // outlives this call.
                let heads = unsafe { &mut *self.heads.get() };
                let head = heads[class];
                if head.is_null() {
                    unsafe { System.alloc(block_layout(class)) }
                } else {
                    // SAFETY: a free block's first word holds the next free block.
                    heads[class] = unsafe { head.cast::<*mut u8>().read() };
                    head
                }
            }
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        match class_of(layout) {
            Some(class) => {
                let heads = unsafe { &mut *self.heads.get() };
                // SAFETY: the block is at least GRANULE bytes and GRANULE-aligned (it came
                // from `block_layout(class)`), so it holds the link.
                unsafe { block.cast::<*mut u8>().write(heads[class]) };
                heads[class] = block;
            }
            None => unsafe { System.dealloc(block, layout) },
        }
    }

    #[inline]
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, fits.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            // The block already has room (its class is the same).
            (Some(old), Some(new)) if old == new => block,
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            _ => {
                let moved = unsafe { self.alloc(new_layout) };
                if !moved.is_null() {
                    unsafe {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_small_request_with_room() {
        for size in 0..=SMALL_MAX {
            for align in [1, 2, 4, 8, 16] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                let class = class_of(layout).expect("small");
                let block = block_layout(class);
                assert!(block.size() >= size.max(1), "{size}/{align}");
                assert!(block.align() >= align);
                assert!(block.size() >= std::mem::size_of::<*mut u8>());
            }
        }
        assert_eq!(
            class_of(Layout::from_size_align(SMALL_MAX + 1, 8).expect("l")),
            None
        );
        assert_eq!(class_of(Layout::from_size_align(64, 32).expect("l")), None);
    }

    #[test]
    fn a_freed_block_is_reused_by_its_class_and_reallocs_keep_the_bytes() {
        let a = SizeClasses::new();
        let small = Layout::from_size_align(24, 8).expect("layout");
        unsafe {
            let p = a.alloc(small);
            assert!(!p.is_null());
            p.write_bytes(7, 24);
            a.dealloc(p, small);
            // Same class (17..=32 bytes): the same block comes back.
            let q = a.alloc(Layout::from_size_align(30, 4).expect("layout"));
            assert_eq!(p, q);
            q.write_bytes(9, 30);
            // Growing within the class keeps the block; across classes moves the bytes.
            let same = a.realloc(q, Layout::from_size_align(30, 4).expect("l"), 32);
            assert_eq!(same, q);
            let grown = a.realloc(same, Layout::from_size_align(32, 4).expect("l"), 2000);
            assert!(!grown.is_null());
            assert!(
                std::slice::from_raw_parts(grown, 30)
                    .iter()
                    .all(|b| *b == 9)
            );
            let shrunk = a.realloc(grown, Layout::from_size_align(2000, 4).expect("l"), 20);
            assert!(
                std::slice::from_raw_parts(shrunk, 20)
                    .iter()
                    .all(|b| *b == 9)
            );
            a.dealloc(shrunk, Layout::from_size_align(20, 4).expect("l"));
        }
    }
}
