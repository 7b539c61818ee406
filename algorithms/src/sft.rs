//! Supervised fine-tuning of the policy adapter, as TRL 1.16's `SFTTrainer`: the loss is the
//! token-level mean negative log-likelihood over the trained tokens of the micro-batch (the sum
//! of their NLLs divided by their number). Which tokens are trained (the completion, the
//! assistant turns or every token) is decided when the data is tokenized; no reference pass.
//! Metrics: `loss` and `num_tokens`, the trained tokens of the micro-batch (TRL logs the running
//! total of input tokens under that name). TRL's `mean_token_accuracy` and `entropy` need the
//! logits, which `PolicyModel` does not expose.

use crate::trainer::{PolicyModel, Role, StepOutput, TokenBatch, Trainer};
use anyhow::{ensure, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// The `[sft]` section of a run file (TRL's `SFTConfig` names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Prompt/completion rows: train on the completion only (TRL's default for such rows).
    pub completion_only_loss: bool,
    /// Conversational rows: train on the assistant turns only (TRL's default: every token).
    pub assistant_only_loss: bool,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            completion_only_loss: true,
            assistant_only_loss: false,
        }
    }
}

/// A tokenized row: the sequence and, per token, whether its log-prob is trained (`trained[t]`
/// means the logits at `t - 1` are trained to predict `ids[t]`; `trained[0]` is never counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl SftExample {
    /// Tokens whose log-prob the loss counts.
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Right-padded rows with `loss_mask` = the trained tokens (position 0 never).
pub fn sft_batch(batch: &[SftExample], pad_id: u32) -> TokenBatch {
    let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut out = TokenBatch::default();
    for e in batch {
        let n = e.ids.len();
        let mut ids = e.ids.clone();
        ids.resize(len, pad_id);
        let mut valid = vec![true; n];
        valid.resize(len, false);
        let mut mask: Vec<bool> = (0..n).map(|t| t > 0 && e.trained[t]).collect();
        mask.resize(len, false);
        out.ids.push(ids);
        out.valid.push(valid);
        out.loss_mask.push(mask);
    }
    out
}

/// Mean NLL: `-sum(token_logps) / max(trained, 1)`, `[1]`. `token_logps` `[b, t]` is zero where a
/// token is not trained (as `PolicyModel::token_logps` returns it); as in TRL, a batch without a
/// trained token gives 0.
pub fn sft_loss<B: Backend>(token_logps: Tensor<B, 2>, trained: usize) -> Tensor<B, 1> {
    token_logps.sum().neg() / trained.max(1) as f64
}

pub struct SftTrainer {
    pub pad_id: u32,
}

impl<B: AutodiffBackend> Trainer<B> for SftTrainer {
    type Example = SftExample;

    fn name(&self) -> &'static str {
        "sft"
    }

    fn trainable_roles(&self) -> Vec<Role> {
        vec![Role::Policy]
    }

    fn loss(
        &mut self,
        model: &dyn PolicyModel<B>,
        batch: &[SftExample],
        _training: bool,
    ) -> Result<StepOutput<B>> {
        ensure!(!batch.is_empty(), "sft: empty micro-batch");
        for e in batch {
            ensure!(
                e.ids.len() == e.trained.len(),
                "sft: {} token ids but {} trained flags",
                e.ids.len(),
                e.trained.len()
            );
        }
        let tb = sft_batch(batch, self.pad_id);
        let trained: usize = tb.counted().iter().sum();
        let logps = model.token_logps(Role::Policy, &tb, 1.0)?;
        let loss = sft_loss(logps, trained);
        Ok(StepOutput::new(
            loss,
            &[("num_tokens", trained as f64)],
            &tb,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type Cpu = burn::backend::NdArray<f32>;
    type Ad = burn::backend::Autodiff<Cpu>;

    fn t2<B: Backend>(rows: &[Vec<f32>]) -> Tensor<B, 2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let shape = [rows.len(), rows[0].len()];
        Tensor::from_data(TensorData::new(flat, shape), &Default::default())
    }

    fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
        t.into_data().iter::<f64>().next().unwrap()
    }

    /// A tiny stand-in for the model: log-probs from a fixed table of per-token probabilities,
    /// zeroed where the mask is off, exactly as the contract of `token_logps` says.
    fn masked_logps(probs: &[Vec<f32>], tb: &TokenBatch) -> Tensor<Ad, 2> {
        let rows: Vec<Vec<f32>> = probs
            .iter()
            .zip(&tb.loss_mask)
            .map(|(p, m)| {
                p.iter()
                    .zip(m)
                    .map(|(&p, &on)| if on { p.ln() } else { 0.0 })
                    .collect()
            })
            .collect();
        t2::<Ad>(&rows)
    }

    #[test]
    fn loss_is_the_mean_nll_over_trained_tokens() {
        // Row 0: prompt [1, 2], completion [3, 4]; row 1: prompt [5], completion [6, 7, 8].
        let completion_only = [
            SftExample {
                ids: vec![1, 2, 3, 4],
                trained: vec![false, false, true, true],
            },
            SftExample {
                ids: vec![5, 6, 7, 8],
                trained: vec![false, true, true, true],
            },
        ];
        let probs = vec![vec![0.9, 0.5, 0.25, 0.8], vec![0.7, 0.1, 0.5, 0.4]];
        let tb = sft_batch(&completion_only, 0);
        let n: usize = tb.counted().iter().sum();
        assert_eq!(n, 5);
        let loss = scalar(sft_loss(masked_logps(&probs, &tb), n));
        let nll = |p: f64| -p.ln();
        let expected = (nll(0.25) + nll(0.8) + nll(0.1) + nll(0.5) + nll(0.4)) / 5.0;
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");

        // Every token trained: position 0 has no prediction, so 3 + 3 tokens count.
        let all: Vec<SftExample> = completion_only
            .iter()
            .map(|e| SftExample {
                ids: e.ids.clone(),
                trained: vec![true; e.ids.len()],
            })
            .collect();
        let tb = sft_batch(&all, 0);
        let n: usize = tb.counted().iter().sum();
        assert_eq!(n, 6);
        assert_eq!(n, all.iter().map(SftExample::trained_tokens).sum::<usize>());
        let loss_all = scalar(sft_loss(masked_logps(&probs, &tb), n));
        let expected_all = (nll(0.5) + nll(0.25) + nll(0.8) + nll(0.1) + nll(0.5) + nll(0.4)) / 6.0;
        assert!((loss_all - expected_all).abs() < 1e-5, "{loss_all}");
        assert!((loss_all - loss).abs() > 1e-3);
    }

    #[test]
    fn padding_is_never_trained_and_gradient_is_minus_one_over_n() {
        let batch = [
            SftExample {
                ids: vec![1, 2],
                trained: vec![true, true],
            },
            SftExample {
                ids: vec![3, 4, 5, 6],
                trained: vec![false, false, true, true],
            },
        ];
        let tb = sft_batch(&batch, 9);
        assert_eq!(tb.ids[0], vec![1, 2, 9, 9]);
        assert_eq!(tb.valid[0], vec![true, true, false, false]);
        assert_eq!(tb.loss_mask[0], vec![false, true, false, false]);
        assert_eq!(tb.loss_mask[1], vec![false, false, true, true]);
        let x = t2::<Ad>(&[vec![-1.0; 4], vec![-2.0; 4]]).require_grad();
        let mask = t2::<Ad>(&[vec![0.0, 1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0, 1.0]]);
        let loss = sft_loss(x.clone() * mask, 3);
        assert!((scalar(loss.clone()) - 5.0 / 3.0).abs() < 1e-6);
        let grads = loss.backward();
        let g: Vec<f64> = x.grad(&grads).unwrap().into_data().iter::<f64>().collect();
        let third = -1.0 / 3.0;
        let want = [0.0, third, 0.0, 0.0, 0.0, 0.0, third, third];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn a_batch_without_trained_tokens_has_zero_loss() {
        let x = t2::<Cpu>(&[vec![0.0; 3]]);
        assert_eq!(scalar(sft_loss(x, 0)), 0.0);
    }
}
