//! The one place where the model chooses between the CUDA fast path (feature `cuda`, when `B`
//! is the CUDA backend and the shapes allow it) and burn's reference ops, for the frozen linear
//! layers, the LoRA products and the weights kept at rest. `crate::cuda` knows the kernels and
//! the storage formats; this file knows the model's types.

use crate::quant::BaseWeight;
use burn::tensor::{backend::Backend, Tensor};

/// A frozen dense weight as kept: bf16 on CUDA, where every product with it is a bf16 cuBLASLt
/// GEMM anyway (an f32 copy beside the GEMM's bf16 one doubled a dense LM head's bytes: 172 MB
/// instead of 57 for the 0.5b model's), f32 on the CPU backends.
pub(crate) fn dense_at_rest<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "cuda")]
    return crate::cuda::contiguous_bf16(w).unwrap_or_else(|w| w);
    #[cfg(not(feature = "cuda"))]
    w
}

/// The CPU backend used when `--device cpu` (see README: ndarray measured faster than candle).
#[cfg(feature = "ndarray")]
pub type CpuBackend = burn::backend::NdArray<f32>;
#[cfg(all(feature = "candle", not(feature = "ndarray")))]
#[allow(deprecated)] // burn-candle is deprecated upstream; kept as the optional CPU backend the design names
pub type CpuBackend = burn::backend::Candle<f32, i64>;

/// The CUDA attention backward makes its score gradient (a second `[rows, heads, T, T]` tensor
/// beside the probabilities) this many times smaller: in slices of the `rows x kv_heads` groups.
pub const ATTENTION_BACKWARD_SLICES: usize = 8;

/// The CUDA attention makes f32 scores of up to this many bytes whole, all heads at once (three
/// batched GEMMs a call). The bound sits above the largest scores of the measured runs (3.4 GiB,
/// 20b DPO with 2 pairs of 2,176-token rows), so those runs keep the engine they were measured
/// with; lowering it trades launches for memory.
pub const ATTENTION_WHOLE_BYTES: usize = 4 << 30;

/// Beyond [`ATTENTION_WHOLE_BYTES`], the scores of one query block (one KV group's query heads),
/// at most.
pub const ATTENTION_BLOCK_BYTES: usize = 256 << 20;

/// Query rows per block of the CUDA attention for `rows` sequences of `t` queries over `total`
/// keys, or `None` where the scores are made whole (`cuda::attention`; the planner counts the
/// same). Blocks are near-equal, each of at most [`ATTENTION_BLOCK_BYTES`] of scores.
pub fn attention_query_block(
    rows: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    total: usize,
) -> Option<usize> {
    let (whole, block) = ATTENTION_BOUNDS.with(|b| b.get());
    if rows * heads * t * total * 4 <= whole {
        return None;
    }
    let rep = heads / kv_heads.max(1);
    let most = (block / (rep * total * 4).max(1)).max(1);
    Some(t.div_ceil(t.div_ceil(most)))
}

thread_local! {
    /// The bounds in force on this thread: `(whole, block)` bytes.
    static ATTENTION_BOUNDS: std::cell::Cell<(usize, usize)> =
        const { std::cell::Cell::new((ATTENTION_WHOLE_BYTES, ATTENTION_BLOCK_BYTES)) };
}

/// Sets this thread's attention bounds (`(whole, block)` bytes, see [`attention_query_block`]):
/// the GPU checks run both regimes at small shapes with it.
pub fn set_attention_bounds(whole: usize, block: usize) {
    ATTENTION_BOUNDS.with(|b| b.set((whole, block)));
}

/// Groups per slice of the CUDA attention backward for `groups = rows x kv_heads` (the planner
/// counts one slice of `[rep x T, T]` f32 per group).
pub fn attention_backward_slice(groups: usize) -> usize {
    groups.div_ceil(ATTENTION_BACKWARD_SLICES).max(1)
}

/// `x w^T` for a large row-major `w` (`[n, k]`, e.g. tied embeddings `[vocab, hidden]`) and
/// fewer rows in `x`: computed as `(w x^T)^T` off CUDA, so only `x` is copied into the layout
/// the CPU matmuls want, not `w`.
pub fn matmul_wt<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "cuda")]
    if crate::cuda::is_cuda::<B>() {
        return x.matmul(w.clone().transpose());
    }
    if x.dims()[0] >= w.dims()[0] {
        return x.matmul(w.clone().transpose());
    }
    w.clone().matmul(x.transpose()).transpose()
}

/// Whether `B` is one of the CUDA backends (false without the `cuda` feature).
#[cfg_attr(not(feature = "cuda"), allow(clippy::extra_unused_type_parameters))]
pub(crate) fn is_cuda<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    return crate::cuda::is_cuda::<B>();
    #[cfg(not(feature = "cuda"))]
    false
}

/// A frozen layer's form on the CUDA fast path, built on first use there (nothing without the
/// `cuda` feature).
#[cfg(feature = "cuda")]
pub type FastSlot = crate::cuda::GpuSlot;
#[cfg(not(feature = "cuda"))]
#[derive(Debug, Clone, Default)]
pub struct FastSlot;

/// The CUDA fast path's `x @ W^T`, when `B` is the CUDA backend and the weight has a GPU form;
/// `None` sends the caller down the reference path.
pub(crate) fn linear_fast<B: Backend>(
    slot: &FastSlot,
    weight: &BaseWeight<B>,
    x: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "cuda")]
    return crate::cuda::try_linear(slot, weight, x);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, weight, x);
        None
    }
}

/// The CUDA fast path's `dy @ W` (the input gradient of [`linear_fast`]); `None` elsewhere.
pub(crate) fn linear_backward_fast<B: Backend>(
    slot: &FastSlot,
    weight: &BaseWeight<B>,
    dy: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "cuda")]
    return crate::cuda::try_linear_backward(slot, weight, dy);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, weight, dy);
        None
    }
}

/// `alpha x y^T` through the few-row GEMV kernel (sampling), when `B` is the plain CUDA backend,
/// the product is `x y^T` and `x` has few rows; `None` sends the caller to the GEMM.
fn small_product<B: Backend>(
    x: &Tensor<B, 2>,
    y: &Tensor<B, 2>,
    tx: bool,
    ty: bool,
    alpha: f64,
) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "cuda")]
    if !tx && ty {
        let z = crate::cuda::try_small_matmul_t(x, y)?;
        return Some(if alpha == 1.0 { z } else { z * alpha });
    }
    let _ = (x, y, tx, ty, alpha);
    None
}

/// `acc + alpha op(x) op(y)`: on the plain CUDA backend one GEMM accumulating into `acc` (few
/// rows: the GEMV kernel, then an add).
pub(crate) fn matmul_acc<B: Backend>(
    acc: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    y: &Tensor<B, 2>,
    tx: bool,
    ty: bool,
    alpha: f64,
) -> Tensor<B, 2> {
    if let Some(z) = small_product(x, y, tx, ty, alpha) {
        return acc + z;
    }
    #[cfg(feature = "cuda")]
    let acc = match crate::cuda::train_ops::try_matmul_acc(acc, x, y, tx, ty, alpha) {
        Ok(z) => return z,
        Err(acc) => acc,
    };
    acc + matmul(x, y, tx, ty, alpha)
}

/// `alpha op(x) op(y)` (`op` transposes when asked): cuBLASLt on the plain CUDA backend (few
/// rows of `x y^T`: the GEMV kernel), burn's matmul elsewhere.
pub(crate) fn matmul<B: Backend>(
    x: &Tensor<B, 2>,
    y: &Tensor<B, 2>,
    tx: bool,
    ty: bool,
    alpha: f64,
) -> Tensor<B, 2> {
    if let Some(z) = small_product(x, y, tx, ty, alpha) {
        return z;
    }
    #[cfg(feature = "cuda")]
    if let Some(z) = crate::cuda::train_ops::try_matmul(x, y, tx, ty, alpha) {
        return z;
    }
    let x = if tx { x.clone().transpose() } else { x.clone() };
    let y = if ty { y.clone().transpose() } else { y.clone() };
    let z = x.matmul(y);
    if alpha == 1.0 {
        z
    } else {
        z * alpha
    }
}
