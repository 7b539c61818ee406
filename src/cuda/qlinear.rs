//! The frozen base's linear op on CUDA: `y = x @ W^T`, backward `dx = dy @ W`, no weight gradient.
//!
//! Many rows (prefill, training): `W` is dequantized by a CubeCL kernel into a short-lived bf16
//! workspace, `x` is cast to bf16, and cuBLASLt multiplies with f32 accumulation and f32 output.
//! The backward dequantizes again instead of keeping the dense weight alive in the graph: the
//! autodiff node's state is the 4-bit weight itself. Few rows (decode): the fused NF4 GEMV
//! kernel reads each 4-bit weight once and never writes a dense copy.

use super::blas::GemmShape;
use super::kernels::{
    f32_gemv, f32_to_bf16, nf4_dequant_bf16, nf4_dequant_bf16_3, nf4_gemv_fused, WORD,
};
use crate::quant::nf4::{dynamic_map_signed, Nf4Tensor, BLOCK_SIZE, NF4_CODE};
use anyhow::{ensure, Context, Result};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_autodiff::checkpoint::{base::Checkpointer, strategy::NoCheckpointing};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::sync::Arc;

/// The CUDA backend the engine runs on (`burn::backend::Cuda<f32, i32>` without fusion).
pub type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
/// Its autodiff wrapper, as the training commands use it.
pub type Ad = Autodiff<Inner>;

/// Up to this many rows, the forward takes the fused NF4 GEMV (one launch, no workspace) instead
/// of dequantize + GEMM: decode-sized batches outside the fused decode.
pub const GEMV_MAX_ROWS: usize = 16;
/// Planes per cube of the f32 GEMV (they split each output's row).
const GEMV_PLANES: u32 = 8;

/// The NF4 GEMV's launch shape when set for tuning (`examples/qlinear_bench.rs`): planes per
/// cube and output features per plane; `None` picks by output width ([`gemv_shape`]).
static NF4_GEMV_SHAPE: std::sync::Mutex<Option<(u32, usize)>> = std::sync::Mutex::new(None);

/// Sets the NF4 GEMV's planes per cube and outputs per plane (1, 2, 4 or 8); `None` restores
/// the choice by output width.
pub fn set_nf4_gemv_shape(shape: Option<(u32, usize)>) {
    *NF4_GEMV_SHAPE.lock().unwrap_or_else(|e| e.into_inner()) =
        shape.map(|(p, o)| (p.max(1), o.clamp(1, 8)));
}

/// Planes per cube and outputs per plane of the NF4 GEMV for `out` output features: two
/// outputs per plane, and eight planes per cube on wide layers (measured on an H100, 2026-11-23:
/// (4, 2) was fastest at the 0.5b shapes, (8, 2) at 4096 -> 14336; four outputs per plane cost
/// more in registers than they saved in shared-memory reads).
fn gemv_shape(out: usize) -> (u32, usize) {
    if let Some(shape) = *NF4_GEMV_SHAPE.lock().unwrap_or_else(|e| e.into_inner()) {
        return shape;
    }
    (if out >= 8192 { 8 } else { 4 }, 2)
}

/// A frozen weight `[out, in]` resident on the GPU.
#[derive(Debug)]
enum Stored {
    /// bitsandbytes NF4 + double quant, see `kernels` for the layout.
    Nf4(Nf4Args),
    /// A dense bf16 copy (unquantized bases and the LM head).
    Bf16(CubeTensor<CudaRuntime>),
}

/// An NF4 weight's device arrays, as the kernels take them (`kernels` describes the layout).
#[derive(Debug, Clone)]
pub struct Nf4Args {
    pub packed: Handle,
    pub codes: Handle,
    pub nested: Handle,
    pub code2: Handle,
    /// The 16 NF4 levels.
    pub nf4: Handle,
    pub offset: f32,
    /// Packed u32 words (8 values each).
    pub words: usize,
    pub nested_len: usize,
    /// u32 words of the 8-bit absmax codes.
    pub code_words: usize,
}

/// One frozen linear layer on the GPU; shared by the forward and its autodiff node.
#[derive(Debug)]
pub struct GpuLinear {
    stored: Stored,
    out_features: usize,
    in_features: usize,
    device: CudaDevice,
}

fn upload_u32(client: &ComputeClient<CudaRuntime>, bytes: &[u8]) -> (Handle, usize) {
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().div_ceil(4) * 4, 0);
    let words = padded.len() / 4;
    (client.create_from_slice(&padded), words)
}

fn upload_f32(client: &ComputeClient<CudaRuntime>, values: &[f32]) -> Handle {
    client.create_from_slice(f32::as_bytes(values))
}

impl GpuLinear {
    /// Uploads an NF4 weight once (bytes as stored: 4.127 bits per value). `None` when its
    /// shape does not fit the kernels' word layout (the caller keeps the reference path).
    pub fn from_nf4(q: &Nf4Tensor, device: &CudaDevice) -> Option<Self> {
        let [out_features, in_features] = q.shape[..] else {
            return None;
        };
        if in_features % WORD != 0 || (out_features * in_features) % BLOCK_SIZE != 0 {
            return None;
        }
        let client = CudaRuntime::client(device);
        let (packed, words) = upload_u32(&client, &q.packed);
        let (codes, code_words) = upload_u32(&client, &q.absmax_codes);
        let stored = Stored::Nf4(Nf4Args {
            packed,
            codes,
            nested: upload_f32(&client, &q.nested_absmax),
            code2: upload_f32(&client, &dynamic_map_signed()),
            nf4: upload_f32(&client, &NF4_CODE),
            offset: q.offset,
            words,
            nested_len: q.nested_absmax.len(),
            code_words,
        });
        Some(Self {
            stored,
            out_features,
            in_features,
            device: device.clone(),
        })
    }

    /// Keeps a bf16 copy of a dense f32 weight `[out, in]` already on the GPU.
    pub fn from_dense(w: CubeTensor<CudaRuntime>) -> Option<Self> {
        let dims = w.meta.shape().to_vec();
        let [out_features, in_features] = dims[..] else {
            return None;
        };
        let device = w.device.clone();
        let w = into_contiguous(cast(into_contiguous(w), DType::BF16));
        Some(Self {
            stored: Stored::Bf16(w),
            out_features,
            in_features,
            device,
        })
    }

    pub fn client(&self) -> ComputeClient<CudaRuntime> {
        CudaRuntime::client(&self.device)
    }

    /// The weight as a dense bf16 `[out, in]` tensor: a fresh workspace for NF4.
    pub fn dense_bf16(&self) -> CubeTensor<CudaRuntime> {
        match &self.stored {
            Stored::Bf16(w) => w.clone(),
            Stored::Nf4(_) => {
                let out = empty_device_contiguous_dtype(
                    self.client(),
                    self.device.clone(),
                    Shape::new([self.out_features, self.in_features]),
                    DType::BF16,
                );
                self.dequant_into(&out, 0);
                out
            }
        }
    }

    /// Dequantizes an NF4 weight into `ws` from bf16 value `at` on (even; `ws` holds at least
    /// `at + out * in` bf16 values, the weight as `[out, in]` row-major); a dense weight launches
    /// nothing.
    pub fn dequant_into(&self, ws: &CubeTensor<CudaRuntime>, at: usize) {
        let Stored::Nf4(Nf4Args {
            packed,
            codes,
            nested,
            code2,
            nf4,
            offset,
            words,
            nested_len,
            code_words,
        }) = &self.stored
        else {
            return;
        };
        let cubes = (words * 4).div_ceil(256) as u32;
        // SAFETY: every array length matches its buffer (`ws` holds at / 2 + words * 4 u32: the
        // caller's promise); the kernel bounds-checks its index against words * 4.
        unsafe {
            nf4_dequant_bf16::launch_unchecked::<CudaRuntime>(
                &self.client(),
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_1d(256),
                ArrayArg::from_raw_parts(packed.clone(), *words),
                ArrayArg::from_raw_parts(codes.clone(), *code_words),
                ArrayArg::from_raw_parts(nested.clone(), *nested_len),
                ArrayArg::from_raw_parts(code2.clone(), 256),
                ArrayArg::from_raw_parts(nf4.clone(), 16),
                *offset,
                *words,
                ArrayArg::from_raw_parts(ws.handle.clone(), at / 2 + words * 4),
                at / 2,
            )
        };
    }

    /// Member `i` of a group of up to three NF4 weights launched together, and whether it is
    /// there: an absent member (`i >= lins.len()`) is the first one's arrays, passed to fill the
    /// kernel's argument group and never read. The caller checked that every member is NF4.
    pub fn group_member<'a>(lins: &[&'a GpuLinear], i: usize) -> (&'a Nf4Args, bool) {
        let present = i < lins.len();
        let args = lins[if present { i } else { 0 }]
            .nf4_args()
            .expect("the caller checked that every member is NF4");
        (args, present)
    }

    /// [`Self::dequant_into`] of up to three NF4 weights with the same `in_features` side by
    /// side (`[sum of out, in]` from bf16 value `at` on), in one launch
    /// (`kernels::nf4_dequant_bf16_3`): the decode's q/k/v and gate/up groups. Returns `false`
    /// (and launches nothing) for more than three weights or any dense one.
    pub fn dequant_group_into(
        lins: &[&GpuLinear],
        ws: &CubeTensor<CudaRuntime>,
        at: usize,
    ) -> bool {
        if lins.is_empty() || lins.len() > 3 || !lins.iter().all(|l| l.nf4_args().is_some()) {
            return false;
        }
        // Member i's argument group, in the kernel's order (packed, codes, nested, code2, offset,
        // words); absent members have no words (their arrays are never read).
        let member = |i: usize| {
            let (m, present) = Self::group_member(lins, i);
            let words = if present { m.words } else { 0 };
            // SAFETY: the lengths recorded at upload (packed at least one word when absent).
            let arg = |h: &Handle, len: usize| unsafe { ArrayArg::from_raw_parts(h.clone(), len) };
            (
                arg(&m.packed, words.max(1)),
                arg(&m.codes, m.code_words),
                arg(&m.nested, m.nested_len),
                arg(&m.code2, 256),
                m.offset,
                words,
            )
        };
        let (p0, c0, n0, q0, o0, w0) = member(0);
        let (p1, c1, n1, q1, o1, w1) = member(1);
        let (p2, c2, n2, q2, o2, w2) = member(2);
        let total = w0 + w1 + w2;
        let first = lins[0];
        let nf4 = &Self::group_member(lins, 0).0.nf4;
        // SAFETY: each member's arrays have the lengths recorded at upload; `ws` holds at / 2 +
        // total * 4 u32 (the caller's promise); the kernel bounds-checks against total * 4.
        unsafe {
            nf4_dequant_bf16_3::launch_unchecked::<CudaRuntime>(
                &first.client(),
                CubeCount::Static((total * 4).div_ceil(256) as u32, 1, 1),
                CubeDim::new_1d(256),
                p0,
                c0,
                n0,
                q0,
                o0,
                w0,
                p1,
                c1,
                n1,
                q1,
                o1,
                w1,
                p2,
                c2,
                n2,
                q2,
                o2,
                w2,
                ArrayArg::from_raw_parts(nf4.clone(), 16),
                ArrayArg::from_raw_parts(ws.handle.clone(), at / 2 + total * 4),
                at / 2,
            )
        };
        true
    }

    /// `x [rows, in] (f32) -> [rows, out] (f32)`.
    pub fn forward(&self, x: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>> {
        // cuBLAS and the kernels index densely: packed row-major strides.
        let x = into_contiguous(x);
        let rows = x.meta.shape()[0];
        ensure!(
            x.meta.shape()[1] == self.in_features,
            "qlinear: input has {} features, weight expects {}",
            x.meta.shape()[1],
            self.in_features
        );
        if rows <= GEMV_MAX_ROWS {
            if let Stored::Nf4(_) = self.stored {
                return Ok(self.gemv(x, rows));
            }
        }
        // Row-major x [rows, in] and W [out, in] are column-major [in, rows] and [in, out]:
        // y^T [out, rows] = W^T-of-that · x, i.e. op(A) = A^T with A = W.
        let (o, i, n) = (
            self.out_features as u64,
            self.in_features as u64,
            rows as u64,
        );
        let shape = GemmShape::bf16(true, false, o, n, i, i as i64, i as i64, o as i64);
        self.with_weight(x, shape)
    }

    /// `dy [rows, out] (f32) -> dx = dy @ W [rows, in] (f32)`.
    pub fn backward(&self, dy: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>> {
        let rows = dy.meta.shape()[0];
        // Column-major: dx^T [in, rows] = W_c [in, out] · dy^T [out, rows].
        let (o, i, n) = (
            self.out_features as u64,
            self.in_features as u64,
            rows as u64,
        );
        let shape = GemmShape::bf16(false, false, i, n, o, i as i64, o as i64, i as i64);
        self.with_weight(dy, shape)
    }

    /// One GEMM of the dequantized weight with `input` (f32, cast to bf16 here): the f32 result
    /// `[n, m]` row-major, i.e. cuBLAS' column-major `[m, n]` of `shape`.
    fn with_weight(
        &self,
        input: CubeTensor<CudaRuntime>,
        shape: GemmShape,
    ) -> Result<CubeTensor<CudaRuntime>> {
        let input = to_bf16(into_contiguous(input));
        let w = self.dense_bf16();
        let out = self.empty_f32(shape.n as usize, shape.m as usize);
        self.gemm(shape, &w, &input, &out)?;
        Ok(out)
    }

    fn empty_f32(&self, rows: usize, cols: usize) -> CubeTensor<CudaRuntime> {
        empty_device_contiguous_dtype(
            self.client(),
            self.device.clone(),
            Shape::new([rows, cols]),
            DType::F32,
        )
    }

    /// One cuBLASLt GEMM over these buffers (public for the throughput benchmark).
    pub fn gemm(
        &self,
        shape: GemmShape,
        a: &CubeTensor<CudaRuntime>,
        b: &CubeTensor<CudaRuntime>,
        d: &CubeTensor<CudaRuntime>,
    ) -> Result<()> {
        super::gemm::gemm(shape, 1.0, 0.0, a, b, d).context("qlinear GEMM")
    }

    fn gemv(&self, x: CubeTensor<CudaRuntime>, rows: usize) -> CubeTensor<CudaRuntime> {
        let y = self.empty_f32(rows, self.out_features);
        let launched = self.gemv_into(&x, rows, &y);
        assert!(launched, "gemv is only called for NF4 weights");
        y
    }

    /// `y = x [rows, in] @ W^T` in one launch (`kernels::nf4_gemv_fused`), `y` `[rows, out]`
    /// contiguous; false (nothing launched) for a dense weight. `x` must be contiguous, `rows`
    /// at most [`GEMV_MAX_ROWS`].
    pub fn gemv_into(
        &self,
        x: &CubeTensor<CudaRuntime>,
        rows: usize,
        y: &CubeTensor<CudaRuntime>,
    ) -> bool {
        let Stored::Nf4(Nf4Args {
            packed,
            codes,
            nested,
            code2,
            nf4,
            offset,
            words,
            nested_len,
            code_words,
        }) = &self.stored
        else {
            return false;
        };
        let client = self.client();
        let (planes, outs) = gemv_shape(self.out_features);
        let cubes = (self.out_features as u32).div_ceil(planes * outs as u32);
        // SAFETY: lengths match the buffers; each plane bounds-checks its output feature.
        unsafe {
            nf4_gemv_fused::launch_unchecked::<CudaRuntime>(
                &client,
                CubeCount::Static(cubes, 1, 1),
                CubeDim::new_2d(32, planes),
                ArrayArg::from_raw_parts(x.handle.clone(), rows * self.in_features),
                ArrayArg::from_raw_parts(packed.clone(), *words),
                ArrayArg::from_raw_parts(codes.clone(), *code_words),
                ArrayArg::from_raw_parts(nested.clone(), *nested_len),
                ArrayArg::from_raw_parts(code2.clone(), 256),
                ArrayArg::from_raw_parts(nf4.clone(), 16),
                *offset,
                self.in_features,
                self.out_features,
                ArrayArg::from_raw_parts(y.handle.clone(), rows * self.out_features),
                rows,
                outs,
                planes as usize,
            )
        };
        true
    }

    /// The dense bf16 weight (`None` for NF4), for callers that run their own GEMM.
    pub fn bf16_weight(&self) -> Option<&CubeTensor<CudaRuntime>> {
        match &self.stored {
            Stored::Bf16(w) => Some(w),
            Stored::Nf4(_) => None,
        }
    }

    /// Whether the weight is stored as NF4 (the GEMV kernels' format).
    /// The NF4 weight's device arrays; `None` for a dense weight.
    pub fn nf4_args(&self) -> Option<&Nf4Args> {
        match &self.stored {
            Stored::Nf4(a) => Some(a),
            Stored::Bf16(_) => None,
        }
    }

    pub fn is_nf4(&self) -> bool {
        matches!(self.stored, Stored::Nf4(_))
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }
}

/// A contiguous f32 tensor as bf16 through our array kernel (burn's cast passes the shape and
/// strides as per-launch metadata, which costs cubecl an upload per call); odd sizes take burn's.
pub(super) fn to_bf16(x: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
    let shape = x.meta.shape().to_vec();
    let n: usize = shape.iter().product();
    if !n.is_multiple_of(2) || x.dtype != DType::F32 {
        return into_contiguous(cast(x, DType::BF16));
    }
    let out = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        Shape::from(shape),
        DType::BF16,
    );
    cast_bf16_into(&x, n, &out);
    out
}

/// Writes the first `n` (even) values of the contiguous f32 `x` as bf16 into `out`, which holds
/// at least `n` bf16 values.
pub(super) fn cast_bf16_into(x: &CubeTensor<CudaRuntime>, n: usize, out: &CubeTensor<CudaRuntime>) {
    let pairs = n / 2;
    // SAFETY: x holds n contiguous f32, out n bf16 = pairs u32; the kernel bounds-checks pairs.
    unsafe {
        f32_to_bf16::launch_unchecked::<CudaRuntime>(
            &x.client,
            CubeCount::Static((pairs as u32).div_ceil(256), 1, 1),
            CubeDim::new_1d(256),
            ArrayArg::from_raw_parts(x.handle.clone(), n),
            ArrayArg::from_raw_parts(out.handle.clone(), pairs),
            pairs,
        )
    };
}

/// The autodiff node of `qlinear`: its state is the (4-bit) weight, not a dense copy.
#[derive(Debug)]
struct QLinearBackward;

impl Backward<Inner, 1> for QLinearBackward {
    type State = Arc<GpuLinear>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let weight = ops.state;
        unary::<Inner, _>(ops.parents, ops.node, grads, |dy| {
            weight
                .backward(dy)
                .unwrap_or_else(|e| panic!("qlinear backward failed on the GPU: {e:#}"))
        });
    }
}

/// `x @ W^T` on the autodiff CUDA backend, recording the backward above.
pub fn forward_autodiff(w: &Arc<GpuLinear>, x: Tensor<Ad, 2>) -> Result<Tensor<Ad, 2>> {
    let x = x.into_primitive().tensor();
    let y = w.forward(x.primitive.clone())?;
    let y = match QLinearBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(w.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(y)))
}

/// `x @ W^T` on the plain CUDA backend (generation, scoring without graphs).
pub fn forward_inner(w: &GpuLinear, x: Tensor<Inner, 2>) -> Result<Tensor<Inner, 2>> {
    let y = w.forward(x.into_primitive().tensor())?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(y)))
}

/// `x @ w^T` for f32 `x [rows, in]` and `w [out, in]` with few rows (see `kernels::f32_gemv`);
/// `None` above [`GEMV_MAX_ROWS`] rows.
pub fn small_matmul_t(x: Tensor<Inner, 2>, w: Tensor<Inner, 2>) -> Option<Tensor<Inner, 2>> {
    let [rows, in_features] = x.dims();
    let [out_features, w_in] = w.dims();
    if rows > GEMV_MAX_ROWS || rows == 0 || w_in != in_features {
        return None;
    }
    let x = into_contiguous(x.into_primitive().tensor());
    let w = into_contiguous(w.into_primitive().tensor());
    let client = x.client.clone();
    let y = empty_device_contiguous_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([rows, out_features]),
        DType::F32,
    );
    let cubes = out_features as u32;
    // SAFETY: lengths match the contiguous buffers; each cube bounds-checks its output.
    unsafe {
        f32_gemv::launch_unchecked::<CudaRuntime>(
            &client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(32, GEMV_PLANES),
            ArrayArg::from_raw_parts(x.handle.clone(), rows * in_features),
            ArrayArg::from_raw_parts(w.handle.clone(), out_features * in_features),
            in_features,
            out_features,
            ArrayArg::from_raw_parts(y.handle.clone(), rows * out_features),
            rows,
            GEMV_PLANES as usize,
        )
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(y)))
}
