//! KTO: the policy adapter learns from unpaired rows (prompt, completion, desirable or not),
//! relative to the reference (adapters off). TRL 1.16's `KTOTrainer` semantics: sequence
//! log-probs are sums over completion tokens; for `loss_type = "kto"` each row is also scored
//! with a mismatched completion (its KL completion, [`assign_kl_completions`]) under the policy
//! and the reference, and the batch mean of their difference is the KL reference point.

use crate::dpo::sequence_logps;
use crate::losses::{kto_loss, KtoConfig, KtoLogps};
use crate::trainer::{PolicyModel, Role, StepOutput, TokenBatch, Trainer};
use anyhow::{ensure, Result};
use burn::tensor::backend::AutodiffBackend;

/// A tokenized unpaired row.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// Desirable (true) or undesirable.
    pub label: bool,
    /// Another row's completion, scored after this row's prompt for the KL estimate.
    pub kl_completion: Vec<u32>,
}

/// TRL's `KL_completion_ids`: within each block of 1000 rows (the `datasets.map` batch TRL
/// builds them in), row `i` takes the completion of row `i - 1`, the first row the last one's.
/// With TRL's sequential sampling the KL completions of a batch are the batch's own completions
/// shifted by one.
pub fn assign_kl_completions(rows: &mut [KtoExample]) {
    for block in rows.chunks_mut(1000) {
        let completions: Vec<Vec<u32>> = block.iter().map(|r| r.completion.clone()).collect();
        let n = completions.len();
        for (i, row) in block.iter_mut().enumerate() {
            row.kl_completion = completions[(i + n - 1) % n].clone();
        }
    }
}

pub struct KtoTrainer {
    pub cfg: KtoConfig,
    pub pad_id: u32,
}

impl KtoTrainer {
    /// `[b]` rows of the batch, then (with the KL term) its `[b]` KL rows.
    fn token_batch(&self, batch: &[KtoExample]) -> TokenBatch {
        let mut rows: Vec<(&[u32], &[u32])> = batch
            .iter()
            .map(|e| (e.prompt.as_slice(), e.completion.as_slice()))
            .collect();
        if self.cfg.calculate_kl() {
            rows.extend(
                batch
                    .iter()
                    .map(|e| (e.prompt.as_slice(), e.kl_completion.as_slice())),
            );
        }
        TokenBatch::from_pairs(&rows, self.pad_id)
    }
}

impl<B: AutodiffBackend> Trainer<B> for KtoTrainer {
    type Example = KtoExample;

    fn name(&self) -> &'static str {
        "kto"
    }

    fn trainable_roles(&self) -> Vec<Role> {
        vec![Role::Policy]
    }

    fn loss(
        &mut self,
        model: &dyn PolicyModel<B>,
        batch: &[KtoExample],
        _training: bool,
    ) -> Result<StepOutput<B>> {
        let n = batch.len();
        ensure!(n > 0, "kto: empty micro-batch");
        let tb = self.token_batch(batch);
        let policy = sequence_logps(model.token_logps(Role::Policy, &tb, 1.0)?);
        let reference = sequence_logps(model.token_logps(Role::Reference, &tb, 1.0)?);
        let kl = self.cfg.calculate_kl();
        let logps = KtoLogps {
            policy: policy.clone().slice(0..n),
            reference: reference.clone().slice(0..n),
            // The KL estimate is detached in the loss: no graph is kept for it.
            policy_kl: kl.then(|| policy.detach().slice(n..2 * n)),
            reference_kl: kl.then(|| reference.slice(n..2 * n)),
            labels: batch.iter().map(|e| e.label).collect(),
        };
        let out = kto_loss(logps, &self.cfg)?;
        Ok(StepOutput::new(out.loss, &out.metrics.named(), &tb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(c: u32) -> KtoExample {
        KtoExample {
            prompt: vec![1],
            completion: vec![c],
            label: true,
            kl_completion: vec![],
        }
    }

    #[test]
    fn kl_completions_are_the_previous_rows() {
        let mut rows: Vec<KtoExample> = (0..4).map(row).collect();
        assign_kl_completions(&mut rows);
        let kl: Vec<u32> = rows.iter().map(|r| r.kl_completion[0]).collect();
        assert_eq!(kl, vec![3, 0, 1, 2]);
    }
}
