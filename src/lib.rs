//! `rlhf`: RLHF post-training (PPO, DPO, GRPO, reward modelling) of LoRA adapters on one frozen,
//! 4-bit quantized base model. See README.md for the tour and ../ARCHITECTURE.md for the design.

pub mod cli;
pub mod config;
pub mod generate;
pub mod lora;
pub mod model;
pub mod quant;
pub mod util;
