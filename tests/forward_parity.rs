//! The decoder's logits against Hugging Face transformers' (fixtures made by
//! scripts/fixtures/hf_forward.py), and LoRA adapters against PEFT's.
//!
//! Every case runs on each CPU backend built in: burn-ndarray always, burn-candle with the
//! `candle` feature.

mod ndarray {
    type B = burn::backend::NdArray<f32>;
    include!("forward_parity/cases.rs");
}

#[cfg(feature = "candle")]
#[allow(deprecated)] // burn-candle is deprecated upstream; the crate still offers it.
mod candle {
    type B = burn::backend::Candle<f32, i64>;
    include!("forward_parity/cases.rs");
}
