//! Each algorithm's examples and trainer settings, built from the run config in one place so that
//! `rlhf bench` trains exactly as `rlhf dpo` and `rlhf grpo` do.

use super::setup::{Codec, Loaded};
use crate::config::{Quantize, RunConfig, Truncation};
use crate::data::{Content, PromptExample, TextCodec, TokenizeOptions};
use crate::engine::SeparateReward;
use crate::model::reward_model::RewardModel;
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::dpo::PairExample;
use rlhf_algorithms::grpo::{GrpoExample, GrpoSettings, Objective};
use rlhf_algorithms::losses::{DpoConfig, GrpoLossConfig};
use rlhf_algorithms::trainer::SamplingParams;
use std::path::Path;

/// Name of the sample-completions log in `train.output_dir`.
pub const COMPLETIONS_LOG: &str = "completions.jsonl";

/// Tokenizing a prompt with its completions: `data.max_length` and `data.max_prompt_length` apply.
pub fn tokenize_opts(cfg: &RunConfig) -> TokenizeOptions {
    TokenizeOptions {
        max_length: Some(cfg.data.max_length),
        max_prompt_length: Some(cfg.data.max_prompt_length),
        keep_end: cfg.data.truncation_mode == Truncation::KeepEnd,
    }
}

/// Tokenizing a prompt of GRPO or PPO: `data.max_prompt_length` applies, the completion's length
/// is the algorithm's own.
fn prompt_opts(cfg: &RunConfig) -> TokenizeOptions {
    TokenizeOptions {
        max_length: None,
        max_prompt_length: Some(cfg.data.max_prompt_length),
        keep_end: cfg.data.truncation_mode == Truncation::KeepEnd,
    }
}

/// Reads and tokenizes a preference file into training pairs.
pub fn load_pairs(path: &Path, codec: &Codec, cfg: &RunConfig) -> Result<Vec<PairExample>> {
    let rows = crate::data::load_preferences(path)?;
    anyhow::ensure!(!rows.is_empty(), "{}: no examples", path.display());
    let toks = crate::data::tokenize_preferences(codec, &rows, &tokenize_opts(cfg))?;
    Ok(toks
        .into_iter()
        .map(|t| PairExample {
            prompt: t.prompt,
            chosen: t.chosen,
            rejected: t.rejected,
            ref_logps: None,
        })
        .collect())
}

/// The DPO loss of `[dpo]`, checked.
pub fn dpo_config(cfg: &RunConfig) -> Result<DpoConfig> {
    cfg.dpo.validate()?;
    Ok(cfg.dpo.clone())
}

/// Checks the GRPO-specific values of the run config; errors name the key.
pub fn check_grpo_config(cfg: &RunConfig) -> Result<()> {
    let g = cfg.grpo.num_generations;
    if !cfg.train.batch_size.is_multiple_of(g) {
        bail!(
            "key `train.batch_size`: counts completions and must be a multiple of `grpo.num_generations` ({g}), got {}",
            cfg.train.batch_size
        );
    }
    if cfg.generation.temperature <= 0.0 {
        bail!("key `generation.temperature`: GRPO samples several completions per prompt, expected a temperature > 0");
    }
    if cfg.grpo.max_completion_length == 0 {
        bail!("key `grpo.max_completion_length`: expected a positive integer, got 0");
    }
    if cfg.generation.min_new_tokens > cfg.grpo.max_completion_length {
        bail!(
            "key `generation.min_new_tokens`: exceeds `grpo.max_completion_length` ({})",
            cfg.grpo.max_completion_length
        );
    }
    if !(cfg.grpo.epsilon.is_finite() && cfg.grpo.epsilon >= 0.0) {
        bail!("key `grpo.epsilon`: expected a number >= 0");
    }
    if let Some(e) = cfg.grpo.epsilon_high {
        if !(e.is_finite() && e >= 0.0) {
            bail!("key `grpo.epsilon_high`: expected a number >= 0");
        }
    }
    if !(cfg.grpo.beta.is_finite() && cfg.grpo.beta >= 0.0) {
        bail!("key `grpo.beta`: expected a number >= 0");
    }
    Ok(())
}

/// The loss configuration of `[grpo]` (TRL's GRPOConfig names).
pub fn grpo_loss_config(cfg: &RunConfig) -> Result<GrpoLossConfig> {
    let g = &cfg.grpo;
    Ok(GrpoLossConfig {
        loss_type: g.loss_type,
        importance_sampling_level: g.importance_sampling_level,
        sapo_temperature_pos: g.sapo_temperature_pos,
        sapo_temperature_neg: g.sapo_temperature_neg,
        beta: g.beta,
        epsilon_low: g.epsilon,
        epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
        max_completion_length: g.max_completion_length,
        // The run loop divides every micro-batch loss by the accumulation steps.
        gradient_accumulation_steps: 1,
        steps_per_generation: 1,
        ..GrpoLossConfig::default()
    })
}

/// The prompt as the reward functions see it: the text, or the messages rendered with the chat
/// template (with the generation prompt), exactly what was tokenized.
fn prompt_text(codec: &dyn TextCodec, ex: &PromptExample) -> Result<String> {
    match &ex.prompt {
        Content::Text(t) => Ok(t.clone()),
        Content::Messages(m) => match codec.render_chat(m, true) {
            Some(r) => r.with_context(|| format!("{}: chat template failed", ex.origin)),
            None => bail!(
                "{}: the row holds chat messages but the model has no chat template",
                ex.origin
            ),
        },
    }
}

/// Reads a prompt file and tokenizes each prompt; none may come out empty.
fn tokenized_prompts(
    path: &Path,
    codec: &dyn TextCodec,
    cfg: &RunConfig,
) -> Result<Vec<(PromptExample, Vec<u32>)>> {
    let rows = crate::data::load_prompts(path)?;
    ensure!(!rows.is_empty(), "{}: no prompts", path.display());
    let opts = prompt_opts(cfg);
    rows.into_iter()
        .map(|ex| {
            let ids = crate::data::tokenize_prompt(codec, &ex, &opts)?;
            ensure!(!ids.is_empty(), "{}: the prompt has no tokens", ex.origin);
            Ok((ex, ids))
        })
        .collect()
}

/// Reads and tokenizes a prompt file for GRPO (completions are bounded by
/// `grpo.max_completion_length`, not by `data.max_length`).
pub fn load_grpo_examples(
    path: &Path,
    codec: &dyn TextCodec,
    cfg: &RunConfig,
) -> Result<Vec<GrpoExample>> {
    tokenized_prompts(path, codec, cfg)?
        .into_iter()
        .map(|(ex, prompt_ids)| {
            Ok(GrpoExample {
                prompt_ids,
                prompt_text: prompt_text(codec, &ex)?,
                columns: ex.extra.clone(),
                source: ex.origin.to_string(),
            })
        })
        .collect()
}

/// The trainer settings of a run of GRPO (`rlhf grpo` and `rlhf bench` build them here, so both
/// train alike). Sample completions go to `train.output_dir`/[`COMPLETIONS_LOG`].
pub fn grpo_settings(
    cfg: &RunConfig,
    loss: GrpoLossConfig,
    stop_ids: Vec<u32>,
    pad_id: u32,
) -> Result<GrpoSettings> {
    Ok(GrpoSettings {
        num_generations: cfg.grpo.num_generations,
        num_iterations: cfg.grpo.num_iterations,
        gradient_accumulation_steps: cfg.train.gradient_accumulation_steps,
        scale_rewards: cfg.grpo.scale_rewards,
        mask_truncated_completions: cfg.grpo.mask_truncated_completions,
        loss,
        sampling: sampling_params(cfg, cfg.grpo.max_completion_length, stop_ids, pad_id),
        seed: cfg.train.seed,
        pad_id,
        logging_steps: cfg.train.logging_steps,
        completions_log: Some(cfg.train.output_dir.join(COMPLETIONS_LOG)),
        objective: Objective::Grpo,
    })
}

/// Sampling as `[generation]` sets it, for completions of up to `max_new_tokens` tokens.
pub fn sampling_params(
    cfg: &RunConfig,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
    pad_id: u32,
) -> SamplingParams {
    let g = &cfg.generation;
    SamplingParams {
        max_new_tokens,
        min_new_tokens: g.min_new_tokens,
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        stop_ids,
        pad_id,
    }
}

/// A conversational prompt: its policy ids, its rendered text and its messages.
pub type Conversation = (Vec<u32>, String, Vec<crate::tokenizer::ChatMessage>);

/// The conversational prompts of a prompt file: ids as tokenized for the policy, the rendered
/// text the reward functions see, and the messages (for a reward model with its own chat
/// template: `engine::SeparateReward`).
pub fn prompt_conversations(
    path: &Path,
    codec: &dyn TextCodec,
    cfg: &RunConfig,
) -> Result<Vec<Conversation>> {
    let mut out = Vec::new();
    for (ex, ids) in tokenized_prompts(path, codec, cfg)? {
        if let Content::Messages(m) = &ex.prompt {
            out.push((
                ids,
                prompt_text(codec, &ex)?,
                super::setup::chat_messages(m),
            ));
        }
    }
    Ok(out)
}

/// Tokenized prompts of a prompt file, for PPO (`ppo.response_length` bounds the responses).
pub fn load_prompt_ids(path: &Path, codec: &Codec, cfg: &RunConfig) -> Result<Vec<Vec<u32>>> {
    let prompts = tokenized_prompts(path, codec, cfg)?;
    Ok(prompts.into_iter().map(|(_, ids)| ids).collect())
}

/// The prompt files of the run (train, then eval).
pub fn prompt_files(cfg: &RunConfig) -> Vec<&Path> {
    std::iter::once(cfg.data.train.as_path())
        .chain(cfg.data.eval.as_deref())
        .collect()
}

/// A separate reward model (`ppo.reward_model_path`, GRPO's `reward_model` reward), loaded on the backend without autodiff
/// (it is only scored) and quantized as the base, with the rollout text plumbing it needs.
pub fn load_reward_model<B: AutodiffBackend>(
    dir: &Path,
    key: &str,
    loaded: &Loaded<B>,
    cfg: &RunConfig,
    prompts: &[&Path],
    max_tokens: usize,
    name: &str,
) -> Result<SeparateReward<B::InnerBackend>> {
    let quantize = cfg.model.quantize == Quantize::Nf4;
    let rm = RewardModel::<B::InnerBackend>::load(dir, key, quantize, &loaded.model.device)?;
    let chat_run = cfg.data.chat_template && loaded.chat.is_some();
    let mut scorer = SeparateReward::new(rm, &loaded.tok, chat_run, max_tokens, name);
    if chat_run && !scorer.same_vocab() {
        let codec = Codec::new(&loaded.tok, loaded.chat.as_ref(), cfg);
        for file in prompts {
            for (ids, text, messages) in prompt_conversations(file, &codec, cfg)? {
                scorer.add_conversation(ids, text, messages);
            }
        }
    }
    Ok(scorer)
}
