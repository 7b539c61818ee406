//! Contrastive Preference Optimisation and SimPO (reference-free).
//!
//! Transcribed from TRL 1.16.0 `CPOTrainer` (trl/experimental/cpo/cpo_trainer.py): `cpo_loss`
//! and `get_batch_loss_metrics`. SimPO is `loss_type = "simpo"` (with `cpo_alpha = 0` for the
//! paper's loss; `"alphapo"` is TRL's shorthand for simpo with `cpo_alpha = 0`). The sequence
//! log-probs are sums over completion tokens, means for `ipo` and `simpo`
//! ([`CpoConfig::average_log_prob`]); the NLL is the chosen completions' token mean.

use anyhow::{ensure, Result};
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::common::{ensure_len, read_scalars};
use super::preference::{pair_metrics, PairMetrics};

/// `CPOConfig.loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpoLossType {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
    /// SimPO with `cpo_alpha = 0` (TRL rewrites it so in `CPOConfig.__post_init__`).
    Alphapo,
}

crate::named_option!(CpoLossType, "CPO loss_type", [
    Sigmoid => "sigmoid",
    Hinge => "hinge",
    Ipo => "ipo",
    Simpo => "simpo",
    Alphapo => "alphapo",
]);

/// The `[cpo]` section of a run file (TRL's `CPOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpoConfig {
    pub beta: f64,
    pub label_smoothing: f64,
    pub loss_type: CpoLossType,
    /// Weight of the behaviour-cloning (NLL) term.
    pub cpo_alpha: f64,
    /// SimPO's target reward margin.
    pub simpo_gamma: f64,
    /// AlphaPO reward shape: `r = (1 - p^-alpha) / alpha` when non-zero.
    pub alpha: f64,
}

impl Default for CpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            loss_type: CpoLossType::Sigmoid,
            cpo_alpha: 1.0,
            simpo_gamma: 0.5,
            alpha: 0.0,
        }
    }
}

impl CpoConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "key `cpo.beta`: expected a positive number, got {}",
            self.beta
        );
        ensure!(
            (0.0..=0.5).contains(&self.label_smoothing),
            "key `cpo.label_smoothing`: expected a number in [0, 0.5], got {}",
            self.label_smoothing
        );
        for (k, v) in [
            ("cpo_alpha", self.cpo_alpha),
            ("simpo_gamma", self.simpo_gamma),
            ("alpha", self.alpha),
        ] {
            ensure!(v.is_finite(), "key `cpo.{k}`: expected a finite number");
        }
        Ok(())
    }

    /// The loss actually computed (`alphapo` is simpo).
    pub fn effective_loss(&self) -> CpoLossType {
        match self.loss_type {
            CpoLossType::Alphapo => CpoLossType::Simpo,
            t => t,
        }
    }

    /// The NLL weight actually used (`alphapo` forces 0).
    pub fn effective_cpo_alpha(&self) -> f64 {
        match self.loss_type {
            CpoLossType::Alphapo => 0.0,
            _ => self.cpo_alpha,
        }
    }

    /// Whether sequence log-probs are token means (ipo, simpo) rather than sums.
    pub fn average_log_prob(&self) -> bool {
        matches!(self.effective_loss(), CpoLossType::Ipo | CpoLossType::Simpo)
    }
}

/// Result of [`cpo_loss`].
#[derive(Debug, Clone)]
pub struct CpoOutput<B: Backend> {
    /// `mean(losses) + cpo_alpha * nll_loss`, `[1]`.
    pub loss: Tensor<B, 1>,
    pub pair: PairMetrics,
    pub nll_loss: f64,
}

impl<B: Backend> CpoOutput<B> {
    /// The logged metrics under TRL's names.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let mut v = self.pair.named();
        v.push(("nll_loss", self.nll_loss));
        v
    }
}

/// TRL 1.16.0 CPO loss. `chosen_logps` / `rejected_logps` `[B]` are sums or means as
/// [`CpoConfig::average_log_prob`] says; `nll_loss` `[1]` is the chosen completions' token-mean
/// NLL (ignored when the effective `cpo_alpha` is 0, as TRL does not compute it then).
pub fn cpo_loss<B: Backend>(
    chosen_logps: Tensor<B, 1>,
    rejected_logps: Tensor<B, 1>,
    nll_loss: Tensor<B, 1>,
    cfg: &CpoConfig,
) -> Result<CpoOutput<B>> {
    cfg.validate()?;
    let [n] = chosen_logps.dims();
    ensure!(n > 0, "cpo: empty batch");
    ensure_len(&rejected_logps, n, "rejected_logps")?;
    ensure_len(&nll_loss, 1, "nll_loss")?;
    let beta = cfg.beta;
    let ls = cfg.label_smoothing;
    // AlphaPO: r = (1 - p^-alpha) / alpha = (1 - exp(-alpha * logp)) / alpha.
    let reward = |lp: Tensor<B, 1>| -> Tensor<B, 1> {
        if cfg.alpha != 0.0 {
            ((lp * -cfg.alpha).exp().neg() + 1.0) / cfg.alpha
        } else {
            lp
        }
    };
    let chosen_r = reward(chosen_logps.clone());
    let rejected_r = reward(rejected_logps.clone());
    let mut logits = chosen_r.clone() - rejected_r.clone();
    let logsig = activation::log_sigmoid::<1, B>;
    let losses = match cfg.effective_loss() {
        CpoLossType::Sigmoid | CpoLossType::Simpo | CpoLossType::Alphapo => {
            if cfg.effective_loss() == CpoLossType::Simpo {
                logits = logits - cfg.simpo_gamma / beta;
            }
            logsig(logits.clone() * beta).neg() * (1.0 - ls) - logsig(logits.clone() * (-beta)) * ls
        }
        CpoLossType::Hinge => activation::relu(logits.clone() * (-beta) + 1.0),
        CpoLossType::Ipo => (logits.clone() - 1.0 / (2.0 * beta)).square(),
    };
    let alpha_nll = cfg.effective_cpo_alpha();
    let mut loss = losses.mean();
    if alpha_nll != 0.0 {
        loss = loss + nll_loss.clone() * alpha_nll;
    }
    let pair = pair_metrics(
        chosen_r.detach() * beta,
        rejected_r.detach() * beta,
        chosen_logps.detach(),
        rejected_logps.detach(),
    );
    let nll = if alpha_nll != 0.0 {
        read_scalars(vec![nll_loss.detach()])[0]
    } else {
        0.0
    };
    Ok(CpoOutput {
        loss,
        pair,
        nll_loss: nll,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::{assert_close, t1, vals, Cpu};

    #[test]
    fn simpo_by_hand() {
        let cfg = CpoConfig {
            beta: 2.0,
            loss_type: CpoLossType::Simpo,
            cpo_alpha: 0.0,
            simpo_gamma: 0.5,
            ..CpoConfig::default()
        };
        assert!(cfg.average_log_prob());
        let out = cpo_loss(
            t1::<Cpu>(&[-1.0]),
            t1::<Cpu>(&[-1.5]),
            t1::<Cpu>(&[9.0]),
            &cfg,
        )
        .unwrap();
        // -logsigmoid(beta * (0.5 - gamma / beta)) = -logsigmoid(0.5)
        let want = (1.0 + f64::exp(-0.5)).ln();
        assert_close("loss", vals(out.loss)[0], want);
        assert_close("reward chosen", out.pair.rewards_chosen, -2.0);
    }

    #[test]
    fn alphapo_is_simpo_without_nll() {
        let cfg = CpoConfig {
            loss_type: "alphapo".parse().unwrap(),
            ..CpoConfig::default()
        };
        assert_eq!(cfg.effective_loss(), CpoLossType::Simpo);
        assert_eq!(cfg.effective_cpo_alpha(), 0.0);
        let e = "dpo".parse::<CpoLossType>().unwrap_err().to_string();
        assert!(e.contains("simpo") && e.contains("hinge"), "{e}");
    }
}
