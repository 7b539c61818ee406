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
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}
