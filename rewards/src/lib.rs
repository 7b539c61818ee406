//! Reward functions for GRPO and PPO: TRL-style reward functions written in Rust.
//!
//! - [`RewardFn`]: scores a batch of (prompt, completion, extra columns) rows, one
//!   `Option<f32>` per row (`None` = not applicable, TRL's `None`).
//! - [`RewardSet`]: several weighted functions combined exactly as TRL's `GRPOTrainer` does
//!   (NaN-skipping weighted sum, NaN for rows no function scored), with TRL's metrics.
//! - [`RewardConfig`]: the run config's reward entries, built into functions: exact numeric
//!   answer, regex, length penalty, contains / excludes, plugins and commands.
//! - [`command`]: reward code out of process (JSON lines over a worker's stdin/stdout, with a
//!   timeout per call and restart on crash), for `type = "command"` and isolated plugins.
//! - [`plugin`]: the C ABI of reward plugins (shared libraries) and [`export_plugin!`] to
//!   write one in Rust; [`PluginReward`] loads one.
//!
//! Plugin crates depend on this crate with `default-features = false`: they get only
//! [`plugin`] and [`export_plugin!`]; the rest is behind the default `host` feature.

pub mod plugin;

#[cfg(feature = "host")]
mod builtins;
#[cfg(feature = "host")]
mod combine;
#[cfg(feature = "host")]
pub mod command;
#[cfg(feature = "host")]
pub mod config;
#[cfg(feature = "host")]
mod loader;
#[cfg(feature = "host")]
mod reward;

#[cfg(feature = "host")]
pub use builtins::{extract_answer, Contains, ExactAnswer, LengthPenalty, RegexMatch};
#[cfg(feature = "host")]
pub use combine::{nanmean, nanstd, RewardScores, RewardSet};
#[cfg(feature = "host")]
pub use command::CommandReward;
#[cfg(feature = "host")]
pub use config::RewardConfig;
#[cfg(feature = "host")]
pub use loader::PluginReward;
#[cfg(feature = "host")]
pub use reward::{Columns, FnReward, RewardBatch, RewardFn};
