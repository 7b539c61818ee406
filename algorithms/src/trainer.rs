//! The contract between the algorithms and the engine.
//!
//! An algorithm sees the model only through [`PolicyModel`]: it asks for per-token log-probs or
//! head scores under a [`Role`] (which adapter is active), and for rollouts. It never sees NF4,
//! safetensors or CUDA. Every algorithm implements [`Trainer`]; one run loop in the `rlhf` crate
//! drives any of them (batching, accumulation, optimizer, checkpoints, NaN guard).

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which adapter (and head) is active for a forward pass over the one shared base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Base + policy adapter.
    Policy,
    /// Base with every adapter off (no graph is recorded).
    Reference,
    /// Base + reward adapter + score head.
    Reward,
    /// Base + value adapter + value head.
    Value,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Policy => "policy",
            Role::Reference => "reference",
            Role::Reward => "reward",
            Role::Value => "value",
        }
    }
}

/// Right-padded token sequences for a scoring / training forward pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenBatch {
    /// `[b][t]` token ids, padded to one length.
    pub ids: Vec<Vec<u32>>,
    /// `[b][t]` false where `ids` is padding.
    pub valid: Vec<Vec<bool>>,
    /// `[b][t]` true where token `t` is a completion token whose log-prob counts
    /// (predicted by the logits at position `t - 1`). Position 0 is never counted.
    pub loss_mask: Vec<Vec<bool>>,
}

impl TokenBatch {
    /// Builds a batch of `prompt ++ completion` rows, right-padded with `pad_id`; the completion
    /// tokens are the ones marked in `loss_mask`.
    pub fn from_pairs(rows: &[(&[u32], &[u32])], pad_id: u32) -> Self {
        let len = rows
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        let mut out = TokenBatch::default();
        for (p, c) in rows {
            let n = p.len() + c.len();
            let mut ids = Vec::with_capacity(len);
            ids.extend_from_slice(p);
            ids.extend_from_slice(c);
            ids.resize(len, pad_id);
            let mut valid = vec![true; n];
            valid.resize(len, false);
            let mut mask = vec![false; p.len()];
            mask.extend(std::iter::repeat_n(true, c.len()));
            mask.resize(len, false);
            out.ids.push(ids);
            out.valid.push(valid);
            out.loss_mask.push(mask);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Index of the last real token of each row.
    pub fn last_index(&self) -> Vec<usize> {
        self.valid
            .iter()
            .map(|v| v.iter().rposition(|&x| x).unwrap_or(0))
            .collect()
    }

    /// Number of counted tokens per row.
    pub fn counted(&self) -> Vec<usize> {
        self.loss_mask
            .iter()
            .map(|m| m.iter().filter(|&&x| x).count())
            .collect()
    }
}

/// How to sample a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// Tokens that end a sequence (eos and any extra stop ids); the stop token is kept.
    pub stop_ids: Vec<u32>,
    /// Token fed to finished sequences (never attended to).
    pub pad_id: u32,
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// New tokens only, including the stop token when one ended the sequence.
    pub tokens: Vec<u32>,
    /// True when a stop token ended the sequence (false: cut at max_new_tokens).
    pub stopped: bool,
}

/// What an algorithm may ask of the shared base + adapters.
pub trait PolicyModel<B: AutodiffBackend> {
    /// `log p(token_t | tokens_<t)` under `role`, `[b, t]`, zero where `loss_mask` is false.
    /// Logits are divided by `temperature` first (GRPO/PPO score with the sampling temperature).
    /// For [`Role::Reference`] the result carries no graph.
    fn token_logps(&self, role: Role, batch: &TokenBatch, temperature: f64)
        -> Result<Tensor<B, 2>>;

    /// The scalar head of `role` ([`Role::Reward`] or [`Role::Value`]) at every position, `[b, t]`.
    fn head_scores(&self, role: Role, batch: &TokenBatch) -> Result<Tensor<B, 2>>;

    /// [`token_logps`](Self::token_logps) for scoring a rollout: the result carries no graph.
    /// A graph recorded and then detached is not freed until the next backward, so a scoring
    /// pass through the training forward would keep its activations alive into the next step.
    fn score_logps(
        &self,
        role: Role,
        batch: &TokenBatch,
        temperature: f64,
    ) -> Result<Tensor<B, 2>> {
        Ok(self.token_logps(role, batch, temperature)?.detach())
    }

    /// [`head_scores`](Self::head_scores) for scoring a rollout, without a graph (see
    /// [`score_logps`](Self::score_logps)).
    fn score_heads(&self, role: Role, batch: &TokenBatch) -> Result<Tensor<B, 2>> {
        Ok(self.head_scores(role, batch)?.detach())
    }

    /// One reward per row `[b]` under `role`, without a graph: the head's score at each row's
    /// last real token, or what a model with another reward source (a separate reward model)
    /// gives instead.
    fn sequence_scores(&self, role: Role, batch: &TokenBatch) -> Result<Tensor<B, 1>> {
        Ok(crate::rm::at_last_token(
            self.score_heads(role, batch)?,
            batch,
        ))
    }

    /// Samples one completion per prompt under `role` with a KV cache; records no graph.
    /// `seed` fixes the sampling RNG, so a resumed run draws the same rollouts.
    fn generate(
        &self,
        role: Role,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Vec<Completion>>;

    /// Decodes tokens to text (for reward functions and logs).
    fn decode(&self, tokens: &[u32]) -> Result<String>;

    fn device(&self) -> B::Device;
}

/// Metrics of one step under TRL's names (`loss`, `rewards/chosen`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// The rest of a micro-batch's loss, computed after the run loop has back-propagated the part
/// before it (so the earlier part's graph is freed first): see [`StepOutput::then`].
pub type NextPart<B> = Box<dyn FnOnce(&dyn PolicyModel<B>) -> Result<StepOutput<B>>>;

/// A micro-batch's loss and what to log about it.
pub struct StepOutput<B: AutodiffBackend> {
    /// Scalar `[1]` with the graph back to the trainable parameters.
    pub loss: Tensor<B, 1>,
    pub metrics: Metrics,
    /// Tokens processed (for tokens/s).
    pub tokens: usize,
    /// A further loss term of the same micro-batch with its own graph (PPO's value loss after
    /// its policy loss), built only after `loss` has been back-propagated: the gradients add up
    /// to those of the sum, while a step holds one graph at a time. Its metrics extend these.
    pub then: Option<NextPart<B>>,
}

impl<B: AutodiffBackend> StepOutput<B> {
    /// Packs a loss with its named metrics; adds `loss` itself and counts the batch's real tokens.
    pub fn new(loss: Tensor<B, 1>, named: &[(&str, f64)], batch: &TokenBatch) -> Self {
        let mut metrics: Metrics = named.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let value = to_f64(loss.clone()).first().copied().unwrap_or(f64::NAN);
        metrics.insert("loss".into(), value);
        let tokens = batch.valid.iter().flatten().filter(|&&v| v).count();
        Self {
            loss,
            metrics,
            tokens,
            then: None,
        }
    }

    /// This part and every later one computed now, without back-propagating in between (for
    /// evaluation and tests): the loss is their sum, the metrics merged, the tokens added.
    pub fn complete(mut self, model: &dyn PolicyModel<B>) -> Result<StepOutput<B>> {
        while let Some(next) = self.then.take() {
            let mut part = next(model)?;
            self.loss = self.loss + part.loss;
            self.metrics.append(&mut part.metrics);
            self.tokens += part.tokens;
            self.then = part.then;
        }
        Ok(self)
    }
}

/// One algorithm: turns a micro-batch of prepared examples into a loss.
pub trait Trainer<B: AutodiffBackend> {
    /// A prepared training example (tokenized pair, prompt row, ...).
    type Example: Clone;

    /// Short name for logs and checkpoints (`dpo`, `rm`, ...).
    fn name(&self) -> &'static str;

    /// Roles whose adapters and heads the optimizer updates.
    fn trainable_roles(&self) -> Vec<Role>;

    /// Examples per micro-batch given `train.batch_size` (GRPO: batch_size / num_generations
    /// prompts, since the batch counts completions as in TRL).
    fn examples_per_batch(&self, batch_size: usize) -> usize {
        batch_size
    }

    /// Consecutive optimizer steps that reuse one micro-batch of examples (GRPO's
    /// `num_iterations`: the same prompts' rollout is optimised μ times, as in TRL).
    fn rollout_reuse(&self) -> usize {
        1
    }

    /// Algorithm state a checkpoint must carry besides tensors (KL controller, cached rollouts,
    /// ...), as JSON. The run loop writes it to `trainer.json` and hands it back on resume.
    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }

    /// Restores what `state` returned.
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }

    /// Loss of one micro-batch. `training` is false for evaluation passes.
    fn loss(
        &mut self,
        model: &dyn PolicyModel<B>,
        batch: &[Self::Example],
        training: bool,
    ) -> Result<StepOutput<B>>;
}

/// Reads a `[n]` tensor to host f64s (for metrics).
pub fn to_f64<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_right_padded_with_completion_mask() {
        let b = TokenBatch::from_pairs(&[(&[1, 2], &[3]), (&[4], &[5, 6, 7])], 0);
        assert_eq!(b.ids, vec![vec![1, 2, 3, 0], vec![4, 5, 6, 7]]);
        assert_eq!(b.valid[0], vec![true, true, true, false]);
        assert_eq!(b.loss_mask[0], vec![false, false, true, false]);
        assert_eq!(b.loss_mask[1], vec![false, true, true, true]);
        assert_eq!(b.last_index(), vec![2, 3]);
        assert_eq!(b.counted(), vec![1, 3]);
    }
}
