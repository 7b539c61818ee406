//! Proximal Policy Optimisation (RLHF flavour): KL-shaped rewards, GAE, whitening, the clipped
//! policy and value losses, and the adaptive KL controller.
//!
//! TRL 1.16.0 no longer ships a PPO trainer; the math is transcribed from the last TRL PPO,
//! `trl/experimental/ppo/ppo_trainer.py` of TRL v1.9.0 (unchanged up to commit f2cd577, 1.10.0.dev0):
//! `masked_mean`, `masked_var`, `masked_whiten`, `truncate_response` and `PPOTrainer.train`.
//! `AdaptiveKLController` comes from TRL v0.11.4 `trl/trainer/utils.py` (the 1.x trainer keeps
//! `kl_coef` fixed).
//!
//! Masks follow TRL: for a response whose last real token is at index `L` (its
//! `sequence_length`), `padding_mask` is `t > L` and `padding_mask_p1` is `t > L + 1` (values and
//! rewards keep one position more than log-probs).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use anyhow::{ensure, Result};
use burn::tensor::{backend::Backend, Bool, Tensor};

use super::common::{ensure_dims2, ensure_len, read_scalars, tensor1, tensor2, to_f64};

/// TRL's `INVALID_LOGPROB`: the value log-probs take at padding positions.
pub const INVALID_LOGPROB: f64 = 1.0;

// ---------------------------------------------------------------------------------------------
// Masked statistics
// ---------------------------------------------------------------------------------------------

/// TRL `masked_mean(values, mask)`: `(values * mask).sum() / mask.sum()`, shape `[1]`.
pub fn masked_mean<B: Backend>(values: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    (values * mask.clone()).sum() / mask.sum()
}

/// TRL `masked_var(values, mask, unbiased)`: masked variance, Bessel-corrected by
/// `mask_sum / (mask_sum - 1)` when `unbiased`. Errors (as TRL) when the mask is empty.
pub fn masked_var<B: Backend>(
    values: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    unbiased: bool,
) -> Result<Tensor<B, 1>> {
    let mean = masked_mean(values.clone(), mask.clone());
    let centered = values - mean.unsqueeze::<2>();
    let variance = masked_mean(centered.square(), mask.clone());
    if !unbiased {
        return Ok(variance);
    }
    let mask_sum = to_f64(mask.sum())[0];
    ensure!(
        mask_sum != 0.0,
        "masked_var: the mask is empty (TRL: mini_batch_size too small for whitening)"
    );
    Ok(variance.mul_scalar(mask_sum / (mask_sum - 1.0)))
}

/// TRL `masked_whiten(values, mask, shift_mean)`: `(values - mean) * rsqrt(var + 1e-8)` with the
/// masked mean and unbiased masked variance; the mean is added back when `shift_mean` is false.
/// Every position is transformed; callers re-mask as TRL does.
pub fn masked_whiten<B: Backend>(
    values: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    shift_mean: bool,
) -> Result<Tensor<B, 2>> {
    let mean = masked_mean(values.clone(), mask.clone()).unsqueeze::<2>();
    let var = masked_var(values.clone(), mask, true)?.unsqueeze::<2>();
    let whitened = (values - mean.clone()) * var.add_scalar(1e-8).sqrt().recip();
    Ok(if shift_mean {
        whitened
    } else {
        whitened + mean
    })
}

// ---------------------------------------------------------------------------------------------
// Response post-processing (host side)
// ---------------------------------------------------------------------------------------------

/// TRL `truncate_response`: every token after the first `stop_token_id` becomes `pad_token_id`.
pub fn truncate_response(response: &[u32], stop_token_id: u32, pad_token_id: u32) -> Vec<u32> {
    match response.iter().position(|&t| t == stop_token_id) {
        Some(stop) => response
            .iter()
            .enumerate()
            .map(|(i, &t)| if i > stop { pad_token_id } else { t })
            .collect(),
        None => response.to_vec(),
    }
}

/// TRL's `first_true_indices(response == pad_token_id) - 1`: index of the last token before the
/// first pad (`len - 1` without pad, -1 when the response starts with pad).
pub fn sequence_length(response: &[u32], pad_token_id: u32) -> i64 {
    let first_pad = response
        .iter()
        .position(|&t| t == pad_token_id)
        .unwrap_or(response.len());
    first_pad as i64 - 1
}

/// `padding_mask` (`t > L`) and `padding_mask_p1` (`t > L + 1`) as 0/1 float tensors `[B, T]`
/// (1 = padding).
pub fn padding_masks<B: Backend>(
    sequence_lengths: &[i64],
    gen_length: usize,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let rows = sequence_lengths.len();
    let mut pm = Vec::with_capacity(rows * gen_length);
    let mut pm1 = Vec::with_capacity(rows * gen_length);
    for &len in sequence_lengths {
        for t in 0..gen_length as i64 {
            pm.push(if t > len { 1.0 } else { 0.0 });
            pm1.push(if t > len + 1 { 1.0 } else { 0.0 });
        }
    }
    (
        tensor2(pm, rows, gen_length, device),
        tensor2(pm1, rows, gen_length, device),
    )
}

/// A 0/1 float mask as the boolean mask `masked_fill` takes.
fn as_bool<B: Backend>(mask: &Tensor<B, 2>) -> Tensor<B, 2, Bool> {
    mask.clone().greater_elem(0.5)
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `PPOConfig.kl_estimator` (http://joschu.net/blog/kl-approx.html).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    /// `logprob - ref_logprob` (TRL default).
    K1,
    /// `(r - 1) - log r` with `r = exp(ref_logprob - logprob)`: non-negative, lower variance.
    K3,
}

crate::named_option!(KlEstimator, "kl_estimator", [K1 => "k1", K3 => "k3"]);

/// The `[ppo]` section of a run file: TRL's `PPOConfig` names and defaults. The loss reads the
/// coefficients; the trainer and the command read the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// KL penalty coefficient in the per-token reward (the trainer replaces it with the current
    /// [`KlController`] value at every rollout).
    pub kl_coef: f64,
    /// Per-token KL estimator.
    pub kl_estimator: KlEstimator,
    /// Whiten the shaped rewards before GAE (keeping their mean).
    pub whiten_rewards: bool,
    /// Discount.
    pub gamma: f64,
    /// GAE lambda.
    pub lam: f64,
    /// Policy ratio clip range.
    pub cliprange: f64,
    /// Value prediction clip range around the rollout values.
    pub cliprange_value: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
    /// Subtracted from the score of responses without an EOS token.
    pub missing_eos_penalty: Option<f64>,
    /// Reward adapter folder as written by `rlhf rm` (adapter + score head on the shared base).
    pub reward_adapter: Option<PathBuf>,
    /// A separate 4-bit reward model checkpoint instead of an adapter (counted by the planner).
    pub reward_model_path: Option<PathBuf>,
    /// New tokens sampled per response.
    pub response_length: usize,
    /// Optimisation epochs over each rollout.
    pub num_ppo_epochs: usize,
    /// Mini-batches each rollout is split into.
    pub num_mini_batches: usize,
    /// Target KL of the adaptive controller (`None`: fixed `kl_coef`).
    pub adaptive_kl_target: Option<f64>,
    /// Horizon of the adaptive controller.
    pub adaptive_kl_horizon: f64,
}

impl Default for PpoConfig {
    /// TRL `PPOConfig` defaults.
    fn default() -> Self {
        Self {
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            whiten_rewards: false,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            missing_eos_penalty: None,
            reward_adapter: None,
            reward_model_path: None,
            response_length: 53,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            adaptive_kl_target: None,
            adaptive_kl_horizon: 10000.0,
        }
    }
}

impl PpoConfig {
    /// Rejects non-finite or negative coefficients.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("kl_coef", self.kl_coef),
            ("gamma", self.gamma),
            ("lam", self.lam),
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("vf_coef", self.vf_coef),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "key `ppo.{name}`: expected a finite number >= 0, got {v}"
            );
        }
        ensure!(
            self.num_mini_batches > 0,
            "key `ppo.num_mini_batches`: expected a positive integer, got 0"
        );
        if let Some(p) = self.missing_eos_penalty {
            ensure!(
                p.is_finite(),
                "key `ppo.missing_eos_penalty`: expected a finite number, got {p}"
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Rollout: rewards, advantages, returns
// ---------------------------------------------------------------------------------------------

/// What the rollout phase produced for `B` responses of `T` generated tokens.
#[derive(Debug, Clone)]
pub struct PpoRolloutBatch<B: Backend> {
    /// Policy log-prob of each response token at generation time `[B, T]`.
    pub logprobs: Tensor<B, 2>,
    /// Reference log-prob of each response token `[B, T]`.
    pub ref_logprobs: Tensor<B, 2>,
    /// Value head output at each response position `[B, T]`.
    pub values: Tensor<B, 2>,
    /// Reward-model score of each (truncated) response `[B]`.
    pub scores: Tensor<B, 1>,
    /// Index of the last real token of each truncated response ([`sequence_length`]).
    pub sequence_lengths: Vec<i64>,
    /// Whether each truncated response contains the EOS token (for `missing_eos_penalty`).
    pub contain_eos: Vec<bool>,
}

/// Batch statistics TRL logs after the rollout (`objective/*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoRolloutMetrics {
    /// `objective/kl`: mean over responses of the summed per-token KL.
    pub kl: f64,
    /// `objective/entropy`: mean of `-logprobs.sum(1)` (padding counts as `-INVALID_LOGPROB`, as TRL).
    pub entropy: f64,
    /// `objective/non_score_reward`: mean summed KL penalty.
    pub non_score_reward: f64,
    /// `objective/rlhf_reward`: non-score reward + mean score.
    pub rlhf_reward: f64,
    /// `objective/scores`: mean score (after the missing-EOS penalty).
    pub scores: f64,
}

/// Everything the optimisation epochs need, all detached.
#[derive(Debug, Clone)]
pub struct PpoRollout<B: Backend> {
    /// Log-probs with padding set to [`INVALID_LOGPROB`] `[B, T]` (the "old" log-probs).
    pub logprobs: Tensor<B, 2>,
    /// Values with `padding_mask_p1` positions set to 0 `[B, T]`.
    pub values: Tensor<B, 2>,
    /// Scores after the missing-EOS penalty `[B]`.
    pub scores: Tensor<B, 1>,
    /// Per-token KL estimate `[B, T]`.
    pub kl: Tensor<B, 2>,
    /// `-kl_coef * kl` `[B, T]`.
    pub non_score_reward: Tensor<B, 2>,
    /// Shaped (and optionally whitened) rewards `[B, T]`.
    pub rewards: Tensor<B, 2>,
    /// Whitened GAE advantages, 0 at padding `[B, T]`.
    pub advantages: Tensor<B, 2>,
    /// `advantages + values` before whitening `[B, T]`.
    pub returns: Tensor<B, 2>,
    /// 1 where `t > sequence_length` `[B, T]`.
    pub padding_mask: Tensor<B, 2>,
    /// 1 where `t > sequence_length + 1` `[B, T]`.
    pub padding_mask_p1: Tensor<B, 2>,
    /// Logged statistics.
    pub metrics: PpoRolloutMetrics,
}

/// Steps 3-6 of TRL's `PPOTrainer.train` rollout: missing-EOS penalty, masking, per-token KL
/// penalty `-kl_coef * kl` with the score added at TRL's `actual_end` (`L + 1` when that is
/// inside the response, else `L`), optional reward whitening, GAE backwards over all `T`
/// positions, `returns = advantages + values`, and masked whitening of the advantages.
pub fn ppo_rollout<B: Backend>(
    batch: PpoRolloutBatch<B>,
    cfg: &PpoConfig,
) -> Result<PpoRollout<B>> {
    cfg.validate()?;
    let [rows, cols] = batch.logprobs.dims();
    ensure!(rows > 0 && cols > 0, "ppo rollout: empty batch");
    ensure_dims2(&batch.ref_logprobs, rows, cols, "ppo ref_logprobs")?;
    ensure_dims2(&batch.values, rows, cols, "ppo values")?;
    ensure_len(&batch.scores, rows, "ppo scores")?;
    ensure!(
        batch.sequence_lengths.len() == rows,
        "ppo rollout: {} sequence lengths for {rows} responses",
        batch.sequence_lengths.len()
    );
    ensure!(
        batch.contain_eos.len() == rows,
        "ppo rollout: {} contain_eos flags for {rows} responses",
        batch.contain_eos.len()
    );
    for (i, &len) in batch.sequence_lengths.iter().enumerate() {
        ensure!(
            (-1..cols as i64).contains(&len),
            "ppo rollout: sequence_lengths[{i}] = {len} is outside [-1, {}]",
            cols - 1
        );
    }
    let device = batch.logprobs.device();

    // 3. missing-EOS penalty
    let mut scores = batch.scores.detach();
    if let Some(penalty) = cfg.missing_eos_penalty {
        let missing: Vec<f32> = batch
            .contain_eos
            .iter()
            .map(|&c| if c { 0.0 } else { 1.0 })
            .collect();
        scores = scores - tensor1::<B>(&missing, &device).mul_scalar(penalty);
    }

    let (padding_mask, padding_mask_p1) =
        padding_masks::<B>(&batch.sequence_lengths, cols, &device);
    let pm = as_bool(&padding_mask);
    let pm1 = as_bool(&padding_mask_p1);
    let logprobs = batch
        .logprobs
        .detach()
        .mask_fill(pm.clone(), INVALID_LOGPROB);
    let ref_logprobs = batch
        .ref_logprobs
        .detach()
        .mask_fill(pm.clone(), INVALID_LOGPROB);
    let values = batch.values.detach().mask_fill(pm1.clone(), 0.0);

    // 4. per-token KL penalty, score at `actual_end`
    let logr = ref_logprobs - logprobs.clone();
    let kl = match cfg.kl_estimator {
        KlEstimator::K1 => logr.neg(),
        KlEstimator::K3 => logr.clone().exp().sub_scalar(1.0) - logr,
    };
    let non_score_reward = kl.clone().mul_scalar(-cfg.kl_coef);
    let mut end_onehot = vec![0.0f32; rows * cols];
    for (i, &len) in batch.sequence_lengths.iter().enumerate() {
        let end = if len + 1 < cols as i64 { len + 1 } else { len };
        end_onehot[i * cols + end.max(0) as usize] = 1.0;
    }
    let end_onehot = tensor2::<B>(end_onehot, rows, cols, &device);
    let mut rewards = non_score_reward.clone() + end_onehot * scores.clone().unsqueeze_dim::<2>(1);

    // 5. reward whitening (mean kept)
    if cfg.whiten_rewards {
        let keep = padding_mask_p1.clone().neg().add_scalar(1.0);
        rewards = masked_whiten(rewards, keep, false)?.mask_fill(pm1.clone(), 0.0);
    }

    // 6. GAE, backwards over every position
    let column = |t: &Tensor<B, 2>, i: usize| t.clone().slice([0..rows, i..i + 1]);
    let mut lastgaelam: Tensor<B, 2> = Tensor::zeros([rows, 1], &device);
    let mut reversed = Vec::with_capacity(cols);
    for t in (0..cols).rev() {
        let next_values = if t + 1 < cols {
            column(&values, t + 1)
        } else {
            Tensor::zeros([rows, 1], &device)
        };
        let delta = column(&rewards, t) + next_values.mul_scalar(cfg.gamma) - column(&values, t);
        lastgaelam = delta + lastgaelam.mul_scalar(cfg.gamma * cfg.lam);
        reversed.push(lastgaelam.clone());
    }
    reversed.reverse();
    let advantages = Tensor::cat(reversed, 1);
    let returns = advantages.clone() + values.clone();
    let keep = padding_mask.clone().neg().add_scalar(1.0);
    let advantages = masked_whiten(advantages, keep, true)?.mask_fill(pm, 0.0);

    let mean_kl = kl.clone().sum_dim(1).mean();
    let mean_entropy = logprobs.clone().neg().sum_dim(1).mean();
    let mean_non_score = non_score_reward.clone().sum_dim(1).mean();
    let mean_score = scores.clone().mean();
    let rlhf_reward = mean_non_score.clone() + mean_score.clone();
    let m = read_scalars(vec![
        mean_kl,
        mean_entropy,
        mean_non_score,
        rlhf_reward,
        mean_score,
    ]);
    Ok(PpoRollout {
        logprobs,
        values,
        scores,
        kl,
        non_score_reward,
        rewards,
        advantages,
        returns,
        padding_mask,
        padding_mask_p1,
        metrics: PpoRolloutMetrics {
            kl: m[0],
            entropy: m[1],
            non_score_reward: m[2],
            rlhf_reward: m[3],
            scores: m[4],
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Loss
// ---------------------------------------------------------------------------------------------

/// One micro-batch of the optimisation phase (rows of a [`PpoRollout`] plus fresh forwards).
#[derive(Debug, Clone)]
pub struct PpoMinibatch<B: Backend> {
    /// Current policy log-probs of the response tokens `[B, T]` (carries the gradient).
    pub new_logprobs: Tensor<B, 2>,
    /// Current value predictions `[B, T]` (carries the gradient).
    pub vpred: Tensor<B, 2>,
    /// Rollout log-probs ([`PpoRollout::logprobs`]).
    pub old_logprobs: Tensor<B, 2>,
    /// Rollout values ([`PpoRollout::values`]).
    pub old_values: Tensor<B, 2>,
    /// [`PpoRollout::advantages`].
    pub advantages: Tensor<B, 2>,
    /// [`PpoRollout::returns`].
    pub returns: Tensor<B, 2>,
    /// [`PpoRollout::padding_mask`].
    pub padding_mask: Tensor<B, 2>,
    /// [`PpoRollout::padding_mask_p1`].
    pub padding_mask_p1: Tensor<B, 2>,
}

/// Per-micro-batch statistics TRL accumulates (`policy/*`, `loss/*`, `val/*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoLossMetrics {
    /// `loss/policy_avg` contribution: the clipped policy loss.
    pub pg_loss: f64,
    /// `loss/value_avg` contribution: the clipped value loss (with its 0.5).
    pub vf_loss: f64,
    /// `policy/clipfrac_avg`: fraction of tokens where the clipped policy term is larger.
    pub pg_clipfrac: f64,
    /// `val/clipfrac_avg`: fraction of positions where the clipped value term is larger.
    pub vf_clipfrac: f64,
    /// `policy/approxkl_avg`: `0.5 * mean((new - old)^2)` over all positions.
    pub approxkl: f64,
    /// `val/ratio`: mean probability ratio over all positions.
    pub ratio_mean: f64,
}

/// Result of [`ppo_loss`].
#[derive(Debug, Clone)]
pub struct PpoLossOutput<B: Backend> {
    /// `pg_loss + vf_coef * vf_loss`, shape `[1]`.
    pub loss: Tensor<B, 1>,
    /// The policy term alone (its graph reaches only `new_logprobs`).
    pub pg_loss: Tensor<B, 1>,
    /// `vf_coef * vf_loss` alone (its graph reaches only `vpred`).
    pub vf_loss: Tensor<B, 1>,
    /// Logged statistics.
    pub metrics: PpoLossMetrics,
}

/// TRL's PPO micro-batch loss: `pg_loss + vf_coef * vf_loss` with
/// `vf_loss = 0.5 * masked_mean(max((v - R)^2, (clip(v, V - c_v, V + c_v) - R)^2), ~padding_mask_p1)`
/// and `pg_loss = masked_mean(max(-A r, -A clip(r, 1 - c, 1 + c)), ~padding_mask)`,
/// `r = exp(new_logprobs - old_logprobs)`. New log-probs are set to [`INVALID_LOGPROB`] and value
/// predictions to 0 at their padding, as TRL does before the loss.
pub fn ppo_loss<B: Backend>(mb: PpoMinibatch<B>, cfg: &PpoConfig) -> Result<PpoLossOutput<B>> {
    cfg.validate()?;
    let [rows, cols] = mb.new_logprobs.dims();
    ensure!(rows > 0 && cols > 0, "ppo loss: empty batch");
    for (t, what) in [
        (&mb.vpred, "ppo vpred"),
        (&mb.old_logprobs, "ppo old_logprobs"),
        (&mb.old_values, "ppo old_values"),
        (&mb.advantages, "ppo advantages"),
        (&mb.returns, "ppo returns"),
        (&mb.padding_mask, "ppo padding_mask"),
        (&mb.padding_mask_p1, "ppo padding_mask_p1"),
    ] {
        ensure_dims2(t, rows, cols, what)?;
    }
    let pm = as_bool(&mb.padding_mask);
    let pm1 = as_bool(&mb.padding_mask_p1);
    let keep = mb.padding_mask.clone().detach().neg().add_scalar(1.0);
    let keep_p1 = mb.padding_mask_p1.clone().detach().neg().add_scalar(1.0);
    let old_values = mb.old_values.detach();
    let returns = mb.returns.detach();
    let advantages = mb.advantages.detach();

    let new_logprobs = mb.new_logprobs.mask_fill(pm, INVALID_LOGPROB);
    let vpred = mb.vpred.mask_fill(pm1, 0.0);
    // torch.clamp(vpred, V - c, V + c) with tensor bounds
    let vpred_clipped = vpred
        .clone()
        .max_pair(old_values.clone().sub_scalar(cfg.cliprange_value))
        .min_pair(old_values.add_scalar(cfg.cliprange_value));
    let vf_losses1 = (vpred - returns.clone()).square();
    let vf_losses2 = (vpred_clipped - returns).square();
    let vf_loss_max = vf_losses1.clone().max_pair(vf_losses2.clone());
    let vf_loss = masked_mean(vf_loss_max, keep_p1.clone()).mul_scalar(0.5);
    let vf_clipfrac = masked_mean(vf_losses2.greater(vf_losses1).float(), keep_p1);

    let logprobs_diff = new_logprobs - mb.old_logprobs.detach();
    let ratio = logprobs_diff.clone().exp();
    let pg_losses = (advantages.clone() * ratio.clone()).neg();
    let pg_losses2 = (advantages
        * ratio
            .clone()
            .clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange))
    .neg();
    let pg_loss_max = pg_losses.clone().max_pair(pg_losses2.clone());
    let pg_loss = masked_mean(pg_loss_max, keep.clone());
    let vf_term = vf_loss.clone().mul_scalar(cfg.vf_coef);
    let loss = pg_loss.clone() + vf_term.clone();

    let pg_clipfrac = masked_mean(pg_losses2.greater(pg_losses).float(), keep);
    let approxkl = logprobs_diff.detach().square().mean().mul_scalar(0.5);
    let m = read_scalars(vec![
        pg_loss.clone().detach(),
        vf_loss.detach(),
        pg_clipfrac,
        vf_clipfrac,
        approxkl,
        ratio.detach().mean(),
    ]);
    Ok(PpoLossOutput {
        loss,
        pg_loss,
        vf_loss: vf_term,
        metrics: PpoLossMetrics {
            pg_loss: m[0],
            vf_loss: m[1],
            pg_clipfrac: m[2],
            vf_clipfrac: m[3],
            approxkl: m[4],
            ratio_mean: m[5],
        },
    })
}

// ---------------------------------------------------------------------------------------------
// KL controllers
// ---------------------------------------------------------------------------------------------

/// The KL coefficient schedule: TRL v0.11 `FixedKLController` / `AdaptiveKLController`
/// (Ziegler et al. 2019).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KlController {
    /// Constant coefficient.
    Fixed {
        /// Current coefficient.
        value: f64,
    },
    /// Coefficient steered towards a target KL.
    Adaptive {
        /// Current coefficient.
        value: f64,
        /// KL the controller aims at.
        target: f64,
        /// Steps over which a 20% error changes the coefficient by 20%.
        horizon: f64,
    },
}

impl KlController {
    /// An adaptive controller; `target` and `horizon` must be positive.
    pub fn adaptive(init_kl_coef: f64, target: f64, horizon: f64) -> Result<Self> {
        ensure!(
            target.is_finite() && target > 0.0,
            "adaptive KL controller: target must be > 0, got {target}"
        );
        ensure!(
            horizon.is_finite() && horizon > 0.0,
            "adaptive KL controller: horizon must be > 0, got {horizon}"
        );
        Ok(Self::Adaptive {
            value: init_kl_coef,
            target,
            horizon,
        })
    }

    /// The coefficient to use now.
    pub fn value(&self) -> f64 {
        match self {
            Self::Fixed { value } | Self::Adaptive { value, .. } => *value,
        }
    }

    /// `AdaptiveKLController.update(current, n_steps)`:
    /// `value *= 1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon`.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        if let Self::Adaptive {
            value,
            target,
            horizon,
        } = self
        {
            let proportional_error = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
            let mult = 1.0 + proportional_error * n_steps as f64 / *horizon;
            *value *= mult;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::*;

    #[test]
    fn masked_statistics_by_hand() {
        // kept values 1, 2, 3, 4: mean 2.5, biased var 1.25, unbiased 5/3
        let v = t2::<Cpu>(&[vec![1.0, 2.0, 3.0], vec![4.0, 9.0, 9.0]]);
        let m = t2::<Cpu>(&[vec![1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]);
        assert_close("mean", vals(masked_mean(v.clone(), m.clone()))[0], 2.5);
        assert_close(
            "var",
            vals(masked_var(v.clone(), m.clone(), false).unwrap())[0],
            1.25,
        );
        assert_close(
            "unbiased",
            vals(masked_var(v.clone(), m.clone(), true).unwrap())[0],
            5.0 / 3.0,
        );
        let s = (5.0f64 / 3.0).sqrt();
        let w = vals(masked_whiten(v.clone(), m.clone(), true).unwrap());
        assert_all_close("whiten", &w[..4], &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]);
        let w = vals(masked_whiten(v, m.clone(), false).unwrap());
        assert_close("whiten keeps mean", w[0], -1.5 / s + 2.5);
        assert!(masked_var(
            t2::<Cpu>(&[vec![1.0]]),
            m.zeros_like().slice([0..1, 0..1]),
            true
        )
        .is_err());
    }

    #[test]
    fn response_processing() {
        assert_eq!(truncate_response(&[5, 2, 7, 8], 2, 0), vec![5, 2, 0, 0]);
        assert_eq!(truncate_response(&[5, 6], 2, 0), vec![5, 6]);
        assert_eq!(sequence_length(&[5, 2, 0, 0], 0), 1);
        assert_eq!(sequence_length(&[5, 6], 0), 1);
        assert_eq!(sequence_length(&[0, 0], 0), -1);
    }

    #[test]
    fn gae_by_hand() {
        // one response of 3 tokens, no padding, policy == reference (no KL), score 1 at the last
        // token (L + 1 = 3 is outside), gamma 1, lam 0.5, values [0.5, 0.2, 0.1]:
        // A2 = 1 - 0.1 = 0.9; A1 = (0.1 - 0.2) + 0.5 * 0.9 = 0.35; A0 = (0.2 - 0.5) + 0.5 * 0.35
        let cfg = PpoConfig {
            lam: 0.5,
            ..PpoConfig::default()
        };
        let out = ppo_rollout(
            PpoRolloutBatch::<Cpu> {
                logprobs: t2(&[vec![-1.0, -2.0, -0.5]]),
                ref_logprobs: t2(&[vec![-1.0, -2.0, -0.5]]),
                values: t2(&[vec![0.5, 0.2, 0.1]]),
                scores: t1(&[1.0]),
                sequence_lengths: vec![2],
                contain_eos: vec![true],
            },
            &cfg,
        )
        .unwrap();
        assert_all_close("rewards", &vals(out.rewards.clone()), &[0.0, 0.0, 1.0]);
        assert_all_close("returns", &vals(out.returns.clone()), &[0.375, 0.55, 1.0]);
        // whitened: mean 0.375, unbiased var 0.263125
        assert_all_close(
            "advantages",
            &vals(out.advantages.clone()),
            &[
                -0.9747403391347772,
                -0.048737016956738904,
                1.023477356091516,
            ],
        );
        assert_close("entropy", out.metrics.entropy, 3.5);
    }

    #[test]
    fn kl_penalty_score_position_and_masks() {
        // response of length 1 (L = 0) in T = 3: padding_mask [0, 1, 1], p1 [0, 0, 1];
        // the score lands at L + 1 = 1; k3 with logr = -0.5 is e^-0.5 + 0.5 - 1
        let batch = || PpoRolloutBatch::<Cpu> {
            logprobs: t2(&[vec![-1.0, -7.0, -7.0]]),
            ref_logprobs: t2(&[vec![-1.5, -3.0, -3.0]]),
            values: t2(&[vec![0.0, 0.0, 5.0]]),
            scores: t1(&[2.0]),
            sequence_lengths: vec![0],
            contain_eos: vec![false],
        };
        let k3 = 0.10653065971263342;
        let cfg = PpoConfig {
            kl_coef: 0.1,
            kl_estimator: KlEstimator::K3,
            missing_eos_penalty: Some(0.5),
            ..PpoConfig::default()
        };
        let out = ppo_rollout(batch(), &cfg).unwrap();
        assert_eq!(vals(out.padding_mask.clone()), vec![0.0, 1.0, 1.0]);
        assert_eq!(vals(out.padding_mask_p1.clone()), vec![0.0, 0.0, 1.0]);
        assert_eq!(vals(out.logprobs.clone()), vec![-1.0, 1.0, 1.0]);
        assert_eq!(vals(out.values.clone()), vec![0.0, 0.0, 0.0]);
        assert_all_close("kl", &vals(out.kl.clone()), &[k3, 0.0, 0.0]);
        assert_all_close(
            "rewards",
            &vals(out.rewards.clone()),
            &[-0.1 * k3, 1.5, 0.0],
        );
        assert_close("score after penalty", out.metrics.scores, 1.5);
        let k1 = PpoConfig {
            kl_estimator: KlEstimator::K1,
            ..cfg
        };
        let out = ppo_rollout(batch(), &k1).unwrap();
        assert_all_close("k1", &vals(out.kl), &[0.5, 0.0, 0.0]);
        let bad = PpoRolloutBatch {
            sequence_lengths: vec![3],
            ..batch()
        };
        assert!(ppo_rollout(bad, &k1).is_err());
    }

    #[test]
    fn clipped_losses_by_hand() {
        // ratio 1.5 with A = 1, cliprange 0.2: max(-1.5, -1.2) = -1.2 (clipped, no gradient);
        // value 1.0 vs old 0.5 (clipped to 0.7), return 0.8: max(0.04, 0.01) / 2 = 0.02
        let new_lp = t2::<Ad>(&[vec![(-1.0f64 + 1.5f64.ln()) as f32]]).require_grad();
        let vpred = t2::<Ad>(&[vec![1.0]]).require_grad();
        let zeros = t2::<Ad>(&[vec![0.0]]);
        let out = ppo_loss(
            PpoMinibatch {
                new_logprobs: new_lp.clone(),
                vpred: vpred.clone(),
                old_logprobs: t2(&[vec![-1.0]]),
                old_values: t2(&[vec![0.5]]),
                advantages: t2(&[vec![1.0]]),
                returns: t2(&[vec![0.8]]),
                padding_mask: zeros.clone(),
                padding_mask_p1: zeros,
            },
            &PpoConfig::default(),
        )
        .unwrap();
        assert_close("loss", vals(out.loss.clone())[0], -1.2 + 0.1 * 0.02);
        let m = out.metrics;
        assert_close("pg_clipfrac", m.pg_clipfrac, 1.0);
        assert_close("vf_clipfrac", m.vf_clipfrac, 0.0);
        assert_close("approxkl", m.approxkl, 0.08220097694658271);
        assert_close("ratio", m.ratio_mean, 1.5);
        let grads = out.loss.backward();
        assert_close("grad logp", vals(new_lp.grad(&grads).unwrap())[0], 0.0);
        // vf_coef * 0.5 * 2 * (v - R) = 0.1 * 0.2
        assert_close("grad v", vals(vpred.grad(&grads).unwrap())[0], 0.02);
    }

    #[test]
    fn kl_controllers() {
        let mut fixed = KlController::Fixed { value: 0.1 };
        fixed.update(100.0, 10);
        assert_eq!(fixed.value(), 0.1);
        // error clipped to -0.2: 0.2 * (1 - 0.2 * 64 / 10000)
        let mut adaptive = KlController::adaptive(0.2, 6.0, 10000.0).unwrap();
        adaptive.update(3.0, 64);
        assert!((adaptive.value() - 0.199744).abs() < 1e-12);
        assert!(KlController::adaptive(0.2, 0.0, 1.0).is_err());
    }
}
