//! Trainer trait and the RLHF algorithms. This crate knows nothing of NF4, safetensors or CUDA:
//! it talks to the model through [`trainer::PolicyModel`].

pub mod dpo;
pub mod grpo;
pub mod losses;
pub mod ppo;
pub mod rm;
pub mod trainer;
