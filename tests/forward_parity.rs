//! The decoder's logits against Hugging Face transformers' (fixtures made by
//! scripts/fixtures/hf_forward.py), and LoRA adapters against PEFT's.
//!
//! Every case runs on each CPU backend built in: burn-ndarray with the `ndarray` feature (the
//! default), burn-candle with `candle`.

#[cfg(feature = "ndarray")]
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
