//! GRPO: group-relative policy optimisation of the policy adapter with reward functions
//! (built-in or plugins), as TRL 1.16's `GRPOTrainer` runs it; and RLOO ([`Objective::Rloo`],
//! TRL 1.16's `RLOOTrainer`), which shares the rollouts and differs in advantages and loss.
//!
//! Each micro-batch of `batch_size / num_generations` prompts is rolled out `num_generations`
//! times with the policy (one batched `generate` call, seeded from the run seed, the step and the
//! micro-batch, so a resumed run draws the same completions), the completions are decoded and
//! scored by the [`RewardSet`], advantages are group-relative ([`grpo_advantages`]) and the loss
//! is [`grpo_loss`] with log-probs taken at the sampling temperature.
//!
//! With `num_iterations` (TRL's μ) > 1 a rollout is generated on every μ-th optimizer step and
//! reused, with the log-probs of the policy that generated it ("old" log-probs), for the next
//! μ - 1 steps. The cached rollouts are part of [`Trainer::state`], so a resume is exact.
//!
//! Where this differs from TRL, and why:
//! - TRL generates the completions of all `gradient_accumulation_steps` micro-batches at once;
//!   here each micro-batch is rolled out on its own (the run loop hands out one micro-batch at a
//!   time). Advantages are the same (groups never straddle micro-batches), except that
//!   `scale_rewards = "batch"` takes its std over the micro-batch, and `dapo` normalises by the
//!   micro-batch's token count rather than the generation batch's. With
//!   `gradient_accumulation_steps = 1` both are exactly TRL's.
//! - On the steps that reuse a cached rollout the reward metrics of that rollout are logged
//!   again (TRL logs them only on generation steps).
//! - TRL's sampler hands the same prompts to the μ steps of a rollout, so an epoch takes μ times
//!   as many steps. The shared run loop hands every step new prompts; the steps that reuse a
//!   rollout ignore theirs, so with μ > 1 an epoch of optimizer steps sees 1/μ of the prompts.

use crate::losses::{
    grpo_advantages, grpo_loss, mask_truncated_completions, masked_row_sum, rloo_advantages,
    rloo_loss, GrpoBatch, GrpoLossConfig, MultiObjectiveAggregation, ScaleRewards,
};
use crate::trainer::{
    Completion, Metrics, PolicyModel, Role, SamplingParams, StepOutput, TokenBatch, Trainer,
};
use anyhow::{ensure, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use rlhf_rewards::{Columns, RewardBatch, RewardSet};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;

/// One training prompt, tokenized, with what the reward functions see of it.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoExample {
    /// Prompt token ids (chat template applied when the row holds messages).
    pub prompt_ids: Vec<u32>,
    /// The prompt as text (rendered with the chat template for messages), for reward functions.
    pub prompt_text: String,
    /// Every other column of the dataset row (e.g. `answer`), passed to the reward functions.
    pub columns: Columns,
    /// Where the row came from (`train.jsonl line 7`), for error messages.
    pub source: String,
}

/// Everything [`GrpoTrainer`] needs from the run config.
#[derive(Debug, Clone)]
pub struct GrpoSettings {
    /// Completions per prompt (G).
    pub num_generations: usize,
    /// Optimizer steps each rollout is used for (TRL's μ).
    pub num_iterations: usize,
    /// Micro-batches per optimizer step (the run loop's `train.gradient_accumulation_steps`).
    pub gradient_accumulation_steps: usize,
    pub scale_rewards: ScaleRewards,
    /// Drop completions cut at `max_completion_length` from the loss.
    pub mask_truncated_completions: bool,
    /// The loss; its `gradient_accumulation_steps` and `steps_per_generation` must be 1 because
    /// the run loop divides every micro-batch loss by the accumulation steps itself.
    pub loss: GrpoLossConfig,
    /// How completions are sampled; `temperature` must be > 0 (log-probs are taken at it).
    pub sampling: SamplingParams,
    /// `train.seed`: with the step and micro-batch it fixes each rollout's sampling.
    pub seed: u64,
    /// Padding token for scoring batches.
    pub pad_id: u32,
    /// Write sample completions every this many optimizer steps (0: never).
    pub logging_steps: usize,
    /// The JSONL file sample completions are appended to (`<output_dir>/completions.jsonl`).
    pub completions_log: Option<PathBuf>,
    /// GRPO's group-normalised advantages and token loss, or RLOO's leave-one-out advantages
    /// and sequence loss.
    pub objective: Objective,
}

/// What the rollouts are optimised for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// GRPO: [`grpo_advantages`] and [`grpo_loss`].
    Grpo,
    /// RLOO (TRL 1.16 `RLOOTrainer`): the sequence KL to the reference, weighted by `beta`, is
    /// a reward penalty; advantages are leave-one-out ([`rloo_advantages`]); the loss is the
    /// clipped sequence-ratio objective [`rloo_loss`] with the loss config's epsilons.
    Rloo {
        beta: f64,
        normalize_advantages: bool,
    },
}

impl GrpoSettings {
    /// Rejects settings the trainer cannot run with.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.num_generations >= 2,
            "grpo: num_generations must be at least 2 (advantages are group-relative)"
        );
        ensure!(
            self.num_iterations >= 1,
            "grpo: num_iterations must be >= 1"
        );
        ensure!(
            self.gradient_accumulation_steps >= 1,
            "grpo: gradient_accumulation_steps must be >= 1"
        );
        ensure!(
            self.sampling.temperature > 0.0,
            "grpo: the sampling temperature must be > 0 (GRPO needs different completions per prompt)"
        );
        ensure!(
            self.sampling.max_new_tokens > 0,
            "grpo: max_completion_length must be > 0"
        );
        ensure!(
            self.loss.gradient_accumulation_steps == 1 && self.loss.steps_per_generation == 1,
            "grpo: the loss must be configured with gradient_accumulation_steps = steps_per_generation = 1 (the run loop scales for accumulation)"
        );
        self.loss.validate()
    }
}

/// Marks an error raised while scoring completions, so the command can say what became of the
/// run (a reward plugin failing must not look like a crash of the trainer).
#[derive(Debug, Clone)]
pub struct RewardFailure {
    /// 1-based optimizer step (0 for evaluation).
    pub step: usize,
    /// Micro-batch within the step.
    pub micro_batch: usize,
    /// What was being scored.
    pub what: String,
}

impl std::fmt::Display for RewardFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.step == 0 {
            write!(f, "evaluation: scoring {}", self.what)
        } else {
            write!(
                f,
                "step {}, micro-batch {}: scoring {}",
                self.step, self.micro_batch, self.what
            )
        }
    }
}

/// The completions of one micro-batch and everything the loss needs of them. Serializable so
/// that cached rollouts (num_iterations > 1) survive a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// 0-based optimizer step that generated it.
    pub step: usize,
    /// Per completion: the prompt's ids (each prompt repeated `num_generations` times).
    pub prompt_ids: Vec<Vec<u32>>,
    /// Per completion: the sampled ids (with the stop token when one ended it).
    pub completion_ids: Vec<Vec<u32>>,
    /// Per completion: cut at `max_completion_length` without a stop token.
    pub truncated: Vec<bool>,
    pub advantages: Vec<f32>,
    /// `[n][t]` log-probs of the policy that generated the rollout, laid out as the scoring
    /// batch ([`TokenBatch::from_pairs`]); only kept when the rollout is reused.
    pub old_logps: Option<Vec<Vec<f32>>>,
    /// `[n][t]` reference log-probs (beta > 0), kept when the rollout is reused.
    pub ref_logps: Option<Vec<Vec<f32>>>,
    pub prompt_texts: Vec<String>,
    pub completion_texts: Vec<String>,
    /// Per completion: the weighted reward sum (`None`: no function applied).
    pub rewards: Vec<Option<f32>>,
    /// `[func][completion]` scores (`None`: not applicable).
    pub per_func: Vec<Vec<Option<f32>>>,
    /// Reward and completion-length metrics (`None` stands for NaN).
    pub metrics: Vec<(String, Option<f64>)>,
}

impl Rollout {
    fn scoring_batch(&self, pad_id: u32) -> TokenBatch {
        let rows: Vec<(&[u32], &[u32])> = self
            .prompt_ids
            .iter()
            .zip(&self.completion_ids)
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect();
        TokenBatch::from_pairs(&rows, pad_id)
    }
}

/// What a checkpoint keeps of the trainer (`trainer.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct GrpoState {
    /// Optimizer steps completed.
    steps_done: usize,
    /// Cached rollouts by micro-batch index (num_iterations > 1).
    cache: Vec<Option<Rollout>>,
}

/// The GRPO algorithm for the shared run loop.
pub struct GrpoTrainer {
    pub settings: GrpoSettings,
    pub rewards: RewardSet,
    /// Optimizer steps completed (counted here because the run loop does not pass the step).
    steps_done: usize,
    /// Micro-batches of the current step done so far.
    micro: usize,
    /// Rollouts kept for reuse, by micro-batch index.
    cache: Vec<Option<Rollout>>,
    /// Sample lines of the current step, written when its last micro-batch is done.
    samples: Vec<serde_json::Value>,
    /// Evaluation batches rolled out so far (seeds evaluation sampling).
    eval_batches: u64,
}

/// splitmix64: turns structured inputs (seed, step, ...) into well-spread RNG seeds.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sampling seed of micro-batch `micro` of optimizer step `step` (0-based).
pub fn rollout_seed(seed: u64, step: u64, micro: u64) -> u64 {
    splitmix(splitmix(splitmix(seed) ^ step) ^ micro)
}

fn nan_to_none(x: f64) -> Option<f64> {
    (!x.is_nan()).then_some(x)
}

/// Reads a `[n, t]` tensor into rows.
fn rows_of<B: Backend>(t: Tensor<B, 2>) -> Result<Vec<Vec<f32>>> {
    let [_, cols] = t.dims();
    let flat = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading log-probs: {e:?}"))?;
    Ok(flat.chunks(cols.max(1)).map(<[f32]>::to_vec).collect())
}

fn tensor_of<B: Backend>(rows: &[Vec<f32>], device: &B::Device) -> Tensor<B, 2> {
    let cols = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), cols]), device)
}

/// TRL's completion-length metrics (`completions/*`), from the completion token counts.
fn length_metrics(completions: &[Completion]) -> Vec<(String, Option<f64>)> {
    let lens: Vec<f64> = completions.iter().map(|c| c.tokens.len() as f64).collect();
    let term: Vec<f64> = completions
        .iter()
        .filter(|c| c.stopped)
        .map(|c| c.tokens.len() as f64)
        .collect();
    // TRL logs 0 for the terminated lengths when no completion terminated.
    let term = if term.is_empty() { vec![0.0] } else { term };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let clipped = completions.iter().filter(|c| !c.stopped).count() as f64 / lens.len() as f64;
    [
        ("completions/mean_length", mean(&lens)),
        ("completions/min_length", min(&lens)),
        ("completions/max_length", max(&lens)),
        ("completions/clipped_ratio", clipped),
        ("completions/mean_terminated_length", mean(&term)),
        ("completions/min_terminated_length", min(&term)),
        ("completions/max_terminated_length", max(&term)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), nan_to_none(v)))
    .collect()
}

impl GrpoTrainer {
    pub fn new(settings: GrpoSettings, rewards: RewardSet) -> Result<Self> {
        settings.validate()?;
        Ok(Self {
            settings,
            rewards,
            steps_done: 0,
            micro: 0,
            cache: Vec::new(),
            samples: Vec::new(),
            eval_batches: 0,
        })
    }

    /// Optimizer steps this trainer has completed (after a resume: counted from the checkpoint).
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// Samples `num_generations` completions per prompt, decodes and scores them, and computes
    /// the group-relative advantages. `step` is the 0-based optimizer step (`None` for
    /// evaluation), recorded in the rollout and named in errors.
    pub fn roll_out<B: AutodiffBackend>(
        &self,
        model: &dyn PolicyModel<B>,
        batch: &[GrpoExample],
        step: Option<usize>,
        micro: usize,
        seed: u64,
    ) -> Result<Rollout> {
        ensure!(!batch.is_empty(), "grpo: empty micro-batch");
        let s = &self.settings;
        let g = s.num_generations;
        let prompt_ids: Vec<Vec<u32>> = batch
            .iter()
            .flat_map(|e| std::iter::repeat_n(e.prompt_ids.clone(), g))
            .collect();
        let completions = model
            .generate(Role::Policy, &prompt_ids, &s.sampling, seed)
            .context("grpo: sampling completions")?;
        ensure!(
            completions.len() == prompt_ids.len(),
            "grpo: generate returned {} completions for {} prompts",
            completions.len(),
            prompt_ids.len()
        );
        let completion_texts = completions
            .iter()
            .map(|c| model.decode(&c.tokens))
            .collect::<Result<Vec<String>>>()
            .context("grpo: decoding completions")?;
        let prompt_texts: Vec<String> = batch
            .iter()
            .flat_map(|e| std::iter::repeat_n(e.prompt_text.clone(), g))
            .collect();
        let columns: Vec<Columns> = batch
            .iter()
            .flat_map(|e| std::iter::repeat_n(e.columns.clone(), g))
            .collect();
        let reward_batch = RewardBatch::new(&prompt_texts, &completion_texts, &columns)?;
        let failure = || {
            let sources: Vec<&str> = batch.iter().map(|e| e.source.as_str()).collect();
            RewardFailure {
                step: step.map(|s| s + 1).unwrap_or(0),
                micro_batch: micro,
                what: format!(
                    "{} completions ({g} per prompt; prompts from {})",
                    completions.len(),
                    sources.join(", ")
                ),
            }
        };
        let scores = self.rewards.score(&reward_batch).with_context(failure)?;
        if let Some(w) = &scores.warning {
            eprintln!("warning: {}", w.replace('\n', " "));
        }
        let n = completions.len();
        let per_completion: Vec<Vec<f32>> = (0..n)
            .map(|i| scores.per_func.iter().map(|f| f[i]).collect())
            .collect();
        let truncated: Vec<bool> = completions.iter().map(|c| !c.stopped).collect();
        let mut adv = grpo_advantages(
            &per_completion,
            self.rewards.weights(),
            g,
            s.scale_rewards,
            MultiObjectiveAggregation::SumThenNormalize,
        )?;
        let mut rloo_kl = None;
        if let Objective::Rloo {
            beta,
            normalize_advantages,
        } = s.objective
        {
            let kl = if beta != 0.0 {
                let ids: Vec<Vec<u32>> = completions.iter().map(|c| c.tokens.clone()).collect();
                let (per_seq, mean) = self.sequence_kl(model, &prompt_ids, &ids, &truncated)?;
                rloo_kl = Some(mean);
                Some(per_seq)
            } else {
                None
            };
            let r = rloo_advantages(
                &per_completion,
                self.rewards.weights(),
                g,
                kl.as_deref(),
                beta,
                normalize_advantages,
            )?;
            adv.advantages = r.advantages;
            adv.metrics.frac_reward_zero_std = r.frac_reward_zero_std;
        }
        let mut metrics: Vec<(String, Option<f64>)> = Vec::new();
        for (j, name) in self.rewards.names().iter().enumerate() {
            metrics.push((
                format!("rewards/{name}/mean"),
                nan_to_none(adv.metrics.per_func_mean[j]),
            ));
            metrics.push((
                format!("rewards/{name}/std"),
                nan_to_none(adv.metrics.per_func_std[j]),
            ));
        }
        metrics.push(("reward".into(), nan_to_none(adv.metrics.reward)));
        metrics.push(("reward_std".into(), nan_to_none(adv.metrics.reward_std)));
        metrics.push((
            "frac_reward_zero_std".into(),
            nan_to_none(adv.metrics.frac_reward_zero_std),
        ));
        if let Some(kl) = rloo_kl {
            metrics.push(("kl".into(), nan_to_none(kl)));
        }
        metrics.extend(length_metrics(&completions));
        let opt = |x: f32| (!x.is_nan()).then_some(x);
        Ok(Rollout {
            step: step.unwrap_or(0),
            prompt_ids,
            truncated,
            completion_ids: completions.into_iter().map(|c| c.tokens).collect(),
            advantages: adv.advantages,
            old_logps: None,
            ref_logps: None,
            prompt_texts,
            completion_texts,
            rewards: scores.total.iter().copied().map(opt).collect(),
            per_func: scores
                .per_func
                .iter()
                .map(|f| f.iter().copied().map(opt).collect())
                .collect(),
            metrics,
        })
    }

    /// RLOO's KL penalty: per completion `sum_t (logp - ref_logp)` under the sampling policy
    /// (detached) and the reference, and its mean per token (TRL's logged `kl`).
    fn sequence_kl<B: AutodiffBackend>(
        &self,
        model: &dyn PolicyModel<B>,
        prompt_ids: &[Vec<u32>],
        completion_ids: &[Vec<u32>],
        truncated: &[bool],
    ) -> Result<(Vec<f64>, f64)> {
        let s = &self.settings;
        let rows: Vec<(&[u32], &[u32])> = prompt_ids
            .iter()
            .zip(completion_ids)
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect();
        let tb = TokenBatch::from_pairs(&rows, s.pad_id);
        let temperature = f64::from(s.sampling.temperature);
        let policy = model.score_logps(Role::Policy, &tb, temperature)?;
        let reference = model.token_logps(Role::Reference, &tb, temperature)?;
        let mask = self.completion_mask::<B>(&tb, truncated, &model.device())?;
        let per_token = (policy - reference) * mask.clone();
        let total = crate::trainer::to_f64(per_token.clone().sum())[0];
        let count = crate::trainer::to_f64(mask.clone().sum())[0].max(1.0);
        let per_seq = crate::trainer::to_f64(masked_row_sum(per_token, mask));
        Ok((per_seq, total / count))
    }

    /// The loss mask of a scoring batch, with truncated completions dropped when
    /// `mask_truncated_completions` is on.
    fn completion_mask<B: AutodiffBackend>(
        &self,
        tb: &TokenBatch,
        truncated: &[bool],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let (n, cols) = (tb.len(), tb.ids.first().map_or(0, Vec::len));
        let mask: Vec<f32> = tb
            .loss_mask
            .iter()
            .flatten()
            .map(|&m| if m { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n, cols]), device);
        if self.settings.mask_truncated_completions {
            mask_truncated_completions(mask, truncated)
        } else {
            Ok(mask)
        }
    }

    /// The GRPO loss of a rollout. `keep` stores the policy's (old) and reference log-probs in
    /// the rollout so that later iterations can reuse them.
    fn rollout_loss<B: AutodiffBackend>(
        &self,
        model: &dyn PolicyModel<B>,
        ro: &mut Rollout,
        keep: bool,
    ) -> Result<StepOutput<B>> {
        let s = &self.settings;
        let device = model.device();
        let tb = ro.scoring_batch(s.pad_id);
        let n = tb.len();
        let temperature = f64::from(s.sampling.temperature);
        let logps = model.token_logps(Role::Policy, &tb, temperature)?;
        let reference = if s.loss.beta != 0.0 {
            Some(match &ro.ref_logps {
                Some(r) => tensor_of::<B>(r, &device),
                None => model.token_logps(Role::Reference, &tb, temperature)?,
            })
        } else {
            None
        };
        // On the generating step the policy is the one that sampled: its detached log-probs
        // are the "old" ones (TRL computes them in a separate no-grad pass; same values).
        let old = ro.old_logps.as_ref().map(|o| tensor_of::<B>(o, &device));
        if keep {
            if ro.old_logps.is_none() {
                ro.old_logps = Some(rows_of(logps.clone().detach())?);
            }
            if let (Some(r), None) = (&reference, &ro.ref_logps) {
                ro.ref_logps = Some(rows_of(r.clone().detach())?);
            }
        }
        let mask = self.completion_mask::<B>(&tb, &ro.truncated, &device)?;
        let advantages =
            Tensor::<B, 1>::from_data(TensorData::new(ro.advantages.clone(), [n]), &device);
        let (loss, named) = match s.objective {
            Objective::Grpo => {
                let out = grpo_loss(
                    GrpoBatch {
                        per_token_logps: logps,
                        old_per_token_logps: old,
                        ref_per_token_logps: reference,
                        advantages,
                        completion_mask: mask,
                        num_items_in_batch: None,
                    },
                    &s.loss,
                )?;
                (out.loss, out.metrics.named())
            }
            Objective::Rloo { .. } => {
                let old = old.unwrap_or_else(|| logps.clone().detach());
                let out = rloo_loss(
                    masked_row_sum(logps, mask.clone()),
                    masked_row_sum(old, mask),
                    advantages,
                    s.loss.epsilon_low,
                    s.loss.epsilon_high,
                )?;
                (out.loss.clone(), out.named())
            }
        };
        let mut metrics: Metrics = ro
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), v.unwrap_or(f64::NAN)))
            .collect();
        for (k, v) in named {
            metrics.insert(k.to_string(), v);
        }
        let loss_value = crate::trainer::to_f64(loss.clone())
            .first()
            .copied()
            .unwrap_or(f64::NAN);
        metrics.insert("loss".into(), loss_value);
        let tokens = tb.valid.iter().flatten().filter(|&&v| v).count();
        Ok(StepOutput {
            loss,
            metrics,
            tokens,
            then: None,
        })
    }

    /// Sample lines (prompt, completion, rewards) of a rollout for `completions.jsonl`.
    fn sample_lines(&self, ro: &Rollout, step: usize) -> Vec<serde_json::Value> {
        let names = self.rewards.names();
        (0..ro.completion_texts.len())
            .map(|i| {
                let per_func: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .zip(&ro.per_func)
                    .map(|(n, f)| (n.to_string(), serde_json::json!(f[i])))
                    .collect();
                serde_json::json!({
                    "step": step,
                    "prompt": ro.prompt_texts[i],
                    "completion": ro.completion_texts[i],
                    "reward": ro.rewards[i],
                    "rewards": per_func,
                    "advantage": ro.advantages[i],
                    "truncated": ro.truncated[i],
                })
            })
            .collect()
    }

    /// Appends the pending sample lines to the completions log.
    fn flush_samples(&mut self) -> Result<()> {
        let lines = std::mem::take(&mut self.samples);
        let Some(path) = &self.settings.completions_log else {
            return Ok(());
        };
        if lines.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for l in lines {
            text.push_str(&l.to_string());
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))
    }
}

impl<B: AutodiffBackend> Trainer<B> for GrpoTrainer {
    type Example = GrpoExample;

    fn name(&self) -> &'static str {
        match self.settings.objective {
            Objective::Grpo => "grpo",
            Objective::Rloo { .. } => "rloo",
        }
    }

    fn trainable_roles(&self) -> Vec<Role> {
        vec![Role::Policy]
    }

    /// `train.batch_size` counts completions, as TRL's `per_device_train_batch_size`.
    fn examples_per_batch(&self, batch_size: usize) -> usize {
        (batch_size / self.settings.num_generations).max(1)
    }

    fn rollout_reuse(&self) -> usize {
        self.settings.num_iterations.max(1)
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(GrpoState {
            steps_done: self.steps_done,
            cache: self.cache.clone(),
        })?)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let st: GrpoState = serde_json::from_value(state.clone())
            .context("not a GRPO trainer state (expected steps_done and cache)")?;
        self.steps_done = st.steps_done;
        self.micro = 0;
        self.cache = st.cache;
        self.samples.clear();
        Ok(())
    }

    fn loss(
        &mut self,
        model: &dyn PolicyModel<B>,
        batch: &[GrpoExample],
        training: bool,
    ) -> Result<StepOutput<B>> {
        if !training {
            let seed = rollout_seed(self.settings.seed ^ 0xE7A1, u64::MAX, self.eval_batches);
            self.eval_batches += 1;
            let mut ro = self.roll_out(model, batch, None, 0, seed)?;
            return self.rollout_loss(model, &mut ro, false);
        }
        let s = &self.settings;
        let (step, micro) = (self.steps_done, self.micro);
        let mu = s.num_iterations;
        let generation_step = step - step % mu;
        let cached = self
            .cache
            .get(micro)
            .and_then(Option::as_ref)
            .filter(|r| r.step == generation_step && step != generation_step)
            .cloned();
        let (mut ro, keep) = match cached {
            Some(ro) => (ro, false),
            None => {
                let seed = rollout_seed(s.seed, generation_step as u64, micro as u64);
                let mut ro = self.roll_out(model, batch, Some(step), micro, seed)?;
                ro.step = generation_step;
                (ro, mu > 1)
            }
        };
        let out = self.rollout_loss(model, &mut ro, keep)?;
        let s = &self.settings;
        if s.logging_steps > 0 && (step + 1).is_multiple_of(s.logging_steps) {
            let lines = self.sample_lines(&ro, step + 1);
            self.samples.extend(lines);
        }
        if keep {
            if self.cache.len() <= micro {
                self.cache.resize(micro + 1, None);
            }
            self.cache[micro] = Some(ro);
        }
        self.micro += 1;
        if self.micro == self.settings.gradient_accumulation_steps {
            self.micro = 0;
            self.steps_done += 1;
            self.flush_samples()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::GrpoLossType;
    use burn::tensor::{activation, Int};
    use rlhf_rewards::{FnReward, RewardFn};

    type Ad = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

    const VOCAB: usize = 6;
    const STOP: u32 = 0;
    const MARK: u32 = 3;

    /// A policy that ignores context: every token is drawn from softmax(logits / T).
    /// The reference is the uniform distribution.
    struct Unigram {
        logits: Tensor<Ad, 1>,
    }

    impl Unigram {
        fn new(values: [f32; VOCAB]) -> Self {
            let logits = Tensor::<Ad, 1>::from_data(
                TensorData::new(values.to_vec(), [VOCAB]),
                &Default::default(),
            )
            .require_grad();
            Unigram { logits }
        }

        fn probs(&self, temperature: f64) -> Vec<f64> {
            let p = activation::softmax(self.logits.clone().detach() / temperature, 0);
            p.into_data().iter::<f64>().collect()
        }
    }

    impl PolicyModel<Ad> for Unigram {
        fn token_logps(
            &self,
            role: Role,
            batch: &TokenBatch,
            temperature: f64,
        ) -> Result<Tensor<Ad, 2>> {
            let device = Default::default();
            let logits = match role {
                Role::Reference => Tensor::zeros([VOCAB], &device),
                _ => self.logits.clone(),
            };
            let lp = activation::log_softmax(logits / temperature, 0);
            let (b, t) = (batch.len(), batch.ids[0].len());
            let ids: Vec<i64> = batch.ids.iter().flatten().map(|&x| x as i64).collect();
            let ids = Tensor::<Ad, 1, Int>::from_data(TensorData::new(ids, [b * t]), &device);
            let mask: Vec<f32> = batch
                .loss_mask
                .iter()
                .flatten()
                .map(|&m| if m { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::<Ad, 2>::from_data(TensorData::new(mask, [b, t]), &device);
            let out = lp.select(0, ids).reshape([b, t]) * mask;
            Ok(if role == Role::Reference {
                out.detach()
            } else {
                out
            })
        }

        fn head_scores(&self, _role: Role, _batch: &TokenBatch) -> Result<Tensor<Ad, 2>> {
            anyhow::bail!("no heads")
        }

        fn generate(
            &self,
            _role: Role,
            prompts: &[Vec<u32>],
            params: &SamplingParams,
            seed: u64,
        ) -> Result<Vec<Completion>> {
            let probs = self.probs(f64::from(params.temperature));
            let mut state = splitmix(seed);
            Ok(prompts
                .iter()
                .map(|_| {
                    let mut c = Completion {
                        tokens: vec![],
                        stopped: false,
                    };
                    while c.tokens.len() < params.max_new_tokens {
                        state = splitmix(state);
                        let mut u = (state >> 11) as f64 / (1u64 << 53) as f64;
                        let mut tok = VOCAB as u32 - 1;
                        for (i, p) in probs.iter().enumerate() {
                            if u < *p {
                                tok = i as u32;
                                break;
                            }
                            u -= p;
                        }
                        c.tokens.push(tok);
                        if params.stop_ids.contains(&tok) {
                            c.stopped = true;
                            break;
                        }
                    }
                    c
                })
                .collect())
        }

        fn decode(&self, tokens: &[u32]) -> Result<String> {
            let words: Vec<String> = tokens
                .iter()
                .filter(|&&t| t != STOP)
                .map(|t| {
                    if *t == MARK {
                        "MARK".into()
                    } else {
                        format!("t{t}")
                    }
                })
                .collect();
            Ok(words.join(" "))
        }

        fn device(&self) -> <Ad as burn::tensor::backend::BackendTypes>::Device {
            Default::default()
        }
    }

    fn marker_count() -> RewardSet {
        let f: Box<dyn RewardFn> = Box::new(FnReward::new("marks", |b: &RewardBatch<'_>| {
            Ok(b.completions()
                .iter()
                .map(|c| Some(c.matches("MARK").count() as f32))
                .collect())
        }));
        RewardSet::new(vec![(f, 1.0)]).unwrap()
    }

    fn settings(num_iterations: usize, beta: f64) -> GrpoSettings {
        GrpoSettings {
            num_generations: 4,
            num_iterations,
            gradient_accumulation_steps: 1,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            loss: GrpoLossConfig {
                loss_type: GrpoLossType::Grpo,
                beta,
                max_completion_length: 5,
                ..GrpoLossConfig::default()
            },
            sampling: SamplingParams {
                max_new_tokens: 5,
                min_new_tokens: 0,
                temperature: 0.7,
                top_k: 0,
                top_p: 1.0,
                stop_ids: vec![STOP],
                pad_id: STOP,
            },
            seed: 7,
            pad_id: STOP,
            logging_steps: 1,
            completions_log: None,
            objective: Objective::Grpo,
        }
    }

    fn prompts(n: usize) -> Vec<GrpoExample> {
        (0..n)
            .map(|i| GrpoExample {
                prompt_ids: vec![1, 2 + (i as u32 % 3)],
                prompt_text: format!("p{i}"),
                columns: Columns::new(),
                source: format!("test row {i}"),
            })
            .collect()
    }

    #[test]
    fn rollouts_repeat_each_prompt_and_are_seeded() {
        let model = Unigram::new([0.0, 0.5, 0.1, 0.2, 0.3, 0.0]);
        let t = GrpoTrainer::new(settings(1, 0.0), marker_count()).unwrap();
        assert_eq!(Trainer::<Ad>::examples_per_batch(&t, 8), 2);
        let batch = prompts(2);
        let a = t.roll_out(&model, &batch, Some(0), 0, 1).unwrap();
        assert_eq!(a.prompt_ids.len(), 8);
        assert!(a.prompt_ids[..4].iter().all(|p| p == &batch[0].prompt_ids));
        assert!(a.prompt_ids[4..].iter().all(|p| p == &batch[1].prompt_ids));
        assert_eq!(a, t.roll_out(&model, &batch, Some(0), 0, 1).unwrap());
        assert_ne!(
            a.completion_ids,
            t.roll_out(&model, &batch, Some(0), 0, 2)
                .unwrap()
                .completion_ids
        );
        // Advantages are group-relative: they sum to zero within each group.
        for g in a.advantages.chunks(4) {
            assert!(g.iter().sum::<f32>().abs() < 1e-4, "{g:?}");
        }
        let rewards: Vec<f32> = a.rewards.iter().map(|r| r.unwrap()).collect();
        let marks: Vec<f32> = a
            .completion_ids
            .iter()
            .map(|c| c.iter().filter(|&&t| t == MARK).count() as f32)
            .collect();
        assert_eq!(rewards, marks);
        assert_ne!(rollout_seed(1, 0, 1), rollout_seed(1, 1, 0));
    }

    /// Sets the policy's logits, as an optimizer step would.
    fn set(model: &mut Unigram, values: [f32; VOCAB]) {
        *model = Unigram::new(values);
    }

    #[test]
    fn rollouts_are_reused_for_num_iterations_steps_and_survive_a_checkpoint() {
        let mut model = Unigram::new([0.0, 0.5, 0.1, 0.2, 0.3, 0.0]);
        let mut t = GrpoTrainer::new(settings(3, 0.04), marker_count()).unwrap();
        let batch = prompts(2);
        // Step 0 generates; on-policy, so nothing is clipped and the ratio is 1.
        let out0 = t.loss(&model, &batch, true).unwrap();
        assert_eq!(out0.metrics["clip_ratio/region_mean"], 0.0);
        let state0: GrpoState = serde_json::from_value(Trainer::<Ad>::state(&t).unwrap()).unwrap();
        let cached = state0.cache[0].clone().unwrap();
        assert_eq!(cached.step, 0);
        assert!(cached.old_logps.is_some() && cached.ref_logps.is_some());

        // The policy moves a lot towards MARK: step 1 reuses the rollout (other prompts are
        // ignored) and its ratio against the old log-probs is clipped for positive advantages.
        set(&mut model, [0.0, 0.5, 0.1, 3.0, 0.3, 0.0]);
        let other = prompts(5)[3..].to_vec();
        let out1 = t.loss(&model, &other, true).unwrap();
        assert!(
            out1.metrics["clip_ratio/high_mean"] > 0.0,
            "{:?}",
            out1.metrics
        );
        assert_eq!(out1.metrics["reward"], out0.metrics["reward"]);
        let state1 = Trainer::<Ad>::state(&t).unwrap();
        let s1: GrpoState = serde_json::from_value(state1.clone()).unwrap();
        assert_eq!(s1.cache[0].as_ref().unwrap(), &cached);
        assert_eq!(s1.steps_done, 2);

        // A trainer restored from the checkpoint computes step 2 exactly as the original does.
        let mut resumed = GrpoTrainer::new(settings(3, 0.04), marker_count()).unwrap();
        Trainer::<Ad>::load_state(&mut resumed, &state1).unwrap();
        let a = t.loss(&model, &batch, true).unwrap();
        let b = resumed.loss(&model, &batch, true).unwrap();
        let (la, lb) = (a.loss.into_scalar(), b.loss.into_scalar());
        assert_eq!(la.to_bits(), lb.to_bits());
        assert_eq!(a.metrics.get("kl"), b.metrics.get("kl"));

        // Step 3 generates anew from the moved policy: more MARKs.
        let out3 = t.loss(&model, &batch, true).unwrap();
        let s3: GrpoState = serde_json::from_value(Trainer::<Ad>::state(&t).unwrap()).unwrap();
        assert_eq!(s3.cache[0].as_ref().unwrap().step, 3);
        assert!(out3.metrics["reward"] > out0.metrics["reward"]);
    }

    #[test]
    fn on_policy_gradient_raises_the_rewarded_token() {
        // One step of gradient descent on the GRPO loss must raise p(MARK).
        let model = Unigram::new([0.0; VOCAB]);
        let mut t = GrpoTrainer::new(settings(1, 0.0), marker_count()).unwrap();
        let out = t.loss(&model, &prompts(4), true).unwrap();
        let grads = out.loss.backward();
        let g: Vec<f64> = model
            .logits
            .grad(&grads)
            .unwrap()
            .into_data()
            .iter::<f64>()
            .collect();
        let min = g.iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(g[MARK as usize], min, "gradient {g:?}");
        assert!(g[MARK as usize] < 0.0);
    }

    #[test]
    fn every_loss_type_and_gspo_runs_a_step_that_raises_the_rewarded_token() {
        use crate::losses::ImportanceSamplingLevel;
        let mut variants: Vec<(GrpoLossType, ImportanceSamplingLevel, f64)> = GrpoLossType::ALL
            .iter()
            .map(|&t| (t, ImportanceSamplingLevel::Token, 0.04))
            .collect();
        // GSPO (TRL's recipe: sequence-level ratios, grpo aggregation, no KL)
        variants.push((GrpoLossType::Grpo, ImportanceSamplingLevel::Sequence, 0.0));
        variants.push((GrpoLossType::Dapo, ImportanceSamplingLevel::Sequence, 0.04));
        let mut objectives = vec![Objective::Grpo; variants.len()];
        // RLOO with and without its KL reward penalty
        for beta in [0.05, 0.0] {
            variants.push((GrpoLossType::Grpo, ImportanceSamplingLevel::Token, 0.0));
            objectives.push(Objective::Rloo {
                beta,
                normalize_advantages: beta == 0.0,
            });
        }
        for ((loss_type, level, beta), objective) in variants.into_iter().zip(objectives) {
            let model = Unigram::new([0.0; VOCAB]);
            let mut s = settings(1, beta);
            s.loss.loss_type = loss_type;
            s.loss.importance_sampling_level = level;
            s.objective = objective;
            let mut t = GrpoTrainer::new(s, marker_count()).unwrap();
            let out = t.loss(&model, &prompts(4), true).unwrap();
            assert!(out.metrics["loss"].is_finite(), "{loss_type} {level}");
            let grads = out.loss.backward();
            let g: Vec<f64> = model
                .logits
                .grad(&grads)
                .unwrap()
                .into_data()
                .iter::<f64>()
                .collect();
            let min = g.iter().copied().fold(f64::INFINITY, f64::min);
            assert!(
                g[MARK as usize] == min && min < 0.0,
                "{loss_type} {level} {objective:?}: gradient {g:?}"
            );
        }
    }

    #[test]
    fn reward_errors_are_marked_and_name_the_function() {
        let model = Unigram::new([0.0; VOCAB]);
        let f: Box<dyn RewardFn> = Box::new(FnReward::new("fragile", |_b: &RewardBatch<'_>| {
            anyhow::bail!("cannot score completion 2")
        }));
        let mut t =
            GrpoTrainer::new(settings(1, 0.0), RewardSet::new(vec![(f, 1.0)]).unwrap()).unwrap();
        let err = match t.loss(&model, &prompts(1), true) {
            Ok(_) => panic!("scoring should fail"),
            Err(e) => e,
        };
        let failure = err
            .downcast_ref::<RewardFailure>()
            .expect("a RewardFailure");
        assert_eq!((failure.step, failure.micro_batch), (1, 0));
        let msg = format!("{err:#}");
        assert!(
            msg.contains("`fragile`") && msg.contains("completion 2"),
            "{msg}"
        );
        assert!(msg.contains("test row 0"), "{msg}");
        // The failed step is not counted: a resume redoes it.
        assert_eq!(t.steps_done(), 0);
    }

    #[test]
    fn sample_completions_are_logged_every_logging_steps() {
        let dir = std::env::temp_dir().join(format!("grpo-samples-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("completions.jsonl");
        let _ = std::fs::remove_file(&log);
        let model = Unigram::new([0.0; VOCAB]);
        let mut s = settings(1, 0.0);
        s.logging_steps = 2;
        s.gradient_accumulation_steps = 2;
        s.completions_log = Some(log.clone());
        let mut t = GrpoTrainer::new(s, marker_count()).unwrap();
        for _ in 0..8 {
            t.loss(&model, &prompts(1), true).unwrap();
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // 4 steps of 2 micro-batches of 4 completions; steps 2 and 4 are logged.
        assert_eq!(lines.len(), 16);
        assert!(lines[..8].iter().all(|l| l["step"] == 2));
        assert!(lines[8..].iter().all(|l| l["step"] == 4));
        assert!(lines[0]["rewards"]["marks"].is_number());
        assert!(lines[0]["completion"].is_string() && lines[0]["prompt"] == "p0");
        std::fs::remove_dir_all(&dir).ok();
    }
}
