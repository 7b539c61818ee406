//! `rlhf grpo --config run.toml`: group-relative policy optimisation of the policy adapter on the
//! shared 4-bit base, with reward functions built in or loaded as plugins, or a separate reward
//! model (`type = "reward_model"`), which the engine loads after the base and scores from the
//! completions' text (`engine::SeparateReward`).
//!
//! Order of work: read the config, build the reward functions (a plugin that cannot be loaded
//! fails here, before any weight is read), check the VRAM plan, tokenize the prompts, lock the
//! output folder, load the base, then hand [`GrpoTrainer`] to the shared run loop. Plugins run in
//! worker processes, so one that aborts or loops fails its reward instead of the trainer. A
//! reward function that fails during training (a plugin error, crash or timeout) stops the run
//! with exit code 2 and a message naming the function, the completion and the last checkpoint,
//! which the run loop wrote atomically and which is left untouched: fix the reward and continue
//! with `--resume`.

use super::setup::{self, Outcome, TrainRun};
use super::trainers::{
    check_grpo_config, grpo_loss_config, grpo_settings, load_grpo_examples, load_reward_model,
    prompt_files, COMPLETIONS_LOG,
};
use crate::config::{RewardModelReward, RunConfig};
use crate::model::reward_model::check_reward_folder;
use crate::plan::Algo;
use crate::train::{latest_checkpoint, train};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::grpo::{GrpoTrainer, Objective, RewardFailure};
use rlhf_algorithms::trainer::Role;
use rlhf_rewards::{RewardConfig, RewardFn, RewardSet};
use std::path::Path;

/// One configured reward, in `grpo.rewards` order: built now, or a reward model loaded after the
/// base (it needs the backend).
pub enum RewardSlot {
    Built(Box<dyn RewardFn>, f32),
    Model(usize, RewardModelReward),
}

/// The reward functions of `grpo.rewards`, built (plugins started in worker processes) with
/// their weights; a `reward_model` entry's folder is checked, not loaded. Relative plugin paths
/// are taken relative to the config file's directory.
pub fn build_rewards(cfg: &RunConfig, config: &Path) -> Result<Vec<RewardSlot>> {
    if cfg.grpo.rewards.is_empty() {
        bail!(
            "{}: key `grpo.rewards`: GRPO needs at least one reward function, e.g.\n[[grpo.rewards]]\ntype = \"exact_answer\"",
            config.display()
        );
    }
    let models = cfg
        .grpo
        .reward_models()
        .with_context(|| format!("{}", config.display()))?;
    let base = config.parent().unwrap_or(Path::new(""));
    // Plugins run in worker processes of this binary (see `reward_worker`).
    let worker =
        std::env::current_exe().context("cannot find the rlhf binary for reward workers")?;
    let mut slots = Vec::new();
    for (i, table) in cfg.grpo.rewards.iter().enumerate() {
        if let Some((_, rm)) = models.iter().find(|(j, _)| *j == i) {
            check_reward_folder(&rm.path, &format!("grpo.rewards[{i}].path"))
                .with_context(|| format!("{}", config.display()))?;
            slots.push(RewardSlot::Model(i, rm.clone()));
            continue;
        }
        let entry = toml::Value::Table(table.clone())
            .try_into::<RewardConfig>()
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: key `grpo.rewards[{i}]`: {}",
                    config.display(),
                    e.message().trim()
                )
            })?;
        let func = entry
            .build_isolated(base, &worker)
            .with_context(|| format!("reward function #{} ({})", i + 1, entry.kind()))
            .with_context(|| format!("{}", config.display()))?;
        slots.push(RewardSlot::Built(func, entry.weight()));
    }
    Ok(slots)
}

/// The reward set of the run: every slot built, a reward model loaded on the backend without
/// autodiff (quantized as the base) and scored from the completions' text.
fn reward_set<B: AutodiffBackend>(
    slots: Vec<RewardSlot>,
    loaded: &setup::Loaded<B>,
    cfg: &RunConfig,
) -> Result<RewardSet> {
    let mut funcs = Vec::with_capacity(slots.len());
    for slot in slots {
        funcs.push(match slot {
            RewardSlot::Built(f, w) => (f, w),
            RewardSlot::Model(i, rm) => {
                let name = rm.name.clone().unwrap_or_else(|| "reward_model".into());
                let max_tokens = cfg.data.max_prompt_length + cfg.grpo.max_completion_length;
                let scorer = load_reward_model(
                    &rm.path,
                    &format!("grpo.rewards[{i}].path"),
                    loaded,
                    cfg,
                    &prompt_files(cfg),
                    max_tokens,
                    &name,
                )?;
                (Box::new(scorer) as Box<dyn RewardFn>, rm.weight)
            }
        });
    }
    RewardSet::new(funcs)
}

/// `rlhf grpo` (and `rlhf rloo`, with [`Objective::Rloo`]) on backend `B`.
pub fn run<B: AutodiffBackend>(
    run: &TrainRun,
    device: &B::Device,
    objective: Objective,
) -> Result<Outcome> {
    let cfg = &run.cfg;
    run.in_file(check_grpo_config(cfg))?;
    let mut loss = run.in_file(grpo_loss_config(cfg))?;
    if let Objective::Rloo { .. } = objective {
        // RLOO's KL is a reward penalty, not a loss term.
        loss.beta = 0.0;
    }
    // Plugins load (and a bad one fails) before any weight is read.
    let rewards = build_rewards(cfg, &run.path)?;
    let prepared = run.prepare::<B, _>(Algo::Grpo, device, |p, codec| {
        load_grpo_examples(p, codec, cfg)
    })?;
    let Some(prepared) = prepared else {
        return Ok(Outcome::DoesNotFit);
    };
    let (loaded, run_dir) = (prepared.loaded, prepared.run_dir);
    let (train_set, eval_set) = (prepared.train_set, prepared.eval_set);
    let pad_id = loaded.pad_id();
    let stop_ids = loaded.stop_ids(&cfg.generation.stop_token_ids);

    let rewards = reward_set(rewards, &loaded, cfg)?;
    let mut model = setup::model_for_run(loaded.model, &loaded.tok, cfg, Role::Policy, true)?;
    let opts = run.run_options(&run_dir, &loaded.name);
    let mut settings = grpo_settings(cfg, loss, stop_ids, pad_id)?;
    settings.objective = objective;
    let mut trainer = GrpoTrainer::new(settings, rewards)?;
    let last = match train(cfg, &mut model, &mut trainer, &train_set, &opts) {
        Ok(m) => m,
        Err(e) if e.downcast_ref::<RewardFailure>().is_some() => {
            bail!("{e:#}; {}", stopped_note(&cfg.train.output_dir));
        }
        Err(e) => return Err(e),
    };
    setup::print_metrics("train", &last);
    if let Some(set) = eval_set {
        let m = setup::evaluate_and_write(cfg, &mut model, &mut trainer, &set)?;
        setup::print_metrics("eval", &m);
    }
    eprintln!(
        "adapter written to {}; sample completions in {}",
        cfg.train.output_dir.join(Role::Policy.name()).display(),
        cfg.train.output_dir.join(COMPLETIONS_LOG).display()
    );
    Ok(Outcome::Done)
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
