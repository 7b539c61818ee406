//! Group Relative Policy Optimisation: advantages and loss.
//!
//! Transcribed from TRL 1.16.0 `GRPOTrainer` (trl/trainer/grpo_trainer.py): the advantages from
//! `_generate_and_score_completions`, the loss and its logged metrics from `_compute_loss`.
//! Only what needs neither vLLM nor entropies is covered: no off-policy sequence mask, no
//! high-entropy token mask, no vLLM importance-sampling correction, no entropy bonus.

use anyhow::{bail, ensure, Result};
use burn::tensor::{activation, backend::Backend, Tensor};

use super::common::{ensure_dims2, ensure_len, read_parts, tensor1};

// ---------------------------------------------------------------------------------------------
// Advantages
// ---------------------------------------------------------------------------------------------

/// How rewards are scaled into advantages (`GRPOConfig.scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// Divide by the std of the completion's group (TRL default; `True`).
    Group,
    /// Divide by the std of the whole batch.
    Batch,
    /// Only subtract the group mean (Dr. GRPO; `False`).
    None,
}

crate::named_option!(ScaleRewards, "scale_rewards", [
    Group => "group",
    Batch => "batch",
    None => "none",
]);

/// How several reward functions are combined (`GRPOConfig.multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiObjectiveAggregation {
    /// Weighted sum first, then the `scale_rewards` normalisation (TRL default).
    SumThenNormalize,
    /// GDPO: normalise each function within its group, weighted sum, then batch-normalise.
    NormalizeThenSum,
}

crate::named_option!(MultiObjectiveAggregation, "multi_objective_aggregation", [
    SumThenNormalize => "sum_then_normalize",
    NormalizeThenSum => "normalize_then_sum",
]);

/// Reward statistics TRL logs next to the advantages.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoRewardMetrics {
    /// `reward`: mean of the weighted reward sum over scorable completions.
    pub reward: f64,
    /// `reward_std`: its std (Bessel-corrected).
    pub reward_std: f64,
    /// `frac_reward_zero_std`: fraction of completions whose scaling std is (close to) zero.
    pub frac_reward_zero_std: f64,
    /// `rewards/<func>/mean`, one per reward function, ignoring missing values.
    pub per_func_mean: Vec<f64>,
    /// `rewards/<func>/std`, one per reward function.
    pub per_func_std: Vec<f64>,
}

/// Result of [`grpo_advantages`].
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoAdvantages {
    /// One advantage per completion, in input order (0 for unscorable completions).
    pub advantages: Vec<f32>,
    /// Logged reward statistics.
    pub metrics: GrpoRewardMetrics,
}

/// Mean of the non-NaN values (NaN when there are none), as `torch.nanmean`.
fn nanmean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = xs
        .into_iter()
        .filter(|x| !x.is_nan())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// Bessel-corrected std of the non-NaN values, as TRL's `nanstd` (NaN below two values).
fn nanstd(xs: &[f64]) -> f64 {
    let mean = nanmean(xs.iter().copied());
    let count = xs.iter().filter(|x| !x.is_nan()).count();
    if count <= 1 {
        return f64::NAN;
    }
    let var = nanmean(xs.iter().map(|x| (x - mean) * (x - mean)));
    (var * count as f64 / (count as f64 - 1.0)).sqrt()
}

/// Sum of the non-NaN values (0 when there are none), as `torch.nansum`.
fn nansum(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().filter(|x| !x.is_nan()).sum()
}

/// `torch.isclose(std, 0)` with its default tolerances (atol 1e-8); false for NaN.
fn is_close_to_zero(x: f64) -> bool {
    x.abs() <= 1e-8
}

/// Group-relative advantages of TRL 1.16.0 `GRPOTrainer._generate_and_score_completions`.
///
/// `rewards_per_func[i][j]` is reward function `j` on completion `i`; NaN stands for TRL's `None`
/// (function not applicable). Completions come in consecutive groups of `num_generations` (one
/// group per prompt). The std is Bessel-corrected and the advantage is divided by `std + 1e-4`.
/// A completion that every function left unscored gets advantage 0.
pub fn grpo_advantages(
    rewards_per_func: &[Vec<f32>],
    reward_weights: &[f32],
    num_generations: usize,
    scale_rewards: ScaleRewards,
    aggregation: MultiObjectiveAggregation,
) -> Result<GrpoAdvantages> {
    let n = rewards_per_func.len();
    let n_funcs = reward_weights.len();
    ensure!(n > 0, "grpo advantages: no completions");
    ensure!(n_funcs > 0, "grpo advantages: no reward weights");
    ensure!(
        num_generations > 0,
        "grpo advantages: num_generations must be > 0"
    );
    ensure!(
        n.is_multiple_of(num_generations),
        "grpo advantages: {n} completions are not a whole number of groups of {num_generations}"
    );
    for (i, row) in rewards_per_func.iter().enumerate() {
        ensure!(
            row.len() == n_funcs,
            "grpo advantages: completion {i} has {} rewards, expected one per reward weight ({n_funcs})",
            row.len()
        );
    }
    let r: Vec<Vec<f64>> = rewards_per_func
        .iter()
        .map(|row| row.iter().map(|&x| f64::from(x)).collect())
        .collect();
    let w: Vec<f64> = reward_weights.iter().map(|&x| f64::from(x)).collect();
    let g = num_generations;
    let unscorable: Vec<bool> = r.iter().map(|row| row.iter().all(|x| x.is_nan())).collect();
    let weighted_sum = |i: usize| -> f64 {
        if unscorable[i] {
            f64::NAN
        } else {
            nansum(r[i].iter().zip(&w).map(|(x, w)| x * w))
        }
    };

    let (mut advantages, std_rewards): (Vec<f64>, Vec<f64>) = match aggregation {
        MultiObjectiveAggregation::SumThenNormalize => {
            let rewards: Vec<f64> = (0..n).map(weighted_sum).collect();
            let group_mean: Vec<f64> = rewards
                .chunks(g)
                .map(|grp| nanmean(grp.iter().copied()))
                .collect();
            let std: Vec<f64> = match scale_rewards {
                ScaleRewards::Group | ScaleRewards::None => {
                    if g > 1 {
                        rewards
                            .chunks(g)
                            .flat_map(|grp| std::iter::repeat_n(nanstd(grp), g))
                            .collect()
                    } else {
                        vec![0.0; n]
                    }
                }
                ScaleRewards::Batch => {
                    if n > 1 {
                        vec![nanstd(&rewards); n]
                    } else {
                        vec![0.0; n]
                    }
                }
            };
            let adv = (0..n)
                .map(|i| {
                    let a = rewards[i] - group_mean[i / g];
                    if scale_rewards == ScaleRewards::None {
                        a
                    } else {
                        a / (std[i] + 1e-4)
                    }
                })
                .collect();
            (adv, std)
        }
        MultiObjectiveAggregation::NormalizeThenSum => {
            let mut rewards = vec![0.0; n];
            for (grp_idx, grp) in r.chunks(g).enumerate() {
                let mut normalised = vec![vec![0.0; n_funcs]; g];
                for j in 0..n_funcs {
                    let col: Vec<f64> = grp.iter().map(|row| row[j]).collect();
                    let mean = nanmean(col.iter().copied());
                    let std = if g > 1 { nanstd(&col) } else { 0.0 };
                    for (k, x) in col.iter().enumerate() {
                        normalised[k][j] = (x - mean) / (std + 1e-4);
                    }
                }
                for (k, row) in normalised.iter().enumerate() {
                    let i = grp_idx * g + k;
                    rewards[i] = if unscorable[i] {
                        f64::NAN
                    } else {
                        nansum(row.iter().zip(&w).map(|(x, w)| x * w))
                    };
                }
            }
            let std = if n > 1 { nanstd(&rewards) } else { 0.0 };
            let mean = nanmean(rewards.iter().copied());
            let adv = rewards.iter().map(|x| (x - mean) / (std + 1e-4)).collect();
            (adv, vec![std; n])
        }
    };
    for a in &mut advantages {
        if a.is_nan() {
            *a = 0.0;
        }
    }

    let logged: Vec<f64> = (0..n).map(weighted_sum).collect();
    let metrics = GrpoRewardMetrics {
        reward: nanmean(logged.iter().copied()),
        reward_std: nanstd(&logged),
        frac_reward_zero_std: std_rewards.iter().filter(|s| is_close_to_zero(**s)).count() as f64
            / n as f64,
        per_func_mean: (0..n_funcs)
            .map(|j| nanmean(r.iter().map(|row| row[j])))
            .collect(),
        per_func_std: (0..n_funcs)
            .map(|j| nanstd(&r.iter().map(|row| row[j]).collect::<Vec<_>>()))
            .collect(),
    };
    Ok(GrpoAdvantages {
        advantages: advantages.into_iter().map(|a| a as f32).collect(),
        metrics,
    })
}

// ---------------------------------------------------------------------------------------------
// Truncated completions
// ---------------------------------------------------------------------------------------------

/// Whether a generated completion was cut by the length limit: TRL's
/// `ids[-1] not in [*eos_token_ids, pad_token_id]`. An empty completion counts as truncated.
pub fn is_truncated(completion_ids: &[u32], eos_token_ids: &[u32], pad_token_id: u32) -> bool {
    match completion_ids.last() {
        Some(last) => *last != pad_token_id && !eos_token_ids.contains(last),
        None => true,
    }
}

/// `mask_truncated_completions = True`: zero the completion-mask rows of truncated completions
/// (`completion_mask * (~is_truncated).unsqueeze(1)`), so they count in no loss term.
pub fn mask_truncated_completions<B: Backend>(
    completion_mask: Tensor<B, 2>,
    truncated: &[bool],
) -> Result<Tensor<B, 2>> {
    let [rows, _] = completion_mask.dims();
    ensure!(
        truncated.len() == rows,
        "mask_truncated_completions: {} truncation flags for {rows} completions",
        truncated.len()
    );
    let keep: Vec<f32> = truncated
        .iter()
        .map(|&t| if t { 0.0 } else { 1.0 })
        .collect();
    let keep = tensor1::<B>(&keep, &completion_mask.device()).unsqueeze_dim::<2>(1);
    Ok(completion_mask * keep)
}

// ---------------------------------------------------------------------------------------------
// Loss
// ---------------------------------------------------------------------------------------------

/// `GRPOConfig.loss_type`: the per-token objective and how it is aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoLossType {
    /// Clipped objective, mean over each sequence's tokens, then over sequences.
    Grpo,
    /// Clipped objective, mean over the tokens of the local batch.
    Bnpo,
    /// Clipped objective, sum over tokens / (batch size * max_completion_length).
    DrGrpo,
    /// Clipped objective, sum over tokens / tokens in the generation batch (TRL default).
    Dapo,
    /// Clipped, detached importance weights times log-probs (MiniMax-M1), aggregated as dapo.
    Cispo,
    /// Soft sigmoid gate instead of clipping, aggregated as grpo.
    Sapo,
    /// Length-unbiased sequence objective: sum over tokens, mean over sequences.
    Luspo,
}

crate::named_option!(GrpoLossType, "GRPO loss_type", [
    Grpo => "grpo",
    Bnpo => "bnpo",
    DrGrpo => "dr_grpo",
    Dapo => "dapo",
    Cispo => "cispo",
    Sapo => "sapo",
    Luspo => "luspo",
]);

impl GrpoLossType {
    /// The loss types that use the two-sided clipped ratio and log the clip ratios.
    fn is_clipped(self) -> bool {
        matches!(
            self,
            Self::Grpo | Self::Bnpo | Self::DrGrpo | Self::Dapo | Self::Luspo
        )
    }
}

/// `GRPOConfig.importance_sampling_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportanceSamplingLevel {
    /// One ratio per token (TRL default).
    Token,
    /// One ratio per sequence: exp of the mean token log-ratio (GSPO).
    Sequence,
}

crate::named_option!(ImportanceSamplingLevel, "importance_sampling_level", [
    Token => "token",
    Sequence => "sequence",
]);

/// The `GRPOConfig` / trainer state the loss reads.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoLossConfig {
    /// Objective and aggregation.
    pub loss_type: GrpoLossType,
    /// KL coefficient; 0 drops the KL term and needs no reference log-probs.
    pub beta: f64,
    /// Lower clip: ratios below `1 - epsilon_low` are clipped (`GRPOConfig.epsilon`).
    pub epsilon_low: f64,
    /// Upper clip: `1 + epsilon_high` (cispo: the ratio cap itself).
    pub epsilon_high: f64,
    /// Two-sided GRPO: also cap the unclipped ratio at `delta` (INTELLECT-2).
    pub delta: Option<f64>,
    /// Token- or sequence-level importance ratio.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Multiply the k3 KL by the importance ratio (TRL 1.16 default `true`): changes the gradient
    /// even on-policy, where the ratio's value is 1.
    pub use_bias_correction_kl: bool,
    /// Constant denominator of `dr_grpo`.
    pub max_completion_length: usize,
    /// SAPO gate temperature for positive advantages.
    pub sapo_temperature_pos: f64,
    /// SAPO gate temperature for non-positive advantages.
    pub sapo_temperature_neg: f64,
    /// Micro-batches per optimiser step: grpo/bnpo/dr_grpo/sapo/luspo divide by it; dapo/cispo
    /// scale their token normaliser by `gradient_accumulation_steps / steps_per_generation`.
    /// Use 1 (and `steps_per_generation = 1`) for evaluation.
    pub gradient_accumulation_steps: usize,
    /// Optimiser-step micro-batches generated at once (TRL defaults it to
    /// `gradient_accumulation_steps`).
    pub steps_per_generation: usize,
}

impl Default for GrpoLossConfig {
    /// TRL 1.16.0 `GRPOConfig` defaults (one micro-batch per step).
    fn default() -> Self {
        Self {
            loss_type: GrpoLossType::Dapo,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            use_bias_correction_kl: true,
            max_completion_length: 512,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            gradient_accumulation_steps: 1,
            steps_per_generation: 1,
        }
    }
}

impl GrpoLossConfig {
    /// Rejects values that would divide by zero or make no sense.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta.is_finite() && self.beta >= 0.0,
            "grpo: beta must be >= 0, got {}",
            self.beta
        );
        ensure!(
            self.epsilon_low.is_finite() && self.epsilon_high.is_finite(),
            "grpo: epsilon / epsilon_high must be finite"
        );
        ensure!(
            self.gradient_accumulation_steps > 0 && self.steps_per_generation > 0,
            "grpo: gradient_accumulation_steps and steps_per_generation must be > 0"
        );
        if self.loss_type == GrpoLossType::DrGrpo {
            ensure!(
                self.max_completion_length > 0,
                "grpo: dr_grpo needs max_completion_length > 0"
            );
        }
        if self.loss_type == GrpoLossType::Sapo {
            ensure!(
                self.sapo_temperature_pos != 0.0 && self.sapo_temperature_neg != 0.0,
                "grpo: sapo temperatures must not be 0"
            );
        }
        Ok(())
    }
}

/// One micro-batch of `B` completions padded to `T` tokens.
#[derive(Debug, Clone)]
pub struct GrpoBatch<B: Backend> {
    /// Current policy log-prob of each completion token `[B, T]` (carries the gradient).
    pub per_token_logps: Tensor<B, 2>,
    /// Log-probs of the policy that generated the batch `[B, T]`; `None` when generation and
    /// optimisation are aligned (`num_iterations == 1`), then the detached current log-probs.
    pub old_per_token_logps: Option<Tensor<B, 2>>,
    /// Reference log-probs `[B, T]`; required when `beta != 0`.
    pub ref_per_token_logps: Option<Tensor<B, 2>>,
    /// One advantage per completion `[B]`.
    pub advantages: Tensor<B, 1>,
    /// 1 for completion tokens that count, 0 for padding (and masked truncations) `[B, T]`.
    pub completion_mask: Tensor<B, 2>,
    /// dapo/cispo normaliser: active tokens of the whole generation batch (TRL's
    /// `num_items_in_batch`); `None` uses this micro-batch's `completion_mask.sum()`.
    pub num_items_in_batch: Option<f64>,
}

/// What TRL 1.16 logs from `_compute_loss` (those that need no entropies).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoMetrics {
    /// `kl`: masked mean of the (bias-corrected) per-token KL; `None` when `beta == 0`.
    pub kl: Option<f64>,
    /// `clip_ratio/low_mean`: fraction of tokens with ratio < 1 - eps_low and advantage < 0.
    pub clip_ratio_low_mean: Option<f64>,
    /// `clip_ratio/high_mean`: fraction with ratio > 1 + eps_high and advantage > 0.
    pub clip_ratio_high_mean: Option<f64>,
    /// `clip_ratio/region_mean`: either of the two.
    pub clip_ratio_region_mean: Option<f64>,
    /// `clip_ratio/low_min`: smallest per-sequence low-clip fraction (NaN rows skipped).
    pub clip_ratio_low_min: Option<f64>,
    /// `clip_ratio/high_max`: largest per-sequence high-clip fraction.
    pub clip_ratio_high_max: Option<f64>,
    /// `cispo_clip_ratio`: fraction of tokens whose ratio was capped (cispo only).
    pub cispo_clip_ratio: Option<f64>,
}

impl GrpoMetrics {
    /// The metrics TRL logs for this configuration, under TRL's names.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        [
            ("kl", self.kl),
            ("clip_ratio/low_mean", self.clip_ratio_low_mean),
            ("clip_ratio/high_mean", self.clip_ratio_high_mean),
            ("clip_ratio/region_mean", self.clip_ratio_region_mean),
            ("clip_ratio/low_min", self.clip_ratio_low_min),
            ("clip_ratio/high_max", self.clip_ratio_high_max),
            ("cispo_clip_ratio", self.cispo_clip_ratio),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

/// Result of [`grpo_loss`].
#[derive(Debug, Clone)]
pub struct GrpoLossOutput<B: Backend> {
    /// Scalar loss `[1]`, already scaled for gradient accumulation as TRL does.
    pub loss: Tensor<B, 1>,
    /// Logged statistics.
    pub metrics: GrpoMetrics,
}

/// Masked statistics of a 0/1 indicator (or any value) `x` that is `[B, T]` (token level) or
/// `[B, 1]` (sequence level): `(sum, count, per-row sums, per-row counts)` as TRL's
/// `global_masked_mean` / `masked_seq_mean` need them.
fn masked_parts<B: Backend>(
    x: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let [rows, cols] = x.dims();
    let device = x.device();
    if cols == 1 {
        // Sequence level: one value per sequence, counted without the mask.
        let count = Tensor::<B, 1>::from_floats([rows as f32], &device);
        let per_row = x.clone().reshape([rows]);
        (x.sum(), count, per_row, Tensor::ones([rows], &device))
    } else {
        let xm = x * mask.clone();
        let row_sums = xm.clone().sum_dim(1).reshape([rows]);
        let row_counts = mask.clone().sum_dim(1).reshape([rows]);
        (xm.sum(), mask.clone().sum(), row_sums, row_counts)
    }
}

/// `sum / max(count, 1)` of a [`masked_parts`] result.
fn global_mean(sum: f64, count: f64) -> f64 {
    sum / count.max(1.0)
}

/// TRL's `nanmin` / `nanmax` of `row_sums / row_counts` (rows with no tokens are NaN and skipped).
fn nan_extreme(row_sums: &[f64], row_counts: &[f64], pick_max: bool) -> f64 {
    row_sums
        .iter()
        .zip(row_counts)
        .map(|(s, c)| s / c)
        .filter(|v| !v.is_nan())
        .fold(f64::NAN, |acc, v| {
            if acc.is_nan() {
                v
            } else if pick_max {
                acc.max(v)
            } else {
                acc.min(v)
            }
        })
}

/// The GRPO loss of TRL 1.16.0 `GRPOTrainer._compute_loss` for one micro-batch (train mode).
///
/// Per token: ratio `exp(logp - old_logp)` (or per sequence for
/// `ImportanceSamplingLevel::Sequence`), the clipped surrogate `-min(r A, clip(r) A)` (or the
/// cispo / sapo variants), plus `beta * k3` KL to the reference
/// (`exp(ref - logp) - (ref - logp) - 1`, times the ratio when `use_bias_correction_kl`), then
/// aggregated by `loss_type`. Old and reference log-probs and advantages are detached, as TRL
/// computes them under `torch.no_grad()`.
pub fn grpo_loss<B: Backend>(
    batch: GrpoBatch<B>,
    cfg: &GrpoLossConfig,
) -> Result<GrpoLossOutput<B>> {
    cfg.validate()?;
    let [rows, cols] = batch.per_token_logps.dims();
    ensure!(rows > 0 && cols > 0, "grpo: empty batch");
    ensure_dims2(&batch.completion_mask, rows, cols, "grpo completion_mask")?;
    ensure_len(&batch.advantages, rows, "grpo advantages")?;
    if let Some(old) = &batch.old_per_token_logps {
        ensure_dims2(old, rows, cols, "grpo old_per_token_logps")?;
    }
    if let Some(r) = &batch.ref_per_token_logps {
        ensure_dims2(r, rows, cols, "grpo ref_per_token_logps")?;
    }
    if let Some(n) = batch.num_items_in_batch {
        ensure!(
            n.is_finite() && n >= 0.0,
            "grpo: num_items_in_batch must be a non-negative number, got {n}"
        );
    }

    let mask = batch.completion_mask.detach();
    let logps = batch.per_token_logps;
    let advantages = batch.advantages.detach().unsqueeze_dim::<2>(1); // [B, 1]
    let old = match batch.old_per_token_logps {
        Some(old) => old.detach(),
        None => logps.clone().detach(),
    };
    let log_ratio = logps.clone() - old;
    let log_importance_weights = match cfg.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => {
            (log_ratio * mask.clone()).sum_dim(1) / mask.clone().sum_dim(1).clamp_min(1.0)
        }
    };
    let mut coef_1 = log_importance_weights.exp(); // [B, T] or [B, 1]

    let per_token_kl = if cfg.beta != 0.0 {
        let Some(reference) = batch.ref_per_token_logps else {
            bail!("grpo: beta = {} needs ref_per_token_logps", cfg.beta);
        };
        let d = reference.detach() - logps.clone();
        let kl = (d.clone().exp() - d).sub_scalar(1.0);
        Some(if cfg.use_bias_correction_kl {
            kl * coef_1.clone()
        } else {
            kl
        })
    } else {
        None
    };

    let mut per_token_loss = match cfg.loss_type {
        GrpoLossType::Cispo => {
            let clamped = coef_1.clone().clamp_max(cfg.epsilon_high).detach();
            (clamped * advantages.clone() * logps.clone()).neg()
        }
        GrpoLossType::Sapo => {
            let pos = advantages.clone().greater_elem(0.0).float();
            let temps = pos
                .mul_scalar(cfg.sapo_temperature_pos - cfg.sapo_temperature_neg)
                .add_scalar(cfg.sapo_temperature_neg);
            let gate = activation::sigmoid(temps.clone() * coef_1.clone().sub_scalar(1.0))
                .mul_scalar(4.0)
                / temps;
            (gate * advantages.clone()).neg()
        }
        _ => {
            let coef_2 = coef_1
                .clone()
                .clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
            if let Some(delta) = cfg.delta {
                coef_1 = coef_1.clamp_max(delta);
            }
            let loss1 = coef_1.clone() * advantages.clone();
            let loss2 = coef_2 * advantages.clone();
            loss1.min_pair(loss2).neg()
        }
    };
    if let Some(kl) = &per_token_kl {
        per_token_loss = per_token_loss + kl.clone().mul_scalar(cfg.beta);
    }

    let ga = cfg.gradient_accumulation_steps as f64;
    let masked_loss = per_token_loss * mask.clone(); // broadcasts [B, 1] to [B, T]
    let loss = match cfg.loss_type {
        GrpoLossType::Grpo | GrpoLossType::Sapo => {
            let per_seq = masked_loss.sum_dim(1) / mask.clone().sum_dim(1).clamp_min(1.0);
            per_seq.mean().div_scalar(ga)
        }
        GrpoLossType::Bnpo => {
            (masked_loss.sum() / mask.clone().sum().clamp_min(1.0)).div_scalar(ga)
        }
        GrpoLossType::DrGrpo => masked_loss
            .sum()
            .div_scalar(rows as f64 * cfg.max_completion_length as f64)
            .div_scalar(ga),
        GrpoLossType::Dapo | GrpoLossType::Cispo => {
            // TRL: num_items_in_batch.clamp(min=1) / num_processes * GA / steps_per_generation
            let scale = ga / cfg.steps_per_generation as f64;
            let normaliser = match batch.num_items_in_batch {
                Some(n) => {
                    Tensor::<B, 1>::from_floats([(n.max(1.0) * scale) as f32], &mask.device())
                }
                None => mask.clone().sum().clamp_min(1.0).mul_scalar(scale),
            };
            masked_loss.sum() / normaliser
        }
        GrpoLossType::Luspo => masked_loss.sum_dim(1).mean().div_scalar(ga),
    };

    // Metrics, read back in one transfer.
    let mut parts: Vec<Tensor<B, 1>> = Vec::new();
    if let Some(kl) = per_token_kl {
        let (s, c, _, _) = masked_parts(kl.detach(), &mask);
        parts.push(s);
        parts.push(c);
    }
    let adv_neg = advantages.clone().lower_elem(0.0).float();
    let adv_pos = advantages.greater_elem(0.0).float();
    let coef_1 = coef_1.detach();
    if cfg.loss_type.is_clipped() {
        let low = coef_1.clone().lower_elem(1.0 - cfg.epsilon_low).float() * adv_neg;
        let high = coef_1.greater_elem(1.0 + cfg.epsilon_high).float() * adv_pos;
        // low and high need opposite advantage signs, so "low or high" is their sum.
        let region = low.clone() + high.clone();
        for x in [low, high, region] {
            let (s, c, rs, rc) = masked_parts(x, &mask);
            parts.extend([s, c, rs, rc]);
        }
    } else if cfg.loss_type == GrpoLossType::Cispo {
        let capped = coef_1.greater_elem(cfg.epsilon_high).float() * adv_pos;
        let (s, c, _, _) = masked_parts(capped, &mask);
        parts.extend([s, c]);
    }
    let values = read_parts(parts);
    let mut it = values.into_iter();
    let mut metrics = GrpoMetrics {
        kl: None,
        clip_ratio_low_mean: None,
        clip_ratio_high_mean: None,
        clip_ratio_region_mean: None,
        clip_ratio_low_min: None,
        clip_ratio_high_max: None,
        cispo_clip_ratio: None,
    };
    let mut next = || it.next().expect("one metric part per push");
    if cfg.beta != 0.0 {
        let (s, c) = (next()[0], next()[0]);
        metrics.kl = Some(global_mean(s, c));
    }
    if cfg.loss_type.is_clipped() {
        let (low_s, low_c, low_rs, low_rc) = (next()[0], next()[0], next(), next());
        let (high_s, high_c, high_rs, high_rc) = (next()[0], next()[0], next(), next());
        let (reg_s, reg_c, _, _) = (next()[0], next()[0], next(), next());
        metrics.clip_ratio_low_mean = Some(global_mean(low_s, low_c));
        metrics.clip_ratio_high_mean = Some(global_mean(high_s, high_c));
        metrics.clip_ratio_region_mean = Some(global_mean(reg_s, reg_c));
        metrics.clip_ratio_low_min = Some(nan_extreme(&low_rs, &low_rc, false));
        metrics.clip_ratio_high_max = Some(nan_extreme(&high_rs, &high_rc, true));
    } else if cfg.loss_type == GrpoLossType::Cispo {
        let (s, c) = (next()[0], next()[0]);
        metrics.cispo_clip_ratio = Some(global_mean(s, c));
    }
    Ok(GrpoLossOutput { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::*;

    #[test]
    fn advantages_by_hand() {
        // groups of 2: [1, 3] (mean 2, std sqrt(2)) and [2, 2] (std 0)
        let r = vec![vec![1.0], vec![3.0], vec![2.0], vec![2.0]];
        let sum = MultiObjectiveAggregation::SumThenNormalize;
        let a = grpo_advantages(&r, &[1.0], 2, ScaleRewards::Group, sum).unwrap();
        let x = 1.0 / (2f64.sqrt() + 1e-4);
        let adv: Vec<f64> = a.advantages.iter().map(|&v| f64::from(v)).collect();
        assert_all_close("group", &adv, &[-x, x, 0.0, 0.0]);
        assert_close("zero std", a.metrics.frac_reward_zero_std, 0.5);
        assert_close("reward", a.metrics.reward, 2.0);
        // batch std of [1, 3, 2, 2] = sqrt(2/3), but centred on the group means
        let a = grpo_advantages(&r, &[1.0], 2, ScaleRewards::Batch, sum).unwrap();
        let x = 1.0 / ((2.0f64 / 3.0).sqrt() + 1e-4);
        let adv: Vec<f64> = a.advantages.iter().map(|&v| f64::from(v)).collect();
        assert_all_close("batch", &adv, &[-x, x, 0.0, 0.0]);
        let a = grpo_advantages(&r, &[1.0], 2, ScaleRewards::None, sum).unwrap();
        assert_eq!(a.advantages, vec![-1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn unscorable_completions_get_zero_advantage() {
        // weights [1, 0.5]; completion 1 has only its first reward; completion 3 has none
        let nan = f32::NAN;
        let r = vec![
            vec![1.0, 2.0],
            vec![0.0, nan],
            vec![1.0, 1.0],
            vec![nan, nan],
        ];
        let a = grpo_advantages(
            &r,
            &[1.0, 0.5],
            2,
            ScaleRewards::None,
            MultiObjectiveAggregation::SumThenNormalize,
        )
        .unwrap();
        // group 1: rewards [2, 0], mean 1; group 2: [1.5, NaN], mean 1.5
        assert_eq!(a.advantages, vec![1.0, -1.0, 0.0, 0.0]);
        assert!(grpo_advantages(
            &r[..3],
            &[1.0, 0.5],
            2,
            ScaleRewards::Group,
            MultiObjectiveAggregation::SumThenNormalize
        )
        .is_err());
    }

    #[test]
    fn truncation_mask() {
        assert!(!is_truncated(&[4, 2], &[2], 0));
        assert!(!is_truncated(&[4, 0], &[2], 0));
        assert!(is_truncated(&[4, 5], &[2], 0));
        let mask = t2::<Cpu>(&[vec![1.0, 1.0], vec![1.0, 0.0]]);
        let masked = mask_truncated_completions(mask, &[true, false]).unwrap();
        assert_eq!(vals(masked), vec![0.0, 0.0, 1.0, 0.0]);
    }

    fn batch<B: Backend>(logps: Tensor<B, 2>) -> GrpoBatch<B> {
        GrpoBatch {
            per_token_logps: logps,
            old_per_token_logps: None,
            ref_per_token_logps: None,
            // row 0: 2 tokens with A = 1; row 1: 1 token with A = -3
            advantages: t1(&[1.0, -3.0]),
            completion_mask: t2(&[vec![1.0, 1.0, 0.0], vec![1.0, 0.0, 0.0]]),
            num_items_in_batch: None,
        }
    }

    fn config(loss_type: GrpoLossType) -> GrpoLossConfig {
        GrpoLossConfig {
            loss_type,
            max_completion_length: 4,
            ..GrpoLossConfig::default()
        }
    }

    #[test]
    fn aggregations_by_hand() {
        // on-policy the ratio is 1, so each token's loss is -A: row 0 [-1, -1], row 1 [3]
        let logps = || t2::<Cpu>(&[vec![-1.0, -2.0, -0.5], vec![-0.3, -0.7, -0.1]]);
        let loss = |t: GrpoLossType, n: Option<f64>| {
            let b = GrpoBatch {
                num_items_in_batch: n,
                ..batch(logps())
            };
            vals(grpo_loss(b, &config(t)).unwrap().loss)[0]
        };
        assert_close("grpo", loss(GrpoLossType::Grpo, None), (-1.0 + 3.0) / 2.0);
        assert_close("bnpo", loss(GrpoLossType::Bnpo, None), 1.0 / 3.0);
        assert_close(
            "dr_grpo",
            loss(GrpoLossType::DrGrpo, None),
            1.0 / (2.0 * 4.0),
        );
        assert_close("dapo local", loss(GrpoLossType::Dapo, None), 1.0 / 3.0);
        assert_close("dapo global", loss(GrpoLossType::Dapo, Some(10.0)), 0.1);
        assert_close("luspo", loss(GrpoLossType::Luspo, None), (-2.0 + 3.0) / 2.0);
        // gradient accumulation: grpo divides by GA, dapo's normaliser is scaled by GA / spg
        let ga = GrpoLossConfig {
            gradient_accumulation_steps: 2,
            steps_per_generation: 1,
            ..config(GrpoLossType::Grpo)
        };
        assert_close(
            "grpo ga",
            vals(grpo_loss(batch(logps()), &ga).unwrap().loss)[0],
            0.5,
        );
        let ga = GrpoLossConfig {
            loss_type: GrpoLossType::Dapo,
            ..ga
        };
        assert_close(
            "dapo ga",
            vals(grpo_loss(batch(logps()), &ga).unwrap().loss)[0],
            1.0 / 6.0,
        );
    }

    #[test]
    fn on_policy_gradient_is_minus_advantage_over_length() {
        let logps = t2::<Ad>(&[vec![-1.0, -2.0, -0.5], vec![-0.3, -0.7, -0.1]]).require_grad();
        let out = grpo_loss(batch(logps.clone()), &config(GrpoLossType::Grpo)).unwrap();
        let grads = out.loss.backward();
        // d/dlogp = -A * ratio / len / B; padding gets nothing
        assert_all_close(
            "grad",
            &vals(logps.grad(&grads).unwrap()),
            &[-0.25, -0.25, 0.0, 1.5, 0.0, 0.0],
        );
        assert_eq!(out.metrics.kl, None);
        assert_eq!(out.metrics.clip_ratio_region_mean, Some(0.0));
    }

    fn one_token<B: Backend>(logp: f32, old: f32, adv: f32) -> GrpoBatch<B> {
        GrpoBatch {
            per_token_logps: t2(&[vec![logp]]),
            old_per_token_logps: Some(t2(&[vec![old]])),
            ref_per_token_logps: None,
            advantages: t1(&[adv]),
            completion_mask: t2(&[vec![1.0]]),
            num_items_in_batch: None,
        }
    }

    #[test]
    fn clipping_and_delta_by_hand() {
        // ratio e^0.5 = 1.6487 with eps 0.2
        let r = 0.5f64.exp();
        let run = |adv: f32, delta: Option<f64>| {
            let logps = t2::<Ad>(&[vec![-1.0]]).require_grad();
            let b = GrpoBatch {
                per_token_logps: logps.clone(),
                ..one_token::<Ad>(-1.0, -1.5, adv)
            };
            let cfg = GrpoLossConfig {
                delta,
                ..config(GrpoLossType::Grpo)
            };
            let out = grpo_loss(b, &cfg).unwrap();
            let loss = vals(out.loss.clone())[0];
            let grads = out.loss.backward();
            (loss, vals(logps.grad(&grads).unwrap())[0], out.metrics)
        };
        // A = 1: min(1.6487, 1.2) = 1.2, clipped -> no gradient, counted as high clip
        let (loss, grad, m) = run(1.0, None);
        assert_close("pos loss", loss, -1.2);
        assert_close("pos grad", grad, 0.0);
        assert_eq!(m.clip_ratio_high_mean, Some(1.0));
        assert_eq!(m.clip_ratio_high_max, Some(1.0));
        // A = -1: -min(-1.6487, -1.2) = 1.6487, unclipped -> gradient = ratio
        let (loss, grad, m) = run(-1.0, None);
        assert_close("neg loss", loss, r);
        assert_close("neg grad", grad, r);
        assert_eq!(m.clip_ratio_low_mean, Some(0.0));
        // delta 1.1 caps the unclipped ratio too: 1.2, no gradient
        let (loss, grad, _) = run(-1.0, Some(1.1));
        assert_close("delta loss", loss, 1.2);
        assert_close("delta grad", grad, 0.0);
    }

    #[test]
    fn k3_kl_and_its_bias_correction_by_hand() {
        // logp -1, ref -1.5, A = 0, beta 0.1, on-policy
        // k3 = e^-0.5 + 0.5 - 1 = 0.1065307; d k3 / d logp = 1 - e^-0.5 = 0.3934693
        // with the ratio factor (value 1, derivative 1) the gradient gains k3: 0.5 exactly
        for (bias, grad_expected) in [(false, 0.03934693402873666), (true, 0.05)] {
            let logps = t2::<Ad>(&[vec![-1.0]]).require_grad();
            let b = GrpoBatch {
                per_token_logps: logps.clone(),
                old_per_token_logps: None,
                ref_per_token_logps: Some(t2(&[vec![-1.5]])),
                ..one_token::<Ad>(-1.0, -1.0, 0.0)
            };
            let cfg = GrpoLossConfig {
                beta: 0.1,
                use_bias_correction_kl: bias,
                ..config(GrpoLossType::Grpo)
            };
            let out = grpo_loss(b, &cfg).unwrap();
            assert_close("loss", vals(out.loss.clone())[0], 0.1 * 0.10653065971263342);
            assert_close("kl metric", out.metrics.kl.unwrap(), 0.10653065971263342);
            let grads = out.loss.backward();
            assert_close("grad", vals(logps.grad(&grads).unwrap())[0], grad_expected);
        }
    }

    #[test]
    fn missing_reference_is_an_error() {
        let cfg = GrpoLossConfig {
            beta: 0.1,
            ..config(GrpoLossType::Grpo)
        };
        let err = grpo_loss(one_token::<Cpu>(-1.0, -1.0, 1.0), &cfg).unwrap_err();
        assert!(err.to_string().contains("ref_per_token_logps"), "{err}");
        assert!("gspo".parse::<GrpoLossType>().is_err());
    }
}
