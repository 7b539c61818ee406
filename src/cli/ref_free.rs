//! `rlhf orpo` and `rlhf cpo` (SimPO is `cpo.loss_type = "simpo"`): reference-free preference
//! optimisation of the policy adapter on preference pairs, as TRL's `ORPOTrainer` and
//! `CPOTrainer`. Same steps as `rlhf dpo`: plan (a DPO-shaped pair forward), load, tokenize, then
//! the shared run loop.

use super::setup::{self, Outcome, TrainRun};
use super::trainers::load_pairs;
use crate::plan::Algo;
use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::cpo::CpoTrainer;
use rlhf_algorithms::orpo::OrpoTrainer;

/// Which reference-free method a run trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Orpo,
    Cpo,
}

/// `rlhf orpo|cpo` on backend `B`. The plan is a DPO pair forward's: same sequences, and the
/// reference pass it counts on top is a margin these methods keep.
pub fn run<B: AutodiffBackend>(
    method: Method,
    run: &TrainRun,
    device: &B::Device,
) -> Result<Outcome> {
    let cfg = &run.cfg;
    let load = |p: &std::path::Path, codec: &setup::Codec<'_>| load_pairs(p, codec, cfg);
    match method {
        Method::Orpo => {
            setup::train_policy::<B, _>(run, Algo::Dpo, false, device, load, |pad_id| OrpoTrainer {
                cfg: cfg.orpo.clone(),
                pad_id,
            })
        }
        Method::Cpo => {
            setup::train_policy::<B, _>(run, Algo::Dpo, false, device, load, |pad_id| CpoTrainer {
                cfg: cfg.cpo.clone(),
                pad_id,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::RunConfig;
    use std::path::Path;

    #[test]
    fn example_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for name in [
            "orpo-smollm2.toml",
            "simpo-smollm2.toml",
            "kto-smollm2.toml",
            "sft-smollm2.toml",
            "rloo-smollm2-arithmetic.toml",
        ] {
            let cfg = RunConfig::load(&root.join("configs").join(name))
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert!(cfg.train.max_steps > 0, "{name}");
        }
    }
}
