//! Command-line interface: the arguments, and which subcommand runs. Each subcommand is a file of
//! its own; they share one run set-up (`setup`) and build their trainers in one place
//! (`trainers`). `main.rs` turns the [`Outcome`] or the error into the exit code.

pub mod bench;
pub mod generate;
pub mod grpo;
pub mod plan;
pub mod ppo;
pub mod preference;
pub mod reward_worker;
pub mod setup;
pub mod trainers;

pub use setup::{DeviceArg, Outcome};

use crate::plan::Algo;
use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand};
use setup::{OnBackend, TrainFlags, TrainRun};
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Parser, Debug)]
#[command(
    name = "rlhf",
    version,
    about = "RLHF post-training on one 4-bit base with LoRA adapters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Direct preference optimisation.
    Dpo(RunArgs),
    /// Group-relative policy optimisation with Rust reward functions.
    Grpo(RunArgs),
    /// PPO with policy, value and reward roles on one base.
    Ppo(RunArgs),
    /// Reward-model training (reward adapter + score head).
    Rm(RunArgs),
    /// Predict peak GPU memory for a run without loading weights.
    Plan(plan::PlanArgs),
    /// Sample from the base model, optionally with a LoRA adapter.
    Generate(generate::GenerateArgs),
    /// Time DPO or GRPO steps on a make_model.py folder (the peer benchmark against TRL).
    Bench(bench::BenchArgs),
    /// The worker process a reward plugin runs in (started by `rlhf grpo`).
    #[command(hide = true)]
    RewardWorker(reward_worker::RewardWorkerArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The run's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from a checkpoint folder, or from the latest `checkpoint-N` in train.output_dir.
    #[arg(long, num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Start even when the VRAM plan exceeds plan.budget_gib.
    #[arg(long)]
    pub force: bool,
    /// Start afresh in a train.output_dir that holds an earlier run, removing its checkpoints,
    /// adapters and logs.
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Generate(a) => generate::run(&a),
        Command::Dpo(a) => train(Algo::Dpo, &a),
        Command::Rm(a) => train(Algo::Rm, &a),
        Command::Grpo(a) => train(Algo::Grpo, &a),
        Command::Ppo(a) => train(Algo::Ppo, &a),
        Command::Bench(a) => bench::run(&a),
        Command::RewardWorker(a) => reward_worker::run(&a),
        Command::Plan(a) => {
            let algo = a.algo.as_deref().map(Algo::from_str).transpose()?;
            plan::run(&a.config, algo, a.json)
        }
    }
}

/// Runs a training command on the backend its config's `model.device` names.
fn train(algo: Algo, args: &RunArgs) -> Result<Outcome> {
    let flags = TrainFlags {
        resume: args.resume.clone(),
        force: args.force,
        overwrite: args.overwrite,
    };
    let run = TrainRun::read(&args.config, flags)?;
    run.on_backend(&Training { algo, run: &run })
}

/// A training command ready to run, generic over the backend.
struct Training<'a> {
    algo: Algo,
    run: &'a TrainRun,
}

impl OnBackend for Training<'_> {
    type Output = Outcome;
    fn run<B: Backend>(&self, device: &B::Device) -> Result<Outcome> {
        let run = self.run;
        match self.algo {
            Algo::Dpo | Algo::Rm => preference::run::<Autodiff<B>>(self.algo, run, device),
            Algo::Grpo => grpo::run::<Autodiff<B>>(run, device),
            Algo::Ppo => ppo::run::<Autodiff<B>>(run, device),
            Algo::Generate => bail!("`generate` is not a training command"),
        }
    }
}
