//! Command-line interface: the arguments, and which subcommand runs. Each subcommand is a file of
//! its own; they share one run set-up (`setup`) and build their trainers in one place
//! (`trainers`). `main.rs` turns the [`Outcome`] or the error into the exit code.

pub mod bench;
pub mod generate;
pub mod gpu_info;
pub mod grpo;
pub mod kto;
pub mod merge;
pub mod plan;
pub mod ppo;
pub mod preference;
pub mod ref_free;
pub mod reward_worker;
pub mod rloo;
pub mod setup;
pub mod sft;
pub mod start;
pub mod trainers;

pub use setup::{DeviceArg, Outcome};

use crate::plan::Algo;
use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand};
use rlhf_algorithms::grpo::Objective;
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
    /// Supervised fine-tuning on prompt/completion, messages or text rows (TRL's SFTTrainer).
    Sft(RunArgs),
    /// Direct preference optimisation.
    Dpo(RunArgs),
    /// Odds-ratio preference optimisation (reference-free, TRL's ORPOTrainer).
    Orpo(RunArgs),
    /// Contrastive preference optimisation; SimPO with `cpo.loss_type = "simpo"` (TRL's CPOTrainer).
    Cpo(RunArgs),
    /// Kahneman-Tversky optimisation on unpaired rows (prompt, completion, label).
    Kto(RunArgs),
    /// Group-relative policy optimisation with Rust reward functions.
    Grpo(RunArgs),
    /// REINFORCE leave-one-out with Rust reward functions (TRL's RLOOTrainer).
    Rloo(RunArgs),
    /// PPO with policy, value and reward roles on one base.
    Ppo(RunArgs),
    /// Reward-model training (reward adapter + score head).
    Rm(RunArgs),
    /// Predict peak GPU memory for a run without loading weights.
    Plan(plan::PlanArgs),
    /// Sample from the base model, optionally with a LoRA adapter.
    Generate(generate::GenerateArgs),
    /// Fold a LoRA adapter into its base and write a Hugging Face model folder.
    Merge(merge::MergeArgs),
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
        Command::Merge(a) => merge::run(&a),
        Command::Sft(a) => train(Train::Sft, &a),
        Command::Dpo(a) => train(Train::Dpo, &a),
        Command::Orpo(a) => train(Train::Orpo, &a),
        Command::Cpo(a) => train(Train::Cpo, &a),
        Command::Kto(a) => train(Train::Kto, &a),
        Command::Rm(a) => train(Train::Rm, &a),
        Command::Grpo(a) => train(Train::Grpo, &a),
        Command::Rloo(a) => train(Train::Rloo, &a),
        Command::Ppo(a) => train(Train::Ppo, &a),
        Command::Bench(a) => bench::run(&a),
        Command::RewardWorker(a) => reward_worker::run(&a),
        Command::Plan(a) => {
            let algo = a.algo.as_deref().map(Algo::from_str).transpose()?;
            plan::run(&a.config, algo, a.json)
        }
    }
}

/// The training subcommands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Train {
    Sft,
    Dpo,
    Orpo,
    Cpo,
    Kto,
    Rm,
    Grpo,
    Rloo,
    Ppo,
}

/// Runs a training command on the backend its config's `model.device` names.
fn train(command: Train, args: &RunArgs) -> Result<Outcome> {
    let flags = TrainFlags {
        resume: args.resume.clone(),
        force: args.force,
        overwrite: args.overwrite,
    };
    let run = TrainRun::read(&args.config, flags)?;
    run.on_backend(&Training { command, run: &run })
}

/// A training command ready to run, generic over the backend.
struct Training<'a> {
    command: Train,
    run: &'a TrainRun,
}

impl OnBackend for Training<'_> {
    type Output = Outcome;
    fn run<B: Backend>(&self, device: &B::Device) -> Result<Outcome> {
        let run = self.run;
        match self.command {
            Train::Sft => sft::run::<Autodiff<B>>(run, device),
            Train::Dpo => preference::run::<Autodiff<B>>(Algo::Dpo, run, device),
            Train::Rm => preference::run::<Autodiff<B>>(Algo::Rm, run, device),
            Train::Orpo => ref_free::run::<Autodiff<B>>(ref_free::Method::Orpo, run, device),
            Train::Cpo => ref_free::run::<Autodiff<B>>(ref_free::Method::Cpo, run, device),
            Train::Kto => kto::run::<Autodiff<B>>(run, device),
            Train::Grpo => grpo::run::<Autodiff<B>>(run, device, Objective::Grpo),
            Train::Rloo => rloo::run::<Autodiff<B>>(run, device),
            Train::Ppo => ppo::run::<Autodiff<B>>(run, device),
        }
    }
}
