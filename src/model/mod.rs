//! The Llama-family base model: configuration, forward pass and loading.

pub mod attn_inputs;
pub(crate) mod autodiff_op;
pub mod checkpoint;
pub mod config;
pub mod export;
pub mod export_gguf;
pub mod gguf_source;
pub mod linear;
pub mod llama;
pub mod load;
pub mod logps;
pub mod lora;
pub mod ops;
pub mod reward_model;
pub mod row_chunks;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{Batch, KvCache, Llama};
pub use load::{LoadOptions, TensorSource};
