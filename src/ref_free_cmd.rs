//! `rlhf orpo` and `rlhf cpo` (SimPO is `cpo.loss_type = "simpo"`): reference-free preference
//! optimisation of the policy adapter on preference pairs, as TRL's `ORPOTrainer` and
//! `CPOTrainer`. Same steps as `rlhf dpo`: plan (a DPO-shaped pair forward), load, tokenize, then
//! the shared run loop.

use crate::cli::Loaded;
use crate::commands::{
    check_plan, load_pairs, print_metrics, run_and_eval, Codec, TrainFlags, TrainJob,
};
use crate::config::{Quantize, RunConfig};
use crate::engine::RlhfModel;
use crate::plan::Algo;
use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::cpo::CpoTrainer;
use rlhf_algorithms::orpo::OrpoTrainer;
use rlhf_algorithms::trainer::Role;
use std::path::Path;

/// Which reference-free method a run trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Orpo,
    Cpo,
}

impl TrainJob for Method {
    fn run<B: AutodiffBackend>(
        &self,
        config: &Path,
        flags: &TrainFlags,
        device: &B::Device,
    ) -> Result<i32> {
        run::<B>(*self, config, flags, device)
    }
}

/// `rlhf orpo|cpo` on backend `B`.
pub fn run<B: AutodiffBackend>(
    method: Method,
    config: &Path,
    flags: &TrainFlags,
    device: &B::Device,
) -> Result<i32> {
    let config_text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read config file", config.display()))?;
    let cfg = RunConfig::parse(&config_text, config)?;
    // The plan of a DPO pair forward: same sequences, and the reference pass it counts on top
    // is a margin these methods keep.
    if let Some(code) = check_plan(&cfg, Algo::Dpo, flags.force)? {
        return Ok(code);
    }
    let loaded: Loaded<B> =
        crate::cli::load_model(&cfg.model.path, cfg.model.quantize == Quantize::Nf4, device)?;
    let codec = Codec::of(&loaded, &cfg);
    let pad_id = loaded.pad_id();
    let train_set = load_pairs(&cfg.data.train, &codec, &cfg)?;
    let eval_set = match &cfg.data.eval {
        Some(p) => Some(load_pairs(p, &codec, &cfg)?),
        None => None,
    };
    let mut model = RlhfModel::for_run(loaded.model, &loaded.tok, &cfg);
    model.add_new_adapter(Role::Policy, &cfg.lora, cfg.train.seed)?;
    let opts = flags.run_options(&cfg, &loaded.name, config_text)?;
    let eval = eval_set.as_deref();
    let (last, eval) = match method {
        Method::Orpo => {
            let mut t = OrpoTrainer {
                cfg: cfg.orpo.clone(),
                pad_id,
            };
            run_and_eval(&cfg, &mut model, &mut t, &train_set, eval, &opts)?
        }
        Method::Cpo => {
            let mut t = CpoTrainer {
                cfg: cfg.cpo.clone(),
                pad_id,
            };
            run_and_eval(&cfg, &mut model, &mut t, &train_set, eval, &opts)?
        }
    };
    print_metrics("train", &last);
    if let Some(m) = eval {
        print_metrics("eval", &m);
    }
    eprintln!(
        "adapter written to {}",
        cfg.train.output_dir.join(Role::Policy.name()).display()
    );
    Ok(0)
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
            "rloo-smollm2-arithmetic.toml",
        ] {
            let cfg = RunConfig::load(&root.join("configs").join(name))
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert!(cfg.train.max_steps > 0, "{name}");
        }
    }
}
