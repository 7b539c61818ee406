//! Checks the CUDA attention (`rlhf::cuda::attention`) in both its regimes, whole scores and
//! query blocks, against burn's own ops and autodiff on the same GPU, on random inputs: grouped
//! heads 8:1 and 1:1, left-padded rows, a sliding window, a KV-cache call (queries after cached
//! keys), T in {128, 1024, 8192}. Then measures the memory of the query-block regime's forward
//! and backward at T in {2K, 4K, 8K, 16K} (GPU only):
//!
//!     cargo build --release --features cuda --example attention_check
//!     target/release/examples/attention_check
//!
//! Compared: the output and the three input gradients, as max |difference| / max |reference|
//! over the valid query rows (a padding query sees no key; the regimes may fill its row
//! differently, and no loss reads it). Prints JSON lines; exits 1 when a relative difference
//! reaches 1e-2.

use burn::backend::Autodiff;
use burn::tensor::{activation, backend::Backend, Bool, Distribution, Tensor, TensorData};
use rlhf::cuda::attention::{try_attention, try_attention_backward, try_key_bias, KeyRule};
use rlhf::cuda::memory_usage;
use rlhf::cuda::qlinear::Inner;
use rlhf::model::llama::KeyMask;
use rlhf::model::ops::{attention_backward_slice, attention_query_block, set_attention_bounds};
use std::time::Instant;

type Ad = Autodiff<Inner>;

/// The reference: grouped heads expanded, dense mask, softmax, by burn's ops.
fn reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, nh, t, _] = q.dims();
    let [_, nkv, total, d] = k.dims();
    let rep = nh / nkv;
    let expand = |x: Tensor<B, 4>| {
        x.unsqueeze_dim::<5>(2)
            .expand([b, nkv, rep, total, d])
            .reshape([b, nh, total, d])
    };
    let s = q.matmul(expand(k).swap_dims(2, 3)) * scale;
    let s = s.mask_fill(mask.expand([b, nh, t, total]), -1.0e30);
    activation::softmax(s, 3).matmul(expand(v))
}

/// max |a - b| / max |b|.
fn rel<const D: usize>(a: Tensor<Inner, D>, b: Tensor<Inner, D>) -> f64 {
    let a = a.into_data().to_vec::<f32>().unwrap();
    let b = b.into_data().to_vec::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) as f64;
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    d as f64 / scale
}

struct Case {
    name: &'static str,
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    past: usize,
    d: usize,
    pad: bool,
    window: usize,
}

/// Compares one case in one regime; returns the largest relative difference.
fn check(c: &Case, blocked: bool, device: &cubecl::cuda::CudaDevice) -> f64 {
    let total = c.past + c.t;
    let key_valid: Vec<Vec<bool>> = (0..c.b)
        .map(|r| {
            let pad = if c.pad {
                (r * 37) % (total / 3).max(1)
            } else {
                0
            };
            (0..total).map(|i| i >= pad).collect()
        })
        .collect();
    let keys = KeyMask {
        key_valid: key_valid.clone(),
        past: c.past,
        window: (c.window > 0).then_some(c.window),
    };
    let rule = KeyRule {
        past: c.past,
        window: c.window,
    };
    let normal = Distribution::Normal(0.0, 1.0);
    let q = Tensor::<Inner, 4>::random([c.b, c.nh, c.t, c.d], normal, device);
    let k = Tensor::<Inner, 4>::random([c.b, c.nkv, total, c.d], normal, device);
    let v = Tensor::<Inner, 4>::random([c.b, c.nkv, total, c.d], normal, device);
    // Valid query rows: 1, padding queries 0 (their gradient is zero, as in the model).
    let qvalid: Vec<f32> = key_valid
        .iter()
        .flat_map(|r| r[c.past..].iter().map(|&ok| if ok { 1.0 } else { 0.0 }))
        .collect();
    let qmask = Tensor::<Inner, 4>::from_data(TensorData::new(qvalid, [c.b, 1, c.t, 1]), device);
    let dout = Tensor::<Inner, 4>::random([c.b, c.nh, c.t, c.d], normal, device) * qmask.clone();
    let scale = 1.0 / (c.d as f64).sqrt();

    // Reference forward and gradients by burn's autodiff.
    let (qa, ka, va) = (
        Tensor::<Ad, 4>::from_inner(q.clone()).require_grad(),
        Tensor::<Ad, 4>::from_inner(k.clone()).require_grad(),
        Tensor::<Ad, 4>::from_inner(v.clone()).require_grad(),
    );
    let out_ref = reference(
        qa.clone(),
        ka.clone(),
        va.clone(),
        keys.dense(device),
        scale,
    );
    let grads = (out_ref.clone() * Tensor::<Ad, 4>::from_inner(dout.clone()))
        .sum()
        .backward();
    let (dq_ref, dk_ref, dv_ref) = (
        qa.grad(&grads).unwrap(),
        ka.grad(&grads).unwrap(),
        va.grad(&grads).unwrap(),
    );
    let out_ref = out_ref.inner() * qmask.clone();

    if blocked {
        // Whole scores never; blocks of a quarter of the rows at most.
        let block = (c.nh / c.nkv) * c.t.div_ceil(4) * total * 4;
        set_attention_bounds(0, block);
    } else {
        set_attention_bounds(usize::MAX, usize::MAX);
    }
    let block = attention_query_block(c.b, c.nh, c.nkv, c.t, total);
    assert_eq!(block.is_some(), blocked);
    let bias = try_key_bias::<Inner>(&key_valid, device).expect("CUDA backend");
    let out = try_attention(&q, &k, &v, (&bias, rule), scale, block).expect("CUDA backend");
    let mut high = || {};
    let slice = attention_backward_slice(c.b * c.nkv);
    let (dq, dk, dv) = try_attention_backward(
        &dout,
        (&q, &k, &v),
        (&bias, rule),
        scale,
        (block, slice, &mut high),
    )
    .expect("CUDA backend");
    let r = [
        rel(out * qmask, out_ref),
        rel(dq, dq_ref),
        rel(dk, dk_ref),
        rel(dv, dv_ref),
    ];
    println!(
        "{{\"case\": \"{}\", \"regime\": \"{}\", \"b\": {}, \"heads\": {}, \"kv_heads\": {}, \"t\": {}, \"past\": {}, \"window\": {}, \"padded\": {}, \"rel_out\": {:.3e}, \"rel_dq\": {:.3e}, \"rel_dk\": {:.3e}, \"rel_dv\": {:.3e}}}",
        c.name,
        if blocked { "query blocks" } else { "whole" },
        c.b, c.nh, c.nkv, c.t, c.past, c.window, c.pad, r[0], r[1], r[2], r[3]
    );
    r.into_iter().fold(0.0, f64::max)
}

/// The query-block regime (default bounds) at row length `t`: the allocator's in-use bytes at
/// the backward's high point, beside those of its inputs and outputs, and the time.
fn memory(t: usize, device: &cubecl::cuda::CudaDevice) {
    set_attention_bounds(0, rlhf::model::ops::ATTENTION_BLOCK_BYTES);
    let (b, nh, nkv, d) = (1, 32, 8, 128);
    let normal = Distribution::Normal(0.0, 1.0);
    let key_valid = vec![vec![true; t]];
    let rule = KeyRule { past: 0, window: 0 };
    let q = Tensor::<Inner, 4>::random([b, nh, t, d], normal, device);
    let k = Tensor::<Inner, 4>::random([b, nkv, t, d], normal, device);
    let v = Tensor::<Inner, 4>::random([b, nkv, t, d], normal, device);
    let dout = Tensor::<Inner, 4>::random([b, nh, t, d], normal, device);
    let bias = try_key_bias::<Inner>(&key_valid, device).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let _ = Inner::sync(device);
    let before = memory_usage::<Inner>(device).unwrap().0;
    let start = Instant::now();
    let block = attention_query_block(b, nh, nkv, t, t);
    let out = try_attention(&q, &k, &v, (&bias, rule), scale, block).unwrap();
    let mut at_high = 0u64;
    let mut high = || at_high = memory_usage::<Inner>(device).unwrap().0;
    let grads = try_attention_backward(
        &dout,
        (&q, &k, &v),
        (&bias, rule),
        scale,
        (block, 1, &mut high),
    )
    .unwrap();
    let _ = Inner::sync(device);
    let secs = start.elapsed().as_secs_f64();
    drop((out, grads));
    // What the op must hold anyway: its output and the three gradients.
    let io = (2 * b * nh * t * d + 2 * b * nkv * t * d) as u64 * 4;
    let extra = at_high.saturating_sub(before + io);
    println!(
        "{{\"memory\": \"query blocks\", \"t\": {t}, \"heads\": {nh}, \"kv_heads\": {nkv}, \"in_use_before_mib\": {:.1}, \"in_use_at_high_mib\": {:.1}, \"outputs_mib\": {:.1}, \"beyond_outputs_mib\": {:.1}, \"whole_scores_would_be_mib\": {:.1}, \"fwd_bwd_s\": {secs:.3}}}",
        before as f64 / 1048576.0,
        at_high as f64 / 1048576.0,
        io as f64 / 1048576.0,
        extra as f64 / 1048576.0,
        (b * nh * t * t * 4) as f64 / 1048576.0,
    );
}

fn main() {
    let device = Default::default();
    let cases = [
        Case {
            name: "gqa 8:1, padded",
            b: 2,
            nh: 8,
            nkv: 1,
            t: 128,
            past: 0,
            d: 64,
            pad: true,
            window: 0,
        },
        Case {
            name: "mha 1:1, padded, window 256",
            b: 2,
            nh: 4,
            nkv: 4,
            t: 1024,
            past: 0,
            d: 128,
            pad: true,
            window: 256,
        },
        Case {
            name: "gqa 4:1, kv cache",
            b: 2,
            nh: 8,
            nkv: 2,
            t: 96,
            past: 160,
            d: 64,
            pad: true,
            window: 0,
        },
        Case {
            name: "gqa 8:1, long",
            b: 1,
            nh: 8,
            nkv: 1,
            t: 8192,
            past: 0,
            d: 128,
            pad: true,
            window: 0,
        },
    ];
    let mut worst = 0f64;
    for c in &cases {
        for blocked in [false, true] {
            worst = worst.max(check(c, blocked, &device));
        }
    }
    println!("{{\"worst_rel\": {worst:.3e}}}");
    for t in [2048, 4096, 8192, 16384] {
        memory(t, &device);
    }
    if worst >= 1e-2 {
        std::process::exit(1);
    }
}
