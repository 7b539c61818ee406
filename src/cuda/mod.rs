//! The CUDA fast path for the frozen 4-bit base (feature `cuda`).
//!
//! burn has no specialisation, and the engine stays generic over `Backend`; so the few ops that
//! need CUDA-specific code (the NF4 linear layers) check the concrete backend type at run time and
//! take this path when it is `Cuda` or `Autodiff<Cuda>`. Every other backend keeps the plain-tensor
//! reference path in `model::linear::BaseLinear::forward`, against which this one is tested.
//!
//! - `kernels`: CubeCL kernels over the NF4 format: dequantization to bf16, the fused NF4 GEMV.
//! - `decode_kernels`: the fused decode step's kernels (RoPE and cache append, attention over the
//!   cache, RMSNorm, SwiGLU, LoRA factors, sampling).
//! - `attention`: masked attention and its backward, memory linear in the row length for long rows.
//! - `blas`: cuBLASLt bf16 GEMMs on raw device pointers (cubecl uses the primary context).
//! - `qlinear`: the `x @ dequant(W)^T` op with its backward `dy @ dequant(W)`, as a burn autodiff
//!   node that keeps no dense weight alive between forward and backward.

use burn::tensor::backend::Backend;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::Runtime;
use std::any::Any;

/// The allocator's bytes on a CUDA device, `(in live tensors, held from the driver)`; `None`
/// for any other device type.
pub fn memory_usage<B: Backend>(device: &B::Device) -> Option<(u64, u64)> {
    let device = (device as &dyn Any).downcast_ref::<CudaDevice>()?;
    let usage = CudaRuntime::client(device).memory_usage().ok()?;
    Some((usage.bytes_in_use, usage.bytes_reserved))
}

/// Bytes the whole device has in use (total minus free, every process), read from the driver in
/// the current context; `None` when no context is current. For `RLHF_TRACE_MEM`: what the card
/// holds beyond the allocator (context, modules, local memory) shows as the difference.
pub fn device_used() -> Option<u64> {
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some((total - free) as u64)
}

pub mod attention;
pub mod blas;
pub mod decode_kernels;
pub mod gemm;
pub mod kernels;
pub mod nf4_mma;
pub mod qlinear;
pub mod train_kernels;
pub mod train_ops;

use crate::quant::BaseWeight;
use burn::tensor::Tensor;
use qlinear::{Ad, GpuLinear, Inner};
use std::sync::{Arc, OnceLock};

/// Whether `B` is the CUDA backend (plain or autodiff).
pub fn is_cuda<B: Backend>() -> bool {
    let t = std::any::TypeId::of::<B>();
    t == std::any::TypeId::of::<Inner>() || t == std::any::TypeId::of::<Ad>()
}

/// `t` cast to bf16 into a contiguous buffer on the CUDA backends (plain or autodiff; no graph
/// is recorded: for frozen weights and checkpoints); any other backend gets `t` back as `Err`.
/// burn's own cast allocates with cubecl's row pitch (each row padded to a multiple of up to
/// 512 bytes): a `[32000, 896]` bf16 table took 62.5 MiB instead of 54.7, a 0.5b checkpoint
/// `[4096, 896]` 8 MiB instead of 7, and the LM head's GEMM operand became a second,
/// unpitched copy of it (allocations at the 0.5b DPO peak; H200, 2026-12-02).
pub fn contiguous_bf16<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    fn cast<const D: usize>(x: Tensor<Inner, D>) -> Tensor<Inner, D> {
        let x = burn_cubecl::kernel::into_contiguous(x.into_primitive().tensor());
        Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(qlinear::to_bf16(x)))
    }
    let b = std::any::TypeId::of::<B>();
    if b == std::any::TypeId::of::<Ad>() {
        let t: Tensor<Ad, D> = cast_any(t).expect("B is Ad");
        return Ok(cast_any(Tensor::<Ad, D>::from_inner(cast(t.inner()))).expect("B is Ad"));
    }
    if b == std::any::TypeId::of::<Inner>() {
        let t: Tensor<Inner, D> = cast_any(t).expect("B is Inner");
        return Ok(cast_any(cast(t)).expect("B is Inner"));
    }
    Err(t)
}

/// A layer's GPU form, built on first use and shared by its clones; `None` inside when the layer
/// has no GPU form (odd shapes), so the reference path is taken without retrying.
pub type GpuSlot = Arc<OnceLock<Option<Arc<GpuLinear>>>>;

fn cast_any<T: 'static, U: 'static>(t: T) -> Option<U> {
    (Box::new(t) as Box<dyn Any>)
        .downcast::<U>()
        .ok()
        .map(|b| *b)
}

/// The GPU form of a stored weight (see [`GpuSlot`]).
pub(crate) fn build<B: Backend>(
    weight: &BaseWeight<B>,
    device: &CudaDevice,
) -> Option<Arc<GpuLinear>> {
    let gpu = match weight {
        BaseWeight::Nf4(q) => GpuLinear::from_nf4(q, device),
        BaseWeight::Dense(w) => {
            let w: &dyn Any = w;
            let prim = if let Some(w) = w.downcast_ref::<Tensor<Ad, 2>>() {
                w.clone().inner().into_primitive().tensor()
            } else {
                w.downcast_ref::<Tensor<Inner, 2>>()?
                    .clone()
                    .into_primitive()
                    .tensor()
            };
            GpuLinear::from_dense(prim)
        }
    };
    gpu.map(Arc::new)
}

/// `x @ W^T` through the fast path when `B` is the CUDA backend (plain or autodiff) and the
/// weight has a GPU form (kept in `slot`); `None` sends the caller down the reference path.
pub fn try_linear<B: Backend>(
    slot: &GpuSlot,
    weight: &BaseWeight<B>,
    x: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    let any: &dyn Any = x;
    let fail = |e: anyhow::Error| -> ! { panic!("CUDA linear layer failed: {e:#}") };
    if let Some(x) = any.downcast_ref::<Tensor<Ad, 2>>() {
        let gpu = slot.get_or_init(|| build(weight, &x.device())).as_ref()?;
        let y = qlinear::forward_autodiff(gpu, x.clone()).unwrap_or_else(|e| fail(e));
        return cast_any(y);
    }
    if let Some(x) = any.downcast_ref::<Tensor<Inner, 2>>() {
        let gpu = slot.get_or_init(|| build(weight, &x.device())).as_ref()?;
        let y = qlinear::forward_inner(gpu, x.clone()).unwrap_or_else(|e| fail(e));
        return cast_any(y);
    }
    None
}

/// `dy @ W` (the input gradient of [`try_linear`]) on the plain CUDA backend, for the
/// hand-written block backward; `None` elsewhere.
pub fn try_linear_backward<B: Backend>(
    slot: &GpuSlot,
    weight: &BaseWeight<B>,
    dy: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    let dy = (dy as &dyn Any).downcast_ref::<Tensor<Inner, 2>>()?;
    let gpu = slot.get_or_init(|| build(weight, &dy.device())).as_ref()?;
    let dx = gpu
        .backward(dy.clone().into_primitive().tensor())
        .unwrap_or_else(|e| panic!("CUDA linear backward failed: {e:#}"));
    cast_any(Tensor::<Inner, 2>::from_primitive(
        burn::tensor::TensorPrimitive::Float(dx),
    ))
}

/// `x @ w^T` for few rows on the plain CUDA backend (sampling); `None` elsewhere, including the
/// autodiff backend, whose matmul must record a graph.
pub fn try_small_matmul_t<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let x = (x as &dyn Any).downcast_ref::<Tensor<Inner, 2>>()?;
    let w = (w as &dyn Any).downcast_ref::<Tensor<Inner, 2>>()?;
    cast_any(qlinear::small_matmul_t(x.clone(), w.clone())?)
}
