//! The Llama-family base model: configuration, forward pass and loading.

pub mod checkpoint;
pub mod config;
pub mod gguf_source;
pub mod llama;
pub mod load;
pub mod lora;

pub use config::LlamaConfig;
pub use llama::{Batch, KvCache, Llama};
pub use load::{LoadOptions, TensorSource};
