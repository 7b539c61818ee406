//! `rlhf ppo`: PPO with every role on the one quantized base. Policy = base and policy adapter
//! (trained); value = base, value adapter and value head (trained with the policy); reward =
//! base, reward adapter and score head as written by `rlhf rm` (frozen); reference = base with
//! adapters off. The value model starts as a copy of the reward model (adapter and head), as
//! TRL's PPO example loads its value model from the reward checkpoint.
//!
//! Same steps as the other training commands: plan check before any weight is loaded, model
//! load, prompts, roles, then the shared run loop with [`PpoTrainer`]. With `data.eval`, the
//! final policy and the reference (the model before training) sample one response per eval
//! prompt and the mean reward-model scores go to `eval_metrics.json`.

use crate::cli::Loaded;
use crate::commands::{check_plan, Codec, TrainFlags};
use crate::config::{Quantize, RunConfig, Truncation};
use crate::data::TokenizeOptions;
use crate::engine::{RlhfModel, HEAD_KEY};
use crate::lora::Adapter;
use crate::plan::Algo;
use crate::train::train;
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::losses::{KlController, KlEstimator, PpoConfig};
use rlhf_algorithms::ppo::{check_sampling, mean_sampled_score, PpoCall, PpoSchedule, PpoTrainer};
use rlhf_algorithms::trainer::{Role, SamplingParams};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Runs `rlhf ppo` on the configured device.
pub fn run_on_device(config: &Path, flags: &TrainFlags) -> Result<i32> {
    crate::commands::run_on_device(&PpoJob, config, flags)
}

struct PpoJob;

impl crate::commands::TrainJob for PpoJob {
    fn run<B: AutodiffBackend>(
        &self,
        config: &Path,
        flags: &TrainFlags,
        device: &B::Device,
    ) -> Result<i32> {
        run::<B>(config, flags, device)
    }
}

/// The loss settings of `[ppo]` (TRL's `PPOConfig` names).
pub fn ppo_config(cfg: &RunConfig) -> Result<PpoConfig> {
    let p = &cfg.ppo;
    let c = PpoConfig {
        kl_coef: p.kl_coef,
        kl_estimator: KlEstimator::from_str(&p.kl_estimator).context("key `ppo.kl_estimator`")?,
        whiten_rewards: p.whiten_rewards,
        gamma: p.gamma,
        lam: p.lam,
        cliprange: p.cliprange,
        cliprange_value: p.cliprange_value,
        vf_coef: p.vf_coef,
        missing_eos_penalty: p.missing_eos_penalty,
    };
    c.validate().context("section [ppo]")?;
    Ok(c)
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

/// Where the reward adapter is, refusing what this command cannot run.
fn reward_dir(cfg: &RunConfig) -> Result<PathBuf> {
    match (&cfg.ppo.reward_adapter, &cfg.ppo.reward_model_path) {
        (Some(_), Some(_)) => bail!(
            "keys `ppo.reward_adapter` and `ppo.reward_model_path`: expected one reward source, got both"
        ),
        (None, Some(p)) => bail!(
            "key `ppo.reward_model_path` ({}): a separate reward checkpoint is not supported by `rlhf ppo` yet \
             (`rlhf plan` can estimate it); train a reward adapter on this base with `rlhf rm` and set `ppo.reward_adapter`",
            p.display()
        ),
        (None, None) => bail!(
            "key `ppo.reward_adapter`: missing; set it to the `reward` folder written by `rlhf rm` on this base"
        ),
        (Some(dir), None) => Ok(dir.clone()),
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

/// Tokenized prompts of a prompt file (`max_prompt_length` applies; the response length is
/// `ppo.response_length`).
fn load_prompt_ids(path: &Path, codec: &Codec, cfg: &RunConfig) -> Result<Vec<Vec<u32>>> {
    let rows = crate::data::load_prompts(path)?;
    ensure!(!rows.is_empty(), "{}: no prompts", path.display());
    let opts = TokenizeOptions {
        max_length: None,
        max_prompt_length: Some(cfg.data.max_prompt_length),
        keep_end: cfg.data.truncation_mode == Truncation::KeepEnd,
    };
    rows.iter()
        .map(|r| {
            let ids = crate::data::tokenize_prompt(codec, r, &opts)?;
            ensure!(!ids.is_empty(), "{}: the prompt has no tokens", r.origin);
            Ok(ids)
        })
        .collect()
}

/// `rlhf ppo` on backend `B`.
pub fn run<B: AutodiffBackend>(
    config: &Path,
    flags: &TrainFlags,
    device: &B::Device,
) -> Result<i32> {
    let config_text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read config file", config.display()))?;
    let cfg = RunConfig::parse(&config_text, config)?;
    let ppo = ppo_config(&cfg).with_context(|| format!("{}", config.display()))?;
    let kl = kl_controller(&cfg).with_context(|| format!("{}", config.display()))?;
    let reward = reward_dir(&cfg).with_context(|| format!("{}", config.display()))?;
    ensure!(
        cfg.lora.dropout == 0.0,
        "{}: key `lora.dropout`: PPO runs without dropout (as TRL's PPOTrainer, so that old and new \
         log-probs of the same policy agree); set it to 0",
        config.display()
    );
    ensure!(
        reward.join("adapter_config.json").is_file(),
        "{}: key `ppo.reward_adapter`: {} has no adapter_config.json; expected the `reward` folder written by `rlhf rm`",
        config.display(),
        reward.display()
    );
    let g = &cfg.generation;
    let mut sampling = SamplingParams {
        max_new_tokens: cfg.ppo.response_length,
        min_new_tokens: g.min_new_tokens,
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        stop_ids: Vec::new(),
        pad_id: 0,
    };
    check_sampling(&sampling).with_context(|| format!("{}", config.display()))?;
    let seed = cfg.train.seed;
    let schedule = PpoSchedule {
        rollout_size: cfg.train.batch_size,
        num_ppo_epochs: cfg.ppo.num_ppo_epochs,
        num_mini_batches: cfg.ppo.num_mini_batches,
        gradient_accumulation_steps: cfg.train.gradient_accumulation_steps,
        seed,
    };
    schedule
        .validate()
        .with_context(|| format!("{}", config.display()))?;
    if let Some(code) = check_plan(&cfg, Algo::Ppo, flags.force)? {
        return Ok(code);
    }
    crate::commands::check_data_files(&cfg)?;
    // Data is read and tokenized before the weights load (minutes for a large model).
    let (tok, chat) = crate::cli::load_tokenizer(&cfg.model.path)?;
    let codec = Codec::new(&tok, chat.as_ref(), &cfg);
    let prompts = load_prompt_ids(&cfg.data.train, &codec, &cfg)?;
    let eval_prompts = match &cfg.data.eval {
        Some(p) => Some(load_prompt_ids(p, &codec, &cfg)?),
        None => None,
    };
    let run_dir = flags.open_run_dir(&cfg)?;
    let loaded: Loaded<B> =
        crate::cli::load_model(&cfg.model.path, cfg.model.quantize == Quantize::Nf4, device)?;
    let pad_id = loaded.pad_id();
    sampling.stop_ids = loaded.stop_ids(&cfg.generation.stop_token_ids);
    sampling.pad_id = pad_id;

    let mut model = RlhfModel::for_run(loaded.model, &loaded.tok, &cfg);
    model.add_new_adapter(Role::Policy, &cfg.lora, seed)?;
    load_reward_as(&mut model, &reward, Role::Reward)?;
    load_reward_as(&mut model, &reward, Role::Value)?;

    let mut trainer = PpoTrainer::new(ppo.clone(), kl, schedule, sampling.clone(), prompts, pad_id)
        .with_context(|| format!("{}", config.display()))?;
    let slots = vec![PpoCall; trainer.calls_per_epoch()];
    let opts = flags.run_options(&run_dir, &loaded.name, config_text)?;
    let last = train(&cfg, &mut model, &mut trainer, &slots, &opts)?;
    let parts: Vec<String> = last.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    println!("train: {}", parts.join(" "));

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
    Ok(0)
}
