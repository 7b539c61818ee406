//! Kahneman-Tversky Optimisation on unpaired rows (prompt, completion, desirable or not).
//!
//! Transcribed from TRL 1.16.0 `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py). The KL
//! reference point is estimated from mismatched pairs: each row's prompt with another row's
//! completion (TRL's `KL_completion_ids`), under the policy and under the reference; it is
//! detached and clamped at 0. Sequence log-probs are sums over completion tokens.

use anyhow::{ensure, Result};
use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::common::{ensure_len, read_parts, read_scalars};

/// `KTOConfig.loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtoLossType {
    /// Eq. (7) of the KTO paper, with the KL reference point.
    Kto,
    /// Unpaired APO-zero: no KL term.
    ApoZeroUnpaired,
}

crate::named_option!(KtoLossType, "KTO loss_type", [
    Kto => "kto",
    ApoZeroUnpaired => "apo_zero_unpaired",
]);

/// The `[kto]` section of a run file (TRL's `KTOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoConfig {
    pub beta: f64,
    pub loss_type: KtoLossType,
    /// Weight of the losses of desirable rows.
    pub desirable_weight: f64,
    /// Weight of the losses of undesirable rows.
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: KtoLossType::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

impl KtoConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "key `kto.beta`: expected a positive number, got {}",
            self.beta
        );
        for (k, v) in [
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "key `kto.{k}`: expected a finite number >= 0, got {v}"
            );
        }
        Ok(())
    }

    /// Whether the loss needs the mismatched-pair KL estimate.
    pub fn calculate_kl(&self) -> bool {
        self.loss_type == KtoLossType::Kto
    }
}

/// Sequence log-probs of one KTO batch of `B` rows.
#[derive(Debug, Clone)]
pub struct KtoLogps<B: Backend> {
    /// Policy log-prob of each row's completion `[B]` (carries the gradient).
    pub policy: Tensor<B, 1>,
    /// Reference log-prob of each row's completion `[B]` (detached here).
    pub reference: Tensor<B, 1>,
    /// Policy log-probs of the mismatched KL completions `[B]` (`None` without a KL term).
    pub policy_kl: Option<Tensor<B, 1>>,
    /// Reference log-probs of the mismatched KL completions `[B]`.
    pub reference_kl: Option<Tensor<B, 1>>,
    /// Desirable (true) or undesirable, one per row.
    pub labels: Vec<bool>,
}

/// What TRL logs for a KTO step.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoMetrics {
    pub kl: f64,
    /// `rewards/chosen`, `logps/chosen` (only when the batch has desirable rows).
    pub rewards_chosen: Option<f64>,
    pub logps_chosen: Option<f64>,
    /// `rewards/rejected`, `logps/rejected` (only with undesirable rows).
    pub rewards_rejected: Option<f64>,
    pub logps_rejected: Option<f64>,
}

impl KtoMetrics {
    /// The metrics under TRL's names (`rewards/margins` when both kinds of rows are present).
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![("kl", self.kl)];
        let opt = [
            ("rewards/chosen", self.rewards_chosen),
            ("logps/chosen", self.logps_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("logps/rejected", self.logps_rejected),
        ];
        v.extend(opt.into_iter().filter_map(|(k, x)| x.map(|x| (k, x))));
        if let (Some(c), Some(r)) = (self.rewards_chosen, self.rewards_rejected) {
            v.push(("rewards/margins", c - r));
        }
        v
    }
}

/// Result of [`kto_loss`].
#[derive(Debug, Clone)]
pub struct KtoOutput<B: Backend> {
    /// Mean of the weighted per-row losses, `[1]`.
    pub loss: Tensor<B, 1>,
    pub metrics: KtoMetrics,
}

fn select<B: Backend>(t: Tensor<B, 1>, idx: &[usize]) -> Tensor<B, 1> {
    let device = t.device();
    let idx: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    let n = idx.len();
    t.select(
        0,
        Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &device),
    )
}

/// TRL 1.16.0 KTO loss.
pub fn kto_loss<B: Backend>(logps: KtoLogps<B>, cfg: &KtoConfig) -> Result<KtoOutput<B>> {
    cfg.validate()?;
    let n = logps.labels.len();
    ensure!(n > 0, "kto: empty batch");
    ensure_len(&logps.policy, n, "kto policy logps")?;
    ensure_len(&logps.reference, n, "kto reference logps")?;
    let beta = cfg.beta;
    let kl = if cfg.calculate_kl() {
        let (Some(p), Some(r)) = (&logps.policy_kl, &logps.reference_kl) else {
            anyhow::bail!("kto: loss_type \"kto\" needs the KL completions' log-probs");
        };
        ensure_len(p, n, "kto policy KL logps")?;
        ensure_len(r, n, "kto reference KL logps")?;
        // (KL_logps - ref_KL_logps).mean().detach().clamp(min=0)
        read_scalars(vec![(p.clone().detach() - r.clone().detach()).mean()])[0].max(0.0)
    } else {
        0.0
    };
    let chosen: Vec<usize> = (0..n).filter(|&i| logps.labels[i]).collect();
    let rejected: Vec<usize> = (0..n).filter(|&i| !logps.labels[i]).collect();
    let logratios = logps.policy.clone() - logps.reference.detach();
    let mut parts = Vec::new();
    let mut stats = Vec::new();
    if !chosen.is_empty() {
        let lr = select(logratios.clone(), &chosen);
        let losses = match cfg.loss_type {
            KtoLossType::Kto => activation::sigmoid((lr.clone() - kl) * beta).neg() + 1.0,
            KtoLossType::ApoZeroUnpaired => activation::sigmoid(lr.clone() * beta).neg() + 1.0,
        };
        parts.push(losses * cfg.desirable_weight);
        stats.push((lr.detach() * beta).mean());
        stats.push(select(logps.policy.clone().detach(), &chosen).mean());
    }
    if !rejected.is_empty() {
        let lr = select(logratios, &rejected);
        let losses = match cfg.loss_type {
            KtoLossType::Kto => activation::sigmoid((lr.clone().neg() + kl) * beta).neg() + 1.0,
            KtoLossType::ApoZeroUnpaired => activation::sigmoid(lr.clone() * beta),
        };
        parts.push(losses * cfg.undesirable_weight);
        stats.push((lr.detach() * beta).mean());
        stats.push(select(logps.policy.detach(), &rejected).mean());
    }
    let loss = Tensor::cat(parts, 0).mean();
    let s: Vec<f64> = read_parts(stats).into_iter().map(|v| v[0]).collect();
    let mut it = s.into_iter();
    let (rc, lc) = if chosen.is_empty() {
        (None, None)
    } else {
        (it.next(), it.next())
    };
    let (rr, lrj) = if rejected.is_empty() {
        (None, None)
    } else {
        (it.next(), it.next())
    };
    Ok(KtoOutput {
        loss,
        metrics: KtoMetrics {
            kl,
            rewards_chosen: rc,
            logps_chosen: lc,
            rewards_rejected: rr,
            logps_rejected: lrj,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::{assert_close, t1, vals, Cpu};

    #[test]
    fn by_hand_with_kl_clamped_at_zero() {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let cfg = KtoConfig {
            beta: 0.5,
            undesirable_weight: 2.0,
            ..KtoConfig::default()
        };
        let logps = KtoLogps::<Cpu> {
            policy: t1(&[-1.0, -2.0]),
            reference: t1(&[-1.5, -1.0]),
            // mean KL estimate (-3 - -2.5 + -1 - -2) / 2 = 0.25
            policy_kl: Some(t1(&[-3.0, -1.0])),
            reference_kl: Some(t1(&[-2.5, -2.0])),
            labels: vec![true, false],
        };
        let out = kto_loss(logps.clone(), &cfg).unwrap();
        let kl = 0.25;
        let want = ((1.0 - sig(0.5 * (0.5 - kl))) + 2.0 * (1.0 - sig(0.5 * (kl - -1.0)))) / 2.0;
        assert_close("loss", vals(out.loss)[0], want);
        assert_close("kl", out.metrics.kl, kl);
        assert_close("rewards/chosen", out.metrics.rewards_chosen.unwrap(), 0.25);
        let neg = KtoLogps {
            policy_kl: Some(t1(&[-9.0, -9.0])),
            ..logps
        };
        assert_eq!(kto_loss(neg, &cfg).unwrap().metrics.kl, 0.0);
    }
}
