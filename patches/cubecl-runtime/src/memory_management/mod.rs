pub(crate) mod memory_pool;

mod base;

/// Export utilities to keep track of CPU buffers when performing async data copies.
pub mod drop_queue;

pub use base::*;

/// Dynamic memory management strategy.
mod memory_manage;
pub use memory_manage::*;

use alloc::vec::Vec;

/// The type of memory pool to use.
#[derive(Debug, Clone)]
pub enum PoolType {
    /// Use a memory where every allocation is a separate page.
    ExclusivePages {
        /// The minimum number of bytes to allocate in this pool.
        max_alloc_size: u64,
    },
    /// Use a memory where each allocation is a slice of a bigger allocation.
    SlicedPages {
        /// The page size to allocate.
        page_size: u64,
        /// The maximum size of a slice to allocate in the pool.
        max_slice_size: u64,
    },
    /// rlhf patch: pages cut to the requests, their free space split best-fit over all pages
    /// and merged again when neighbours are free.
    SplitPages {
        /// The smallest request the pool takes.
        min_alloc_size: u64,
        /// The largest request the pool takes.
        max_alloc_size: u64,
        /// The page shared by requests up to half its size.
        segment: u64,
        /// Larger requests get a page of their size rounded up to this.
        granularity: u64,
        /// The smallest rest of a slice kept as a free slice of its own.
        min_rest: u64,
        /// A request over half a segment takes a new page rather than a free slice more than
        /// this many times its size (0: any slice).
        max_ratio: u64,
    },
}

/// Options to create a memory pool.
#[derive(Debug, Clone)]
pub struct MemoryPoolOptions {
    /// What kind of pool to use.
    pub pool_type: PoolType,
    /// Period after which allocations are deemed unused and deallocated.
    ///
    /// This period is measured in the number of allocations in the parent allocator. If a page
    /// in the pool was unused for the entire period, it will be deallocated. This period is
    /// approximmate, as checks are only done occasionally.
    pub dealloc_period: Option<u64>,
}

/// High level configuration of memory management.
#[derive(Clone, Debug)]
pub enum MemoryConfiguration {
    /// The default preset, which uses pools that allocate sub slices.
    #[cfg(not(exclusive_memory_only))]
    SubSlices,
    /// Default preset for using exclusive pages.
    /// This can be necessary for backends don't support sub-slices.
    ExclusivePages,
    /// rlhf patch: exclusive pages for small requests, one split pool above (pages cut to the
    /// requests, free space split and merged: the reservation follows the tensors).
    SplitLarge {
        /// Requests from this size on go to the split pool.
        split_min: u64,
        /// The page shared by the split pool's requests up to half its size.
        segment: u64,
        /// A free slice left over by a request is kept apart only from this size on; a
        /// smaller rest stays with the request.
        min_rest: u64,
        /// A request over half a segment takes a new page rather than a free slice more than
        /// this many times its size (0: any slice).
        max_ratio: u64,
    },
    /// Custom settings.
    Custom {
        /// Options for each pool to construct. When allocating, the first
        /// possible pool will be picked for an allocation.
        pool_options: Vec<MemoryPoolOptions>,
    },
}

#[allow(clippy::derivable_impls)]
impl Default for MemoryConfiguration {
    fn default() -> Self {
        #[cfg(exclusive_memory_only)]
        {
            MemoryConfiguration::ExclusivePages
        }
        #[cfg(not(exclusive_memory_only))]
        {
            MemoryConfiguration::SubSlices
        }
    }
}
