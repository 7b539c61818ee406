//! Times the CUDA `qlinear` op's parts (GPU only):
//!
//!     cargo build --release --features cuda --example qlinear_bench
//!     target/release/examples/qlinear_bench          # prints one JSON line per measurement
//!
//! Throughput: dequant kernel, cuBLASLt GEMM and the whole op at 4096^3, and the decode GEMV at
//! each launch shape. Its correctness against the reference path is `tests/cuda_qlinear.rs`.

mod common;

use burn::tensor::{backend::Backend, Distribution, Tensor};
use common::median;
use rlhf::cuda::qlinear::{GpuLinear, Inner};
use std::time::Instant;

fn random_linear(out: usize, inp: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..out * inp)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.04
        })
        .collect()
}

fn time<F: FnMut()>(device: &cubecl::cuda::CudaDevice, iters: usize, mut f: F) -> f64 {
    f();
    Inner::sync(device).expect("sync");
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        f();
        Inner::sync(device).expect("sync");
        times.push(t.elapsed().as_secs_f64());
    }
    median(times)
}

fn main() -> anyhow::Result<()> {
    let device = Default::default();
    // Throughput at 4096^3: dequant alone, GEMM alone (bf16 in, f32 accumulate and out), whole op.
    let n = 4096;
    let w = random_linear(n, n, 99);
    let q = rlhf::quant::nf4::Nf4Tensor::quantize(&w, &[n, n])?;
    let gpu = GpuLinear::from_nf4(&q, &device).expect("4096x4096 has a GPU form");
    let x = Tensor::<Inner, 2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
    let flops = 2.0 * (n as f64).powi(3);
    let t_dequant = time(&device, 20, || {
        let _ = gpu.dense_bf16();
    });
    let wb = gpu.dense_bf16();
    let xb = burn_cubecl::kernel::cast(
        x.clone().into_primitive().tensor(),
        burn::tensor::DType::BF16,
    );
    let yb = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        wb.client.clone(),
        device.clone(),
        burn::tensor::Shape::new([n, n]),
        burn::tensor::DType::F32,
    );
    let nn = n as u64;
    let shape =
        rlhf::cuda::blas::GemmShape::bf16(true, false, nn, nn, nn, n as i64, n as i64, n as i64);
    let t_gemm = time(&device, 20, || {
        gpu.gemm(shape, &wb, &xb, &yb).expect("gemm")
    });
    let t_op = time(&device, 20, || {
        let _ = gpu
            .forward(x.clone().into_primitive().tensor())
            .expect("forward");
    });
    // Throughput: 20 calls back to back, one synchronisation (the per-call numbers above include
    // a host round trip per call, which at 0.2 ms of GPU work is a large and host-dependent share).
    let batch = |f: &mut dyn FnMut()| {
        f();
        Inner::sync(&device).expect("sync");
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..20 {
                f();
            }
            Inner::sync(&device).expect("sync");
            times.push(t.elapsed().as_secs_f64() / 20.0);
        }
        median(times)
    };
    let b_gemm = batch(&mut || gpu.gemm(shape, &wb, &xb, &yb).expect("gemm"));
    let b_op = batch(&mut || {
        let _ = gpu
            .forward(x.clone().into_primitive().tensor())
            .expect("forward");
    });
    println!(
        "{{\"bench\":\"qlinear_4096_back_to_back\",\"gemm_ms\":{:.4},\"gemm_tflops\":{:.1},\"op_ms\":{:.4},\"op_tflops\":{:.1}}}",
        b_gemm * 1e3,
        flops / b_gemm / 1e12,
        b_op * 1e3,
        flops / b_op / 1e12
    );
    let dequant_bytes = (n * n) as f64 * (0.5 + 2.0);
    println!(
        "{{\"bench\":\"qlinear_4096\",\"gemm_ms\":{:.4},\"gemm_tflops\":{:.1},\"dequant_ms\":{:.4},\"dequant_gbps\":{:.0},\"op_ms\":{:.4},\"op_tflops\":{:.1}}}",
        t_gemm * 1e3,
        flops / t_gemm / 1e12,
        t_dequant * 1e3,
        dequant_bytes / t_dequant / 1e9,
        t_op * 1e3,
        flops / t_op / 1e12
    );

    // Decode GEMV: 16 rows through the 0.5b MLP shapes; bytes = 4-bit weights + constants.
    // Each launch shape (planes per cube, outputs per plane) is timed, then the default choice
    // by output width (planes 0).
    for &(planes, outs) in &[(4u32, 1usize), (4, 2), (4, 4), (8, 2), (2, 4), (0, 0)] {
        rlhf::cuda::qlinear::set_nf4_gemv_shape((planes > 0).then_some((planes, outs)));
        for &(inp, out) in &[
            (896usize, 896usize),
            (896, 4864),
            (4864, 896),
            (4096, 14336),
        ] {
            let w = random_linear(out, inp, 7);
            let q = rlhf::quant::nf4::Nf4Tensor::quantize(&w, &[out, inp])?;
            let gpu = GpuLinear::from_nf4(&q, &device).expect("GPU form");
            let x = Tensor::<Inner, 2>::random([16, inp], Distribution::Normal(0.0, 1.0), &device);
            // Ten launches per synchronization: one host round trip per kernel would hide it.
            let t = time(&device, 20, || {
                for _ in 0..10 {
                    let _ = gpu
                        .forward(x.clone().into_primitive().tensor())
                        .expect("gemv");
                }
            }) / 10.0;
            let bytes = q.storage_bytes() as f64;
            println!(
            "{{\"bench\":\"gemv16\",\"planes\":{planes},\"outs\":{outs},\"in\":{inp},\"out\":{out},\"us\":{:.2},\"weight_gbps\":{:.0}}}",
            t * 1e6,
            bytes / t / 1e9
        );
        }
    }
    Ok(())
}
