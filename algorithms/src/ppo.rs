//! PPO for RLHF (TRL's `PPOTrainer`, experimental in TRL 1.x) on one shared base: the policy
//! adapter samples and is trained, the value adapter + value head is trained with it, the reward
//! role scores (a reward adapter + score head, or a separate reward model behind
//! [`PolicyModel::sequence_scores`]), and the reference is the base with adapters off.
//!
//! TRL runs its own loop; here the shared run loop drives PPO through [`Trainer::loss`], one
//! call per micro-batch. The trainer keeps the schedule itself:
//!
//! * a **rollout** takes `train.batch_size` prompts (TRL's `batch_size`) in a seeded order that
//!   visits every prompt once per epoch (TRL's loader drops the last incomplete batch), samples
//!   one response each with the policy, and scores them with every pass detached: old policy
//!   log-probs, reference log-probs, values, reward at the last response token (with the
//!   missing-EOS penalty). [`ppo_rollout`] then gives KL-shaped rewards, GAE advantages and
//!   returns, which are cached;
//! * the cache then serves `num_ppo_epochs x num_mini_batches x gradient_accumulation_steps`
//!   consecutive `loss()` calls: per PPO epoch a fresh seeded permutation of the rollout is cut
//!   into `num_mini_batches` minibatches and each minibatch into `gradient_accumulation_steps`
//!   micro-batches, so one optimizer step of the run loop is one TRL minibatch;
//! * each call's loss is `pg_loss + vf_coef * vf_loss` ([`ppo_loss`]): policy and value adapters
//!   (and the value head) are trained together by one optimizer, as TRL's
//!   `PolicyAndValueWrapper` does. The two terms are handed to the run loop one after the other
//!   ([`StepOutput::then`]): their adapters are disjoint, so the gradients are the same, and the
//!   step holds the policy's graph or the value's, never both.
//!
//! Examples handed to `loss()` by the run loop are unit slots ([`PpoCall`]): the run loop counts
//! calls, the trainer owns the prompts. The cache, the schedule position and the KL coefficient
//! are in [`Trainer::state`], so a resumed run continues exactly.
//!
//! Responses are aligned as in TRL: column `t` of every `[B, T]` tensor is response token `t`,
//! and `T` is the longest response of the rollout, as the width of the responses HF's
//! `generate` returns to TRL (it stops once every row has hit EOS); where the score and the last
//! value land depends on it. A response's stop token counts as part of it (`contain_eos`).

use crate::losses::{
    padding_masks, ppo_loss, ppo_rollout, KlController, PpoConfig, PpoMinibatch, PpoRolloutBatch,
};
use crate::trainer::{
    to_f64, Metrics, PolicyModel, Role, SamplingParams, StepOutput, TokenBatch, Trainer,
};
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// One `loss()` call of the PPO schedule. The run loop hands these out; they carry nothing
/// because the trainer decides which prompts a rollout takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PpoCall;

/// How a PPO run is laid out (TRL `PPOConfig` names where they exist).
#[derive(Debug, Clone, PartialEq)]
pub struct PpoSchedule {
    /// Prompts per rollout (`train.batch_size`, TRL's `batch_size`).
    pub rollout_size: usize,
    /// Passes over each rollout.
    pub num_ppo_epochs: usize,
    /// Minibatches (optimizer steps) per PPO epoch.
    pub num_mini_batches: usize,
    /// Micro-batches per minibatch (`train.gradient_accumulation_steps`).
    pub gradient_accumulation_steps: usize,
    /// Seeds the prompt order, the sampling and the minibatch permutations.
    pub seed: u64,
}

impl PpoSchedule {
    /// Rows of one minibatch.
    pub fn mini_batch_size(&self) -> usize {
        self.rollout_size / self.num_mini_batches
    }

    /// Rows of one `loss()` call.
    pub fn micro_batch_size(&self) -> usize {
        self.mini_batch_size() / self.gradient_accumulation_steps
    }

    /// `loss()` calls one rollout serves.
    pub fn calls_per_rollout(&self) -> usize {
        self.num_ppo_epochs * self.num_mini_batches * self.gradient_accumulation_steps
    }

    /// Rows of the rollout that call `served` (0-based within the rollout) trains on.
    pub fn micro_batch_rows(&self, rollout: u64, served: usize) -> Vec<usize> {
        let per_epoch = self.num_mini_batches * self.gradient_accumulation_steps;
        let epoch = served / per_epoch;
        let within = served % per_epoch;
        let perm = permutation(
            self.rollout_size,
            mix(self.seed, &[0x4d49_4e49, rollout, epoch as u64]),
        );
        let m = self.micro_batch_size();
        perm[within * m..(within + 1) * m].to_vec()
    }

    /// The rollout must split evenly into micro-batches.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.rollout_size > 0,
            "key `train.batch_size`: expected a positive integer"
        );
        ensure!(
            self.num_ppo_epochs > 0,
            "key `ppo.num_ppo_epochs`: expected a positive integer, got 0"
        );
        ensure!(
            self.num_mini_batches > 0 && self.gradient_accumulation_steps > 0,
            "keys `ppo.num_mini_batches` and `train.gradient_accumulation_steps`: expected positive integers"
        );
        let split = self.num_mini_batches * self.gradient_accumulation_steps;
        ensure!(
            self.rollout_size.is_multiple_of(split),
            "key `train.batch_size`: the rollout of {} prompts must split evenly into \
             ppo.num_mini_batches x train.gradient_accumulation_steps = {split} micro-batches",
            self.rollout_size
        );
        Ok(())
    }
}

/// One cached response of the current rollout, response-aligned (`T` values per vector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedRow {
    pub prompt: Vec<u32>,
    /// Sampled tokens, the stop token included.
    pub completion: Vec<u32>,
    /// Index of the last real response token (TRL's `sequence_length`).
    pub sequence_length: i64,
    /// Old log-probs, `INVALID_LOGPROB` at padding.
    #[serde(with = "exact::floats")]
    pub logprobs: Vec<f32>,
    /// Old values, 0 past `sequence_length + 1`.
    #[serde(with = "exact::floats")]
    pub values: Vec<f32>,
    /// Whitened advantages.
    #[serde(with = "exact::floats")]
    pub advantages: Vec<f32>,
    #[serde(with = "exact::floats")]
    pub returns: Vec<f32>,
}

/// The current rollout and what was logged about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutCache {
    pub rows: Vec<CachedRow>,
    /// `objective/*` metrics of the rollout.
    #[serde(with = "exact::metrics")]
    pub metrics: Metrics,
}

/// Everything a checkpoint must carry to continue a PPO run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoState {
    /// Rollouts done so far (the cache holds rollout `rollouts - 1`).
    pub rollouts: u64,
    /// `loss()` calls already served from the cache.
    pub served: usize,
    /// Current KL coefficient (the controller's value).
    #[serde(with = "exact::float")]
    pub kl_coef: f64,
    /// Responses sampled so far (TRL's `episode`).
    pub episodes: u64,
    pub cache: Option<RolloutCache>,
}

pub struct PpoTrainer {
    /// Loss settings; `kl_coef` is replaced by the controller's value at every rollout.
    pub cfg: PpoConfig,
    pub kl: KlController,
    pub schedule: PpoSchedule,
    /// Sampling; `max_new_tokens` is `ppo.response_length`.
    pub sampling: SamplingParams,
    /// Tokenized prompts of the training set.
    pub prompts: Vec<Vec<u32>>,
    pub pad_id: u32,
    state: PpoState,
    /// Episodes at process start and the start time, for `eps`.
    started: (u64, std::time::Instant),
}

impl PpoTrainer {
    /// Checks the layout and the sampling settings PPO's importance ratios rely on.
    pub fn new(
        cfg: PpoConfig,
        kl: KlController,
        schedule: PpoSchedule,
        sampling: SamplingParams,
        prompts: Vec<Vec<u32>>,
        pad_id: u32,
    ) -> Result<Self> {
        cfg.validate()?;
        schedule.validate()?;
        check_sampling(&sampling)?;
        ensure!(
            prompts.len() >= schedule.rollout_size,
            "the training set has {} prompts, fewer than one rollout (`train.batch_size` = {})",
            prompts.len(),
            schedule.rollout_size
        );
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("prompt {i} of the training set has no tokens");
        }
        let kl_coef = kl.value();
        Ok(Self {
            cfg,
            kl,
            schedule,
            sampling,
            prompts,
            pad_id,
            state: PpoState {
                rollouts: 0,
                served: 0,
                kl_coef,
                episodes: 0,
                cache: None,
            },
            started: (0, std::time::Instant::now()),
        })
    }

    /// Rollouts per pass over the prompts (the last incomplete batch is dropped, as TRL's loader).
    pub fn rollouts_per_epoch(&self) -> usize {
        self.prompts.len() / self.schedule.rollout_size
    }

    /// `loss()` calls per pass over the prompts: the number of [`PpoCall`] slots to give the
    /// run loop, so its step count and `epoch` are PPO's.
    pub fn calls_per_epoch(&self) -> usize {
        self.rollouts_per_epoch() * self.schedule.calls_per_rollout()
    }

    /// The state a checkpoint carries (also for tests).
    pub fn ppo_state(&self) -> &PpoState {
        &self.state
    }

    /// Prompts of rollout `r`: a seeded permutation per epoch, cut into rollouts.
    fn prompt_rows(&self, r: u64) -> Vec<usize> {
        let per_epoch = self.rollouts_per_epoch() as u64;
        let (epoch, within) = (r / per_epoch, (r % per_epoch) as usize);
        let order = permutation(
            self.prompts.len(),
            mix(self.schedule.seed, &[0x5052_4f4d, epoch]),
        );
        let n = self.schedule.rollout_size;
        order[within * n..(within + 1) * n].to_vec()
    }

    /// Logits are divided by `temperature + 1e-7`, as TRL does for every PPO forward pass.
    fn scoring_temperature(&self) -> f64 {
        self.sampling.temperature as f64 + 1e-7
    }

    /// Samples and scores the next rollout, fills the cache, updates the KL controller.
    fn rollout<B: AutodiffBackend>(&mut self, model: &dyn PolicyModel<B>) -> Result<()> {
        let r = self.state.rollouts;
        let rows = self.prompt_rows(r);
        let prompts: Vec<Vec<u32>> = rows.iter().map(|&i| self.prompts[i].clone()).collect();
        let completions = model
            .generate(
                Role::Policy,
                &prompts,
                &self.sampling,
                mix(self.schedule.seed, &[0x5341_4d50, r]),
            )
            .context("ppo rollout: sampling")?;
        let width = completions
            .iter()
            .map(|c| c.tokens.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let pairs: Vec<(&[u32], &[u32])> = prompts
            .iter()
            .zip(&completions)
            .map(|(p, c)| (p.as_slice(), c.tokens.as_slice()))
            .collect();
        let tb = TokenBatch::from_pairs(&pairs, self.pad_id);
        let temperature = self.scoring_temperature();
        let device = model.device();
        let prompt_lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let lp_idx = response_index::<B>(&prompt_lens, width, 0, tb.ids[0].len(), &device);
        let v_idx = response_index::<B>(&prompt_lens, width, -1, tb.ids[0].len(), &device);
        // Scored without graphs: nothing of these passes stays alive into the training step.
        let logprobs = model
            .score_logps(Role::Policy, &tb, temperature)?
            .gather(1, lp_idx.clone());
        let ref_logprobs = model
            .score_logps(Role::Reference, &tb, temperature)?
            .gather(1, lp_idx);
        let values = model.score_heads(Role::Value, &tb)?.gather(1, v_idx);
        let scores = model.sequence_scores(Role::Reward, &tb)?;
        let sequence_lengths: Vec<i64> = completions
            .iter()
            .map(|c| c.tokens.len() as i64 - 1)
            .collect();
        let contain_eos: Vec<bool> = completions.iter().map(|c| c.stopped).collect();

        self.cfg.kl_coef = self.kl.value();
        let out = ppo_rollout(
            PpoRolloutBatch {
                logprobs,
                ref_logprobs,
                values,
                scores,
                sequence_lengths: sequence_lengths.clone(),
                contain_eos: contain_eos.clone(),
            },
            &self.cfg,
        )
        .context("ppo rollout")?;
        let m = out.metrics;
        let mut metrics = Metrics::new();
        metrics.insert("objective/kl".into(), m.kl);
        metrics.insert("objective/entropy".into(), m.entropy);
        metrics.insert("objective/non_score_reward".into(), m.non_score_reward);
        metrics.insert("objective/rlhf_reward".into(), m.rlhf_reward);
        metrics.insert("objective/scores".into(), m.scores);
        metrics.insert("objective/kl_coef".into(), self.cfg.kl_coef);
        metrics.insert(
            "val/num_eos_tokens".into(),
            contain_eos.iter().filter(|&&c| c).count() as f64,
        );
        // TRL 0.11's AdaptiveKLController.update(mean KL, batch_size) after each batch.
        self.kl.update(m.kl, self.schedule.rollout_size);

        let host = |t: Tensor<B, 2>| -> Vec<Vec<f32>> {
            let flat: Vec<f32> = to_f64(t.reshape([prompts.len() * width]))
                .into_iter()
                .map(|x| x as f32)
                .collect();
            flat.chunks(width).map(<[f32]>::to_vec).collect()
        };
        let (lp, vals, adv, ret) = (
            host(out.logprobs),
            host(out.values),
            host(out.advantages),
            host(out.returns),
        );
        let cached = prompts
            .into_iter()
            .zip(completions)
            .enumerate()
            .map(|(i, (prompt, c))| CachedRow {
                prompt,
                completion: c.tokens,
                sequence_length: sequence_lengths[i],
                logprobs: lp[i].clone(),
                values: vals[i].clone(),
                advantages: adv[i].clone(),
                returns: ret[i].clone(),
            })
            .collect();
        self.state.cache = Some(RolloutCache {
            rows: cached,
            metrics,
        });
        self.state.rollouts += 1;
        self.state.served = 0;
        self.state.kl_coef = self.kl.value();
        self.state.episodes += self.schedule.rollout_size as u64;
        Ok(())
    }
}

/// The sampling PPO's importance ratios rely on: the full distribution at a positive
/// temperature (TRL samples with top_k = 0, top_p = 1), and a positive response length.
pub fn check_sampling(sampling: &SamplingParams) -> Result<()> {
    ensure!(
        sampling.max_new_tokens > 0,
        "key `ppo.response_length`: expected a positive integer, got 0"
    );
    ensure!(
        sampling.temperature > 0.0 && sampling.temperature.is_finite(),
        "key `generation.temperature`: PPO samples its rollouts, expected a number > 0, got {}",
        sampling.temperature
    );
    ensure!(
        sampling.top_k == 0 && sampling.top_p >= 1.0 && sampling.min_new_tokens == 0,
        "keys `generation.top_k`, `generation.top_p`, `generation.min_new_tokens`: PPO samples \
         from the full distribution its log-probs describe (as TRL); leave them at 0, 1.0 and 0"
    );
    Ok(())
}

/// `[rows, width]` positions in the padded `prompt ++ response` rows of response column `t`:
/// `prompt_len + t + shift` (shift 0: the token itself, as log-probs are indexed; -1: the state
/// before it, where TRL reads the value), clamped into the row (padding columns are masked).
fn response_index<B: AutodiffBackend>(
    prompt_lens: &[usize],
    width: usize,
    shift: i64,
    seq_len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let last = seq_len as i64 - 1;
    let idx: Vec<i64> = prompt_lens
        .iter()
        .flat_map(|&p| (0..width as i64).map(move |t| (p as i64 + t + shift).clamp(0, last)))
        .collect();
    Tensor::from_data(TensorData::new(idx, [prompt_lens.len(), width]), device)
}

impl<B: AutodiffBackend> Trainer<B> for PpoTrainer {
    type Example = PpoCall;

    fn name(&self) -> &'static str {
        "ppo"
    }

    fn trainable_roles(&self) -> Vec<Role> {
        vec![Role::Policy, Role::Value]
    }

    /// One slot per call: the rollout size is the trainer's.
    fn examples_per_batch(&self, _batch_size: usize) -> usize {
        1
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(&self.state)?)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: PpoState = serde_json::from_value(state.clone())
            .context("not the state of a PPO run (expected rollouts, served, kl_coef, cache)")?;
        if let Some(c) = &s.cache {
            ensure!(
                c.rows.len() == self.schedule.rollout_size,
                "the cached rollout has {} rows but train.batch_size is {}; resume with the same batch size",
                c.rows.len(),
                self.schedule.rollout_size
            );
            let width = c.rows[0].logprobs.len();
            ensure!(
                width <= self.sampling.max_new_tokens
                    && c.rows.iter().all(|r| {
                        [&r.logprobs, &r.values, &r.advantages, &r.returns]
                            .iter()
                            .all(|v| v.len() == width)
                    }),
                "the cached rollout does not fit ppo.response_length = {}; resume with the run's config",
                self.sampling.max_new_tokens
            );
        }
        match &mut self.kl {
            KlController::Fixed { value } | KlController::Adaptive { value, .. } => {
                *value = s.kl_coef
            }
        }
        self.started = (s.episodes, std::time::Instant::now());
        self.state = s;
        Ok(())
    }

    fn loss(
        &mut self,
        model: &dyn PolicyModel<B>,
        _batch: &[PpoCall],
        training: bool,
    ) -> Result<StepOutput<B>> {
        ensure!(
            training,
            "PPO has no evaluation loss: its evaluation samples responses and scores them"
        );
        if self.state.cache.is_none() || self.state.served >= self.schedule.calls_per_rollout() {
            self.rollout(model)?;
        }
        let cache = self.state.cache.as_ref().expect("filled above");
        let rows = self
            .schedule
            .micro_batch_rows(self.state.rollouts - 1, self.state.served);
        let picked: Vec<&CachedRow> = rows.iter().map(|&i| &cache.rows[i]).collect();
        let width = picked[0].logprobs.len();
        let n = picked.len();
        let device = model.device();
        let pairs: Vec<(&[u32], &[u32])> = picked
            .iter()
            .map(|r| (r.prompt.as_slice(), r.completion.as_slice()))
            .collect();
        let tb = TokenBatch::from_pairs(&pairs, self.pad_id);
        let prompt_lens: Vec<usize> = picked.iter().map(|r| r.prompt.len()).collect();
        let seq = tb.ids[0].len();
        let new_logprobs = model
            .token_logps(Role::Policy, &tb, self.scoring_temperature())?
            .gather(1, response_index::<B>(&prompt_lens, width, 0, seq, &device));
        let stack = |f: fn(&CachedRow) -> &Vec<f32>| -> Tensor<B, 2> {
            let flat: Vec<f32> = picked.iter().flat_map(|r| f(r).iter().copied()).collect();
            Tensor::from_data(TensorData::new(flat, [n, width]), &device)
        };
        let lens: Vec<i64> = picked.iter().map(|r| r.sequence_length).collect();
        let (padding_mask, padding_mask_p1) = padding_masks::<B>(&lens, width, &device);
        // The cached rollout, uploaded once, with each term's predictions.
        let (old_logprobs, old_values) = (stack(|r| &r.logprobs), stack(|r| &r.values));
        let (advantages, returns) = (stack(|r| &r.advantages), stack(|r| &r.returns));
        let minibatch = |new_logprobs: Tensor<B, 2>, vpred: Tensor<B, 2>| PpoMinibatch {
            new_logprobs,
            vpred,
            old_logprobs: old_logprobs.clone(),
            old_values: old_values.clone(),
            advantages: advantages.clone(),
            returns: returns.clone(),
            padding_mask: padding_mask.clone(),
            padding_mask_p1: padding_mask_p1.clone(),
        };
        // The policy term first, with the old values standing in for the value predictions (no
        // graph there); the value term is built only after the run loop has back-propagated
        // this one, so a step holds one model graph at a time. The adapters are disjoint, so the
        // gradients are those of `pg_loss + vf_coef * vf_loss`, as TRL's one backward gives.
        let policy = ppo_loss(
            minibatch(new_logprobs.clone(), old_values.clone()),
            &self.cfg,
        )?;
        let value_batch = minibatch(new_logprobs.detach(), old_values.clone());
        self.state.served += 1;

        let mut metrics = cache.metrics.clone();
        metrics.insert("episode".into(), self.state.episodes as f64);
        let secs = self.started.1.elapsed().as_secs_f64();
        metrics.insert(
            "eps".into(),
            (self.state.episodes - self.started.0) as f64 / secs.max(1e-9),
        );
        let tokens = tb.valid.iter().flatten().filter(|&&v| v).count();
        let cfg = self.cfg.clone();
        let value_index = response_index::<B>(&prompt_lens, width, -1, seq, &device);
        let value_part = move |model: &dyn PolicyModel<B>| -> Result<StepOutput<B>> {
            let vpred = model.head_scores(Role::Value, &tb)?.gather(1, value_index);
            let out = ppo_loss(
                PpoMinibatch {
                    vpred,
                    ..value_batch
                },
                &cfg,
            )?;
            let m = out.metrics;
            metrics.insert("policy/approxkl_avg".into(), m.approxkl);
            metrics.insert("policy/clipfrac_avg".into(), m.pg_clipfrac);
            metrics.insert("loss/policy_avg".into(), m.pg_loss);
            metrics.insert("loss/value_avg".into(), m.vf_loss);
            metrics.insert("val/clipfrac_avg".into(), m.vf_clipfrac);
            metrics.insert("val/ratio".into(), m.ratio_mean);
            metrics.insert("loss".into(), m.pg_loss + cfg.vf_coef * m.vf_loss);
            Ok(StepOutput {
                loss: out.vf_loss,
                metrics,
                tokens,
                then: None,
            })
        };
        Ok(StepOutput {
            loss: policy.pg_loss,
            metrics: Metrics::new(),
            tokens: 0,
            then: Some(Box::new(value_part)),
        })
    }
}

/// Mean reward-model score of one sampled response per prompt under `role` (the policy, or
/// [`Role::Reference`] for the model before training), with the missing-EOS penalty applied as
/// in `objective/scores`. Prompts go in chunks of `batch`; `seed` fixes the samples.
#[allow(clippy::too_many_arguments)]
pub fn mean_sampled_score<B: AutodiffBackend>(
    model: &dyn PolicyModel<B>,
    role: Role,
    prompts: &[Vec<u32>],
    sampling: &SamplingParams,
    missing_eos_penalty: Option<f64>,
    batch: usize,
    pad_id: u32,
    seed: u64,
) -> Result<f64> {
    ensure!(!prompts.is_empty(), "no prompts to evaluate");
    let mut total = 0.0;
    for (k, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let completions = model.generate(role, chunk, sampling, mix(seed, &[k as u64]))?;
        let pairs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .zip(&completions)
            .map(|(p, c)| (p.as_slice(), c.tokens.as_slice()))
            .collect();
        let tb = TokenBatch::from_pairs(&pairs, pad_id);
        let scores = to_f64(model.sequence_scores(Role::Reward, &tb)?);
        for (s, c) in scores.iter().zip(&completions) {
            total += s - if c.stopped {
                0.0
            } else {
                missing_eos_penalty.unwrap_or(0.0)
            };
        }
    }
    Ok(total / prompts.len() as f64)
}

/// Floats in `trainer.json` as the decimal strings Rust prints (shortest round-trip form) and
/// parses exactly: serde_json's default float parser may be off by one unit in the last place,
/// and a resumed run must see the very bits it saved.
mod exact {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    fn parse<T: std::str::FromStr, E: Error>(s: &str) -> Result<T, E> {
        s.parse()
            .map_err(|_| E::custom(format!("`{s}` is not a number")))
    }

    /// `Vec<f32>` as one space-separated string.
    pub mod floats {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
            let text: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
            s.serialize_str(&text.join(" "))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
            let text = String::deserialize(d)?;
            text.split_whitespace().map(parse).collect()
        }
    }

    /// One `f64` as a string.
    pub mod float {
        use super::*;

        pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&format!("{v:?}"))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
            parse(&String::deserialize(d)?)
        }
    }

    /// Metric values as strings.
    pub mod metrics {
        use super::*;
        use crate::trainer::Metrics;
        use std::collections::BTreeMap;

        pub fn serialize<S: Serializer>(m: &Metrics, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| (k, format!("{v:?}"))))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Metrics, D::Error> {
            BTreeMap::<String, String>::deserialize(d)?
                .into_iter()
                .map(|(k, v)| Ok((k, parse(&v)?)))
                .collect()
        }
    }
}

/// SplitMix64 of a seed and a few salts: independent streams for prompt order, sampling and
/// minibatch permutations.
fn mix(seed: u64, salts: &[u64]) -> u64 {
    let mut x = seed;
    for &s in salts {
        x = splitmix(x ^ splitmix(s));
    }
    x
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A permutation of `0..n` from `seed` (Fisher-Yates).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        state = splitmix(state);
        let j = ((state as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::INVALID_LOGPROB;
    use crate::trainer::Completion;

    type Ad = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

    /// A model whose outputs are readable from the token ids: log-prob of token `x` is
    /// `-0.1 x` (times a trainable scale under the policy), the value at position `s` is `0.5 s`,
    /// the reward at position `s` is the token id there.
    struct Mock {
        completions: Vec<Completion>,
        scale: Tensor<Ad, 2>,
    }

    fn grid(batch: &TokenBatch, f: impl Fn(usize, usize) -> f32) -> Tensor<Ad, 2> {
        let (b, t) = (batch.len(), batch.ids[0].len());
        let v: Vec<f32> = (0..b)
            .flat_map(|i| (0..t).map(move |s| (i, s)))
            .map(|(i, s)| f(i, s))
            .collect();
        Tensor::from_data(TensorData::new(v, [b, t]), &Default::default())
    }

    impl PolicyModel<Ad> for Mock {
        fn token_logps(&self, role: Role, batch: &TokenBatch, _t: f64) -> Result<Tensor<Ad, 2>> {
            let lp = grid(batch, |i, s| {
                if batch.loss_mask[i][s] {
                    -0.1 * batch.ids[i][s] as f32
                } else {
                    0.0
                }
            });
            Ok(match role {
                Role::Policy => lp * self.scale.clone(),
                _ => lp,
            })
        }

        fn head_scores(&self, role: Role, batch: &TokenBatch) -> Result<Tensor<Ad, 2>> {
            Ok(match role {
                Role::Value => grid(batch, |_, s| 0.5 * s as f32) * self.scale.clone(),
                _ => grid(batch, |i, s| batch.ids[i][s] as f32),
            })
        }

        fn generate(
            &self,
            _role: Role,
            prompts: &[Vec<u32>],
            _params: &SamplingParams,
            _seed: u64,
        ) -> Result<Vec<Completion>> {
            Ok(self.completions[..prompts.len()].to_vec())
        }

        fn decode(&self, _tokens: &[u32]) -> Result<String> {
            Ok(String::new())
        }

        fn device(&self) -> burn::tensor::Device<Ad> {
            Default::default()
        }
    }

    fn mock() -> Mock {
        Mock {
            completions: vec![
                Completion {
                    tokens: vec![3, 4, 2],
                    stopped: true,
                },
                Completion {
                    tokens: vec![9],
                    stopped: false,
                },
            ],
            scale: Tensor::from_data(TensorData::new(vec![1.0f32], [1, 1]), &Default::default())
                .require_grad(),
        }
    }

    fn trainer(epochs: usize) -> PpoTrainer {
        PpoTrainer::new(
            PpoConfig::default(),
            KlController::Fixed { value: 0.05 },
            PpoSchedule {
                rollout_size: 2,
                num_ppo_epochs: epochs,
                num_mini_batches: 1,
                gradient_accumulation_steps: 1,
                seed: 7,
            },
            SamplingParams {
                max_new_tokens: 4,
                min_new_tokens: 0,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                stop_ids: vec![2],
                pad_id: 0,
            },
            vec![vec![1, 5], vec![1, 6, 7]],
            0,
        )
        .unwrap()
    }

    #[test]
    fn rollout_aligns_log_probs_values_and_scores_with_the_responses() {
        let (model, mut t) = (mock(), trainer(1));
        let out = Trainer::<Ad>::loss(&mut t, &model, &[PpoCall], true)
            .unwrap()
            .complete(&model)
            .unwrap();
        assert!(out.metrics["loss"].is_finite());
        let cache = t.ppo_state().cache.clone().unwrap();
        for row in &cache.rows {
            let p = row.prompt.len() as f32;
            // Width 3 = the longest response; padding log-probs are INVALID_LOGPROB.
            let c = &row.completion;
            let lp: Vec<f32> = (0..3)
                .map(|t| {
                    c.get(t)
                        .map_or(INVALID_LOGPROB as f32, |&x| -0.1 * x as f32)
                })
                .collect();
            assert_eq!(row.logprobs, lp, "{row:?}");
            // Value of response token t is read at position p - 1 + t, kept up to L + 1.
            let l = row.sequence_length;
            let v: Vec<f32> = (0..3)
                .map(|t| {
                    if t as i64 > l + 1 {
                        0.0
                    } else {
                        0.5 * (p - 1.0 + t as f32)
                    }
                })
                .collect();
            assert_eq!(row.values, v, "{row:?}");
            assert_eq!(l, c.len() as i64 - 1);
        }
        // Scores: reward at the last token of each row (ids 2 and 9).
        assert_eq!(cache.metrics["objective/scores"], 5.5);
        assert_eq!(cache.metrics["val/num_eos_tokens"], 1.0);
        assert_eq!(t.ppo_state().episodes, 2);
    }

    #[test]
    fn a_rollout_serves_its_calls_then_the_next_one_is_sampled() {
        let (model, mut t) = (mock(), trainer(2));
        for call in 0..5 {
            Trainer::<Ad>::loss(&mut t, &model, &[PpoCall], true)
                .unwrap()
                .complete(&model)
                .unwrap();
            let s = t.ppo_state();
            assert_eq!(
                (s.rollouts, s.served),
                (call / 2 + 1, call as usize % 2 + 1)
            );
        }
        assert!(Trainer::<Ad>::loss(&mut t, &model, &[PpoCall], false).is_err());
    }

    #[test]
    fn policy_then_value_parts_give_the_gradient_of_their_sum() {
        let model = mock();
        let grad = |g: &<Ad as AutodiffBackend>::Gradients| -> f64 {
            let g = model.scale.grad(g).expect("scale is in the graph");
            g.into_data().to_vec::<f32>().unwrap()[0] as f64
        };
        let mut split = trainer(1);
        let first = Trainer::<Ad>::loss(&mut split, &model, &[PpoCall], true).unwrap();
        let g_policy = grad(&first.loss.backward());
        let second = (first.then.expect("the value part follows"))(&model).unwrap();
        assert!(second.then.is_none());
        let g_value = grad(&second.loss.backward());
        let mut whole = trainer(1);
        let out = Trainer::<Ad>::loss(&mut whole, &model, &[PpoCall], true)
            .unwrap()
            .complete(&model)
            .unwrap();
        let loss = to_f64(out.loss.clone())[0];
        assert!(
            (loss - out.metrics["loss"]).abs() < 1e-6,
            "{loss} vs {:?}",
            out.metrics
        );
        let g_whole = grad(&out.loss.backward());
        assert!(
            g_policy.abs() > 1e-4 && g_value.abs() > 1e-4,
            "{g_policy} {g_value}"
        );
        assert!(
            (g_policy + g_value - g_whole).abs() < 1e-6,
            "{g_policy} + {g_value} vs {g_whole}"
        );
    }

    #[test]
    fn restored_state_gives_the_same_next_loss() {
        let model = mock();
        let mut a = trainer(2);
        Trainer::<Ad>::loss(&mut a, &model, &[PpoCall], true).unwrap();
        let saved = Trainer::<Ad>::state(&a).unwrap();
        let text = serde_json::to_string(&saved).unwrap();
        let mut b = trainer(2);
        Trainer::<Ad>::load_state(&mut b, &serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(a.ppo_state(), b.ppo_state());
        let la = Trainer::<Ad>::loss(&mut a, &model, &[PpoCall], true).unwrap();
        let lb = Trainer::<Ad>::loss(&mut b, &model, &[PpoCall], true).unwrap();
        assert_eq!(to_f64(la.loss), to_f64(lb.loss));
        let mut other = trainer(2);
        other.schedule.rollout_size = 1;
        assert!(Trainer::<Ad>::load_state(&mut other, &saved).is_err());
    }

    #[test]
    fn schedule_covers_each_rollout_once_per_epoch_and_prompts_once_per_epoch() {
        let s = PpoSchedule {
            rollout_size: 8,
            num_ppo_epochs: 2,
            num_mini_batches: 2,
            gradient_accumulation_steps: 2,
            seed: 1,
        };
        assert_eq!(s.calls_per_rollout(), 8);
        for epoch in 0..2 {
            let mut rows: Vec<usize> = (0..4)
                .flat_map(|k| s.micro_batch_rows(3, epoch * 4 + k))
                .collect();
            rows.sort();
            assert_eq!(rows, (0..8).collect::<Vec<_>>());
        }
        assert!(PpoSchedule {
            rollout_size: 6,
            ..s.clone()
        }
        .validate()
        .is_err());
        let mut t = trainer(1);
        t.prompts = (0..5).map(|i| vec![i + 1]).collect();
        assert_eq!(t.rollouts_per_epoch(), 2);
        let mut seen: Vec<usize> = (0..2).flat_map(|r| t.prompt_rows(r)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4);
    }
}
