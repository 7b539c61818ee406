//! Several weighted reward functions scored together, combined exactly as TRL 1.x's
//! `GRPOTrainer` does (`_calculate_rewards` and `_generate_and_score_completions`, trl 1.16.0):
//!
//! 1. every function scores every row; `None` becomes NaN (`rewards_per_func[row, func]`);
//! 2. a row's reward is the NaN-skipping sum (`torch.nansum`) of `weight * score`, so a function
//!    that does not apply to a row simply drops out of that row's sum;
//! 3. a row where *every* function returned `None` is "unscorable": TRL logs a warning
//!    ("All reward functions returned None for the following kwargs: ...") and sets its reward
//!    to NaN rather than the 0 that `nansum` would give; GRPO then excludes it from the group
//!    baseline and gives it advantage 0. [`RewardScores::warning`] carries that warning (also
//!    logged through `log::warn!`) and the row's total is NaN.
//!
//! Metrics follow TRL's names: `rewards/<name>/mean` and `rewards/<name>/std` over the rows
//! where the function applied (`nanmean` / TRL's `nanstd`), `reward` and `reward_std` over the
//! scorable rows.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::RewardConfig;
use crate::reward::{RewardBatch, RewardFn};

/// Weighted reward functions, scored and combined together.
pub struct RewardSet {
    funcs: Vec<Box<dyn RewardFn>>,
    weights: Vec<f32>,
}

impl std::fmt::Debug for RewardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewardSet")
            .field("names", &self.names())
            .field("weights", &self.weights)
            .finish()
    }
}

impl RewardSet {
    /// Functions with their weights. Refuses an empty list, non-finite weights and duplicate
    /// names (they would share one metric).
    pub fn new(funcs: Vec<(Box<dyn RewardFn>, f32)>) -> Result<Self> {
        if funcs.is_empty() {
            bail!("no reward functions configured: GRPO needs at least one");
        }
        let mut seen = HashSet::new();
        for (func, weight) in &funcs {
            let name = func.name();
            if !weight.is_finite() {
                bail!("reward `{name}`: weight must be a finite number, got {weight}");
            }
            if !seen.insert(name.to_string()) {
                bail!("two reward functions are named `{name}`; give one of them another `name`");
            }
        }
        let (funcs, weights) = funcs.into_iter().unzip();
        Ok(RewardSet { funcs, weights })
    }

    /// Builds every configured reward. Relative plugin paths are resolved against `base_dir`
    /// (the directory of the config file).
    pub fn from_configs(configs: &[RewardConfig], base_dir: &Path) -> Result<Self> {
        let funcs = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let func = config
                    .build(base_dir)
                    .with_context(|| format!("reward function #{} ({})", i + 1, config.kind()))?;
                Ok((func, config.weight()))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(funcs)
    }

    /// As [`from_configs`](Self::from_configs), with plugins in worker processes of `worker`
    /// (see [`RewardConfig::build_isolated`]).
    pub fn from_configs_isolated(
        configs: &[RewardConfig],
        base_dir: &Path,
        worker: &Path,
    ) -> Result<Self> {
        let funcs = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let func = config
                    .build_isolated(base_dir, worker)
                    .with_context(|| format!("reward function #{} ({})", i + 1, config.kind()))?;
                Ok((func, config.weight()))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(funcs)
    }

    pub fn names(&self) -> Vec<&str> {
        self.funcs.iter().map(|f| f.name()).collect()
    }

    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Scores `batch` with every function and combines the scores (see the module docs).
    pub fn score(&self, batch: &RewardBatch<'_>) -> Result<RewardScores> {
        let rows = batch.len();
        let mut per_func = Vec::with_capacity(self.funcs.len());
        for func in &self.funcs {
            let scores = func
                .score(batch)
                .with_context(|| format!("reward function `{}`", func.name()))?;
            if scores.len() != rows {
                bail!(
                    "the reward function `{}` returned {} rewards, but {rows} were expected (one per prompt-completion pair)",
                    func.name(),
                    scores.len()
                );
            }
            per_func.push(
                scores
                    .into_iter()
                    .map(|s| s.unwrap_or(f32::NAN))
                    .collect::<Vec<f32>>(),
            );
        }

        let mut total = Vec::with_capacity(rows);
        let mut first_unscorable = None;
        for row in 0..rows {
            let mut sum = 0.0f32;
            let mut any_scored = false;
            for (scores, &weight) in per_func.iter().zip(&self.weights) {
                let score = scores[row];
                any_scored |= !score.is_nan();
                // torch.nansum: NaN products (from a NaN score, or 0 * inf) count as zero.
                let product = score * weight;
                if !product.is_nan() {
                    sum += product;
                }
            }
            if !any_scored {
                first_unscorable.get_or_insert(row);
            }
            total.push(if any_scored { sum } else { f32::NAN });
        }

        let warning = first_unscorable.map(|row| {
            let mut kwargs = batch.columns()[row].clone();
            kwargs.insert("prompt".into(), Value::String(batch.prompts()[row].clone()));
            kwargs.insert(
                "completion".into(),
                Value::String(batch.completions()[row].clone()),
            );
            let message = format!(
                "All reward functions returned None for the following kwargs:\n{}\n\
                 Please ensure that at least one reward function returns a valid reward.",
                Value::Object(kwargs)
            );
            log::warn!("{message}");
            message
        });

        Ok(RewardScores {
            names: self.names().into_iter().map(String::from).collect(),
            weights: self.weights.clone(),
            per_func,
            total,
            warning,
        })
    }
}

/// The scores of one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardScores {
    /// Function names, in configuration order.
    pub names: Vec<String>,
    pub weights: Vec<f32>,
    /// `per_func[f][row]`: function `f`'s score for `row`, NaN where it returned `None`.
    pub per_func: Vec<Vec<f32>>,
    /// Per row: the NaN-skipping weighted sum; NaN for an unscorable row (every function
    /// returned `None`), which GRPO must leave out of its baselines.
    pub total: Vec<f32>,
    /// TRL's warning about the first unscorable row, if any.
    pub warning: Option<String>,
}

impl RewardScores {
    /// Rows where every function returned `None`.
    pub fn unscorable_rows(&self) -> Vec<usize> {
        (0..self.total.len())
            .filter(|&row| self.per_func.iter().all(|scores| scores[row].is_nan()))
            .collect()
    }

    /// TRL's reward metrics for this batch, in TRL's order: `rewards/<name>/mean` and
    /// `rewards/<name>/std` per function, then `reward` and `reward_std`. A mean over no
    /// values is NaN; a std over fewer than two values is NaN.
    pub fn metrics(&self) -> Vec<(String, f32)> {
        let mut out = Vec::with_capacity(2 * self.names.len() + 2);
        for (name, scores) in self.names.iter().zip(&self.per_func) {
            out.push((format!("rewards/{name}/mean"), nanmean(scores)));
            out.push((format!("rewards/{name}/std"), nanstd(scores)));
        }
        out.push(("reward".into(), nanmean(&self.total)));
        out.push(("reward_std".into(), nanstd(&self.total)));
        out
    }
}

/// Mean over the non-NaN values (`torch.nanmean`); NaN when there are none.
pub fn nanmean(values: &[f32]) -> f32 {
    let (sum, count) = values
        .iter()
        .filter(|v| !v.is_nan())
        .fold((0.0f64, 0usize), |(s, n), &v| (s + f64::from(v), n + 1));
    if count == 0 {
        f32::NAN
    } else {
        (sum / count as f64) as f32
    }
}

/// Sample standard deviation over the non-NaN values, with Bessel's correction, computed the
/// way TRL's `trl.trainer.utils.nanstd` does (so infinities give the same results): the mean of
/// the non-NaN squared deviations, times `n / (n - 1)` for the `n` non-NaN values. NaN when
/// `n < 2`.
pub fn nanstd(values: &[f32]) -> f32 {
    let count = values.iter().filter(|v| !v.is_nan()).count();
    if count < 2 {
        return f32::NAN;
    }
    let mean = f64::from(nanmean(values));
    let squared: Vec<f32> = values
        .iter()
        .map(|&v| ((f64::from(v) - mean) * (f64::from(v) - mean)) as f32)
        .collect();
    let variance = f64::from(nanmean(&squared)) * count as f64 / (count as f64 - 1.0);
    variance.sqrt() as f32
}
