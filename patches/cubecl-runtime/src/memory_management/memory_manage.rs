use super::{
    MemoryConfiguration, MemoryPoolOptions, MemoryUsage, PoolType,
    memory_pool::{ExclusiveMemoryPool, MemoryPool, PersistentPool, SlicedPool, SplitPool},
};
use crate::{
    config::{
        CubeClRuntimeConfig, RuntimeConfig,
        memory::{MemoryLogLevel, PersistentMemory},
    },
    logging::ServerLogger,
    memory_management::{BytesFormat, memory_pool::Slice},
    server::IoError,
    storage::{ComputeStorage, StorageHandle},
};

use alloc::format;
use alloc::string::{String, ToString};
#[cfg(not(exclusive_memory_only))]
use alloc::vec;
use alloc::vec::Vec;
use cubecl_common::{backtrace::BackTrace, stub::Arc};
use cubecl_ir::MemoryDeviceProperties;

pub use super::memory_pool::{ManagedMemoryBinding, handle::*};

/// rlhf patch: the process-wide reservation limit in bytes (`u64::MAX`: none).
static RESERVE_LIMIT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(u64::MAX);
/// rlhf patch: how many times a limit or a failed allocation made the allocator give back its
/// cached pages (a cost to watch: each one frees pages that may be needed again soon).
static RELEASES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// rlhf patch: caps the bytes a storage holds from the device (`None`: no cap). Before a new
/// page would take the storage's [`ComputeStorage::allocated_bytes`] past the cap, every cached
/// free page is given back first; the cap is soft (a page is still allocated above it when
/// the live tensors need it), so it bounds the cache, never the tensors.
pub fn set_reserve_limit(bytes: Option<u64>) {
    RESERVE_LIMIT.store(
        bytes.unwrap_or(u64::MAX),
        core::sync::atomic::Ordering::Relaxed,
    );
}

/// rlhf patch: the number of times cached pages were given back to the device so far, for the
/// reservation limit or after a failed allocation.
pub fn release_count() -> u64 {
    RELEASES.load(core::sync::atomic::Ordering::Relaxed)
}

// These are 288 bytes vs 64 bytes. Adding boxing isn't really worth
// saving the 200 bytes.
#[allow(clippy::large_enum_variant)]
enum DynamicPool {
    Sliced(SlicedPool),
    Exclusive(ExclusiveMemoryPool),
    Split(SplitPool),
}

impl MemoryPool for DynamicPool {
    fn accept(&self, size: u64) -> bool {
        match self {
            DynamicPool::Sliced(pool) => pool.accept(size),
            DynamicPool::Exclusive(pool) => pool.accept(size),
            DynamicPool::Split(pool) => pool.accept(size),
        }
    }

    fn find(&self, binding: &ManagedMemoryBinding) -> Result<&Slice, IoError> {
        match self {
            DynamicPool::Sliced(m) => m.find(binding),
            DynamicPool::Exclusive(m) => m.find(binding),
            DynamicPool::Split(m) => m.find(binding),
        }
    }

    #[cfg_attr(feature = "tracing", tracing::instrument(level = "trace", skip(self)))]
    fn try_reserve(&mut self, size: u64) -> Option<ManagedMemoryHandle> {
        match self {
            DynamicPool::Sliced(m) => m.try_reserve(size),
            DynamicPool::Exclusive(m) => m.try_reserve(size),
            DynamicPool::Split(m) => m.try_reserve(size),
        }
    }

    #[cfg_attr(
        feature = "tracing",
        tracing::instrument(level = "trace", skip(self, storage))
    )]
    fn alloc<Storage: ComputeStorage>(
        &mut self,
        storage: &mut Storage,
        size: u64,
    ) -> Result<ManagedMemoryHandle, IoError> {
        match self {
            DynamicPool::Sliced(m) => m.alloc(storage, size),
            DynamicPool::Exclusive(m) => m.alloc(storage, size),
            DynamicPool::Split(m) => m.alloc(storage, size),
        }
    }

    fn get_memory_usage(&self) -> MemoryUsage {
        match self {
            DynamicPool::Sliced(m) => m.get_memory_usage(),
            DynamicPool::Exclusive(m) => m.get_memory_usage(),
            DynamicPool::Split(m) => m.get_memory_usage(),
        }
    }

    fn cleanup<Storage: ComputeStorage>(
        &mut self,
        storage: &mut Storage,
        alloc_nr: u64,
        explicit: bool,
    ) {
        match self {
            DynamicPool::Sliced(m) => m.cleanup(storage, alloc_nr, explicit),
            DynamicPool::Exclusive(m) => m.cleanup(storage, alloc_nr, explicit),
            DynamicPool::Split(m) => m.cleanup(storage, alloc_nr, explicit),
        };
        storage.flush();
    }

    fn bind(
        &mut self,
        reserved: ManagedMemoryHandle,
        assigned: ManagedMemoryHandle,
        cursor: u64,
    ) -> Result<(), IoError> {
        match self {
            DynamicPool::Sliced(m) => m.bind(reserved, assigned, cursor),
            DynamicPool::Exclusive(m) => m.bind(reserved, assigned, cursor),
            DynamicPool::Split(m) => m.bind(reserved, assigned, cursor),
        }
    }
}

impl DynamicPool {
    /// rlhf patch: bytes an explicit cleanup would give back (pages no live tensor uses).
    fn releasable_bytes(&self) -> u64 {
        match self {
            DynamicPool::Sliced(m) => m.releasable_bytes(),
            DynamicPool::Exclusive(m) => m.releasable_bytes(),
            DynamicPool::Split(m) => m.releasable_bytes(),
        }
    }
}

#[derive(Default, Clone, Copy, Debug)]
/// The mode of allocation used.
pub enum MemoryAllocationMode {
    /// Use the automatic memory management strategy for allocation.
    #[default]
    Auto,
    /// Use a persistent memory management strategy, meaning that all allocations are for data that is
    /// likely never going to be freed.
    Persistent,
}

/// Reserves and keeps track of chunks of memory in the storage, and slices upon these chunks.
pub struct MemoryManagement<Storage> {
    name: String,
    persistent: PersistentPool,
    pools: Vec<DynamicPool>,
    storage: Storage,
    alloc_reserve_count: u64,
    mode: MemoryAllocationMode,
    config: PersistentMemory,
    logger: Arc<ServerLogger>,
    /// rlhf patch: a limit for this instance alone, over the process-wide one (tests).
    reserve_limit: Option<u64>,
}

fn generate_bucket_sizes(
    start_size: u64,
    end_size: u64,
    max_buckets: usize,
    alignment: u64,
) -> Vec<u64> {
    let mut buckets = Vec::with_capacity(max_buckets);
    let log_min = (start_size as f64).ln();
    let log_max = (end_size as f64).ln();
    let log_range = log_max - log_min;

    // Pure exponential performed best, but let's try slightly denser in lower-mid range
    for i in 0..max_buckets {
        let p = i as f64 / (max_buckets - 1) as f64;
        // Slight bias toward lower-mid range with less aggressive curve than sigmoid
        let log_size = log_min + log_range * p;
        let size = log_size.exp() as u64;
        let aligned_size = size.next_multiple_of(alignment);
        buckets.push(aligned_size);
    }

    buckets.dedup();
    buckets
}

const DEALLOC_SCALE_MB: u64 = 1024 * 1024 * 1024;
const BASE_DEALLOC_PERIOD: u64 = 5000;

/// The options for creating a new [`MemoryManagement`] instance.
#[derive(Debug)]
pub struct MemoryManagementOptions {
    /// The name of the memory management.
    name: String,
    /// The [`MemoryAllocationOption`] used by this instance.
    memory: MemoryAllocationOption,
}

impl MemoryManagementOptions {
    /// Creates a new [`MemoryManagementOptions`].
    pub fn new<S: Into<String>>(name: S) -> Self {
        Self {
            name: name.into(),
            memory: MemoryAllocationOption::FromConfig,
        }
    }

    /// Forces the [`MemoryAllocationMode`] during execution to always be the provided one.
    pub fn mode(mut self, mode: MemoryAllocationMode) -> Self {
        self.memory = MemoryAllocationOption::Provided(mode);
        self
    }
}

#[derive(Default, Debug)]
/// Determines which [`MemoryAllocationMode`] is used during allocations.
enum MemoryAllocationOption {
    #[default]
    /// Uses the [`GlobalConfig`] to determine the mode of allocation.
    FromConfig,
    /// Use the provided [`MemoryAllocationMode`].
    Provided(MemoryAllocationMode),
}

impl<Storage: ComputeStorage> MemoryManagement<Storage> {
    /// Creates the options from device limits.
    pub fn from_configuration(
        storage: Storage,
        properties: &MemoryDeviceProperties,
        config: MemoryConfiguration,
        logger: Arc<ServerLogger>,
        options: MemoryManagementOptions,
    ) -> Self {
        let pool_options = match config {
            #[cfg(not(exclusive_memory_only))]
            MemoryConfiguration::SubSlices => {
                // Round chunk size to be aligned.
                let memory_alignment = properties.alignment;
                let max_page = properties.max_page_size;
                let mut pools = Vec::new();

                const MB: u64 = 1024 * 1024;

                // Add in a pool for allocations that are smaller than the min alignment,
                // as they can't use offsets at all (on wgpu at least).
                pools.push(MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages { max_alloc_size: 0 },
                    dealloc_period: None,
                });

                let mut current = max_page;
                let mut max_sizes = vec![];
                let mut page_sizes = vec![];
                let mut base = pools.len() as u32;

                while current >= 32 * MB {
                    current /= 4;

                    // Make sure every pool has an aligned size.
                    current = current.next_multiple_of(memory_alignment);

                    max_sizes.push(current / 2u64.pow(base));
                    page_sizes.push(current);
                    base += 1;
                }

                max_sizes.reverse();
                page_sizes.reverse();

                for i in 0..max_sizes.len() {
                    let max = max_sizes[i];
                    let page_size = page_sizes[i];

                    pools.push(MemoryPoolOptions {
                        // Creating max slices lower than the chunk size reduces fragmentation.
                        pool_type: PoolType::SlicedPages {
                            page_size,
                            max_slice_size: max,
                        },
                        dealloc_period: None,
                    });
                }

                // Add pools from big to small.
                pools.push(MemoryPoolOptions {
                    pool_type: PoolType::SlicedPages {
                        page_size: max_page / memory_alignment * memory_alignment,
                        max_slice_size: max_page / memory_alignment * memory_alignment,
                    },
                    dealloc_period: None,
                });
                pools
            }
            MemoryConfiguration::ExclusivePages => {
                // Add all bin sizes. Nb: because of alignment some buckets
                // end up as the same size, so only want unique ones,
                // but also keep the order, so a BTree will do.
                const MIN_BUCKET_SIZE: u64 = 1024 * 32;
                const NUM_POOLS: usize = 24;

                let sizes = generate_bucket_sizes(
                    MIN_BUCKET_SIZE,
                    properties.max_page_size,
                    NUM_POOLS,
                    properties.alignment,
                );

                sizes
                    .iter()
                    .map(|&size| {
                        let dealloc_period = (BASE_DEALLOC_PERIOD as f64
                            * (1.0 + size as f64 / (DEALLOC_SCALE_MB as f64)).round())
                            as u64;

                        MemoryPoolOptions {
                            pool_type: PoolType::ExclusivePages {
                                max_alloc_size: size,
                            },
                            dealloc_period: Some(dealloc_period),
                        }
                    })
                    .collect()
            }
            MemoryConfiguration::SplitLarge {
                split_min,
                segment,
                min_rest,
                max_ratio,
            } => {
                // Small requests: exclusive pages in size buckets (many small tensors, little
                // to win); from `split_min`: one split pool whose pages are 2 MiB multiples,
                // requests up to half a `segment` sharing one (PyTorch's caching allocator
                // makes the same choices for its large blocks).
                const MB: u64 = 1024 * 1024;
                let align = properties.alignment;
                let mut pools: Vec<MemoryPoolOptions> = Vec::new();
                if split_min > align {
                    pools = generate_bucket_sizes(1024 * 32, split_min, 8, align)
                        .into_iter()
                        .filter(|&size| size < split_min)
                        .map(|size| MemoryPoolOptions {
                            pool_type: PoolType::ExclusivePages {
                                max_alloc_size: size,
                            },
                            dealloc_period: Some(BASE_DEALLOC_PERIOD),
                        })
                        .collect();
                    pools.push(MemoryPoolOptions {
                        pool_type: PoolType::ExclusivePages {
                            max_alloc_size: (split_min - 1) / align * align,
                        },
                        dealloc_period: Some(BASE_DEALLOC_PERIOD),
                    });
                }
                pools.push(MemoryPoolOptions {
                    pool_type: PoolType::SplitPages {
                        min_alloc_size: 0,
                        max_alloc_size: properties.max_page_size,
                        segment: segment.next_multiple_of(align),
                        granularity: (2 * MB).next_multiple_of(align),
                        min_rest,
                        max_ratio,
                    },
                    dealloc_period: None,
                });
                pools
            }
            MemoryConfiguration::Custom { pool_options } => pool_options,
        };

        logger.log_memory(
            |level| !matches!(level, MemoryLogLevel::Disabled),
            || {
                let mut msg = String::new();
                for pool in pool_options.iter() {
                    msg += &format!("[{}] Using memory pool: \n {pool:?}\n", options.name);
                }
                msg
            },
        );

        let pools: Vec<_> = pool_options
            .iter()
            .enumerate()
            .map(|(pool_pos, options)| {
                let pool_pos = pool_pos as u8;

                match options.pool_type {
                    PoolType::SlicedPages {
                        page_size,
                        max_slice_size,
                    } => DynamicPool::Sliced(SlicedPool::new(
                        page_size,
                        max_slice_size,
                        properties.alignment,
                        pool_pos,
                    )),
                    PoolType::SplitPages {
                        min_alloc_size,
                        max_alloc_size,
                        segment,
                        granularity,
                        min_rest,
                        max_ratio,
                    } => DynamicPool::Split(SplitPool::new(
                        min_alloc_size,
                        max_alloc_size,
                        (segment, granularity, min_rest, max_ratio),
                        properties.alignment,
                        pool_pos,
                    )),
                    PoolType::ExclusivePages { max_alloc_size } => {
                        DynamicPool::Exclusive(ExclusiveMemoryPool::new(
                            max_alloc_size,
                            properties.alignment,
                            options.dealloc_period.unwrap_or(u64::MAX),
                            pool_pos,
                        ))
                    }
                }
            })
            .collect();

        let config = CubeClRuntimeConfig::get().memory.persistent_memory.clone();

        let mode = match options.memory {
            MemoryAllocationOption::Provided(mode) => mode,
            MemoryAllocationOption::FromConfig => match config {
                PersistentMemory::Enabled => MemoryAllocationMode::Auto,
                PersistentMemory::Disabled => MemoryAllocationMode::Auto,
                PersistentMemory::Enforced => MemoryAllocationMode::Persistent,
            },
        };

        Self {
            name: options.name,
            persistent: PersistentPool::new(
                properties.max_page_size,
                properties.alignment,
                pools.len() as u8,
            ),
            pools,
            storage,
            alloc_reserve_count: 0,
            mode,
            config,
            logger,
            reserve_limit: None,
        }
    }

    /// rlhf patch: a reservation limit for this instance only (see [`set_reserve_limit`]).
    pub fn set_reserve_limit(&mut self, bytes: Option<u64>) {
        self.reserve_limit = bytes;
    }

    /// rlhf patch: bytes of cached pages no live tensor uses (what [`Self::release_cached`]
    /// gives back; a split page with one live slice stays).
    fn releasable_bytes(&self) -> u64 {
        self.pools
            .iter()
            .map(DynamicPool::releasable_bytes)
            .sum::<u64>()
            + self.persistent.releasable_bytes()
    }

    /// rlhf patch: gives every cached free page back to the device.
    fn release_cached(&mut self) {
        RELEASES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        self.cleanup(true);
        self.storage.release();
    }

    /// Change the mode of allocation.
    pub fn mode(&mut self, mode: MemoryAllocationMode) {
        // We override the mode based on the cubecl config.
        let mode = match self.config {
            PersistentMemory::Enabled => mode,
            PersistentMemory::Disabled | PersistentMemory::Enforced => return,
        };

        self.logger.log_memory(
            |level| !matches!(level, MemoryLogLevel::Disabled),
            || {
                format!(
                    "[{}] Setting memory allocation mode: from {:?} => {mode:?}",
                    self.name, self.mode
                )
            },
        );
        self.mode = mode;
    }

    /// Cleanup allocations in pools that are deemed unnecessary.
    pub fn cleanup(&mut self, explicit: bool) {
        self.logger.log_memory(
            |level| !matches!(level, MemoryLogLevel::Disabled) && explicit,
            || "Manual memory cleanup ...".to_string(),
        );

        self.persistent
            .cleanup(&mut self.storage, self.alloc_reserve_count, explicit);

        for pool in self.pools.iter_mut() {
            pool.cleanup(&mut self.storage, self.alloc_reserve_count, explicit);
        }
    }

    /// Returns the storage from the specified binding
    pub fn get_cursor(&self, binding: ManagedMemoryBinding) -> Result<u64, IoError> {
        let slice = self.find(binding)?;
        Ok(slice.cursor)
    }

    /// Returns the storage from the specified binding
    fn find(&self, binding: ManagedMemoryBinding) -> Result<&Slice, IoError> {
        let id = binding.descriptor();

        if id.location().pool >= self.pools.len() as u8 {
            return self.persistent.find(&binding);
        }

        let pool =
            self.pools
                .get(id.location().pool as usize)
                .ok_or_else(|| IoError::NotFound {
                    backtrace: BackTrace::capture(),
                    reason: format!("Pool {} doesn't exist", id.location().pool).into(),
                })?;

        let slice = pool.find(&binding)?;

        assert_eq!(slice.handle.descriptor(), binding.descriptor());

        Ok(slice)
    }

    /// Returns the storage from the specified binding
    pub fn get_storage(&mut self, binding: ManagedMemoryBinding) -> Result<StorageHandle, IoError> {
        let slice = self.find(binding)?;
        Ok(slice.storage.clone())
    }

    /// Returns the resource from the storage at the specified handle
    pub fn get_resource(
        &mut self,
        binding: ManagedMemoryBinding,
        offset_start: Option<u64>,
        offset_end: Option<u64>,
    ) -> Result<Storage::Resource, IoError> {
        let handle = self.get_storage(binding)?;

        let handle = match offset_start {
            Some(offset) => handle.offset_start(offset),
            None => handle,
        };
        let handle = match offset_end {
            Some(offset) => handle.offset_end(offset),
            None => handle,
        };
        Ok(self.storage().get(&handle))
    }

    /// Finds a spot in memory for a resource with the given size in bytes, and returns a handle to it
    #[cfg_attr(feature = "tracing", tracing::instrument(level = "trace", skip(self)))]
    pub fn reserve(&mut self, size: u64) -> Result<ManagedMemoryHandle, IoError> {
        // If this happens every nanosecond, counts overflows after 585 years, so not worth thinking too
        // hard about overflow here.
        self.alloc_reserve_count += 1;

        if let Some(val) = self.persistent.try_reserve(size) {
            self.logger.log_memory(
                |level| matches!(level, MemoryLogLevel::Full),
                || {
                    format!(
                        "[{}] Reserved memory {size} using persistent memory",
                        self.name
                    )
                },
            );
            return Ok(val);
        }

        if matches!(self.mode, MemoryAllocationMode::Persistent) || self.persistent.has_size(size) {
            let allocated = self.alloc_or_release(None, size);

            self.logger.log_memory(
                |level| !matches!(level, MemoryLogLevel::Disabled),
                || {
                    format!(
                        "[{}] Allocated a new memory page using persistent memory, \n{}",
                        self.name, self,
                    )
                },
            );
            return allocated;
        }

        self.logger.log_memory(
            |level| matches!(level, MemoryLogLevel::Full),
            || {
                format!(
                    "[{}] Reserved memory {} using dynamic pool",
                    self.name,
                    BytesFormat::new(size)
                )
            },
        );

        // Find first pool that fits this allocation
        let index = self
            .pools
            .iter()
            .position(|p| p.accept(size))
            .ok_or(IoError::BufferTooBig {
                size,
                backtrace: BackTrace::capture(),
            })?;

        if let Some(slice) = self.pools[index].try_reserve(size) {
            return Ok(slice);
        }

        let allocated = self.alloc_or_release(Some(index), size);

        self.logger.log_memory(
            |level| matches!(level, MemoryLogLevel::Full),
            || {
                format!(
                    "[{}], Allocated a new memory page, current usage: \n{}",
                    self.name, self
                )
            },
        );

        allocated
    }

    /// rlhf patch: allocates a new page in a dynamic pool (`Some(index)`) or the persistent one.
    /// A page that would take the storage past the reservation limit first makes the allocator
    /// give back its cached free pages; a page the device refuses does the same, then is retried
    /// once. So memory the allocator merely caches never makes a run fail, and the cache stays
    /// inside the limit the caller derived from its plan.
    fn alloc_or_release(
        &mut self,
        pool: Option<usize>,
        size: u64,
    ) -> Result<ManagedMemoryHandle, IoError> {
        let limit = self
            .reserve_limit
            .unwrap_or_else(|| RESERVE_LIMIT.load(core::sync::atomic::Ordering::Relaxed));
        // Past the limit, the cache is given back when that brings the new page under the limit
        // or when the cache could hold the page: where the live tensors themselves exceed the
        // limit, releasing a small cache on every new page would stall the stream for nothing.
        if limit != u64::MAX
            && let Some(held) = self.storage.allocated_bytes()
            && held.saturating_add(size) > limit
        {
            let cached = self.releasable_bytes();
            if cached > 0 && (cached >= size || held - cached.min(held) + size <= limit) {
                self.release_cached();
            }
        }
        let alloc = |mm: &mut Self| match pool {
            Some(index) => mm.pools[index].alloc(&mut mm.storage, size),
            None => mm.persistent.alloc(&mut mm.storage, size),
        };
        match alloc(self) {
            Err(IoError::BufferTooBig { .. }) => {
                self.release_cached();
                alloc(self)
            }
            other => other,
        }
    }

    /// Fetch the storage used by the memory manager.
    ///
    /// # Notes
    ///
    /// The storage should probably not be used for allocations since the handles won't be
    /// compatible with the ones provided by the current trait. Prefer using the
    /// [alloc](ComputeStorage::alloc) and [dealloc](ComputeStorage::dealloc) functions.
    ///
    /// This is useful if you need to time the deallocations based on async computation, or to
    /// change the mode of storage for different reasons.
    pub fn storage(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// Get the current memory usage.
    pub fn memory_usage(&self) -> MemoryUsage {
        let memory_usage = self.pools.iter().map(|x| x.get_memory_usage()).fold(
            MemoryUsage {
                number_allocs: 0,
                bytes_in_use: 0,
                bytes_padding: 0,
                bytes_reserved: 0,
            },
            |m1, m2| m1.combine(m2),
        );
        memory_usage.combine(self.persistent.get_memory_usage())
    }

    /// Print out a report of the current memory usage.
    pub fn print_memory_usage(&self) {
        #[cfg(feature = "std")]
        log::info!("{}", self.memory_usage());
    }

    /// Binds the given [handle](HandleId) to a [`MemorySlot`].
    pub fn bind(
        &mut self,
        reserved: ManagedMemoryHandle,
        assigned: ManagedMemoryHandle,
        cursor: u64,
    ) -> Result<(), IoError> {
        let descriptor = reserved.descriptor();

        if descriptor.location().init == 0 {
            return Err(IoError::NotFound {
                backtrace: BackTrace::capture(),
                reason: "Reserved memory isn't initialized".into(),
            });
        }

        let pool_index = descriptor.location().pool as usize;
        if pool_index >= self.pools.len() {
            return self.persistent.bind(reserved, assigned, cursor);
        }

        self.pools
            .get_mut(pool_index)
            .map(|p| p.bind(reserved, assigned, cursor))
            .ok_or_else(|| IoError::NotFound {
                backtrace: BackTrace::capture(),
                reason: format!("Memory pool {} doesn't exist", pool_index).into(),
            })?
    }
}

impl<Storage: ComputeStorage> core::fmt::Display for MemoryManagement<Storage> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("\n# MemoryManagement\n\n")?;
        f.write_fmt(format_args!(" - name: {:?}\n", self.name))?;
        f.write_fmt(format_args!("\n## Persistent\n\n{}", self.persistent))?;
        f.write_str("\n## Dynamic\n\n")?;

        for pool in self.pools.iter() {
            match pool {
                DynamicPool::Sliced(pool) => f.write_fmt(format_args!("{pool}\n"))?,
                DynamicPool::Exclusive(pool) => f.write_fmt(format_args!("{pool}\n"))?,
                DynamicPool::Split(pool) => f.write_fmt(format_args!("{pool}\n"))?,
            }
        }
        let memory_usage = self.memory_usage();
        f.write_fmt(format_args!("\n## Summary\n\n{memory_usage}"))?;

        Ok(())
    }
}

impl<Storage> core::fmt::Debug for MemoryManagement<Storage> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(
            alloc::format!(
                "DynamicMemoryManagement {:?}",
                core::any::type_name::<Storage>(),
            )
            .as_str(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{memory_management::MemoryManagement, storage::BytesStorage};
    use alloc::vec;

    const DUMMY_MEM_PROPS: MemoryDeviceProperties = MemoryDeviceProperties {
        max_page_size: 128 * 1024 * 1024,
        alignment: 32,
    };

    fn options() -> MemoryManagementOptions {
        MemoryManagementOptions {
            name: "test".into(),
            memory: MemoryAllocationOption::FromConfig,
        }
    }

    // Test pools with slices.
    #[test_log::test]
    #[cfg(not(exclusive_memory_only))]
    fn test_handle_mutability() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::SubSlices,
            Arc::new(ServerLogger::default()),
            options(),
        );
        let handle = memory_management.reserve(10).unwrap();
        let other_ref = handle.clone();
        assert!(!handle.can_mut(), "Handle can't be mut when multiple ref.");
        drop(other_ref);
        assert!(handle.can_mut(), "Handle should be mut when only one ref.");
    }

    // Test pools with slices.
    #[test_log::test]
    #[cfg(not(exclusive_memory_only))]
    fn test_memory_usage() {
        let max_page_size = 512;

        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages {
                        max_alloc_size: max_page_size,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        let handle = memory_management.reserve(100);
        let usage = memory_management.memory_usage();

        assert_eq!(usage.bytes_in_use, 100);
        assert!(usage.bytes_reserved >= 100 && usage.bytes_reserved <= max_page_size);

        // Drop and re-alloc.
        drop(handle);
        let _handle = memory_management.reserve(100);
        let usage_new = memory_management.memory_usage();
        assert_eq!(usage, usage_new);
    }

    /// A device of `cap` bytes whose frees take effect at `flush`, like the CUDA storage's.
    struct Capped {
        bytes: BytesStorage,
        cap: u64,
        used: u64,
        sizes: hashbrown::HashMap<crate::storage::StorageId, u64>,
        pending: Vec<crate::storage::StorageId>,
    }

    impl ComputeStorage for Capped {
        type Resource = crate::storage::BytesResource;
        fn alignment(&self) -> usize {
            self.bytes.alignment()
        }
        fn get(&mut self, handle: &crate::storage::StorageHandle) -> Self::Resource {
            self.bytes.get(handle)
        }
        fn alloc(&mut self, size: u64) -> Result<crate::storage::StorageHandle, IoError> {
            if self.used + size > self.cap {
                return Err(IoError::BufferTooBig {
                    size,
                    backtrace: BackTrace::capture(),
                });
            }
            let handle = self.bytes.alloc(size)?;
            self.used += size;
            self.sizes.insert(handle.id, size);
            Ok(handle)
        }
        fn dealloc(&mut self, id: crate::storage::StorageId) {
            self.pending.push(id);
        }
        fn flush(&mut self) {
            for id in self.pending.drain(..) {
                self.used -= self.sizes.remove(&id).unwrap_or(0);
                self.bytes.dealloc(id);
            }
            self.bytes.flush();
        }
        fn allocated_bytes(&self) -> Option<u64> {
            Some(self.used)
        }
    }

    // rlhf patch: a cached free page too small for the next request is given back when the
    // device is full, instead of failing the request.
    #[test_log::test]
    fn full_device_releases_cached_pages_and_retries() {
        let storage = Capped {
            bytes: BytesStorage::default(),
            cap: 1000,
            used: 0,
            sizes: Default::default(),
            pending: Vec::new(),
        };
        let mut memory_management = MemoryManagement::from_configuration(
            storage,
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages {
                        max_alloc_size: 1024,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        let first = memory_management.reserve(600).unwrap();
        drop(first);
        // The freed 600-byte page stays cached; 600 + 700 exceed the device.
        let second = memory_management.reserve(700);
        assert!(
            second.is_ok(),
            "the cached page was not released: {:?}",
            second.err()
        );
        let reserved = memory_management.memory_usage().bytes_reserved;
        assert!((700..=1000).contains(&reserved), "reserved {reserved}");
    }

    impl Capped {
        fn new(cap: u64) -> Self {
            Self {
                bytes: BytesStorage::default(),
                cap,
                used: 0,
                sizes: Default::default(),
                pending: Vec::new(),
            }
        }
    }

    // rlhf patch: with a reservation limit, cached pages are given back before the storage
    // would hold more than the limit, even where the device has room.
    #[test_log::test]
    fn reservation_limit_bounds_the_cache() {
        let mut memory_management = MemoryManagement::from_configuration(
            Capped::new(1 << 20),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages {
                        max_alloc_size: 4096,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        memory_management.set_reserve_limit(Some(2000));
        let kept = memory_management.reserve(800).unwrap();
        for size in [600, 900, 1000, 700] {
            let handle = memory_management.reserve(size).unwrap();
            let held = memory_management.storage().used;
            assert!(held <= 2000, "{held} bytes held above the 2000-byte limit");
            drop(handle);
        }
        // Live tensors above the limit still get memory: the limit bounds the cache only.
        let big = memory_management.reserve(1500);
        assert!(big.is_ok(), "{:?}", big.err());
        drop(kept);
    }

    fn split_pool_with(max_ratio: u64, cap: u64) -> MemoryManagement<Capped> {
        MemoryManagement::from_configuration(
            Capped::new(cap),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::SplitPages {
                        min_alloc_size: 0,
                        max_alloc_size: 1 << 20,
                        segment: 2048,
                        granularity: 256,
                        min_rest: 0,
                        max_ratio,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        )
    }

    /// A DPO step in miniature: a reference pass (per layer a 3,000-byte buffer, then two
    /// 20,000-byte logits buffers, all freed), then the policy pass, which keeps a 1,200-byte
    /// checkpoint per layer beside the same buffers and needs three logits buffers. Returns the
    /// bytes held at the end and the largest bytes in use.
    fn dpo_in_miniature(mm: &mut MemoryManagement<Capped>) -> (u64, u64) {
        let mut peak = 0;
        let mut note = |mm: &MemoryManagement<Capped>| {
            peak = peak.max(mm.memory_usage().bytes_in_use);
        };
        for _ in 0..2 {
            for _ in 0..8 {
                let t = mm.reserve(3000).unwrap();
                note(mm);
                drop(t);
            }
            let logits: Vec<_> = (0..2).map(|_| mm.reserve(20_000).unwrap()).collect();
            note(mm);
            drop(logits);
            let mut kept = Vec::new();
            for _ in 0..8 {
                kept.push(mm.reserve(1200).unwrap());
                let t = mm.reserve(3000).unwrap();
                note(mm);
                drop(t);
            }
            let logits: Vec<_> = (0..3).map(|_| mm.reserve(20_000).unwrap()).collect();
            note(mm);
            drop((logits, kept));
        }
        (mm.storage().used, peak)
    }

    #[test_log::test]
    fn split_pages_with_a_ratio_keep_freed_buffers_whole_for_the_next_pass() {
        let (held_any, peak) = dpo_in_miniature(&mut split_pool_with(0, 1 << 20));
        let (held_ratio, peak_ratio) = dpo_in_miniature(&mut split_pool_with(4, 1 << 20));
        assert_eq!(peak, peak_ratio);
        assert!(
            held_ratio < held_any,
            "with the ratio {held_ratio} bytes held, without {held_any} (peak in use {peak})"
        );
    }

    #[test_log::test]
    fn split_pages_with_a_ratio_use_a_large_slice_when_the_device_is_full() {
        let mut mm = split_pool_with(4, 21_000);
        drop(mm.reserve(20_000).unwrap());
        // No room for a page of its own: the 20,224-byte free slice serves the 1,200 bytes.
        let small = mm.reserve(1200);
        assert!(small.is_ok(), "{:?}", small.err());
        assert_eq!(mm.storage().used, 20_224);
    }

    fn split_pool(exclusive: bool) -> MemoryManagement<Capped> {
        let pool_type = if exclusive {
            PoolType::ExclusivePages {
                max_alloc_size: 1 << 16,
            }
        } else {
            PoolType::SplitPages {
                min_alloc_size: 0,
                max_alloc_size: 1 << 16,
                segment: 4096,
                granularity: 256,
                min_rest: 0,
                max_ratio: 0,
            }
        };
        MemoryManagement::from_configuration(
            Capped::new(1 << 20),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type,
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        )
    }

    /// Phases of a training step whose tensors change shape: ten 1,000-byte buffers, then five
    /// of 2,000, then three of 3,300, each set freed before the next. Freed space serves the
    /// next shape only when it can be split and merged; exclusive pages keep adding pages.
    fn phases_held(exclusive: bool) -> (u64, u64) {
        let mut mm = split_pool(exclusive);
        let kept = mm.reserve(5000).unwrap();
        let mut first = 0;
        for (count, size) in [(10, 1000), (5, 2000), (3, 3300), (10, 1000), (5, 2000)] {
            let live: Vec<_> = (0..count).map(|_| mm.reserve(size).unwrap()).collect();
            first = first.max(mm.storage().used);
            drop(live);
        }
        drop(kept);
        (first, mm.storage().used)
    }

    #[test_log::test]
    fn split_pages_follow_the_tensors_across_shapes() {
        let (first, held) = phases_held(false);
        // The first phase, the largest (5,000 + 10 x 1,024 bytes), takes a 5,120-byte page and
        // three 4,096-byte segments; the later shapes fit in what it freed.
        assert_eq!(first, 5120 + 3 * 4096);
        assert_eq!(held, first, "the split pool grew after the largest phase");
        let (_, exclusive_held) = phases_held(true);
        assert!(
            exclusive_held > held,
            "exclusive pages held {exclusive_held}, split {held}: the phases do not tell them apart"
        );
    }

    #[test_log::test]
    fn split_pages_keep_the_padding_of_reused_slices() {
        let mut mm = split_pool(false);
        // 33 bytes pad to 64; reusing the slice must not lose the padding from the page.
        for _ in 0..1000 {
            drop(mm.reserve(33).unwrap());
        }
        let whole = mm.reserve(4096).unwrap();
        assert_eq!(mm.storage().used, 4096, "a second page was needed");
        drop(whole);
    }

    #[test_log::test]
    fn split_pages_pick_the_best_fit_and_give_back_unused_pages() {
        let mut mm = split_pool(false);
        let big = mm.reserve(3000).unwrap(); // a page of its own (over half a segment)
        let a = mm.reserve(1000).unwrap(); // a 4,096-byte segment
        let b = mm.reserve(1000).unwrap();
        drop(a);
        drop(big);
        // 900 bytes fit the freed 1,024 exactly enough; the 3,072-byte page stays whole.
        let c = mm.reserve(900).unwrap();
        let d = mm.reserve(3000).unwrap();
        assert_eq!(mm.storage().used, 3072 + 4096, "no page beyond the two");
        drop((c, d));
        mm.cleanup(true);
        mm.storage().flush();
        assert_eq!(
            mm.storage().used,
            4096,
            "the segment with a live slice stays, nothing else"
        );
        drop(b);
    }

    #[test_log::test]
    fn split_large_configuration_limits_its_cache() {
        let mut mm = MemoryManagement::from_configuration(
            Capped::new(1 << 30),
            &MemoryDeviceProperties {
                max_page_size: 1 << 28,
                alignment: 256,
            },
            MemoryConfiguration::SplitLarge {
                split_min: 1 << 20,
                segment: 20 << 20,
                min_rest: 0,
                max_ratio: 0,
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        const MB: u64 = 1 << 20;
        mm.set_reserve_limit(Some(64 * MB));
        let small = mm.reserve(4096).unwrap();
        for size in [30 * MB, 12 * MB, 50 * MB, 7 * MB, 33 * MB] {
            let handle = mm.reserve(size).unwrap();
            let held = mm.storage().used;
            assert!(held <= 64 * MB, "{held} bytes held above the 64 MiB limit");
            drop(handle);
        }
        drop(small);
    }

    #[test_log::test]
    fn alloc_two_chunks_on_one_page() {
        let page_size = 2048;

        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::SlicedPages {
                        page_size,
                        max_slice_size: page_size,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );

        let alloc_size = 512;
        let _handle = memory_management.reserve(alloc_size);
        let _new_handle = memory_management.reserve(alloc_size);

        let usage = memory_management.memory_usage();
        assert_eq!(usage.number_allocs, 2);
        assert_eq!(usage.bytes_in_use, alloc_size * 2);
        assert_eq!(usage.bytes_reserved, page_size);
    }

    #[test_log::test]
    fn alloc_reuses_storage() {
        // If no storage is re-used, this will allocate two pages.
        let page_size = 512;

        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::SlicedPages {
                        page_size,
                        max_slice_size: page_size,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );

        let alloc_size = 512;
        let _handle = memory_management.reserve(alloc_size);
        drop(_handle);
        let _new_handle = memory_management.reserve(alloc_size);

        let usage = memory_management.memory_usage();
        assert_eq!(usage.number_allocs, 1);
        assert_eq!(usage.bytes_in_use, alloc_size);
        assert_eq!(usage.bytes_reserved, page_size);
    }

    #[test_log::test]
    fn alloc_allocs_new_storage() {
        let page_size = 1024;

        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::SlicedPages {
                        page_size,
                        max_slice_size: page_size,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );

        let alloc_size = 768;
        let _handle = memory_management.reserve(alloc_size);
        let _new_handle = memory_management.reserve(alloc_size);

        let usage = memory_management.memory_usage();
        assert_eq!(usage.number_allocs, 2);
        assert_eq!(usage.bytes_in_use, alloc_size * 2);
        assert_eq!(usage.bytes_reserved, page_size * 2);
    }

    #[test_log::test]
    fn alloc_respects_alignment_size() {
        let page_size = 500;
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &MemoryDeviceProperties {
                max_page_size: page_size,
                alignment: 50,
            },
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::SlicedPages {
                        page_size,
                        max_slice_size: page_size,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        let alloc_size = 40;
        let _handle = memory_management.reserve(alloc_size);
        let _new_handle = memory_management.reserve(alloc_size);
        let usage = memory_management.memory_usage();
        // Each slice should be aligned to 50 bytes, so 20 padding bytes.
        assert_eq!(usage.bytes_padding, 10 * 2);
    }

    #[test_log::test]
    fn allocs_on_correct_page() {
        let sizes = [100, 200, 300, 400];

        let pools = sizes
            .iter()
            .map(|size| MemoryPoolOptions {
                pool_type: PoolType::SlicedPages {
                    page_size: *size,
                    max_slice_size: *size,
                },
                dealloc_period: None,
            })
            .collect();
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &MemoryDeviceProperties {
                max_page_size: 128 * 1024 * 1024,
                alignment: 10,
            },
            MemoryConfiguration::Custom {
                pool_options: pools,
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        // Allocate one thing on each page.
        let alloc_sizes = [50, 150, 250, 350];
        let _handles = alloc_sizes.map(|s| memory_management.reserve(s));

        let usage = memory_management.memory_usage();

        // Total memory should be size of all pages, and no more.
        assert_eq!(usage.bytes_in_use, alloc_sizes.iter().sum::<u64>());
        assert!(usage.bytes_reserved >= sizes.iter().sum::<u64>());
    }

    #[test_log::test]
    #[cfg(not(exclusive_memory_only))]
    fn allocate_deallocate_reallocate() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &MemoryDeviceProperties {
                max_page_size: 128 * 1024 * 1024,
                alignment: 32,
            },
            MemoryConfiguration::SubSlices,
            Arc::new(ServerLogger::default()),
            options(),
        );
        // Allocate a bunch
        let handles: Vec<_> = (0..5)
            .map(|i| memory_management.reserve(1000 * (i + 1)))
            .collect();
        let usage_before = memory_management.memory_usage();
        // Deallocate
        drop(handles);
        // Reallocate
        let _new_handles: Vec<_> = (0..5)
            .map(|i| memory_management.reserve(1000 * (i + 1)))
            .collect();
        let usage_after = memory_management.memory_usage();
        assert_eq!(usage_before.number_allocs, usage_after.number_allocs);
        assert_eq!(usage_before.bytes_in_use, usage_after.bytes_in_use);
        // Usage after can actually be _less_ because of defragging.
        assert!(usage_before.bytes_reserved >= usage_after.bytes_reserved);
    }

    #[test_log::test]
    #[cfg(not(exclusive_memory_only))]
    fn test_fragmentation_resistance() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &MemoryDeviceProperties {
                max_page_size: 128 * 1024 * 1024,
                alignment: 32,
            },
            MemoryConfiguration::SubSlices,
            Arc::new(ServerLogger::default()),
            options(),
        );
        // Allocate a mix of small and large chunks
        let sizes = [50, 1000, 100, 5000, 200, 10000, 300];
        let handles: Vec<_> = sizes
            .iter()
            .map(|&size| memory_management.reserve(size).unwrap())
            .collect();
        let usage_before = memory_management.memory_usage();
        // Deallocate every other allocation
        for i in (0..handles.len()).step_by(2) {
            drop(handles[i].clone());
        }
        // Reallocate similar sizes
        for &size in &sizes[0..sizes.len() / 2] {
            memory_management.reserve(size).unwrap();
        }
        let usage_after = memory_management.memory_usage();
        // Check that we haven't increased our memory usage significantly
        assert!(usage_after.bytes_reserved <= (usage_before.bytes_reserved as f64 * 1.1) as u64);
    }

    // Test pools without slices. More or less same as tests above.
    #[test_log::test]
    fn noslice_test_handle_mutability() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &(MemoryDeviceProperties {
                max_page_size: 128 * 1024 * 1024,
                alignment: 32,
            }),
            MemoryConfiguration::ExclusivePages,
            Arc::new(ServerLogger::default()),
            options(),
        );
        let handle = memory_management.reserve(10).unwrap();
        let other_ref = handle.clone();
        assert!(!handle.can_mut(), "Handle can't be mut when multiple ref.");
        drop(other_ref);
        assert!(handle.can_mut(), "Handle should be mut when only one ref.");
    }

    #[test_log::test]
    fn noslice_alloc_two_chunk() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages {
                        max_alloc_size: 1024,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );

        let alloc_size = 512;
        let _handle = memory_management.reserve(alloc_size);
        let _new_handle = memory_management.reserve(alloc_size);

        let usage = memory_management.memory_usage();
        assert_eq!(usage.number_allocs, 2);
        assert_eq!(usage.bytes_in_use, alloc_size * 2);
        assert!(usage.bytes_reserved >= alloc_size * 2);
    }

    #[test_log::test]
    fn noslice_alloc_reuses_storage() {
        // If no storage is re-used, this will allocate two pages.
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages {
                        max_alloc_size: 1024,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );

        let alloc_size = 512;
        let _handle = memory_management.reserve(alloc_size);
        drop(_handle);
        let _new_handle = memory_management.reserve(alloc_size);

        let usage = memory_management.memory_usage();
        assert_eq!(usage.number_allocs, 1);
        assert_eq!(usage.bytes_in_use, alloc_size);
        assert!(usage.bytes_reserved >= alloc_size);
    }

    #[test_log::test]
    fn noslice_alloc_allocs_new_storage() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &DUMMY_MEM_PROPS,
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages {
                        max_alloc_size: 1024,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );

        let alloc_size = 768;
        let _handle = memory_management.reserve(alloc_size);
        let _new_handle = memory_management.reserve(alloc_size);
        let usage = memory_management.memory_usage();
        assert_eq!(usage.number_allocs, 2);
        assert_eq!(usage.bytes_in_use, alloc_size * 2);
        assert!(usage.bytes_reserved >= alloc_size * 2);
    }

    #[test_log::test]
    fn noslice_alloc_respects_alignment_size() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &MemoryDeviceProperties {
                max_page_size: DUMMY_MEM_PROPS.max_page_size,
                alignment: 50,
            },
            MemoryConfiguration::Custom {
                pool_options: vec![MemoryPoolOptions {
                    pool_type: PoolType::ExclusivePages {
                        max_alloc_size: 50 * 20,
                    },
                    dealloc_period: None,
                }],
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        let alloc_size = 40;
        let _handle = memory_management.reserve(alloc_size);
        let _new_handle = memory_management.reserve(alloc_size);
        let usage = memory_management.memory_usage();
        // Each slice should be aligned to 60 bytes, so 20 padding bytes.
        assert_eq!(usage.bytes_padding, 10 * 2);
    }

    #[test_log::test]
    fn noslice_allocs_on_correct_page() {
        let pools = [100, 200, 300, 400]
            .iter()
            .map(|&size| MemoryPoolOptions {
                pool_type: PoolType::SlicedPages {
                    page_size: size,
                    max_slice_size: size,
                },
                dealloc_period: None,
            })
            .collect();
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &MemoryDeviceProperties {
                max_page_size: DUMMY_MEM_PROPS.max_page_size,
                alignment: 10,
            },
            MemoryConfiguration::Custom {
                pool_options: pools,
            },
            Arc::new(ServerLogger::default()),
            options(),
        );
        // Allocate one thing on each page.
        let alloc_sizes = [50, 150, 250, 350];
        let _handles = alloc_sizes.map(|s| memory_management.reserve(s));
        let usage = memory_management.memory_usage();
        // Total memory should be size of all pages, and no more.
        assert_eq!(usage.bytes_in_use, alloc_sizes.iter().sum::<u64>());
    }

    #[test_log::test]
    fn noslice_allocate_deallocate_reallocate() {
        let mut memory_management = MemoryManagement::from_configuration(
            BytesStorage::default(),
            &MemoryDeviceProperties {
                max_page_size: 128 * 1024 * 1024,
                alignment: 32,
            },
            MemoryConfiguration::ExclusivePages,
            Arc::new(ServerLogger::default()),
            options(),
        );
        // Allocate a bunch
        let handles: Vec<_> = (0..5)
            .map(|i| memory_management.reserve(1000 * (i + 1)))
            .collect();
        let usage_before = memory_management.memory_usage();
        // Deallocate
        drop(handles);
        // Reallocate
        let _new_handles: Vec<_> = (0..5)
            .map(|i| memory_management.reserve(1000 * (i + 1)))
            .collect();
        let usage_after = memory_management.memory_usage();
        assert_eq!(usage_before.number_allocs, usage_after.number_allocs);
        assert_eq!(usage_before.bytes_in_use, usage_after.bytes_in_use);
        assert_eq!(usage_before.bytes_reserved, usage_after.bytes_reserved);
    }
}
