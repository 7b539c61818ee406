//! Direct Preference Optimisation losses.
//!
//! Transcribed from TRL 1.16.0 `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py), for the
//! default `f_divergence_type = "reverse_kl"`, `ld_alpha = None` and `use_weighting = False`.
//! The inputs are per-sequence log-probabilities summed over the completion tokens, exactly what
//! TRL computes before the loss (`per_token_logps.sum(dim=1)`).

use anyhow::{bail, ensure, Result};
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::common::ensure_len;
use super::preference::{pair_metrics, PairMetrics};

/// One of TRL's DPO `loss_type` values (the ones that need only per-sequence log-probs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLossType {
    /// `-logsigmoid(beta * delta)`, the original DPO loss.
    Sigmoid,
    /// `relu(1 - beta * delta)` (SLiC).
    Hinge,
    /// `(delta_per_token - 1 / (2 beta))^2` with log-ratios divided by completion length.
    Ipo,
    /// EXO-pref, needs `label_smoothing > 0`.
    ExoPair,
    /// NCA for pairs.
    NcaPair,
    /// Robust DPO (noisy labels, `label_smoothing` in [0, 0.5)).
    Robust,
    /// BCO for pairs.
    BcoPair,
    /// SPPO with hard probabilities.
    SppoHard,
    /// APO-zero.
    ApoZero,
    /// APO-down.
    ApoDown,
    /// DiscoPOP (uses `discopop_tau`).
    Discopop,
    /// Sigmoid loss on length-normalised log-ratios.
    SigmoidNorm,
}

crate::named_option!(DpoLossType, "DPO loss_type", [
    Sigmoid => "sigmoid",
    Hinge => "hinge",
    Ipo => "ipo",
    ExoPair => "exo_pair",
    NcaPair => "nca_pair",
    Robust => "robust",
    BcoPair => "bco_pair",
    SppoHard => "sppo_hard",
    ApoZero => "apo_zero",
    ApoDown => "apo_down",
    Discopop => "discopop",
    SigmoidNorm => "sigmoid_norm",
]);

impl DpoLossType {
    /// Loss types that divide the log-ratios by the number of completion tokens.
    fn needs_lengths(self) -> bool {
        matches!(self, Self::Ipo | Self::SigmoidNorm)
    }
}

/// The `[dpo]` section of a run file: TRL's `DPOConfig` names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// Temperature of the implicit reward (IPO: the regulariser tau).
    pub beta: f64,
    /// Label noise for `robust`, `exo_pair` (TRL 1.16's `sigmoid` ignores it).
    pub label_smoothing: f64,
    /// Losses summed together, each `mean()`-ed over the batch (`loss_type`: one name or a list).
    #[serde(rename = "loss_type", deserialize_with = "crate::options::one_or_many")]
    pub loss_types: Vec<DpoLossType>,
    /// One weight per loss type; `None` means all 1.0 (as TRL).
    pub loss_weights: Option<Vec<f64>>,
    /// Temperature of the DiscoPOP mixing coefficient.
    pub discopop_tau: f64,
    /// Compute every example's reference log-probs once before training.
    pub precompute_ref_log_probs: bool,
}

impl Default for DpoConfig {
    /// TRL 1.16.0 `DPOConfig` defaults.
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            loss_types: vec![DpoLossType::Sigmoid],
            loss_weights: None,
            discopop_tau: 0.05,
            precompute_ref_log_probs: false,
        }
    }
}

impl DpoConfig {
    /// Rejects configurations TRL rejects (or that would divide by zero).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "key `dpo.beta`: expected a positive number, got {}",
            self.beta
        );
        ensure!(
            !self.loss_types.is_empty(),
            "key `dpo.loss_type`: expected at least one loss type"
        );
        if let Some(w) = &self.loss_weights {
            ensure!(
                w.len() == self.loss_types.len(),
                "key `dpo.loss_weights`: {} weights for {} loss types (expected one per loss_type)",
                w.len(),
                self.loss_types.len()
            );
        }
        if self.loss_types.contains(&DpoLossType::ExoPair) {
            ensure!(
                self.label_smoothing > 0.0 && self.label_smoothing < 1.0,
                "key `dpo.label_smoothing`: exo_pair needs 0 < label_smoothing < 1, got {}",
                self.label_smoothing
            );
        }
        if self.loss_types.contains(&DpoLossType::Robust) {
            ensure!(
                self.label_smoothing != 0.5,
                "key `dpo.label_smoothing`: robust divides by 1 - 2 * label_smoothing, which is 0 for label_smoothing = 0.5"
            );
        }
        if self.loss_types.contains(&DpoLossType::Discopop) {
            ensure!(
                self.discopop_tau != 0.0,
                "key `dpo.discopop_tau`: must not be 0"
            );
        }
        Ok(())
    }

    fn weights(&self) -> Vec<f64> {
        self.loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.loss_types.len()])
    }
}

/// Per-sequence log-probabilities of one batch of `B` preference pairs.
#[derive(Debug, Clone)]
pub struct DpoLogps<B: Backend> {
    /// Policy log-prob of each chosen completion, summed over its tokens: `[B]`.
    pub policy_chosen: Tensor<B, 1>,
    /// Policy log-prob of each rejected completion: `[B]`.
    pub policy_rejected: Tensor<B, 1>,
    /// Reference log-prob of each chosen completion: `[B]` (detached here, as TRL runs it under no_grad).
    pub ref_chosen: Tensor<B, 1>,
    /// Reference log-prob of each rejected completion: `[B]`.
    pub ref_rejected: Tensor<B, 1>,
    /// Completion token counts of the chosen sequences (`completion_mask.sum(1)`), needed by `ipo`
    /// and `sigmoid_norm`.
    pub chosen_lengths: Option<Tensor<B, 1>>,
    /// Completion token counts of the rejected sequences.
    pub rejected_lengths: Option<Tensor<B, 1>>,
}

/// What TRL logs for a DPO step (`rewards/*`, `logps/*`), averaged over the batch: the pair
/// metrics the reference-free trainers log too, with `beta * (policy - ref)` as the rewards.
pub type DpoMetrics = PairMetrics;

/// Result of [`dpo_loss`].
#[derive(Debug, Clone)]
pub struct DpoOutput<B: Backend> {
    /// The weighted sum of the batch-mean losses, shape `[1]`; differentiable w.r.t. the policy log-probs.
    pub loss: Tensor<B, 1>,
    /// `beta * (policy_chosen - ref_chosen)`, detached: `[B]`.
    pub chosen_rewards: Tensor<B, 1>,
    /// `beta * (policy_rejected - ref_rejected)`, detached: `[B]`.
    pub rejected_rewards: Tensor<B, 1>,
    /// Batch means as TRL logs them.
    pub metrics: DpoMetrics,
}

/// The DPO loss of TRL 1.16.0 `DPOTrainer._compute_loss`: for each configured loss type a
/// per-sequence loss, `mean()` over the batch, times its weight, summed.
///
/// Gradients flow into `policy_chosen` / `policy_rejected` only; the reference log-probs and the
/// lengths are detached, as TRL computes them under `torch.no_grad()`.
pub fn dpo_loss<B: Backend>(logps: DpoLogps<B>, cfg: &DpoConfig) -> Result<DpoOutput<B>> {
    cfg.validate()?;
    let [batch] = logps.policy_chosen.dims();
    ensure!(batch > 0, "dpo: empty batch");
    ensure_len(&logps.policy_rejected, batch, "dpo policy_rejected")?;
    ensure_len(&logps.ref_chosen, batch, "dpo ref_chosen")?;
    ensure_len(&logps.ref_rejected, batch, "dpo ref_rejected")?;

    let beta = cfg.beta;
    let ls = cfg.label_smoothing;
    let chosen_logratios = logps.policy_chosen.clone() - logps.ref_chosen.detach();
    let rejected_logratios = logps.policy_rejected.clone() - logps.ref_rejected.detach();
    // reverse-KL DPO: the scores are the log-ratios themselves.
    let delta = chosen_logratios.clone() - rejected_logratios.clone();
    let logits = delta.clone().mul_scalar(beta);

    // Length-normalised scores (TRL: `chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)`).
    let avg_delta = if cfg.loss_types.iter().any(|t| t.needs_lengths()) {
        let (Some(lc), Some(lr)) = (&logps.chosen_lengths, &logps.rejected_lengths) else {
            bail!("dpo: loss types ipo / sigmoid_norm need chosen_lengths and rejected_lengths");
        };
        ensure_len(lc, batch, "dpo chosen_lengths")?;
        ensure_len(lr, batch, "dpo rejected_lengths")?;
        let chosen_avg = chosen_logratios.clone() / lc.clone().detach().clamp_min(1.0);
        let rejected_avg = rejected_logratios.clone() / lr.clone().detach().clamp_min(1.0);
        Some(chosen_avg - rejected_avg)
    } else {
        None
    };

    let logsig = activation::log_sigmoid::<1, B>;
    let sig = activation::sigmoid::<1, B>;
    let mut loss: Option<Tensor<B, 1>> = None;
    for (loss_type, weight) in cfg.loss_types.iter().zip(cfg.weights()) {
        let per_sequence = match loss_type {
            DpoLossType::Sigmoid => logsig(logits.clone()).neg(),
            DpoLossType::Hinge => activation::relu(logits.clone().neg().add_scalar(1.0)),
            DpoLossType::Ipo => {
                let d = avg_delta.clone().expect("lengths checked above");
                d.sub_scalar(1.0 / (2.0 * beta)).square()
            }
            DpoLossType::ExoPair => {
                // qw (log qw - log(1 - eps)) + ql (log ql - log eps)
                let log_pw = (-ls).ln_1p();
                let log_pl = ls.ln();
                let qw = sig(logits.clone());
                let ql = sig(logits.clone().neg());
                let log_qw = logsig(logits.clone());
                let log_ql = logsig(logits.clone().neg());
                qw * log_qw.sub_scalar(log_pw) + ql * log_ql.sub_scalar(log_pl)
            }
            DpoLossType::NcaPair => {
                let cr = chosen_logratios.clone().mul_scalar(beta);
                let rr = rejected_logratios.clone().mul_scalar(beta);
                logsig(cr.clone()).neg()
                    - logsig(cr.neg()).mul_scalar(0.5)
                    - logsig(rr.neg()).mul_scalar(0.5)
            }
            DpoLossType::Robust => {
                let clean = logsig(logits.clone()).mul_scalar(-(1.0 - ls));
                let flipped = logsig(logits.clone().neg()).mul_scalar(-ls);
                (clean - flipped).div_scalar(1.0 - 2.0 * ls)
            }
            DpoLossType::BcoPair => {
                let cr = chosen_logratios.clone().mul_scalar(beta);
                let rr = rejected_logratios.clone().mul_scalar(beta);
                logsig(cr).neg() - logsig(rr.neg())
            }
            DpoLossType::SppoHard => {
                let winner = chosen_logratios.clone().sub_scalar(0.5 / beta).square();
                let loser = rejected_logratios.clone().add_scalar(0.5 / beta).square();
                winner + loser
            }
            DpoLossType::ApoZero => {
                let chosen = sig(chosen_logratios.clone().mul_scalar(beta))
                    .neg()
                    .add_scalar(1.0);
                let rejected = sig(rejected_logratios.clone().mul_scalar(beta));
                chosen + rejected
            }
            DpoLossType::ApoDown => {
                let chosen = sig(chosen_logratios.clone().mul_scalar(beta));
                let rejected = sig(delta.clone().mul_scalar(beta)).neg().add_scalar(1.0);
                chosen + rejected
            }
            DpoLossType::Discopop => {
                let modulation = sig(logits.clone().div_scalar(cfg.discopop_tau));
                let logistic = logsig(logits.clone()).neg();
                let exponential = logits.clone().neg().exp();
                logistic * modulation.clone().neg().add_scalar(1.0) + exponential * modulation
            }
            DpoLossType::SigmoidNorm => {
                let d = avg_delta.clone().expect("lengths checked above");
                logsig(d.mul_scalar(beta)).neg()
            }
        };
        let term = per_sequence.mean().mul_scalar(weight);
        loss = Some(match loss {
            None => term,
            Some(acc) => acc + term,
        });
    }
    let loss = loss.expect("loss_types is non-empty");

    let chosen_rewards = chosen_logratios.detach().mul_scalar(beta);
    let rejected_rewards = rejected_logratios.detach().mul_scalar(beta);
    let metrics = pair_metrics(
        chosen_rewards.clone(),
        rejected_rewards.clone(),
        logps.policy_chosen.detach(),
        logps.policy_rejected.detach(),
    );
    Ok(DpoOutput {
        loss,
        chosen_rewards,
        rejected_rewards,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::*;

    /// Two pairs: pair 1 has log-ratios +0.5 / -0.5 (delta = 1), pair 2 has -1 / +1 (delta = -2).
    fn pairs<B: Backend>(with_lengths: bool) -> DpoLogps<B> {
        DpoLogps {
            policy_chosen: t1(&[-1.0, -3.0]),
            policy_rejected: t1(&[-2.0, -1.0]),
            ref_chosen: t1(&[-1.5, -2.0]),
            ref_rejected: t1(&[-1.5, -2.0]),
            // pair 2's chosen length 0 is clamped to 1 as in TRL
            chosen_lengths: with_lengths.then(|| t1(&[2.0, 0.0])),
            rejected_lengths: with_lengths.then(|| t1(&[4.0, 1.0])),
        }
    }

    fn cfg(types: &[DpoLossType], beta: f64) -> DpoConfig {
        DpoConfig {
            beta,
            loss_types: types.to_vec(),
            ..DpoConfig::default()
        }
    }

    #[test]
    fn sigmoid_by_hand_with_gradients_and_metrics() {
        // loss = mean(log(1 + e^-0.1), log(1 + e^0.2)) = mean(0.6443967, 0.7981389)
        let logps = pairs::<Ad>(false);
        let chosen = logps.policy_chosen.clone().require_grad();
        let ref_chosen = logps.ref_chosen.clone().require_grad();
        let out = dpo_loss(
            DpoLogps {
                policy_chosen: chosen.clone(),
                ref_chosen: ref_chosen.clone(),
                ..logps
            },
            &cfg(&[DpoLossType::Sigmoid], 0.1),
        )
        .unwrap();
        assert_close("loss", vals(out.loss.clone())[0], 0.7212677647275814);
        assert_all_close(
            "chosen rewards",
            &vals(out.chosen_rewards.clone()),
            &[0.05, -0.1],
        );
        assert_all_close(
            "rejected rewards",
            &vals(out.rejected_rewards.clone()),
            &[-0.05, 0.1],
        );
        let m = out.metrics;
        assert_close("accuracy", m.rewards_accuracies, 0.5);
        assert_close("margins", m.rewards_margins, (0.1 - 0.2) / 2.0);
        assert_close("logps/chosen", m.logps_chosen, -2.0);
        assert_close("logps/rejected", m.logps_rejected, -1.5);
        // d/d chosen = -(1/B) * beta * (1 - sigmoid(beta * delta))
        let grads = out.loss.backward();
        assert_all_close(
            "grad chosen",
            &vals(chosen.grad(&grads).unwrap()),
            &[-0.023751040626053002, -0.027491699865623893],
        );
        // the reference is detached, as TRL computes it under no_grad
        assert!(ref_chosen.grad(&grads).is_none());
    }

    #[test]
    fn hinge_ipo_and_robust_by_hand() {
        // hinge, beta 0.5: relu(1 - 0.5) = 0.5, relu(1 + 1) = 2
        let out = dpo_loss(pairs::<Cpu>(false), &cfg(&[DpoLossType::Hinge], 0.5)).unwrap();
        assert_close("hinge", vals(out.loss)[0], 1.25);
        // ipo, beta 0.1: (0.5/2 + 0.5/4 - 5)^2 = 21.390625, (-1/1 - 1/1 - 5)^2 = 49
        let out = dpo_loss(pairs::<Cpu>(true), &cfg(&[DpoLossType::Ipo], 0.1)).unwrap();
        assert_close("ipo", vals(out.loss)[0], (21.390625 + 49.0) / 2.0);
        // robust, ls 0.1: (-0.9 logsig(0.1 d) + 0.1 logsig(-0.1 d)) / 0.8
        let robust = DpoConfig {
            label_smoothing: 0.1,
            ..cfg(&[DpoLossType::Robust], 0.1)
        };
        let out = dpo_loss(pairs::<Cpu>(false), &robust).unwrap();
        assert_close("robust", vals(out.loss)[0], 0.7275177647275815);
    }

    #[test]
    fn weighted_combination_sums_weighted_means() {
        // 0.8 * sigmoid (0.72126776) + 0.5 * hinge at beta 0.1 (mean(0.9, 1.2) = 1.05)
        let mix = DpoConfig {
            loss_weights: Some(vec![0.8, 0.5]),
            ..cfg(&[DpoLossType::Sigmoid, DpoLossType::Hinge], 0.1)
        };
        let out = dpo_loss(pairs::<Cpu>(false), &mix).unwrap();
        assert_close("mix", vals(out.loss)[0], 1.1020142117820653);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let err = dpo_loss(pairs::<Cpu>(false), &cfg(&[DpoLossType::Ipo], 0.1)).unwrap_err();
        assert!(err.to_string().contains("chosen_lengths"), "{err}");
        let exo = cfg(&[DpoLossType::ExoPair], 0.1);
        assert!(dpo_loss(pairs::<Cpu>(false), &exo).is_err());
        let bad_weights = DpoConfig {
            loss_weights: Some(vec![1.0, 2.0]),
            ..DpoConfig::default()
        };
        assert!(dpo_loss(pairs::<Cpu>(false), &bad_weights).is_err());
        let mut short = pairs::<Cpu>(false);
        short.ref_rejected = t1(&[1.0]);
        let err = dpo_loss(short, &DpoConfig::default()).unwrap_err();
        assert!(err.to_string().contains("ref_rejected"), "{err}");
        assert!("nope".parse::<DpoLossType>().is_err());
        assert_eq!(
            "bco_pair".parse::<DpoLossType>().unwrap(),
            DpoLossType::BcoPair
        );
    }
}
