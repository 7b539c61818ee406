//! Device memory as the allocator sees it, for benchmarks and planner calibration.

use burn::tensor::backend::Backend;

/// Bytes held by the device allocator of the calling thread's stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes in live tensors.
    pub in_use: u64,
    /// Bytes the allocator holds from the driver (in use + cached pages).
    pub reserved: u64,
}

/// The allocator's numbers for `device`, or `None` on backends that do not track device memory
/// (the CPU backends).
pub fn usage<B: Backend>(device: &B::Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::memory_usage::<B>(device)
            .map(|(in_use, reserved)| DeviceMemory { in_use, reserved })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

use std::sync::atomic::{AtomicU64, Ordering};

static NOTED_IN_USE: AtomicU64 = AtomicU64::new(0);
static NOTED_RESERVED: AtomicU64 = AtomicU64::new(0);

/// Records the allocator's numbers now, if they are the highest so far. Benchmarks sample at
/// phase boundaries, which miss the transients inside a step; the ops that make the large ones
/// (a checkpointed block's recomputation, the vocabulary projection's backward) call this at
/// their high point. Cheap, and a no-op on the CPU backends. With `RLHF_TRACE_MEM=1` each
/// call prints `what` and the bytes in use (where a peak comes from).
pub fn note<B: Backend>(device: &B::Device, what: &str) {
    if let Some(m) = usage::<B>(device) {
        if crate::switches::switches().trace_mem {
            eprintln!(
                "mem {what}: {:.1} MiB in use, {:.1} MiB reserved, {:.1} MiB held, {} releases, {:.1} MiB device used",
                m.in_use as f64 / 1048576.0,
                m.reserved as f64 / 1048576.0,
                held_bytes().unwrap_or(0) as f64 / 1048576.0,
                release_count(),
                device_used().unwrap_or(0) as f64 / 1048576.0
            );
        }
        NOTED_IN_USE.fetch_max(m.in_use, Ordering::Relaxed);
        NOTED_RESERVED.fetch_max(m.reserved, Ordering::Relaxed);
    }
}

/// The highest numbers [`note`] saw since the last call (then resets them); `None` if none.
pub fn take_noted() -> Option<DeviceMemory> {
    let in_use = NOTED_IN_USE.swap(0, Ordering::Relaxed);
    let reserved = NOTED_RESERVED.swap(0, Ordering::Relaxed);
    (in_use > 0 || reserved > 0).then_some(DeviceMemory { in_use, reserved })
}

/// Bounds the bytes the CUDA allocator may hold from the driver: past `limit`, its cached free
/// pages are given back before a new page is allocated (live tensors still get memory above
/// it). The run set-up derives the limit from the budget or the plan (`plan.cache`). A no-op on the CPU backends and with
/// `RLHF_NO_ALLOC_LIMIT`.
pub fn bound_allocator(limit: u64) {
    #[cfg(feature = "cuda")]
    if !crate::switches::switches().no_alloc_limit {
        cubecl::cuda::set_reserve_limit(Some(limit));
    }
    let _ = limit;
}

/// Bytes in use on the whole device (every process), from the driver; `None` on the CPU
/// backends or before a CUDA context exists.
pub fn device_used() -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::device_used()
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// How many times the CUDA allocator gave its cached pages back (for the reservation limit or
/// after a refused allocation); 0 on the CPU backends.
pub fn release_count() -> u64 {
    #[cfg(feature = "cuda")]
    {
        cubecl::cuda::release_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Bytes the CUDA allocator holds from the driver now, freed blocks awaiting their flush
/// included; `None` on the CPU backends.
pub fn held_bytes() -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        Some(cubecl::cuda::held_bytes())
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}
