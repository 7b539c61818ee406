//! Scoring the policy's rollouts with a separate reward model ([`RewardModel`]): PPO's reward
//! role when `ppo.reward_model_path` is set, and GRPO's `type = "reward_model"` reward.
//!
//! The reward model reads its own token ids. When its vocabulary is the policy's (same tokens,
//! same ids), PPO hands it the rollout's ids as they are. Otherwise each row is turned back into
//! text and re-tokenized (GRPO's reward functions only see text, so GRPO always takes this path;
//! with the policy's own tokenizer it gives the rollout's ids up to tokenization round trips) as TRL's `GRPOTrainer` does for a reward model with its own processing
//! class: a conversational prompt (the run uses chat templates and the reward model has one) is
//! rendered with the reward model's template as `prompt messages + {assistant: completion}`;
//! anything else is the text of the whole row (PPO) or `prompt text + completion text` (GRPO);
//! both are encoded without added special tokens (a template writes its own). Decoding skips the
//! policy's special tokens (BOS, EOS, template markers), as TRL decodes completions.
//!
//! Length: a row is cut to `max_tokens` (the run's longest scored sequence, `data.max_prompt_length`
//! plus the completion length, which the planner counts, and at most the reward model's
//! `max_position_embeddings`) by dropping its oldest tokens, keeping a leading BOS: the score is
//! read at the end of the completion, so the end is what must survive.

use super::SequenceScorer;
use crate::model::reward_model::RewardModel;
use crate::tokenizer::{ChatMessage, Tok};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use rlhf_algorithms::trainer::TokenBatch;
use rlhf_rewards::{RewardBatch, RewardFn};
use std::collections::HashMap;

/// A reward model with what it needs to read the policy's rollouts.
pub struct SeparateReward<B: Backend> {
    pub model: RewardModel<B>,
    policy_tok: Tok,
    /// The vocabularies agree: PPO's rollout ids are scored as they are.
    same_vocab: bool,
    /// Render conversational prompts with the reward model's chat template.
    use_chat: bool,
    /// A conversational prompt's messages, by the policy's prompt ids (PPO) ...
    by_ids: HashMap<Vec<u32>, Vec<ChatMessage>>,
    /// ... and by the prompt text the reward functions see (GRPO).
    by_text: HashMap<String, Vec<ChatMessage>>,
    max_tokens: usize,
    name: String,
}

impl<B: Backend> SeparateReward<B> {
    /// `chat_run`: the run renders conversations with chat templates (`data.chat_template`);
    /// `max_tokens`: the longest sequence the run scores (see the module docs).
    pub fn new(
        model: RewardModel<B>,
        policy_tok: &Tok,
        chat_run: bool,
        max_tokens: usize,
        name: impl Into<String>,
    ) -> Self {
        let same_vocab = model.tok.inner().get_vocab(true) == policy_tok.inner().get_vocab(true);
        let use_chat = chat_run && model.chat.is_some();
        let max_tokens = model
            .max_positions()
            .map_or(max_tokens, |m| m.min(max_tokens))
            .max(1);
        Self {
            model,
            policy_tok: policy_tok.clone(),
            same_vocab,
            use_chat,
            by_ids: HashMap::new(),
            by_text: HashMap::new(),
            max_tokens,
            name: name.into(),
        }
    }

    /// Whether PPO's rollout ids are reused as they are.
    pub fn same_vocab(&self) -> bool {
        self.same_vocab
    }

    /// Remembers a conversational prompt: its ids as the policy tokenized them, the text the
    /// reward functions see, and its messages.
    pub fn add_conversation(&mut self, ids: Vec<u32>, text: String, messages: Vec<ChatMessage>) {
        self.by_ids.insert(ids, messages.clone());
        self.by_text.insert(text, messages);
    }

    /// The reward model's ids of one prompt + completion given as text (see the module docs).
    pub fn encode(
        &self,
        messages: Option<&[ChatMessage]>,
        prompt: &str,
        completion: &str,
    ) -> Result<Vec<u32>> {
        let text = match (messages, &self.model.chat) {
            (Some(m), Some(chat)) if self.use_chat => {
                let mut all = m.to_vec();
                all.push(ChatMessage::new("assistant", completion));
                chat.render(&all, false).with_context(|| {
                    format!(
                        "{}: the reward model's chat template failed",
                        self.model.dir.display()
                    )
                })?
            }
            _ => format!("{prompt}{completion}"),
        };
        Ok(self.truncate(self.model.tok.encode(&text, false)?))
    }

    /// Keeps the last `max_tokens` ids, and a leading BOS.
    fn truncate(&self, ids: Vec<u32>) -> Vec<u32> {
        let n = self.max_tokens;
        if ids.len() <= n {
            return ids;
        }
        let bos = self.model.tok.bos_id().filter(|b| ids.first() == Some(b));
        match bos {
            Some(b) if n > 1 => std::iter::once(b)
                .chain(ids[ids.len() - (n - 1)..].iter().copied())
                .collect(),
            _ => ids[ids.len() - n..].to_vec(),
        }
    }

    /// The reward model's ids of each row of a rollout batch (`loss_mask` marks the completion).
    pub fn rows_for_tokens(&self, tb: &TokenBatch) -> Result<Vec<Vec<u32>>> {
        (0..tb.len())
            .map(|i| {
                let (ids, valid, mask) = (&tb.ids[i], &tb.valid[i], &tb.loss_mask[i]);
                let pick = |completion: bool| -> Vec<u32> {
                    (0..ids.len())
                        .filter(|&j| valid[j] && mask[j] == completion)
                        .map(|j| ids[j])
                        .collect()
                };
                let (prompt, completion) = (pick(false), pick(true));
                if self.same_vocab {
                    let mut all = prompt;
                    all.extend(completion);
                    return Ok(self.truncate(all));
                }
                match self.by_ids.get(&prompt).filter(|_| self.use_chat) {
                    Some(messages) => {
                        let c = self.policy_tok.decode(&completion, true)?;
                        self.encode(Some(messages), "", &c)
                    }
                    // One decode of the whole row: the text between prompt and completion is
                    // the tokenizer's (a word-level vocabulary joins them with a space).
                    None => {
                        let mut all = prompt;
                        all.extend(completion);
                        self.encode(None, &self.policy_tok.decode(&all, true)?, "")
                    }
                }
            })
            .collect()
    }

    /// The reward model's ids of each row of a reward batch (prompt and completion texts).
    pub fn rows_for_texts(&self, batch: &RewardBatch<'_>) -> Result<Vec<Vec<u32>>> {
        batch
            .prompts()
            .iter()
            .zip(batch.completions())
            .map(|(p, c)| {
                let messages = self.by_text.get(p).map(Vec::as_slice);
                self.encode(messages, p, c)
            })
            .collect()
    }

    /// Scores rows of reward-model ids: right-padded with its pad token, one forward pass.
    pub fn score_ids(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        let pad = self
            .model
            .pad_token_id
            .or(self.model.tok.pad_id())
            .unwrap_or(0);
        // An empty row (nothing survived decoding) is scored at one pad token.
        let len = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len());
        let mut valid = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = r.clone();
            let mut ok = vec![true; r.len().max(1)];
            if row.is_empty() {
                row.push(pad);
            }
            row.resize(len, pad);
            ok.resize(len, false);
            ids.push(row);
            valid.push(ok);
        }
        self.model.score_rows(&ids, &valid)
    }
}

impl<B: Backend> SequenceScorer for SeparateReward<B> {
    fn score_tokens(&self, tb: &TokenBatch) -> Result<Vec<f32>> {
        crate::oom::enter("scoring");
        let rows = self.rows_for_tokens(tb)?;
        self.score_ids(&rows)
            .with_context(|| format!("reward model {}", self.model.dir.display()))
    }
}

impl<B: Backend> RewardFn for SeparateReward<B>
where
    RewardModel<B>: Send + Sync,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        crate::oom::enter("scoring");
        let rows = self.rows_for_texts(batch)?;
        let scores = self.score_ids(&rows)?;
        Ok(scores.into_iter().map(Some).collect())
    }
}
