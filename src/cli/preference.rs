//! `rlhf dpo` and `rlhf rm`: preference pairs, one trained adapter (policy for DPO; reward
//! adapter and score head for RM), through the shared run set-up and run loop.

use super::setup::{self, Outcome, TrainRun};
use super::trainers::{dpo_config, load_pairs};
use crate::engine::{new_head, RlhfModel};
use crate::plan::Algo;
use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::dpo::{DpoTrainer, PairExample};
use rlhf_algorithms::losses::RewardLossConfig;
use rlhf_algorithms::rm::RewardTrainer;
use rlhf_algorithms::trainer::Role;

/// `rlhf dpo` (`algo` = DPO) / `rlhf rm` (RM) on backend `B`.
pub fn run<B: AutodiffBackend>(algo: Algo, run: &TrainRun, device: &B::Device) -> Result<Outcome> {
    let cfg = &run.cfg;
    let prepared = run.prepare::<B, _>(algo, device, |p, codec| load_pairs(p, codec, cfg))?;
    let Some(prepared) = prepared else {
        return Ok(Outcome::DoesNotFit);
    };
    let (loaded, run_dir) = (prepared.loaded, prepared.run_dir);
    let (train_set, eval_set) = (prepared.train_set, prepared.eval_set);
    let role = if algo == Algo::Rm {
        Role::Reward
    } else {
        Role::Policy
    };
    let pad_id = loaded.pad_id();
    let mut model = setup::model_for_run(loaded.model, &loaded.tok, cfg, role, algo == Algo::Dpo)?;
    // A reward adapter started from an `rlhf rm` folder keeps its head.
    if role == Role::Reward && !model.heads.contains_key(&role) {
        let head = new_head(model.base.cfg.hidden_size, cfg.train.seed ^ 0x5EED, device);
        model.heads.insert(role, head);
    }
    let opts = run.run_options(&run_dir, &loaded.name);
    let (last, eval) = match algo {
        Algo::Dpo => {
            let mut trainer = DpoTrainer {
                cfg: dpo_config(cfg)?,
                pad_id,
            };
            let mut train_set = train_set;
            if cfg.dpo.precompute_ref_log_probs {
                precompute_reference(&trainer, &model, &mut train_set, cfg.train.batch_size)?;
            }
            setup::train_and_eval(run, &mut model, &mut trainer, &train_set, eval_set, &opts)?
        }
        Algo::Rm => {
            let c = cfg.rm.center_rewards_coefficient;
            let mut trainer = RewardTrainer {
                cfg: RewardLossConfig {
                    center_rewards_coefficient: (c != 0.0).then_some(c),
                },
                pad_id,
            };
            setup::train_and_eval(run, &mut model, &mut trainer, &train_set, eval_set, &opts)?
        }
        other => bail!("`{other}` is not a preference algorithm"),
    };
    setup::report(cfg, role, &last, eval.as_ref());
    Ok(Outcome::Done)
}

/// Computes every example's reference log-probs once (adapters off), as TRL's
/// `precompute_ref_log_probs` does.
fn precompute_reference<B: AutodiffBackend>(
    trainer: &DpoTrainer,
    model: &RlhfModel<B>,
    set: &mut [PairExample],
    batch: usize,
) -> Result<()> {
    for chunk in set.chunks_mut(batch) {
        let r = trainer.reference_logps(model, chunk)?;
        for (e, v) in chunk.iter_mut().zip(r) {
            e.ref_logps = Some(v);
        }
    }
    Ok(())
}
