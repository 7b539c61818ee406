//! `rlhf ppo`: PPO with every role on the one quantized base. Policy = base and policy adapter
//! (trained); value = base, value adapter and value head (trained with the policy); reward =
//! base, reward adapter and score head as written by `rlhf rm` (frozen); reference = base with
//! adapters off. The value model starts as a copy of the reward model (adapter and head), as
//! TRL's PPO example loads its value model from the reward checkpoint.
//!
//! With `ppo.reward_model_path` the reward is a separate Hugging Face reward model instead (a
//! second frozen base, quantized as the first, with its own tokenizer: `engine::SeparateReward`);
//! the value adapter and head then start fresh.
//!
//! Same steps as the other training commands: plan check before any weight is loaded, prompts
//! tokenized, output folder locked, model load, roles, then the shared run loop with
//! [`PpoTrainer`]. With `data.eval`, the final policy and the reference (the model before
//! training) sample one response per eval prompt and the mean reward-model scores go to
//! `eval_metrics.json`.

use super::setup::{self, Outcome, Prepared, TrainRun};
use super::trainers::{load_prompt_ids, load_reward_model, prompt_files, sampling_params};
use crate::config::RunConfig;
use crate::engine::{new_head, RlhfModel, HEAD_KEY};
use crate::model::lora::Adapter;
use crate::model::reward_model::check_reward_folder;
use crate::plan::Algo;
use crate::train::train;
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::losses::{KlController, PpoConfig};
use rlhf_algorithms::ppo::{check_sampling, mean_sampled_score, PpoCall, PpoSchedule, PpoTrainer};
use rlhf_algorithms::trainer::Role;
use std::path::{Path, PathBuf};

/// The run-config key of the separate reward model.
const RM_KEY: &str = "ppo.reward_model_path";

/// The loss settings of `[ppo]` (TRL's `PPOConfig` names), checked.
pub fn ppo_config(cfg: &RunConfig) -> Result<PpoConfig> {
    cfg.ppo.validate()?;
    Ok(cfg.ppo.clone())
}

/// The KL controller: fixed `kl_coef`, or adaptive when `ppo.adaptive_kl_target` is set.
pub fn kl_controller(cfg: &RunConfig) -> Result<KlController> {
    Ok(match cfg.ppo.adaptive_kl_target {
        None => KlController::Fixed {
            value: cfg.ppo.kl_coef,
        },
        Some(target) => {
            KlController::adaptive(cfg.ppo.kl_coef, target, cfg.ppo.adaptive_kl_horizon)
                .context("keys `ppo.adaptive_kl_target` / `ppo.adaptive_kl_horizon`")?
        }
    })
}

/// Where PPO's reward comes from.
enum RewardFrom {
    /// A reward adapter + score head written by `rlhf rm` on this base.
    Adapter(PathBuf),
    /// A separate sequence-classification checkpoint (`ppo.reward_model_path`).
    Model(PathBuf),
}

/// The one reward source of the run.
fn reward_source(cfg: &RunConfig) -> Result<RewardFrom> {
    match (&cfg.ppo.reward_adapter, &cfg.ppo.reward_model_path) {
        (Some(_), Some(_)) => bail!(
            "keys `ppo.reward_adapter` and `ppo.reward_model_path`: expected one reward source, got both"
        ),
        (None, Some(p)) => Ok(RewardFrom::Model(p.clone())),
        (None, None) => bail!(
            "key `ppo.reward_adapter`: missing; set it to the `reward` folder written by `rlhf rm` on this base, \
             or set `ppo.reward_model_path` to a Hugging Face reward model folder"
        ),
        (Some(dir), None) => Ok(RewardFrom::Adapter(dir.clone())),
    }
}

/// Loads the reward adapter + score head as `role`, dropout off (a scorer must be deterministic).
fn load_reward_as<B: AutodiffBackend>(
    model: &mut RlhfModel<B>,
    dir: &Path,
    role: Role,
) -> Result<()> {
    let device = model.base.device.clone();
    let (mut adapter, mut extra) =
        Adapter::<B>::load_peft(dir, role.name(), &model.base.cfg, &device).with_context(|| {
            format!(
                "{}: cannot load the reward adapter (key `ppo.reward_adapter`)",
                dir.display()
            )
        })?;
    let head = extra.remove(HEAD_KEY).with_context(|| {
        format!(
            "{}: no score head `{HEAD_KEY}` in adapter_model.safetensors; expected a reward adapter written by `rlhf rm`",
            dir.display()
        )
    })?;
    let hidden = model.base.cfg.hidden_size;
    ensure!(
        head.dims() == [1, hidden],
        "{}: score head has shape {:?}, expected [1, {hidden}]",
        dir.display(),
        head.dims()
    );
    adapter.cfg.dropout = 0.0;
    model.adapters.insert(role, adapter);
    model.heads.insert(role, head);
    Ok(())
}

/// `rlhf ppo` on backend `B`.
pub fn run<B: AutodiffBackend>(run: &TrainRun, device: &B::Device) -> Result<Outcome> {
    let cfg = &run.cfg;
    let ppo = run.in_file(ppo_config(cfg))?;
    let kl = run.in_file(kl_controller(cfg))?;
    let reward = run.in_file(reward_source(cfg))?;
    ensure!(
        cfg.lora.dropout == 0.0,
        "{}: key `lora.dropout`: PPO runs without dropout (as TRL's PPOTrainer, so that old and new \
         log-probs of the same policy agree); set it to 0",
        run.path.display()
    );
    match &reward {
        RewardFrom::Adapter(dir) => ensure!(
            dir.join("adapter_config.json").is_file(),
            "{}: key `ppo.reward_adapter`: {} has no adapter_config.json; expected the `reward` folder written by `rlhf rm`",
            run.path.display(),
            dir.display()
        ),
        // Its config and tokenizer are checked before any weight is read.
        RewardFrom::Model(dir) => run.in_file(check_reward_folder(dir, RM_KEY))?,
    }
    let mut sampling = sampling_params(cfg, cfg.ppo.response_length, Vec::new(), 0);
    run.in_file(check_sampling(&sampling))?;
    let seed = cfg.train.seed;
    let schedule = PpoSchedule {
        rollout_size: cfg.train.batch_size,
        num_ppo_epochs: cfg.ppo.num_ppo_epochs,
        num_mini_batches: cfg.ppo.num_mini_batches,
        gradient_accumulation_steps: cfg.train.gradient_accumulation_steps,
        seed,
    };
    run.in_file(schedule.validate())?;
    let prepared =
        run.prepare::<B, _>(Algo::Ppo, device, |p, codec| load_prompt_ids(p, codec, cfg))?;
    let Some(Prepared {
        loaded,
        train_set: prompts,
        eval_set: eval_prompts,
        run_dir,
    }) = prepared
    else {
        return Ok(Outcome::DoesNotFit);
    };
    let pad_id = loaded.pad_id();
    sampling.stop_ids = loaded.stop_ids(&cfg.generation.stop_token_ids);
    sampling.pad_id = pad_id;

    let separate = match &reward {
        RewardFrom::Model(dir) => {
            let max_tokens = cfg.data.max_prompt_length + cfg.ppo.response_length;
            let rm = load_reward_model(
                dir,
                RM_KEY,
                &loaded,
                cfg,
                &prompt_files(cfg),
                max_tokens,
                "reward_model",
            );
            let rm = run.in_file(rm)?;
            Some(rm)
        }
        RewardFrom::Adapter(_) => None,
    };
    let mut model = setup::model_for_run(loaded.model, &loaded.tok, cfg, Role::Policy, true)?;
    if let RewardFrom::Adapter(dir) = &reward {
        load_reward_as(&mut model, dir, Role::Reward)?;
        load_reward_as(&mut model, dir, Role::Value)?;
    }
    if let Some(rm) = separate {
        // The reward model's weights are not on this base: the value adapter and head start
        // fresh (PEFT's init, HF's `score` init).
        model.add_new_adapter(Role::Value, &cfg.lora, seed ^ 0x7A1E)?;
        let head = new_head::<B>(model.base.cfg.hidden_size, seed ^ 0x5C0E, device);
        model.heads.insert(Role::Value, head);
        model.reward_model = Some(Box::new(rm));
    }

    let trainer = PpoTrainer::new(ppo.clone(), kl, schedule, sampling.clone(), prompts, pad_id);
    let mut trainer = run.in_file(trainer)?;
    let slots = vec![PpoCall; trainer.calls_per_epoch()];
    let opts = run.run_options(&run_dir, &loaded.name);
    let last = train(cfg, &mut model, &mut trainer, &slots, &opts)?;
    setup::print_metrics("train", &last);

    if let Some(eval) = eval_prompts {
        model.set_training(false);
        let score = |role: Role| {
            mean_sampled_score(
                &model,
                role,
                &eval,
                &sampling,
                ppo.missing_eos_penalty,
                cfg.train.batch_size,
                pad_id,
                seed ^ 0xE7A1,
            )
        };
        let policy = score(Role::Policy)?;
        let reference = score(Role::Reference)?;
        let line = serde_json::json!({
            "eval_objective/scores": policy,
            "eval_objective/scores_reference": reference,
        });
        crate::util::write_atomic(
            &cfg.train.output_dir.join("eval_metrics.json"),
            serde_json::to_string_pretty(&line)?.as_bytes(),
        )?;
        println!("eval: objective/scores={policy:.4} (reference {reference:.4})");
    }
    eprintln!(
        "policy adapter written to {}, value adapter + head to {}",
        cfg.train.output_dir.join(Role::Policy.name()).display(),
        cfg.train.output_dir.join(Role::Value.name()).display()
    );
    Ok(Outcome::Done)
}
