//! `rlhf rloo --config run.toml`: REINFORCE Leave-One-Out (TRL 1.16's `RLOOTrainer`) on the
//! policy adapter. It shares GRPO's rollouts, reward functions, plan and run loop; the `[rloo]`
//! section (TRL's `RLOOConfig` names, reward functions as `[[rloo.rewards]]`) takes the place of
//! `[grpo]`, and the trainer runs with [`Objective::Rloo`].

use super::setup::{Outcome, TrainRun};
use crate::config::RunConfig;
use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::grpo::Objective;

/// `rlhf rloo` on backend `B`: the GRPO pipeline on the run as [`as_grpo_run`] reads it.
pub fn run<B: AutodiffBackend>(run: &TrainRun, device: &B::Device) -> Result<Outcome> {
    let objective = Objective::Rloo {
        beta: run.cfg.rloo.beta,
        normalize_advantages: run.cfg.rloo.normalize_advantages,
    };
    let as_grpo = TrainRun {
        path: run.path.clone(),
        text: run.text.clone(),
        cfg: run.in_file(as_grpo_run(&run.cfg))?,
        flags: run.flags.clone(),
    };
    super::grpo::run::<B>(&as_grpo, device, objective)
}

/// The run as the GRPO pipeline reads it: `[rloo]` copied into `[grpo]` (the planner then counts
/// the reference pass that `rloo.beta > 0` needs). A run file with `[rloo]` must not also set
/// `[grpo]` reward functions.
pub fn as_grpo_run(cfg: &RunConfig) -> Result<RunConfig> {
    let r = &cfg.rloo;
    if !cfg.grpo.rewards.is_empty() {
        bail!("key `grpo.rewards`: `rlhf rloo` reads its reward functions from `[[rloo.rewards]]`");
    }
    if r.rewards.is_empty() {
        bail!(
            "key `rloo.rewards`: RLOO needs at least one reward function, e.g.\n[[rloo.rewards]]\ntype = \"exact_answer\""
        );
    }
    let mut out = cfg.clone();
    let g = &mut out.grpo;
    g.num_generations = r.num_generations;
    g.max_completion_length = r.max_completion_length;
    g.beta = r.beta;
    g.epsilon = r.epsilon;
    g.epsilon_high = r.epsilon_high;
    g.num_iterations = 1;
    g.mask_truncated_completions = r.mask_truncated_completions;
    g.rewards = r
        .rewards
        .iter()
        .map(|c| match toml::Value::try_from(c)? {
            toml::Value::Table(t) => Ok(t),
            _ => bail!("a reward function is not a table"),
        })
        .collect::<Result<_>>()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn rloo_section_drives_the_grpo_pipeline() {
        let cfg = RunConfig::parse(
            "[rloo]\nnum_generations = 4\nbeta = 0.1\n[[rloo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\n",
            Path::new("rloo.toml"),
        )
        .unwrap();
        let g = as_grpo_run(&cfg).unwrap();
        assert_eq!(g.grpo.num_generations, 4);
        assert_eq!(g.grpo.rewards.len(), 1);
        assert_eq!(g.grpo.rewards[0]["type"].as_str(), Some("contains"));
        let none = RunConfig::parse("[rloo]\nbeta = 0.1\n", Path::new("r.toml")).unwrap();
        assert!(as_grpo_run(&none)
            .unwrap_err()
            .to_string()
            .contains("rloo.rewards"));
    }
}
