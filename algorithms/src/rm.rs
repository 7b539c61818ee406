//! Reward modelling: a reward adapter + score head on the shared base learns a Bradley-Terry
//! preference (TRL 1.x `RewardTrainer`). The reward is the score head's output at the last real
//! token of `prompt ++ completion`, as `AutoModelForSequenceClassification` takes it.

use crate::dpo::{concat_pairs, PairExample};
use crate::losses::{reward_loss, RewardLossConfig};
use crate::trainer::{PolicyModel, Role, StepOutput, Trainer};
use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

pub struct RewardTrainer {
    pub cfg: RewardLossConfig,
    pub pad_id: u32,
}

/// Scalar rewards `[b]` of a batch's rows, read at each row's last real token.
pub fn last_token_scores<B: AutodiffBackend>(
    model: &dyn PolicyModel<B>,
    role: Role,
    tb: &crate::trainer::TokenBatch,
) -> Result<Tensor<B, 1>> {
    Ok(at_last_token(model.head_scores(role, tb)?, tb))
}

/// The scores `[b, t]` read at each row's last real token: `[b]`.
pub fn at_last_token<B: Backend>(
    scores: Tensor<B, 2>,
    tb: &crate::trainer::TokenBatch,
) -> Tensor<B, 1> {
    let last: Vec<i64> = tb.last_index().iter().map(|&i| i as i64).collect();
    let n = last.len();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(last, [n, 1]), &scores.device());
    scores.gather(1, idx).squeeze_dim(1)
}

impl<B: AutodiffBackend> Trainer<B> for RewardTrainer {
    type Example = PairExample;

    fn name(&self) -> &'static str {
        "rm"
    }

    fn trainable_roles(&self) -> Vec<Role> {
        vec![Role::Reward]
    }

    fn loss(
        &mut self,
        model: &dyn PolicyModel<B>,
        batch: &[PairExample],
        _training: bool,
    ) -> Result<StepOutput<B>> {
        let n = batch.len();
        let tb = concat_pairs(batch, self.pad_id);
        let r = last_token_scores(model, Role::Reward, &tb)?;
        let out = reward_loss(r.clone().slice(0..n), r.slice(n..2 * n), None, &self.cfg)?;
        Ok(StepOutput::new(out.loss, &out.metrics.named(), &tb))
    }
}
