//! `rlhf grpo --config run.toml`: group-relative policy optimisation of the policy adapter on the
//! shared 4-bit base, with reward functions built in or loaded as plugins.
//!
//! Order of work: read the config, build the reward functions (a plugin that cannot be loaded
//! fails here, before any weight is read), check the VRAM plan, load the base, tokenize the
//! prompts, then hand [`GrpoTrainer`] to the shared run loop. A reward function that fails during
//! training (a plugin error or panic) stops the run with exit code 2 and a message naming the
//! function, the completion and the last checkpoint, which the run loop wrote atomically and
//! which is left untouched: fix the reward and continue with `--resume`.

use crate::cli::Loaded;
use crate::commands::{check_plan, Codec, TrainFlags};
use crate::config::{Quantize, RunConfig, Truncation};
use crate::data::{Content, PromptExample, TextCodec, TokenizeOptions};
use crate::engine::RlhfModel;
use crate::plan::Algo;
use crate::train::{evaluate, latest_checkpoint, train};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::grpo::{GrpoExample, GrpoSettings, GrpoTrainer, RewardFailure};
use rlhf_algorithms::losses::{GrpoLossConfig, GrpoLossType, ScaleRewards};
use rlhf_algorithms::trainer::{Metrics, Role, SamplingParams};
use rlhf_rewards::{RewardConfig, RewardSet};
use std::path::Path;
use std::str::FromStr;

/// Name of the sample-completions log in `train.output_dir`.
pub const COMPLETIONS_LOG: &str = "completions.jsonl";

/// Runs `rlhf grpo` on the configured device.
pub fn run_on_device(config: &Path, flags: &TrainFlags) -> Result<i32> {
    crate::commands::run_on_device(&GrpoJob, config, flags)
}

struct GrpoJob;

impl crate::commands::TrainJob for GrpoJob {
    fn run<B: AutodiffBackend>(
        &self,
        config: &Path,
        flags: &TrainFlags,
        device: &B::Device,
    ) -> Result<i32> {
        run::<B>(config, flags, device)
    }
}

/// The reward functions of `grpo.rewards`, built (plugins started in worker processes) with
/// their weights. Relative plugin paths are taken relative to the config file's directory.
pub fn build_rewards(cfg: &RunConfig, config: &Path) -> Result<RewardSet> {
    if cfg.grpo.rewards.is_empty() {
        bail!(
            "{}: key `grpo.rewards`: GRPO needs at least one reward function, e.g.\n[[grpo.rewards]]\ntype = \"exact_answer\"",
            config.display()
        );
    }
    let entries = cfg
        .grpo
        .rewards
        .iter()
        .enumerate()
        .map(|(i, table)| {
            toml::Value::Table(table.clone())
                .try_into::<RewardConfig>()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}: key `grpo.rewards[{i}]`: {}",
                        config.display(),
                        e.message().trim()
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let base = config.parent().unwrap_or(Path::new(""));
    // Plugins run in worker processes of this binary (see `reward_worker`).
    let worker =
        std::env::current_exe().context("cannot find the rlhf binary for reward workers")?;
    RewardSet::from_configs_isolated(&entries, base, &worker)
        .with_context(|| format!("{}", config.display()))
}

/// Checks the GRPO-specific values of the run config; errors name the key.
pub fn check_config(cfg: &RunConfig) -> Result<()> {
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
pub fn loss_config(cfg: &RunConfig) -> Result<GrpoLossConfig> {
    let g = &cfg.grpo;
    Ok(GrpoLossConfig {
        loss_type: GrpoLossType::from_str(&g.loss_type).context("key `grpo.loss_type`")?,
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

/// Reads and tokenizes a prompt file.
pub fn load_examples(
    path: &Path,
    codec: &dyn TextCodec,
    cfg: &RunConfig,
) -> Result<Vec<GrpoExample>> {
    let rows = crate::data::load_prompts(path)?;
    anyhow::ensure!(!rows.is_empty(), "{}: no prompts", path.display());
    let opts = TokenizeOptions {
        // Completions are bounded by grpo.max_completion_length, not by data.max_length.
        max_length: None,
        max_prompt_length: Some(cfg.data.max_prompt_length),
        keep_end: cfg.data.truncation_mode == Truncation::KeepEnd,
    };
    rows.iter()
        .map(|ex| {
            let prompt_ids = crate::data::tokenize_prompt(codec, ex, &opts)?;
            anyhow::ensure!(
                !prompt_ids.is_empty(),
                "{}: the prompt has no tokens",
                ex.origin
            );
            Ok(GrpoExample {
                prompt_ids,
                prompt_text: prompt_text(codec, ex)?,
                columns: ex.extra.clone(),
                source: ex.origin.to_string(),
            })
        })
        .collect()
}

/// `rlhf grpo` on backend `B`.
pub fn run<B: AutodiffBackend>(
    config: &Path,
    flags: &TrainFlags,
    device: &B::Device,
) -> Result<i32> {
    let config_text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read config file", config.display()))?;
    let cfg = RunConfig::parse(&config_text, config)?;
    check_config(&cfg).map_err(|e| anyhow::anyhow!("{}: {e:#}", config.display()))?;
    let loss = loss_config(&cfg).map_err(|e| anyhow::anyhow!("{}: {e:#}", config.display()))?;
    // Plugins load (and a bad one fails) before any weight is read.
    let rewards = build_rewards(&cfg, config)?;
    if let Some(code) = check_plan(&cfg, Algo::Grpo, flags.force)? {
        return Ok(code);
    }
    crate::commands::check_data_files(&cfg)?;
    // Data is read and tokenized before the weights load (minutes for a large model).
    let (tok, chat) = crate::cli::load_tokenizer(&cfg.model.path)?;
    let codec = Codec::new(&tok, chat.as_ref(), &cfg);
    let train_set = load_examples(&cfg.data.train, &codec, &cfg)?;
    let eval_set = match &cfg.data.eval {
        Some(p) => Some(load_examples(p, &codec, &cfg)?),
        None => None,
    };
    let run_dir = flags.open_run_dir(&cfg)?;
    let loaded: Loaded<B> =
        crate::cli::load_model(&cfg.model.path, cfg.model.quantize == Quantize::Nf4, device)?;
    let pad_id = loaded.pad_id();
    let stop_ids = loaded.stop_ids(&cfg.generation.stop_token_ids);

    let mut model = RlhfModel::for_run(loaded.model, &loaded.tok, &cfg);
    let seed = cfg.train.seed;
    model.add_new_adapter(Role::Policy, &cfg.lora, seed)?;
    let opts = flags.run_options(&run_dir, &loaded.name, config_text)?;
    let settings = settings(&cfg, loss, stop_ids, pad_id)?;
    let mut trainer = GrpoTrainer::new(settings, rewards)?;
    let last = match train(&cfg, &mut model, &mut trainer, &train_set, &opts) {
        Ok(m) => m,
        Err(e) if e.downcast_ref::<RewardFailure>().is_some() => {
            bail!("{e:#}; {}", stopped_note(&cfg.train.output_dir));
        }
        Err(e) => return Err(e),
    };
    print_metrics("train", &last);
    if let Some(set) = eval_set {
        let m = evaluate(&cfg, &mut model, &mut trainer, &set)
            .map_err(|e| e.context("evaluation on data.eval"))?;
        let line: serde_json::Map<String, serde_json::Value> = m
            .iter()
            .map(|(k, v)| (format!("eval_{k}"), serde_json::json!(v)))
            .collect();
        crate::util::write_atomic(
            &cfg.train.output_dir.join("eval_metrics.json"),
            serde_json::to_string_pretty(&line)?.as_bytes(),
        )?;
        print_metrics("eval", &m);
    }
    eprintln!(
        "adapter written to {}; sample completions in {}",
        cfg.train.output_dir.join(Role::Policy.name()).display(),
        cfg.train.output_dir.join(COMPLETIONS_LOG).display()
    );
    Ok(0)
}

/// The trainer settings of a run (`rlhf grpo` and `rlhf bench` build them here, so both train
/// alike). Sample completions go to `train.output_dir`/[`COMPLETIONS_LOG`].
pub fn settings(
    cfg: &RunConfig,
    loss: GrpoLossConfig,
    stop_ids: Vec<u32>,
    pad_id: u32,
) -> Result<GrpoSettings> {
    let g = &cfg.generation;
    Ok(GrpoSettings {
        num_generations: cfg.grpo.num_generations,
        num_iterations: cfg.grpo.num_iterations,
        gradient_accumulation_steps: cfg.train.gradient_accumulation_steps,
        scale_rewards: ScaleRewards::from_str(&cfg.grpo.scale_rewards)?,
        mask_truncated_completions: cfg.grpo.mask_truncated_completions,
        loss,
        sampling: SamplingParams {
            max_new_tokens: cfg.grpo.max_completion_length,
            min_new_tokens: g.min_new_tokens,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            stop_ids,
            pad_id,
        },
        seed: cfg.train.seed,
        pad_id,
        logging_steps: cfg.train.logging_steps,
        completions_log: Some(cfg.train.output_dir.join(COMPLETIONS_LOG)),
    })
}

/// What a run stopped by a reward error leaves behind.
fn stopped_note(out_dir: &Path) -> String {
    match latest_checkpoint(out_dir) {
        Ok(dir) => format!(
            "the run stopped; its last checkpoint {} is intact: fix the reward, then continue with --resume",
            dir.display()
        ),
        Err(_) => format!(
            "the run stopped before any checkpoint was written in {} (see train.save_steps)",
            out_dir.display()
        ),
    }
}

fn print_metrics(what: &str, m: &Metrics) {
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    println!("{what}: {}", parts.join(" "));
}
