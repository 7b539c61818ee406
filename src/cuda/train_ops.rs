//! The decoder block's many-row ops on CUDA (training, prefill, the reference pass): fused
//! CubeCL kernels (`train_kernels`) for RMSNorm, SwiGLU, RoPE, the token log-probs and AdamW,
//! and cuBLASLt GEMMs for the LoRA factors (attention has its own file, `attention`). Each
//! `try_*` returns `None` unless `B` is the plain CUDA backend, and the caller then runs its
//! reference burn ops (the autodiff backend must record burn's graph; the checkpointed blocks run
//! on the plain backend). `examples/train_ops_check.rs` compares every op here with that
//! reference on the GPU.

use super::blas::{GemmIn, GemmShape};
use super::gemm::gemm;
use super::qlinear::Inner;
use super::train_kernels::{
    adamw_step, rms_norm_bwd, rms_norm_fwd, rope_transpose, sum_squares, swiglu_bwd,
    token_logp_bwd, token_logp_fwd,
};
use anyhow::Result;
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};

pub(super) type T = CubeTensor<CudaRuntime>;

/// Rows per cube of the row kernels (one plane each).
const ROW_PLANES: u32 = 4;

/// Switch for A/B measurements and checks (`RLHF_NO_FUSED_TRAIN=1` or [`set_enabled`]).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns these ops on or off (off: every caller takes its reference burn ops).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub(super) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) && !crate::switches::switches().no_fused_train
}

/// Row-major `out = alpha op(x) op(y) + beta out` (TF32), `batch` contiguous matrices of each:
/// `x` is `[rows, inner]` (`[inner, rows]` when `tx`), `y` `[inner, cols]` (`[cols, inner]`
/// when `ty`).
#[allow(clippy::too_many_arguments)]
fn row_gemm(
    batch: usize,
    dims: (usize, usize, usize),
    x: &T,
    y: &T,
    tx: bool,
    ty: bool,
    (alpha, beta): (f32, f32),
    out: &T,
) {
    let shape = GemmShape::row_major(GemmIn::F32Tf32, batch, dims, tx, ty);
    // cuBLAS' A is the row-major right factor (see `GemmShape::row_major`).
    gemm(shape, alpha, beta, y, x, out).unwrap_or_else(|e| panic!("CUDA GEMM failed: {e:#}"));
}

/// `(rows, inner, cols)` of `op(x) op(y)` for 2-D operands.
fn product_dims(x: [usize; 2], y: [usize; 2], tx: bool, ty: bool) -> (usize, usize, usize) {
    let (rows, inner) = if tx { (x[1], x[0]) } else { (x[0], x[1]) };
    let (inner_y, cols) = if ty { (y[1], y[0]) } else { (y[0], y[1]) };
    assert_eq!(inner, inner_y, "matmul of {x:?} and {y:?}");
    (rows, inner, cols)
}

pub(super) fn empty(like: &T, dims: &[usize]) -> T {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(dims.to_vec()),
        DType::F32,
    )
}

/// The plain CUDA primitive behind `t`, contiguous; `None` for any other backend.
pub(super) fn prim<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<T> {
    if !enabled() {
        return None;
    }
    let t = (t as &dyn Any).downcast_ref::<Tensor<Inner, D>>()?;
    Some(into_contiguous(t.clone().into_primitive().tensor()))
}

/// Back to `B`, which the caller's `prim` proved is the plain CUDA backend.
pub(super) fn wrap<B: Backend, const D: usize>(t: T) -> Tensor<B, D> {
    let t = Tensor::<Inner, D>::from_primitive(TensorPrimitive::Float(t));
    *(Box::new(t) as Box<dyn Any>)
        .downcast::<Tensor<B, D>>()
        .expect("prim() succeeded, so B is the plain CUDA backend")
}

pub(super) fn row_cubes(rows: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static((rows as u32).div_ceil(ROW_PLANES), 1, 1),
        CubeDim::new_2d(32, ROW_PLANES),
    )
}

fn flat_cubes(n: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static((n as u32).div_ceil(256), 1, 1),
        CubeDim::new_1d(256),
    )
}

pub(super) fn arr(t: &T) -> ArrayArg<CudaRuntime> {
    let len = t.meta.shape().iter().product();
    // SAFETY: `t` is contiguous (made so by `prim`/`empty`), so its buffer holds `len` values.
    unsafe { ArrayArg::from_raw_parts(t.handle.clone(), len) }
}

/// RMSNorm of `x [b, t, h]` by `w [h]`: `(y, inv [b, t, 1])`.
pub fn try_rms_norm<B: Backend>(
    x: &Tensor<B, 3>,
    w: &Tensor<B, 1>,
    eps: f64,
) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
    let xp = prim(x)?;
    let wp = prim(w)?;
    let [b, t, h] = x.dims();
    let y = empty(&xp, &[b, t, h]);
    let inv = empty(&xp, &[b, t, 1]);
    let (count, dim) = row_cubes(b * t);
    // SAFETY: buffers hold rows * width (x, y), width (w) and rows (inv) values.
    unsafe {
        rms_norm_fwd::launch_unchecked::<CudaRuntime>(
            &xp.client,
            count,
            dim,
            arr(&xp),
            arr(&wp),
            arr(&y),
            arr(&inv),
            b * t,
            h,
            eps as f32,
        )
    };
    Some((wrap(y), wrap(inv)))
}

/// `res + d(RMSNorm)/dx` applied to `dy` (see `train_kernels::rms_norm_bwd`).
pub fn try_rms_backward<B: Backend>(
    res: &Tensor<B, 3>,
    dy: &Tensor<B, 3>,
    x: &Tensor<B, 3>,
    inv: &Tensor<B, 3>,
    w: &Tensor<B, 1>,
) -> Option<Tensor<B, 3>> {
    let (rp, dyp, xp, ip, wp) = (prim(res)?, prim(dy)?, prim(x)?, prim(inv)?, prim(w)?);
    let [b, t, h] = x.dims();
    let dx = empty(&xp, &[b, t, h]);
    let (count, dim) = row_cubes(b * t);
    // SAFETY: as in `try_rms_norm`; every [b, t, h] buffer is contiguous.
    unsafe {
        rms_norm_bwd::launch_unchecked::<CudaRuntime>(
            &xp.client,
            count,
            dim,
            arr(&dyp),
            arr(&xp),
            arr(&ip),
            arr(&wp),
            arr(&rp),
            arr(&dx),
            b * t,
            h,
        )
    };
    Some(wrap(dx))
}

/// `silu(gate) * up`.
pub fn try_swiglu<B: Backend>(gate: &Tensor<B, 3>, up: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    let (g, u) = (prim(gate)?, prim(up)?);
    let dims = gate.dims();
    let n: usize = dims.iter().product();
    if !dims[2].is_multiple_of(2) {
        return None;
    }
    let y = empty(&g, &dims);
    // The kernel's bf16 output and LoRA inputs, unused here (their flags are off): a one-value
    // placeholder.
    let unused = empty(&g, &[1]);
    let (count, dim) = flat_cubes(n / 2);
    // SAFETY: three contiguous buffers of n values (the kernel takes pairs and bounds-checks
    // n / 2); without its bf16 flag the kernel never touches its fourth array.
    unsafe {
        super::decode_kernels::silu_mul::launch_unchecked::<CudaRuntime>(
            &g.client,
            count,
            dim,
            arr(&g),
            arr(&u),
            arr(&y),
            arr(&unused),
            n / 2,
            dims[2],
            dims[2],
            0,
            arr(&unused),
            arr(&unused),
            0,
            0,
            0.0,
            false,
            false,
        )
    };
    Some(wrap(y))
}

/// `(dgate, dup)` of `act = silu(gate) * up` from `dact`, written over `gate` and `up` when
/// nothing else holds their buffers (else over copies). `Err` gives the inputs back when `B` is
/// not the CUDA backend.
#[allow(clippy::type_complexity)]
pub fn try_swiglu_backward<B: Backend>(
    dact: &Tensor<B, 3>,
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
) -> Result<(Tensor<B, 3>, Tensor<B, 3>), (Tensor<B, 3>, Tensor<B, 3>)> {
    let Some(d) = prim(dact) else {
        return Err((gate, up));
    };
    let own = |t: Tensor<B, 3>| {
        let t = (Box::new(t) as Box<dyn Any>)
            .downcast::<Tensor<Inner, 3>>()
            .expect("the CUDA backend, as dact showed");
        let p = into_contiguous(t.into_primitive().tensor());
        if p.can_mut() {
            p
        } else {
            // A buffer shared with another tensor is copied before being overwritten.
            let copy = Tensor::<Inner, 3>::from_primitive(TensorPrimitive::Float(p)) * 1.0;
            into_contiguous(copy.into_primitive().tensor())
        }
    };
    let (g, u) = (own(gate), own(up));
    let n = g.meta.shape().iter().product();
    let (count, dim) = flat_cubes(n);
    // SAFETY: three contiguous buffers of n values; the kernel bounds-checks n.
    unsafe {
        swiglu_bwd::launch_unchecked::<CudaRuntime>(
            &g.client,
            count,
            dim,
            arr(&d),
            arr(&g),
            arr(&u),
            n,
        )
    };
    Ok((wrap(g), wrap(u)))
}

/// `[b, t, heads * d] -> [b, heads, t, d]`, RoPE-rotated when `rope` gives `(cos, sin)`.
pub fn try_to_heads<B: Backend>(
    x: &Tensor<B, 3>,
    heads: usize,
    rope: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
) -> Option<Tensor<B, 4>> {
    heads_kernel::<B>(&prim(x)?, x.dims()[0], x.dims()[1], heads, rope, false).map(wrap)
}

/// `[b, heads, t, d] -> [b, t, heads * d]`, rotated back by minus the RoPE angle when `rope`
/// gives `(cos, sin)` (the gradient of [`try_to_heads`]).
pub fn try_from_heads<B: Backend>(
    x: &Tensor<B, 4>,
    rope: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
) -> Option<Tensor<B, 3>> {
    let [b, heads, t, _] = x.dims();
    heads_kernel::<B>(&prim(x)?, b, t, heads, rope, true).map(wrap)
}

fn heads_kernel<B: Backend>(
    x: &T,
    b: usize,
    t: usize,
    heads: usize,
    rope: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
    back: bool,
) -> Option<T> {
    let n: usize = x.meta.shape().iter().product();
    let d = n / (b * t * heads);
    let out = if back {
        empty(x, &[b, t, heads * d])
    } else {
        empty(x, &[b, heads, t, d])
    };
    let (cos, sin) = match rope {
        Some((c, s)) => (prim(c)?, prim(s)?),
        None => (x.clone(), x.clone()),
    };
    let (count, dim) = flat_cubes(n / 2);
    // SAFETY: x and out hold b * t * heads * d values, cos/sin b * t * d/2 (read only when
    // rotating); the kernel bounds-checks its unit index.
    unsafe {
        rope_transpose::launch_unchecked::<CudaRuntime>(
            &x.client,
            count,
            dim,
            arr(x),
            arr(&cos),
            arr(&sin),
            arr(&out),
            b,
            t,
            heads,
            d,
            rope.is_some(),
            back,
        )
    };
    Some(out)
}

/// `alpha op(x) op(y)` for row-major matrices (`op` transposes when asked), through cuBLASLt in
/// TF32: the LoRA factors' products at training shapes.
pub fn try_matmul<B: Backend>(
    x: &Tensor<B, 2>,
    y: &Tensor<B, 2>,
    tx: bool,
    ty: bool,
    alpha: f64,
) -> Option<Tensor<B, 2>> {
    let (xp, yp) = (prim(x)?, prim(y)?);
    let dims = product_dims(x.dims(), y.dims(), tx, ty);
    let out = empty(&xp, &[dims.0, dims.2]);
    row_gemm(1, dims, &xp, &yp, tx, ty, (alpha as f32, 0.0), &out);
    Some(wrap(out))
}

/// `acc + alpha op(x) op(y)`, accumulated in place into `acc`'s buffer by the GEMM (beta = 1)
/// when `acc` is a plain CUDA tensor nobody else holds; otherwise `Err(acc)` for the caller's
/// reference path.
pub fn try_matmul_acc<B: Backend>(
    acc: Tensor<B, 2>,
    x: &Tensor<B, 2>,
    y: &Tensor<B, 2>,
    tx: bool,
    ty: bool,
    alpha: f64,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let (Some(xp), Some(yp)) = (prim(x), prim(y)) else {
        return Err(acc);
    };
    let acc = match (Box::new(acc) as Box<dyn Any>).downcast::<Tensor<Inner, 2>>() {
        Ok(a) => *a,
        Err(a) => return Err(*a.downcast::<Tensor<B, 2>>().expect("the same type")),
    };
    let ap = acc.into_primitive().tensor();
    if !ap.can_mut() || !ap.is_contiguous() {
        return Err(wrap(ap));
    }
    let dims = product_dims(x.dims(), y.dims(), tx, ty);
    assert_eq!(
        ap.meta.shape().to_vec(),
        vec![dims.0, dims.2],
        "accumulator shape"
    );
    row_gemm(1, dims, &xp, &yp, tx, ty, (alpha as f32, 1.0), &ap);
    Ok(wrap(ap))
}

/// The sum of squares of each tensor of `ts`: one single-cube launch per tensor into one small
/// buffer, read back once (the tensor-op path is two launches and one blocking read per tensor,
/// hundreds per step for an adapter on every projection). `None` on other backends.
pub fn try_sum_squares<B: Backend>(ts: &[Tensor<B, 2>]) -> Option<Result<Vec<f32>>> {
    let prims: Vec<T> = ts.iter().map(prim).collect::<Option<_>>()?;
    let first = prims.first()?;
    let out = empty(first, &[prims.len()]);
    for (slot, t) in prims.iter().enumerate() {
        let n: usize = t.meta.shape().iter().product();
        // SAFETY: `t` holds n values, `out` one per tensor; one cube of 8 planes.
        unsafe {
            sum_squares::launch_unchecked::<CudaRuntime>(
                &t.client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(256),
                arr(t),
                n,
                arr(&out),
                slot,
                8,
            )
        };
    }
    let bytes = match first.client.read_one(out.handle.clone()) {
        Ok(b) => b,
        Err(e) => return Some(Err(anyhow::anyhow!("reading gradient norms: {e:?}"))),
    };
    Some(Ok(bytes
        .chunks_exact(4)
        .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect()))
}

/// The scalars of one AdamW step, rounded to f32 from the f64 values the tensor-op path uses.
#[derive(Debug, Clone, Copy)]
pub struct AdamwScalars {
    /// The gradient-clipping factor (1 when not clipping).
    pub clip: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    pub b1: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub eps: f32,
    /// `sqrt(1 - b2^t)`.
    pub bc2_sqrt: f32,
    /// `lr / (1 - b1^t)`.
    pub step_size: f32,
}

/// One AdamW step of one tensor in one launch (`train_kernels::adamw_step`): the new
/// `(p, m, v)`, or `None` on other backends (where the tensor ops run instead).
#[allow(clippy::type_complexity)]
pub fn try_adamw<B: Backend>(
    p: &Tensor<B, 2>,
    g: &Tensor<B, 2>,
    m: &Tensor<B, 2>,
    v: &Tensor<B, 2>,
    s: &AdamwScalars,
) -> Option<(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)> {
    let (pp, gp, mp, vp) = (prim(p)?, prim(g)?, prim(m)?, prim(v)?);
    let dims = p.dims();
    let n = dims[0] * dims[1];
    let (p_out, m_out, v_out) = (empty(&pp, &dims), empty(&pp, &dims), empty(&pp, &dims));
    let (count, dim) = flat_cubes(n);
    // SAFETY: seven contiguous buffers of n values; the kernel bounds-checks n.
    unsafe {
        adamw_step::launch_unchecked::<CudaRuntime>(
            &pp.client,
            count,
            dim,
            arr(&pp),
            arr(&gp),
            arr(&mp),
            arr(&vp),
            arr(&p_out),
            arr(&m_out),
            arr(&v_out),
            n,
            s.clip,
            s.decay,
            s.b1,
            s.one_minus_b1,
            s.b2,
            s.one_minus_b2,
            s.eps,
            s.bc2_sqrt,
            s.step_size,
        )
    };
    Some((wrap(p_out), wrap(m_out), wrap(v_out)))
}

/// Token labels as a device buffer of u32 (for [`try_token_logps`] and its gradient).
fn upload_labels(like: &T, labels: &[u32]) -> ArrayArg<CudaRuntime> {
    let handle = like.client.create_from_slice(u32::as_bytes(labels));
    // SAFETY: the buffer holds `labels.len()` u32.
    unsafe { ArrayArg::from_raw_parts(handle, labels.len()) }
}

/// `log_softmax(z * inv_t)[label]` per row of the logits `z [rows, vocab]`, one launch
/// (`train_kernels::token_logp_fwd`); `None` on other backends.
pub fn try_token_logps<B: Backend>(
    z: &Tensor<B, 2>,
    labels: &[u32],
    inv_t: f32,
) -> Option<Tensor<B, 1>> {
    let [rows, vocab] = z.dims();
    assert_eq!(labels.len(), rows, "one label per row");
    // The kernel reads z[label] unchecked: out-of-range labels take the reference path.
    if labels.iter().any(|&l| l as usize >= vocab) {
        return None;
    }
    let zp = prim(z)?;
    let lp = empty(&zp, &[rows]);
    // SAFETY: z holds rows x vocab values, the labels and lp one per row; one cube per row.
    unsafe {
        token_logp_fwd::launch_unchecked::<CudaRuntime>(
            &zp.client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(256),
            arr(&zp),
            upload_labels(&zp, labels),
            vocab,
            inv_t,
            arr(&lp),
            8,
        )
    };
    Some(wrap(lp))
}

/// The gradient of [`try_token_logps`] with respect to the logits for the log-probs' gradient
/// `dl [rows]`, written over `z`'s buffer (`train_kernels::token_logp_bwd`). `Err(z)` when `B`
/// is not the CUDA backend or `z`'s buffer is shared.
pub fn try_token_logps_grad<B: Backend>(
    z: Tensor<B, 2>,
    labels: &[u32],
    dl: &Tensor<B, 1>,
    inv_t: f32,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let [rows, vocab] = z.dims();
    let Some(dlp) = prim(dl).filter(|_| labels.iter().all(|&l| (l as usize) < vocab)) else {
        return Err(z);
    };
    let zi = (Box::new(z) as Box<dyn Any>)
        .downcast::<Tensor<Inner, 2>>()
        .expect("the CUDA backend, as dl showed");
    let zp = zi.into_primitive().tensor();
    if !zp.can_mut() || !zp.is_contiguous() {
        return Err(wrap(zp));
    }
    assert_eq!(labels.len(), rows, "one label per row");
    // SAFETY: as in `try_token_logps`; the kernel writes z in place, row by row.
    unsafe {
        token_logp_bwd::launch_unchecked::<CudaRuntime>(
            &zp.client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(256),
            arr(&zp),
            upload_labels(&zp, labels),
            arr(&dlp),
            vocab,
            inv_t,
            8,
        )
    };
    Ok(wrap(zp))
}
