//! What each algorithm runs: its phases and, in each, the passes over the base.

use super::{Algo, Pass, PassKind, Phase, RewardSource, Workload};
use crate::config::{ReferenceModel, RunConfig};
use crate::model::config::LlamaConfig;
use anyhow::{bail, Result};

fn check_len(m: &LlamaConfig, total: usize, key: &str, what: &str) -> Result<()> {
    if total > m.max_position_embeddings && m.rope_scaling.is_none() {
        bail!(
            "key `{key}`: {what} = {total} tokens exceeds the model's max_position_embeddings {} (its config has no rope_scaling)",
            m.max_position_embeddings
        );
    }
    Ok(())
}
fn positive(v: usize, key: &str) -> Result<u64> {
    if v == 0 {
        bail!("key `{key}`: expected a positive integer, got 0");
    }
    Ok(v as u64)
}
pub(super) fn workload(
    run: &RunConfig,
    m: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
) -> Result<Workload> {
    run.validate()?;
    let b = positive(run.train.batch_size, "train.batch_size")?;
    if algo.trains() && run.lora.target_modules.is_empty() {
        bail!("key `lora.target_modules`: expected at least one module to train");
    }
    let fwd = |label, rows, tokens, logits_tokens, lora, grad| Pass {
        label,
        kind: PassKind::Forward { grad },
        rows,
        tokens,
        logits_tokens,
        lora,
        reward_model: false,
    };
    let mut notes = Vec::new();
    let mut w = match algo {
        Algo::Sft => {
            let t = positive(run.data.max_length, "data.max_length")?;
            check_len(m, run.data.max_length, "data.max_length", "data.max_length")?;
            notes.push(format!(
                "sft: {b} sequences of {t} tokens through the policy adapter; no reference pass"
            ));
            Workload {
                adapters: vec![("policy", true)],
                heads: vec![],
                phases: vec![
                    (Phase::Load, vec![]),
                    (Phase::TrainStep, vec![fwd("policy", b, t, t, true, true)]),
                ],
                rollout: None,
                notes,
            }
        }
        Algo::Dpo | Algo::Rm => {
            let t = positive(run.data.max_length, "data.max_length")?;
            check_len(m, run.data.max_length, "data.max_length", "data.max_length")?;
            // Chosen and rejected of every pair go through together.
            let rows = 2 * b;
            if algo == Algo::Dpo {
                notes.push(format!(
                    "dpo: {b} pairs = {rows} sequences of {t} tokens; the reference pass (adapter off, no grads) runs before the policy's"
                ));
                Workload {
                    adapters: vec![("policy", true)],
                    heads: vec![],
                    phases: vec![
                        (Phase::Load, vec![]),
                        (
                            Phase::Scoring,
                            vec![fwd("reference", rows, t, t, false, false)],
                        ),
                        (
                            Phase::TrainStep,
                            vec![fwd("policy", rows, t, t, true, true)],
                        ),
                    ],
                    rollout: None,
                    notes,
                }
            } else {
                notes.push(format!(
                    "rm: {b} pairs = {rows} sequences of {t} tokens through the reward adapter and score head (no lm_head)"
                ));
                Workload {
                    adapters: vec![("reward", true)],
                    heads: vec![("score", true)],
                    phases: vec![
                        (Phase::Load, vec![]),
                        (
                            Phase::TrainStep,
                            vec![fwd("reward", rows, t, 0, true, true)],
                        ),
                    ],
                    rollout: None,
                    notes,
                }
            }
        }
        Algo::Grpo => {
            let g = run.grpo.num_generations as u64;
            if !b.is_multiple_of(g) {
                bail!(
                    "key `train.batch_size`: expected a multiple of `grpo.num_generations` ({g}) so every prompt's group is whole, got {b}"
                );
            }
            let p = positive(run.data.max_prompt_length, "data.max_prompt_length")?;
            let c = positive(run.grpo.max_completion_length, "grpo.max_completion_length")?;
            check_len(
                m,
                (p + c) as usize,
                "grpo.max_completion_length",
                "data.max_prompt_length + grpo.max_completion_length",
            )?;
            let mut scoring = Vec::new();
            if let RewardSource::Checkpoint {
                path, why_assumed, ..
            } = reward
            {
                // The reward model scores the rollout before the reference and old-policy passes;
                // its input is cut to `p + c` tokens (`engine::separate_reward`).
                let mut pass = fwd("reward model", b, p + c, 0, false, false);
                pass.reward_model = true;
                scoring.push(pass);
                notes.push(match why_assumed {
                    None => format!(
                        "grpo: separate reward model {} resident in every phase",
                        path.display()
                    ),
                    Some(e) => format!(
                        "grpo: could not read the reward model's config ({e}); assuming the base model's dims"
                    ),
                });
            }
            if run.grpo.beta > 0.0 {
                scoring.push(fwd("reference", b, p + c, c, false, false));
            }
            if run.grpo.num_iterations > 1 {
                scoring.push(fwd("old policy", b, p + c, c, true, false));
            }
            let mut phases = vec![
                (Phase::Load, vec![]),
                (Phase::Rollout, vec![generate_pass(b, p, c)]),
            ];
            if !scoring.is_empty() {
                phases.push((Phase::Scoring, scoring));
            }
            phases.push((
                Phase::TrainStep,
                vec![fwd("policy", b, p + c, c, true, true)],
            ));
            notes.push(format!(
                "grpo: {b} completions per micro-batch = {} prompt(s) x {g} generations, {p} prompt + {c} completion tokens; logits over completion tokens only",
                b / g
            ));
            Workload {
                adapters: vec![("policy", true)],
                heads: vec![],
                phases,
                rollout: Some((b, p + c)),
                notes,
            }
        }
        Algo::Ppo => {
            let p = positive(run.data.max_prompt_length, "data.max_prompt_length")?;
            let c = positive(run.ppo.response_length, "ppo.response_length")?;
            check_len(
                m,
                (p + c) as usize,
                "ppo.response_length",
                "data.max_prompt_length + ppo.response_length",
            )?;
            // The rollout is `train.batch_size` rows; each training pass takes one micro-batch of
            // one minibatch of it (algorithms::ppo::PpoSchedule).
            let split =
                run.ppo.num_mini_batches.max(1) * run.train.gradient_accumulation_steps.max(1);
            let tb = (b / split as u64).max(1);
            let mut adapters = vec![("policy", true), ("value", true)];
            let mut heads = vec![("value", true)];
            let mut reward_pass = fwd("reward", b, p + c, 0, true, false);
            match reward {
                RewardSource::Checkpoint {
                    path, why_assumed, ..
                } => {
                    reward_pass.lora = false;
                    reward_pass.reward_model = true;
                    match why_assumed {
                        None => notes.push(format!(
                            "ppo: separate reward checkpoint {} resident in every phase",
                            path.display()
                        )),
                        Some(e) => notes.push(format!(
                            "ppo: could not read the reward checkpoint's config ({e}); assuming the base model's dims"
                        )),
                    }
                }
                _ => {
                    adapters.push(("reward", false));
                    heads.push(("score", false));
                    if run.ppo.reward_adapter.is_none() {
                        notes.push(
                            "ppo: no reward source configured; assuming a reward adapter shaped like [lora]".into(),
                        );
                    }
                }
            }
            notes.push(format!(
                "ppo: {b} rollouts of {p} prompt + {c} response tokens; policy and value losses are back-propagated one after the other (disjoint adapters)"
            ));
            Workload {
                adapters,
                heads,
                phases: vec![
                    (Phase::Load, vec![]),
                    (Phase::Rollout, vec![generate_pass(b, p, c)]),
                    (
                        Phase::Scoring,
                        vec![
                            fwd("old policy", b, p + c, c, true, false),
                            fwd("reference", b, p + c, c, false, false),
                            fwd("value", b, p + c, 0, true, false),
                            reward_pass,
                        ],
                    ),
                    (
                        Phase::TrainStep,
                        vec![
                            fwd("policy", tb, p + c, c, true, true),
                            fwd("value", tb, p + c, 0, true, true),
                        ],
                    ),
                ],
                rollout: Some((b, p + c)),
                notes,
            }
        }
        Algo::Generate => {
            let p = positive(run.data.max_prompt_length, "data.max_prompt_length")?;
            let c = positive(run.generation.max_new_tokens, "generation.max_new_tokens")?;
            check_len(
                m,
                (p + c) as usize,
                "generation.max_new_tokens",
                "data.max_prompt_length + generation.max_new_tokens",
            )?;
            notes.push(format!(
                "generate: {b} rows of {p} prompt + {c} new tokens, adapter loaded"
            ));
            Workload {
                adapters: vec![("policy", false)],
                heads: vec![],
                phases: vec![
                    (Phase::Load, vec![]),
                    (Phase::Rollout, vec![generate_pass(b, p, c)]),
                ],
                rollout: None,
                notes,
            }
        }
    };
    if run.model.reference() == ReferenceModel::Initial
        && matches!(algo, Algo::Dpo | Algo::Grpo | Algo::Ppo)
    {
        frozen_initial_reference(&mut w);
    }
    Ok(w)
}
/// `model.reference = "initial"`: the reference is a frozen copy of the starting adapter, one
/// more adapter's parameters resident (no gradients, no optimizer state), and the reference
/// pass runs through it.
fn frozen_initial_reference(w: &mut Workload) {
    w.adapters
        .push(("reference (frozen initial adapter)", false));
    for (_, passes) in &mut w.phases {
        for p in passes.iter_mut().filter(|p| p.label == "reference") {
            p.lora = true;
        }
    }
    w.notes.push(
        "reference: a frozen copy of the starting adapter (model.adapter), counted as one more adapter".into(),
    );
}
fn generate_pass(rows: u64, prompt: u64, completion: u64) -> Pass {
    Pass {
        label: "generate",
        kind: PassKind::Generate { prompt, completion },
        rows,
        tokens: prompt + completion,
        logits_tokens: 0,
        lora: true,
        reward_model: false,
    }
}
