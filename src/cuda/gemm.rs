//! cuBLASLt GEMMs over cubecl tensors' buffers on cubecl's stream: the checked bridge from
//! tensors to the raw-pointer GEMM of `blas`.

use super::blas::{self, GemmIn, GemmShape};
use anyhow::{ensure, Result};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;

type T = CubeTensor<CudaRuntime>;

/// `alpha op(A) op(B) + beta D` over these tensors' buffers, on cubecl's stream (see `blas`).
/// Each buffer is checked to hold what the shape reads or writes.
pub fn gemm(shape: GemmShape, alpha: f32, beta: f32, a: &T, b: &T, d: &T) -> Result<()> {
    gemm_at(shape, alpha, beta, (a, 0), (b, 0), d, (d, 0))
}

/// [`gemm`] with `A`, `B` and `D` starting `offset` elements into their buffers, and `C` (the
/// `beta` term, `D`'s layout and offset) read from `c`.
pub fn gemm_at(
    shape: GemmShape,
    alpha: f32,
    beta: f32,
    (a, a_off): (&T, usize),
    (b, b_off): (&T, usize),
    c: &T,
    (d, d_off): (&T, usize),
) -> Result<()> {
    let client = d.client.clone();
    let in_bytes = match shape.input {
        GemmIn::Bf16 => 2,
        GemmIn::F32Tf32 => 4,
    };
    let (sa, sb, sd) = shape.spans();
    let mut stream = None;
    let mut ptrs = [0u64; 4];
    let operands = [
        (a, sa + a_off as u64, in_bytes, a_off as u64),
        (b, sb + b_off as u64, in_bytes, b_off as u64),
        (c, sd + d_off as u64, 4, d_off as u64),
        (d, sd + d_off as u64, 4, d_off as u64),
    ];
    // One blocking round trip to cubecl's device thread for all four (patched cubecl-runtime).
    let resources = client
        .get_resources(operands.iter().map(|o| o.0.handle.clone()).collect())
        .map_err(|e| anyhow::anyhow!("CUDA buffer: {e:?}"))?;
    for (i, ((_, span, bytes, off), res)) in operands.into_iter().zip(&resources).enumerate() {
        let r = res.resource();
        ensure!(
            span * bytes <= r.size,
            "GEMM operand {i} needs {} bytes, its buffer has {} ({shape:?})",
            span * bytes,
            r.size
        );
        ptrs[i] = r.ptr + off * bytes;
        stream.get_or_insert(r.stream);
    }
    let stream = stream.expect("four operands");
    // SAFETY: the stream is cubecl's (live while its client is), the four buffers were checked
    // above to span what the shape touches, and the tensors outlive the enqueue (later reuse of
    // their memory is ordered by the stream). A cudarc driver stream is the same handle as a
    // runtime API stream.
    unsafe {
        blas::gemm(
            d.device.index,
            stream as _,
            shape,
            alpha,
            beta,
            ptrs[0],
            ptrs[1],
            ptrs[2],
            ptrs[3],
        )
    }
}
