//! `rlhf`: RLHF post-training (PPO, DPO, ORPO, CPO/SimPO, KTO, GRPO, RLOO, reward modelling) of
//! LoRA adapters on one frozen, 4-bit quantized base model. See README.md for the tour and
//! ARCHITECTURE.md for the design.

pub mod alloc;
pub mod cli;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod devmem;
pub mod engine;
pub mod finite;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod oom;
pub mod optim;
pub mod phase_clock;
pub mod plan;
pub mod quant;
pub mod rundir;
pub mod switches;
pub mod tokenizer;
pub mod train;
pub mod util;
