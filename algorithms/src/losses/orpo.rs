//! Odds Ratio Preference Optimisation (reference-free).
//!
//! Transcribed from TRL 1.16.0 `ORPOTrainer` (trl/experimental/orpo/orpo_trainer.py):
//! `odds_ratio_loss` and `get_batch_loss_metrics`. The inputs are what `concatenated_forward`
//! returns: the mean log-prob per completion token of each chosen / rejected sequence
//! ([`SequenceStats`]), and the negative log-likelihood of the chosen sequences over prompt *and*
//! completion tokens.

use anyhow::{ensure, Result};
use burn::tensor::{activation, backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::common::{ensure_len, read_scalars};
use super::preference::{pair_metrics, PairMetrics};

/// The `[orpo]` section of a run file (TRL's `ORPOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrpoConfig {
    /// Weight of the odds-ratio term (λ in the paper).
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

impl OrpoConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta.is_finite() && self.beta >= 0.0,
            "key `orpo.beta`: expected a finite number >= 0, got {}",
            self.beta
        );
        Ok(())
    }
}

/// Result of [`orpo_loss`].
#[derive(Debug, Clone)]
pub struct OrpoOutput<B: Backend> {
    /// `nll_loss - mean(beta * logsigmoid(log_odds))`, `[1]`.
    pub loss: Tensor<B, 1>,
    /// `rewards/*` and `logps/*` as TRL logs them (rewards are `beta * logps`).
    pub pair: PairMetrics,
    /// `nll_loss`.
    pub nll_loss: f64,
    /// `log_odds_ratio`: mean of `logsigmoid(log_odds)`.
    pub log_odds_ratio: f64,
    /// `log_odds_chosen`: mean of the log odds.
    pub log_odds_chosen: f64,
}

impl<B: Backend> OrpoOutput<B> {
    /// The logged metrics under TRL's names.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let mut v = self.pair.named();
        v.push(("nll_loss", self.nll_loss));
        v.push(("log_odds_ratio", self.log_odds_ratio));
        v.push(("log_odds_chosen", self.log_odds_chosen));
        v
    }
}

/// `log(1 - exp(x))` for `x < 0`, TRL's `log1mexp`: `log1p(-exp(x))` below `-ln 2`,
/// `log(-expm1(x))` above, with `expm1(x) = 2 t / (1 - t)`, `t = tanh(x / 2)` (exact, and free
/// of the cancellation of `exp(x) - 1` near 0).
pub fn log1mexp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let below = x.clone().lower_elem(-std::f64::consts::LN_2);
    let far = x.clone().exp().neg().log1p();
    let t = (x / 2.0).tanh();
    let near = (t.clone() * (-2.0) / (t.neg() + 1.0)).log();
    near.mask_where(below, far)
}

/// TRL 1.16.0 ORPO loss. `chosen_logps` / `rejected_logps` are mean completion log-probs `[B]`;
/// `nll_loss` is the chosen sequences' token-mean NLL `[1]`.
pub fn orpo_loss<B: Backend>(
    chosen_logps: Tensor<B, 1>,
    rejected_logps: Tensor<B, 1>,
    nll_loss: Tensor<B, 1>,
    cfg: &OrpoConfig,
) -> Result<OrpoOutput<B>> {
    cfg.validate()?;
    let [n] = chosen_logps.dims();
    ensure!(n > 0, "orpo: empty batch");
    ensure_len(&rejected_logps, n, "rejected_logps")?;
    ensure_len(&nll_loss, 1, "nll_loss")?;
    let log_odds = (chosen_logps.clone() - rejected_logps.clone())
        - (log1mexp(chosen_logps.clone()) - log1mexp(rejected_logps.clone()));
    let ratio = activation::log_sigmoid(log_odds.clone());
    let loss = nll_loss.clone() - (ratio.clone() * cfg.beta).mean();
    let (c, r) = (chosen_logps.detach(), rejected_logps.detach());
    let pair = pair_metrics(c.clone() * cfg.beta, r.clone() * cfg.beta, c, r);
    let s = read_scalars(vec![
        nll_loss.detach(),
        ratio.detach().mean(),
        log_odds.detach().mean(),
    ]);
    Ok(OrpoOutput {
        loss,
        pair,
        nll_loss: s[0],
        log_odds_ratio: s[1],
        log_odds_chosen: s[2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::test_util::{assert_close, t1, vals, Cpu};

    #[test]
    fn log1mexp_matches_f64_on_both_branches() {
        let xs = [-5.0, -1.0, -0.7, -0.69, -0.1, -1e-3];
        let got = vals(log1mexp(t1::<Cpu>(&xs)));
        for (x, g) in xs.iter().zip(got) {
            let want = (1.0 - f64::exp(f64::from(*x))).ln();
            assert!(
                (g - want).abs() < 1e-5 * want.abs().max(1.0),
                "{x}: {g} vs {want}"
            );
        }
    }

    #[test]
    fn by_hand() {
        let out = orpo_loss(
            t1::<Cpu>(&[-0.5]),
            t1::<Cpu>(&[-1.5]),
            t1::<Cpu>(&[2.0]),
            &OrpoConfig { beta: 0.2 },
        )
        .unwrap();
        let l = |x: f64| (1.0 - x.exp()).ln();
        let odds = (-0.5 - -1.5) - (l(-0.5) - l(-1.5));
        let ratio = -(1.0 + f64::exp(-odds)).ln();
        assert_close("loss", vals(out.loss)[0], 2.0 - 0.2 * ratio);
        assert_close("log_odds_chosen", out.log_odds_chosen, odds);
    }
}
