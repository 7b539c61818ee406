//! ORPO: the policy adapter learns the chosen completions (NLL over prompt and completion) and
//! to prefer them over the rejected ones by their odds ratio, without a reference pass. TRL 1.16's
//! `ORPOTrainer` semantics: chosen and rejected rows go through one concatenated forward; the
//! sequence log-probs are means over completion tokens.

use crate::dpo::{concat_pairs, PairExample};
use crate::losses::{masked_row_mean, masked_token_mean, orpo_loss, OrpoConfig};
use crate::trainer::{PolicyModel, Role, StepOutput, TokenBatch, Trainer};
use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

pub struct OrpoTrainer {
    pub cfg: OrpoConfig,
    pub pad_id: u32,
}

/// A 0/1 tensor `[b, t]` of a batch's per-row flags.
pub fn mask_tensor<B: Backend>(mask: &[Vec<bool>], device: &B::Device) -> Tensor<B, 2> {
    let (b, t) = (mask.len(), mask.first().map_or(0, Vec::len));
    let v: Vec<f32> = mask
        .iter()
        .flatten()
        .map(|&m| f32::from(u8::from(m)))
        .collect();
    Tensor::from_data(TensorData::new(v, [b, t]), device)
}

/// The same rows with every real token after the first counted (prompt included), as the
/// language-modelling labels `input_ids` where `attention_mask == 1` count in TRL.
pub fn whole_sequence(tb: &TokenBatch) -> TokenBatch {
    let mut full = tb.clone();
    for (mask, valid) in full.loss_mask.iter_mut().zip(&tb.valid) {
        for (t, (m, &v)) in mask.iter_mut().zip(valid).enumerate() {
            *m = v && t > 0;
        }
    }
    full
}

impl<B: AutodiffBackend> Trainer<B> for OrpoTrainer {
    type Example = PairExample;

    fn name(&self) -> &'static str {
        "orpo"
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
        let full = whole_sequence(&tb);
        let device = model.device();
        // One forward: log-probs of every real token; the completion mask picks the
        // completion tokens out of it.
        let tok = model.token_logps(Role::Policy, &full, 1.0)?;
        let completion = mask_tensor::<B>(&tb.loss_mask, &device);
        let every = mask_tensor::<B>(&full.loss_mask, &device);
        let mean = masked_row_mean(tok.clone(), completion);
        let nll = masked_token_mean(tok.slice(0..n), every.slice(0..n)).neg();
        let out = orpo_loss(
            mean.clone().slice(0..n),
            mean.slice(n..2 * n),
            nll,
            &self.cfg,
        )?;
        Ok(StepOutput::new(out.loss.clone(), &out.named(), &tb))
    }
}
