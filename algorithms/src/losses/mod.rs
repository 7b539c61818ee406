//! Loss functions of DPO, ORPO, CPO/SimPO, KTO, reward modelling, GRPO, RLOO and PPO.
//!
//! Plain functions over burn tensors, generic over the backend and free of any model, so each one
//! can be checked against the numbers TRL produces (tests/fixtures/trl/). Every function names
//! the TRL code it transcribes; inputs that TRL computes under `torch.no_grad()` are detached
//! here, so gradients flow exactly where TRL's do.

mod common;
pub mod cpo;
pub mod dpo;
#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod fixture_tests_ref_free;
pub mod grpo;
pub mod kto;
pub mod orpo;
pub mod ppo;
pub mod preference;
pub mod rloo;
pub mod rm;
#[cfg(test)]
mod test_util;

pub use cpo::{cpo_loss, CpoConfig, CpoLossType, CpoOutput};
pub use dpo::{dpo_loss, DpoConfig, DpoLogps, DpoLossType, DpoMetrics, DpoOutput};
pub use grpo::{
    grpo_advantages, grpo_loss, is_truncated, mask_truncated_completions, GrpoAdvantages,
    GrpoBatch, GrpoLossConfig, GrpoLossOutput, GrpoLossType, GrpoMetrics, GrpoRewardMetrics,
    ImportanceSamplingLevel, MultiObjectiveAggregation, ScaleRewards,
};
pub use kto::{kto_loss, KtoConfig, KtoLogps, KtoLossType, KtoMetrics, KtoOutput};
pub use orpo::{log1mexp, orpo_loss, OrpoConfig, OrpoOutput};
pub use ppo::{
    masked_mean, masked_var, masked_whiten, padding_masks, ppo_loss, ppo_rollout, sequence_length,
    truncate_response, KlController, KlEstimator, PpoConfig, PpoLossMetrics, PpoLossOutput,
    PpoMinibatch, PpoRollout, PpoRolloutBatch, PpoRolloutMetrics, INVALID_LOGPROB,
};
pub use preference::{
    masked_row_mean, masked_row_sum, masked_token_mean, pair_metrics, PairMetrics,
};
pub use rloo::{rloo_advantages, rloo_loss, RlooAdvantages, RlooConfig, RlooLossOutput};
pub use rm::{reward_loss, RewardLossConfig, RewardLossOutput, RewardMetrics};
