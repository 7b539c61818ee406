//! Trainer trait and the RLHF algorithms. This crate knows nothing of NF4, safetensors or CUDA:
//! it talks to the model through [`trainer::PolicyModel`].

pub mod cpo;
pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod losses;
pub mod options;
pub mod orpo;
pub mod ppo;
pub mod rm;
pub mod sft;
pub mod trainer;
