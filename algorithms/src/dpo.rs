//! DPO: the policy adapter learns to prefer `chosen` over `rejected` relative to the reference,
//! which is the same base with adapters off (no second model). TRL 1.x's `DPOTrainer` semantics:
//! chosen and rejected go through one concatenated forward pass; sequence log-probs are sums
//! over completion tokens.

use crate::losses::{dpo_loss, DpoConfig, DpoLogps};
use crate::trainer::{PolicyModel, Role, StepOutput, TokenBatch, Trainer};
use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

/// A tokenized preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PairExample {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Reference log-probs (chosen, rejected), when precomputed once per dataset.
    pub ref_logps: Option<(f64, f64)>,
}

pub struct DpoTrainer {
    pub cfg: DpoConfig,
    pub pad_id: u32,
}

/// `[2b]` rows: every chosen sequence, then every rejected one (TRL's concatenated forward).
pub fn concat_pairs(batch: &[PairExample], pad_id: u32) -> TokenBatch {
    let rows: Vec<(&[u32], &[u32])> = batch
        .iter()
        .map(|e| (e.prompt.as_slice(), e.chosen.as_slice()))
        .chain(
            batch
                .iter()
                .map(|e| (e.prompt.as_slice(), e.rejected.as_slice())),
        )
        .collect();
    TokenBatch::from_pairs(&rows, pad_id)
}

/// Sums per-token log-probs `[b, t]` into sequence log-probs `[b]`.
pub fn sequence_logps<B: burn::tensor::backend::Backend>(t: Tensor<B, 2>) -> Tensor<B, 1> {
    t.sum_dim(1).squeeze_dim(1)
}

impl DpoTrainer {
    /// Reference log-probs (chosen, rejected) of a batch, with adapters off.
    pub fn reference_logps<B: AutodiffBackend>(
        &self,
        model: &dyn PolicyModel<B>,
        batch: &[PairExample],
    ) -> Result<Vec<(f64, f64)>> {
        let tb = concat_pairs(batch, self.pad_id);
        let r = crate::trainer::to_f64(sequence_logps(model.token_logps(
            Role::Reference,
            &tb,
            1.0,
        )?));
        let n = batch.len();
        Ok((0..n).map(|i| (r[i], r[n + i])).collect())
    }
}

impl<B: AutodiffBackend> Trainer<B> for DpoTrainer {
    type Example = PairExample;

    fn name(&self) -> &'static str {
        "dpo"
    }

    fn trainable_roles(&self) -> Vec<Role> {
        vec![Role::Policy]
    }

    fn loss(
        &mut self,
        model: &dyn PolicyModel<B>,
        batch: &[PairExample],
        _training: bool,
    ) -> Result<StepOutput<B>> {
        let n = batch.len();
        let tb = concat_pairs(batch, self.pad_id);
        let device = model.device();
        let policy = sequence_logps(model.token_logps(Role::Policy, &tb, 1.0)?);
        let refs: Vec<(f64, f64)> = if batch.iter().all(|e| e.ref_logps.is_some()) {
            batch
                .iter()
                .map(|e| e.ref_logps.expect("checked"))
                .collect()
        } else {
            self.reference_logps(model, batch)?
        };
        let vec1 = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [n]), &device);
        let counts = tb.counted();
        let logps = DpoLogps {
            policy_chosen: policy.clone().slice(0..n),
            policy_rejected: policy.slice(n..2 * n),
            ref_chosen: vec1(refs.iter().map(|r| r.0 as f32).collect()),
            ref_rejected: vec1(refs.iter().map(|r| r.1 as f32).collect()),
            chosen_lengths: Some(vec1(counts[..n].iter().map(|&c| c as f32).collect())),
            rejected_lengths: Some(vec1(counts[n..].iter().map(|&c| c as f32).collect())),
        };
        let out = dpo_loss(logps, &self.cfg)?;
        Ok(StepOutput::new(out.loss, &out.metrics.named(), &tb))
    }
}
