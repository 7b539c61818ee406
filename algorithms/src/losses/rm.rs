//! Reward-model (Bradley-Terry) loss, transcribed from TRL 1.16.0 `RewardTrainer.compute_loss`
//! (trl/trainer/reward_trainer.py).

use anyhow::{ensure, Result};
use burn::tensor::{activation, backend::Backend, Tensor};

use super::common::{ensure_len, read_scalars};

/// The `RewardConfig` fields the loss reads.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardLossConfig {
    /// Weight of the auxiliary `mean((r_chosen + r_rejected)^2)` term that keeps rewards centred
    /// (TRL default `None`: no term).
    pub center_rewards_coefficient: Option<f64>,
}

/// What TRL logs for a reward-model step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardMetrics {
    /// `accuracy`: fraction of pairs with `r_chosen > r_rejected`.
    pub accuracy: f64,
    /// `margin`: mean of `r_chosen - r_rejected`.
    pub margin: f64,
    /// `min_reward` over chosen and rejected rewards together.
    pub min_reward: f64,
    /// `mean_reward` over chosen and rejected rewards together.
    pub mean_reward: f64,
    /// `max_reward` over chosen and rejected rewards together.
    pub max_reward: f64,
}

impl RewardMetrics {
    /// The metrics under TRL's log names.
    pub fn named(&self) -> [(&'static str, f64); 5] {
        [
            ("accuracy", self.accuracy),
            ("margin", self.margin),
            ("min_reward", self.min_reward),
            ("mean_reward", self.mean_reward),
            ("max_reward", self.max_reward),
        ]
    }
}

/// Result of [`reward_loss`].
#[derive(Debug, Clone)]
pub struct RewardLossOutput<B: Backend> {
    /// Scalar loss, shape `[1]`.
    pub loss: Tensor<B, 1>,
    /// Batch statistics as TRL logs them.
    pub metrics: RewardMetrics,
}

/// TRL 1.16.0 `RewardTrainer.compute_loss`:
/// `-logsigmoid(r_chosen - r_rejected - margin).mean()
///  + center_rewards_coefficient * mean((r_chosen + r_rejected)^2)`.
///
/// `rewards_chosen` / `rewards_rejected` are the scalar head outputs `[B]`; `margin` (optional,
/// `[B]`) is data, so it is detached.
pub fn reward_loss<B: Backend>(
    rewards_chosen: Tensor<B, 1>,
    rewards_rejected: Tensor<B, 1>,
    margin: Option<Tensor<B, 1>>,
    cfg: &RewardLossConfig,
) -> Result<RewardLossOutput<B>> {
    let [batch] = rewards_chosen.dims();
    ensure!(batch > 0, "reward loss: empty batch");
    ensure_len(&rewards_rejected, batch, "reward loss rewards_rejected")?;
    if let Some(c) = cfg.center_rewards_coefficient {
        ensure!(
            c.is_finite(),
            "reward loss: center_rewards_coefficient must be finite, got {c}"
        );
    }

    let mut diff = rewards_chosen.clone() - rewards_rejected.clone();
    if let Some(m) = margin {
        ensure_len(&m, batch, "reward loss margin")?;
        diff = diff - m.detach();
    }
    let mut loss = activation::log_sigmoid(diff).mean().neg();
    if let Some(c) = cfg.center_rewards_coefficient {
        let centre = (rewards_chosen.clone() + rewards_rejected.clone())
            .square()
            .mean();
        loss = loss + centre.mul_scalar(c);
    }

    let chosen = rewards_chosen.detach();
    let rejected = rewards_rejected.detach();
    let all = Tensor::cat(vec![chosen.clone(), rejected.clone()], 0);
    let values = read_scalars(vec![
        chosen.clone().greater(rejected.clone()).float().mean(),
        (chosen - rejected).mean(),
        all.clone().min(),
        all.clone().mean(),
        all.max(),
    ]);
    let metrics = RewardMetrics {
        accuracy: values[0],
        margin: values[1],
        min_reward: values[2],
        mean_reward: values[3],
        max_reward: values[4],
    };
    Ok(RewardLossOutput { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::*;

    #[test]
    fn bradley_terry_by_hand() {
        // diffs [1, -1]: mean(log(1 + e^-1), log(1 + e^1)) = 0.8132617
        let chosen = t1::<Ad>(&[1.0, 0.0]).require_grad();
        let rejected = t1::<Ad>(&[0.0, 1.0]);
        let out = reward_loss(
            chosen.clone(),
            rejected.clone(),
            None,
            &RewardLossConfig::default(),
        )
        .unwrap();
        assert_close("loss", vals(out.loss.clone())[0], 0.8132616875182228);
        let m = out.metrics;
        assert_close("accuracy", m.accuracy, 0.5);
        assert_close("margin", m.margin, 0.0);
        assert_close("min", m.min_reward, 0.0);
        assert_close("mean", m.mean_reward, 0.5);
        assert_close("max", m.max_reward, 1.0);
        // d/dr_c = -(1 - sigmoid(diff)) / B
        let grads = out.loss.backward();
        let expected: Vec<f64> = [1.0f64, -1.0]
            .iter()
            .map(|d| -(1.0 - 1.0 / (1.0 + (-d).exp())) / 2.0)
            .collect();
        assert_all_close("grad", &vals(chosen.grad(&grads).unwrap()), &expected);
    }

    #[test]
    fn margin_and_centring_by_hand() {
        // margin 0.5: diffs [0.5, -1.5] -> 1.0877451; centring 0.1 * mean(1^2, 1^2) = 0.1
        let cfg = RewardLossConfig {
            center_rewards_coefficient: Some(0.1),
        };
        let out = reward_loss(
            t1::<Cpu>(&[1.0, 0.0]),
            t1(&[0.0, 1.0]),
            Some(t1(&[0.5, 0.5])),
            &cfg,
        )
        .unwrap();
        assert_close("loss", vals(out.loss)[0], 1.0877451310814297 + 0.1);
        let err = reward_loss(t1::<Cpu>(&[1.0, 0.0]), t1(&[0.0]), None, &cfg).unwrap_err();
        assert!(err.to_string().contains("rewards_rejected"), "{err}");
    }
}
