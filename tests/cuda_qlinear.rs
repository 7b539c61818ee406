//! GPU checks of the CUDA NF4 linear layer against the reference path (feature `cuda`; ignored
//! by default, they need a GPU). On the GPU machine:
//!
//!     cargo test --release --features cuda --test cuda_qlinear -- --ignored
//!
//! For random NF4 weights and inputs at training (GEMM) and decode (GEMV) shapes of the 0.5b and
//! 8b models, the fast forward (`x @ dequant(W)^T`, bf16 GEMM or fused GEMV) and its backward
//! (`dy @ dequant(W)`) must match the reference path (f32 dequant on the host + burn's f32
//! matmul) within bf16's relative L2 error; so must the few-row kernel used for LoRA factors
//! while sampling. `examples/qlinear_bench.rs` times these ops.
#![cfg(feature = "cuda")]

use burn::tensor::{Distribution, Tensor};
use rlhf::cuda::qlinear::{Ad, Inner};
use rlhf::model::linear::BaseLinear;

/// bf16 operands: relative L2 errors of a few 1e-3 are expected.
const TOLERANCE: f64 = 1e-2;

fn rel_err(a: Tensor<Inner, 2>, b: Tensor<Inner, 2>) -> f64 {
    let num = (a - b.clone()).powf_scalar(2.0).sum().into_scalar() as f64;
    let den = b.powf_scalar(2.0).sum().into_scalar() as f64;
    (num / den.max(1e-30)).sqrt()
}

/// `[out, in]` weights uniform in +-0.02 (a trained layer's scale), row-major.
fn random_linear(out: usize, inp: usize, device: &cubecl::cuda::CudaDevice) -> Vec<f32> {
    Tensor::<Inner, 2>::random([out, inp], Distribution::Uniform(-0.02, 0.02), device)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 values")
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test cuda_qlinear -- --ignored"]
fn nf4_linear_forward_and_backward_match_the_reference_path() {
    let device = Default::default();
    let shapes = [
        (1, 896, 896),
        (16, 896, 4864),
        (3, 896, 130),
        (16, 4864, 896),
        (512, 896, 128),
        (4096, 896, 4864),
        (2048, 4864, 896),
        (1024, 4096, 14336),
    ];
    let mut failed = Vec::new();
    for &(rows, inp, out) in &shapes {
        let w = random_linear(out, inp, &device);
        let lin = BaseLinear::<Ad>::new(w, out, inp, None, true, &device).unwrap();
        let x = Tensor::<Ad, 2>::random([rows, inp], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let dy = Tensor::<Ad, 2>::random([rows, out], Distribution::Normal(0.0, 1.0), &device);
        let y = lin.forward(x.clone());
        let grads = (y.clone() * dy.clone()).sum().backward();
        let dx = x.grad(&grads).expect("x has a gradient");

        let x_ref = x.clone().detach().require_grad();
        let y_ref = x_ref.clone().matmul(lin.dense_weight(&device).transpose());
        let grads_ref = (y_ref.clone() * dy).sum().backward();
        let dx_ref = x_ref.grad(&grads_ref).expect("x_ref has a gradient");

        let fwd = rel_err(y.inner(), y_ref.inner());
        let bwd = rel_err(dx, dx_ref);
        eprintln!("qlinear rows {rows} in {inp} out {out}: forward {fwd:.3e}, backward {bwd:.3e}");
        if !(fwd < TOLERANCE && bwd < TOLERANCE) {
            failed.push((rows, inp, out, fwd, bwd));
        }
    }
    assert!(
        failed.is_empty(),
        "(rows, in, out, forward, backward) over {TOLERANCE}: {failed:?}"
    );
}

/// The reference is burn-cuda's matmul, which computes in TF32 (errors ~3e-4 relative), so the
/// bound is bf16's, as above.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test cuda_qlinear -- --ignored"]
fn few_row_matmul_matches_burns_matmul() {
    let device = Default::default();
    for &(rows, inp, out) in &[(1usize, 896usize, 16usize), (16, 896, 16), (16, 16, 4864)] {
        let x = Tensor::<Inner, 2>::random([rows, inp], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Inner, 2>::random([out, inp], Distribution::Normal(0.0, 1.0), &device);
        let y = rlhf::cuda::qlinear::small_matmul_t(x.clone(), w.clone()).expect("few rows");
        let err = rel_err(y, x.matmul(w.transpose()));
        assert!(err < TOLERANCE, "rows {rows} in {inp} out {out}: {err:.3e}");
    }
}
