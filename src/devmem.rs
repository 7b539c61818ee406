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
                "mem {what}: {:.1} MiB in use, {:.1} MiB reserved",
                m.in_use as f64 / 1048576.0,
                m.reserved as f64 / 1048576.0
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
