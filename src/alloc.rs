//! The binary's global allocator: the system allocator, with freed large blocks kept for reuse.
//!
//! A CPU training step allocates and frees the same large tensors every step (activations,
//! logits, gradients: 1-100 MB each). glibc serves blocks above its mmap threshold (at most
//! 32 MiB, and every block at first) with fresh `mmap`s and returns them on free, so each step
//! page-faulted and zeroed its whole working set again: 2.3 M page faults in a 3-step SmolLM2
//! DPO run on 2 cores, ~10% of its CPU time. Here blocks of at least [`MIN_BLOCK`] bytes are
//! rounded up to one of eight size classes per power of two (at most 12.5% more) and, when
//! freed, kept (up to [`CACHE_BYTES`] in all) for the next request of their class. [`trim`]
//! gives them all back (after loading a model, whose staging buffers are not needed again).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks this large or larger are rounded to a size class and cached when freed.
pub const MIN_BLOCK: usize = 1 << 20;
/// At most this many freed bytes are kept; beyond it a freed block goes back to the system.
/// (1 GiB kept too little of the SmolLM2 step's working set: 57 instead of 66 tokens/s.)
pub const CACHE_BYTES: usize = 4 << 30;
/// Alignment of every cached block, so that any request of its class (alignment up to this)
/// can take it.
const ALIGN: usize = 64;
const SLOTS: usize = 2048;
const EMPTY: Slot = Slot { ptr: 0, size: 0 };

/// A freed block: its address and its class size (0: the slot is empty).
#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    size: usize,
}

struct Free {
    slots: [Slot; SLOTS],
    bytes: usize,
}

/// The freed blocks, one store for the process.
static FREE: Mutex<Free> = Mutex::new(Free {
    slots: [EMPTY; SLOTS],
    bytes: 0,
});

fn free() -> std::sync::MutexGuard<'static, Free> {
    FREE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The allocator (`#[global_allocator] static A: BlockCache = BlockCache;`).
pub struct BlockCache;

/// Gives every kept block back to the system (a no-op where `BlockCache` is not the global
/// allocator: nothing was kept).
pub fn trim() {
    let mut free = free();
    for slot in free.slots.iter_mut().filter(|s| s.size > 0) {
        let layout = Layout::from_size_align(slot.size, ALIGN).expect("a class layout");
        // SAFETY: the block came from `System` with this layout (`keep` stores only those).
        unsafe { System.dealloc(slot.ptr as *mut u8, layout) };
        *slot = EMPTY;
    }
    free.bytes = 0;
}

/// The size class of a request of `size >= MIN_BLOCK` bytes: `size` rounded up to a multiple
/// of an eighth of its power of two.
pub fn class_of(size: usize) -> usize {
    let step = 1usize << (usize::BITS - 1 - size.leading_zeros()).saturating_sub(3);
    size.div_ceil(step) * step
}

/// Whether `layout` goes through the cache (and how it is allocated from the system).
fn cached(layout: Layout) -> Option<Layout> {
    (layout.size() >= MIN_BLOCK && layout.align() <= ALIGN)
        .then(|| Layout::from_size_align(class_of(layout.size()), ALIGN).ok())
        .flatten()
}

impl BlockCache {
    fn take(&self, size: usize) -> Option<*mut u8> {
        let mut free = free();
        let slot = free.slots.iter_mut().find(|s| s.size == size)?;
        let ptr = slot.ptr as *mut u8;
        *slot = EMPTY;
        free.bytes -= size;
        Some(ptr)
    }

    /// Keeps the block if there is room; `false` when the caller must free it.
    fn keep(&self, ptr: *mut u8, size: usize) -> bool {
        let mut free = free();
        if free.bytes + size > CACHE_BYTES {
            return false;
        }
        let Some(slot) = free.slots.iter_mut().find(|s| s.size == 0) else {
            return false;
        };
        *slot = Slot {
            ptr: ptr as usize,
            size,
        };
        free.bytes += size;
        true
    }
}

// SAFETY: every block handed out comes from `System` with the layout that frees it: the
// caller's own layout below `MIN_BLOCK`, else `cached(layout)`, which depends on the layout
// alone, so `dealloc` and `realloc` recompute the same one. A cached block is handed out to
// one caller at a time (taken from its slot under the lock).
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match cached(layout) {
            Some(big) => self
                .take(big.size())
                .unwrap_or_else(|| unsafe { System.alloc(big) }),
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match cached(layout) {
            Some(big) => match self.take(big.size()) {
                Some(p) => {
                    unsafe { p.write_bytes(0, layout.size()) };
                    p
                }
                None => unsafe { System.alloc_zeroed(big) },
            },
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match cached(layout) {
            Some(big) => {
                if !self.keep(ptr, big.size()) {
                    unsafe { System.dealloc(ptr, big) }
                }
            }
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (cached(layout), cached(new)) {
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            (Some(a), Some(b)) if a.size() == b.size() => ptr,
            _ => {
                let p = unsafe { self.alloc(new) };
                if !p.is_null() {
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_an_eighth() {
        for size in [
            MIN_BLOCK,
            MIN_BLOCK + 1,
            3 << 20,
            (5 << 20) + 7,
            100_000_003,
        ] {
            let c = class_of(size);
            assert!(c >= size && (c - size) * 8 <= size, "{size} -> {c}");
            assert_eq!(class_of(c), c, "a class is its own class");
        }
        assert_eq!(class_of(MIN_BLOCK + 1), MIN_BLOCK + (MIN_BLOCK >> 3));
    }

    #[test]
    fn freed_blocks_are_reused_zeroed_and_bounded() {
        let a = BlockCache;
        let l = Layout::from_size_align(3 << 20, 8).unwrap();
        unsafe {
            let p = a.alloc(l);
            p.write_bytes(7, l.size());
            a.dealloc(p, l);
            // The same class (a slightly different size) takes the same block, zeroed on request.
            let l2 = Layout::from_size_align((3 << 20) - 100, 16).unwrap();
            let q = a.alloc_zeroed(l2);
            assert_eq!(p, q);
            assert!(std::slice::from_raw_parts(q, l2.size())
                .iter()
                .all(|&b| b == 0));
            // Growing within the class keeps the block; across classes moves the contents.
            *q = 9;
            let r = a.realloc(q, l2, 3 << 20);
            assert_eq!(r, q);
            let s = a.realloc(r, l, 8 << 20);
            assert_eq!(*s, 9);
            a.dealloc(s, Layout::from_size_align(8 << 20, 8).unwrap());
            // More than the cap is given back, not kept.
            let big = Layout::from_size_align(CACHE_BYTES / 2 + MIN_BLOCK, 8).unwrap();
            let (x, y) = (a.alloc(big), a.alloc(big));
            a.dealloc(x, big);
            a.dealloc(y, big);
            assert!(free().bytes <= CACHE_BYTES);
            trim();
            assert_eq!(free().bytes, 0);
        }
    }
}
