//! `rlhf grpo --config run.toml`: group-relative policy optimisation of the policy adapter on the
//! shared 4-bit base, with reward functions built in or loaded as plugins.
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
    check_grpo_config, grpo_loss_config, grpo_settings, load_grpo_examples, COMPLETIONS_LOG,
};
use crate::config::RunConfig;
use crate::plan::Algo;
use crate::train::{latest_checkpoint, train};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::grpo::{GrpoTrainer, Objective, RewardFailure};
use rlhf_algorithms::trainer::Role;
use rlhf_rewards::{RewardConfig, RewardSet};
use std::path::Path;

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
