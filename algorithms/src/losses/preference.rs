//! What TRL's preference trainers (DPO, ORPO, CPO/SimPO) log about a batch of pairs.

use burn::tensor::{backend::Backend, Tensor};

use super::common::read_scalars;

/// `rewards/*` and `logps/*`, averaged over the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// Fraction of pairs whose chosen reward is strictly above the rejected one.
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl PairMetrics {
    /// The metrics under TRL's names.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

/// Reads the pair metrics (one device -> host transfer) from detached `[B]` tensors.
pub fn pair_metrics<B: Backend>(
    chosen_rewards: Tensor<B, 1>,
    rejected_rewards: Tensor<B, 1>,
    chosen_logps: Tensor<B, 1>,
    rejected_logps: Tensor<B, 1>,
) -> PairMetrics {
    let acc = chosen_rewards
        .clone()
        .greater(rejected_rewards.clone())
        .float()
        .mean();
    let v = read_scalars(vec![
        chosen_rewards.clone().mean(),
        rejected_rewards.clone().mean(),
        acc,
        (chosen_rewards - rejected_rewards).mean(),
        chosen_logps.mean(),
        rejected_logps.mean(),
    ]);
    PairMetrics {
        rewards_chosen: v[0],
        rewards_rejected: v[1],
        rewards_accuracies: v[2],
        rewards_margins: v[3],
        logps_chosen: v[4],
        logps_rejected: v[5],
    }
}

/// Sum of `x` `[n, t]` over the tokens `mask` marks, per row: `[n]`.
pub fn masked_row_sum<B: Backend>(x: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = x.dims();
    (x * mask).sum_dim(1).reshape([n])
}

/// Mean of `x` over the tokens `mask` marks, per row (TRL's `average_log_prob = True`): `[n]`.
pub fn masked_row_mean<B: Backend>(x: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = mask.dims();
    let count = mask.clone().sum_dim(1).reshape([n]);
    masked_row_sum(x, mask) / count
}

/// Mean of `x` over every token `mask` marks (`nn.CrossEntropyLoss`'s mean over labels): `[1]`.
pub fn masked_token_mean<B: Backend>(x: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    (x * mask.clone()).sum() / mask.sum()
}
