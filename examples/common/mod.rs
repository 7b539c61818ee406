//! Helpers the GPU check examples share (`mod common;` in each). Not an example itself: cargo
//! only builds `examples/*.rs` and `examples/*/main.rs`.

// Each example uses a subset.
#![allow(dead_code)]

use burn::tensor::{backend::Backend, Distribution, Tensor};
use rlhf::config::{LoraConfig, ALL_TARGETS};
use rlhf::model::lora::Adapter;
use rlhf::model::{Llama, LoadOptions};

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The model in `dir` with an NF4 base.
pub fn load_nf4<B: Backend>(dir: &str, device: &B::Device) -> anyhow::Result<Llama<B>> {
    Llama::<B>::from_hf_dir(
        std::path::Path::new(dir),
        LoadOptions { quantize: true },
        device,
    )
}

/// The benchmark's LoRA: r 16, alpha 32, no dropout, all seven projections.
pub fn lora_config() -> LoraConfig {
    LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
    }
}

/// An adapter for `model` whose factors are all random (B too, so its delta is not zero).
pub fn random_adapter<B: Backend>(model: &Llama<B>) -> anyhow::Result<Adapter<B>> {
    let device = &model.device;
    let mut adapter = Adapter::<B>::new("policy", &lora_config(), &model.cfg, 3, device)?;
    let ts: Vec<Tensor<B, 2>> = adapter
        .tensors()
        .into_iter()
        .map(|t| Tensor::random(t.dims(), Distribution::Uniform(-0.05, 0.05), device))
        .collect();
    adapter.set_tensors(ts.into_iter());
    Ok(adapter)
}

/// The same adapter's values on another backend (the f32 CPU reference).
pub fn copy_adapter<A: Backend, B: Backend>(
    adapter: &Adapter<A>,
    model: &Llama<B>,
) -> anyhow::Result<Adapter<B>> {
    let device = &model.device;
    let mut c = Adapter::<B>::new("policy", &lora_config(), &model.cfg, 3, device)?;
    let ts: Vec<Tensor<B, 2>> = adapter
        .tensors()
        .into_iter()
        .map(|t| Tensor::from_data(t.into_data(), device))
        .collect();
    c.set_tensors(ts.into_iter());
    Ok(c)
}
