//! CPO and SimPO: reference-free preference optimisation of the policy adapter, with an optional
//! NLL (behaviour cloning) term on the chosen completions. TRL 1.16's `CPOTrainer` semantics:
//! one concatenated forward; sequence log-probs are sums over completion tokens, means for
//! `ipo` and `simpo`; the NLL is the token mean over the chosen completions.

use crate::dpo::{concat_pairs, PairExample};
use crate::losses::{cpo_loss, masked_row_mean, masked_row_sum, masked_token_mean, CpoConfig};
use crate::orpo::mask_tensor;
use crate::trainer::{PolicyModel, Role, StepOutput, Trainer};
use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

pub struct CpoTrainer {
    pub cfg: CpoConfig,
    pub pad_id: u32,
}

impl<B: AutodiffBackend> Trainer<B> for CpoTrainer {
    type Example = PairExample;

    fn name(&self) -> &'static str {
        "cpo"
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
        let tok = model.token_logps(Role::Policy, &tb, 1.0)?;
        let mask = mask_tensor::<B>(&tb.loss_mask, &model.device());
        let seq = if self.cfg.average_log_prob() {
            masked_row_mean(tok.clone(), mask.clone())
        } else {
            masked_row_sum(tok.clone(), mask.clone())
        };
        let nll = masked_token_mean(tok.slice(0..n), mask.slice(0..n)).neg();
        let out = cpo_loss(seq.clone().slice(0..n), seq.slice(n..2 * n), nll, &self.cfg)?;
        Ok(StepOutput::new(out.loss.clone(), &out.named(), &tb))
    }
}
