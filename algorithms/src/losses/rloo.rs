//! REINFORCE Leave-One-Out: advantages and loss.
//!
//! Transcribed from TRL 1.16.0 `RLOOTrainer` (trl/trainer/rloo_trainer.py): the advantages of
//! `_generate_and_score_completions` (the KL to the reference is a sequence-level reward
//! penalty, and each completion's baseline is the mean reward of the other completions of its
//! prompt) and the sequence-level clipped loss of `_compute_loss`.

use anyhow::{ensure, Result};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::common::{ensure_len, read_scalars};

/// The `[rloo]` section of a run file (TRL's `RLOOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlooConfig {
    /// Completions per prompt (k).
    pub num_generations: usize,
    pub max_completion_length: usize,
    /// Weight of the sequence KL penalty in the reward.
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    /// Whiten the advantages over the batch.
    pub normalize_advantages: bool,
    pub mask_truncated_completions: bool,
    /// Reward functions, as `[[grpo.rewards]]` takes them.
    pub rewards: Vec<rlhf_rewards::RewardConfig>,
}

impl Default for RlooConfig {
    fn default() -> Self {
        Self {
            num_generations: 2,
            max_completion_length: 512,
            beta: 0.05,
            epsilon: 0.2,
            epsilon_high: None,
            normalize_advantages: false,
            mask_truncated_completions: false,
            rewards: Vec::new(),
        }
    }
}

impl RlooConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.num_generations >= 2,
            "key `rloo.num_generations`: expected at least 2 (the baseline leaves one out)"
        );
        ensure!(
            self.max_completion_length > 0,
            "key `rloo.max_completion_length`: expected a positive integer, got 0"
        );
        ensure!(
            self.beta.is_finite() && self.beta >= 0.0,
            "key `rloo.beta`: expected a finite number >= 0, got {}",
            self.beta
        );
        ensure!(
            self.epsilon.is_finite() && self.epsilon >= 0.0,
            "key `rloo.epsilon`: expected a finite number >= 0, got {}",
            self.epsilon
        );
        if let Some(e) = self.epsilon_high {
            ensure!(
                e.is_finite() && e >= 0.0,
                "key `rloo.epsilon_high`: expected a finite number >= 0, got {e}"
            );
        }
        Ok(())
    }
}

/// Result of [`rloo_advantages`].
#[derive(Debug, Clone, PartialEq)]
pub struct RlooAdvantages {
    pub advantages: Vec<f32>,
    /// `reward`: mean weighted reward (before the KL penalty) of the scorable completions.
    pub reward: f64,
    pub reward_std: f64,
    /// `frac_reward_zero_std`: fraction of groups whose (penalised) rewards are all equal.
    pub frac_reward_zero_std: f64,
}

fn nanmean(xs: &[f64]) -> f64 {
    let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn nanstd(xs: &[f64]) -> f64 {
    let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.len() < 2 {
        return f64::NAN;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64;
    var.sqrt()
}

/// Leave-one-out advantages of TRL 1.16.0. `rewards_per_func[i][j]` is function `j` on
/// completion `i` (NaN: not applicable); `seq_kl[i]` is `sum_t (old_logp - ref_logp)` over the
/// completion (`None` when `beta == 0`). Completions come in groups of `num_generations`.
pub fn rloo_advantages(
    rewards_per_func: &[Vec<f32>],
    reward_weights: &[f32],
    num_generations: usize,
    seq_kl: Option<&[f64]>,
    beta: f64,
    normalize_advantages: bool,
) -> Result<RlooAdvantages> {
    let n = rewards_per_func.len();
    let g = num_generations;
    ensure!(
        n > 0 && g > 1,
        "rloo: no completions or num_generations < 2"
    );
    ensure!(
        n.is_multiple_of(g),
        "rloo: {n} completions are not groups of {g}"
    );
    let weighted: Vec<f64> = rewards_per_func
        .iter()
        .map(|row| {
            if row.iter().all(|x| x.is_nan()) {
                f64::NAN
            } else {
                row.iter()
                    .zip(reward_weights)
                    .filter(|(x, _)| !x.is_nan())
                    .map(|(x, w)| f64::from(*x) * f64::from(*w))
                    .sum()
            }
        })
        .collect();
    let mut rewards = weighted.clone();
    if beta != 0.0 {
        let kl = seq_kl.ok_or_else(|| anyhow::anyhow!("rloo: beta > 0 needs the sequence KL"))?;
        ensure!(
            kl.len() == n,
            "rloo: {} KL values for {n} completions",
            kl.len()
        );
        for (r, k) in rewards.iter_mut().zip(kl) {
            *r -= beta * k;
        }
    }
    let mut advantages = vec![0.0f64; n];
    let mut zero_std = 0usize;
    for (gi, grp) in rewards.chunks(g).enumerate() {
        let scorable = grp.iter().filter(|x| !x.is_nan()).count() as f64;
        let sum: f64 = grp.iter().filter(|x| !x.is_nan()).sum();
        for (k, r) in grp.iter().enumerate() {
            advantages[gi * g + k] = r - (sum - r) / (scorable - 1.0);
        }
        if nanstd(grp).abs() <= 1e-8 {
            zero_std += 1;
        }
    }
    if normalize_advantages {
        let m = nanmean(&advantages);
        let s = nanstd(&advantages);
        for a in &mut advantages {
            *a = (*a - m) / (s + 1e-4);
        }
    }
    Ok(RlooAdvantages {
        advantages: advantages
            .iter()
            .map(|a| if a.is_nan() { 0.0 } else { *a as f32 })
            .collect(),
        reward: nanmean(&weighted),
        reward_std: nanstd(&weighted),
        frac_reward_zero_std: zero_std as f64 / (n / g) as f64,
    })
}

/// Result of [`rloo_loss`].
#[derive(Debug, Clone)]
pub struct RlooLossOutput<B: Backend> {
    /// Mean over completions of the clipped sequence objective, `[1]`.
    pub loss: Tensor<B, 1>,
    pub clip_ratio_low_mean: f64,
    pub clip_ratio_high_mean: f64,
    pub clip_ratio_region_mean: f64,
}

impl<B: Backend> RlooLossOutput<B> {
    /// The clip metrics under TRL's names.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("clip_ratio/low_mean", self.clip_ratio_low_mean),
            ("clip_ratio/high_mean", self.clip_ratio_high_mean),
            ("clip_ratio/region_mean", self.clip_ratio_region_mean),
        ]
    }
}

/// TRL 1.16.0 RLOO loss: `-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)` with the sequence
/// ratio `r = exp(logp - old_logp)`, averaged over completions. `logps` `[B]` are the current
/// policy's completion log-prob sums; `old_logps` those of the policy that sampled (detached).
pub fn rloo_loss<B: Backend>(
    logps: Tensor<B, 1>,
    old_logps: Tensor<B, 1>,
    advantages: Tensor<B, 1>,
    epsilon_low: f64,
    epsilon_high: f64,
) -> Result<RlooLossOutput<B>> {
    let [n] = logps.dims();
    ensure!(n > 0, "rloo: empty batch");
    ensure_len(&old_logps, n, "rloo old_logps")?;
    ensure_len(&advantages, n, "rloo advantages")?;
    let coef_1 = (logps - old_logps.detach()).exp();
    let coef_2 = coef_1.clone().clamp(1.0 - epsilon_low, 1.0 + epsilon_high);
    let adv = advantages.detach();
    let l1 = coef_1.clone() * adv.clone();
    let l2 = coef_2 * adv.clone();
    let loss = l1.min_pair(l2).neg().mean();
    let c = coef_1.detach();
    let low = c.clone().lower_elem(1.0 - epsilon_low).float() * adv.clone().lower_elem(0.0).float();
    let high = c.greater_elem(1.0 + epsilon_high).float() * adv.greater_elem(0.0).float();
    let region = (low.clone() + high.clone()).clamp_max(1.0);
    let s = read_scalars(vec![low.mean(), high.mean(), region.mean()]);
    Ok(RlooLossOutput {
        loss,
        clip_ratio_low_mean: s[0],
        clip_ratio_high_mean: s[1],
        clip_ratio_region_mean: s[2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::{assert_all_close, t1, vals, Ad};

    #[test]
    fn leave_one_out_by_hand() {
        let r = vec![
            vec![1.0f32],
            vec![0.0],
            vec![0.0],
            vec![2.0],
            vec![2.0],
            vec![2.0],
        ];
        let a = rloo_advantages(&r, &[1.0], 3, None, 0.0, false).unwrap();
        let got: Vec<f64> = a.advantages.iter().map(|&x| f64::from(x)).collect();
        assert_all_close("adv", &got, &[1.0, -0.5, -0.5, 0.0, 0.0, 0.0]);
        assert_eq!(a.frac_reward_zero_std, 0.5);
        let kl = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let b = rloo_advantages(&r, &[1.0], 3, Some(&kl), 0.5, false).unwrap();
        assert_eq!(b.advantages[0], 0.5);
    }

    #[test]
    fn on_policy_gradient_is_minus_mean_advantage() {
        let lp = t1::<Ad>(&[-1.0, -2.0]).require_grad();
        let out = rloo_loss(lp.clone(), lp.clone().detach(), t1(&[1.0, -3.0]), 0.2, 0.2).unwrap();
        let g = out.loss.backward();
        assert_all_close("grad", &vals(lp.grad(&g).unwrap()), &[-0.5, 1.5]);
    }
}
