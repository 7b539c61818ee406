//! Command-line interface. `main.rs` only maps errors to exit codes; everything else is here.

use crate::commands::PreferenceJob;
use crate::generate::{generate, SamplingParams};
use crate::lora::Adapter;
use crate::model::{Llama, LoadOptions};
use crate::plan::Algo;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand, ValueEnum};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The CPU backend used when `--device cpu` (see README: ndarray measured faster than candle).
#[cfg(feature = "ndarray")]
pub type CpuBackend = burn::backend::NdArray<f32>;
#[cfg(all(feature = "candle", not(feature = "ndarray")))]
#[allow(deprecated)] // burn-candle is deprecated upstream; kept as the optional CPU backend the design names
pub type CpuBackend = burn::backend::Candle<f32, i64>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;

/// Exit code for "the run does not fit the VRAM budget".
pub const EXIT_DOES_NOT_FIT: i32 = 3;

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
    Plan(PlanArgs),
    /// Sample from the base model, optionally with a LoRA adapter.
    Generate(GenerateArgs),
    /// Time DPO or GRPO steps on a make_model.py folder (the peer benchmark against TRL).
    Bench(crate::bench::BenchArgs),
    /// The worker process a reward plugin runs in (started by `rlhf grpo`).
    #[command(hide = true)]
    RewardWorker(crate::reward_worker::RewardWorkerArgs),
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

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The run's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// dpo, rm, grpo, ppo or generate (default: guessed from the file name).
    #[arg(long)]
    pub algo: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT-layout LoRA adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Stop tokens are not sampled before this many new tokens.
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Keep the base unquantized (f32) instead of NF4.
    #[arg(long)]
    pub no_quantize: bool,
}

/// Parses arguments and runs the command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Generate(args) => {
            match args.device {
                DeviceArg::Cpu => run_generate::<CpuBackend>(&args, &Default::default())?,
                DeviceArg::Cuda => {
                    #[cfg(feature = "cuda")]
                    run_generate::<CudaBackend>(&args, &Default::default())?;
                    #[cfg(not(feature = "cuda"))]
                    bail!("this binary was built without CUDA: rebuild with `--features cuda`");
                }
            }
            Ok(0)
        }
        Command::Dpo(a) => {
            crate::commands::run_on_device(&PreferenceJob(Algo::Dpo), &a.config, &flags(&a))
        }
        Command::Rm(a) => {
            crate::commands::run_on_device(&PreferenceJob(Algo::Rm), &a.config, &flags(&a))
        }
        Command::Grpo(a) => crate::grpo_cmd::run_on_device(&a.config, &flags(&a)),
        Command::Ppo(a) => crate::ppo_cmd::run_on_device(&a.config, &flags(&a)),
        Command::Bench(a) => crate::bench::run(&a),
        Command::RewardWorker(a) => crate::reward_worker::run(&a),
        Command::Plan(a) => {
            let algo = a.algo.as_deref().map(Algo::from_str).transpose()?;
            crate::commands::run_plan(&a.config, algo, a.json)
        }
    }
}

fn flags(a: &RunArgs) -> crate::commands::TrainFlags {
    crate::commands::TrainFlags {
        resume: a.resume.clone(),
        force: a.force,
        overwrite: a.overwrite,
    }
}

/// A loaded base model and its tokenizer.
pub struct Loaded<B: Backend> {
    pub model: Llama<B>,
    pub tok: crate::tokenizer::Tok,
    pub chat: Option<crate::tokenizer::ChatTemplate>,
    pub name: String,
}

impl<B: Backend> Loaded<B> {
    /// Padding id: the tokenizer's pad token, else eos, else 0 (padding is masked anyway).
    pub fn pad_id(&self) -> u32 {
        self.tok.pad_id().or(self.tok.eos_id()).unwrap_or(0)
    }

    /// Tokens that end a sequence: the model config's eos ids, the tokenizer's, then `extra`,
    /// each once.
    pub fn stop_ids(&self, extra: &[u32]) -> Vec<u32> {
        let mut stop = Vec::new();
        let all = self.model.cfg.eos_token_ids.iter().copied();
        for id in all.chain(self.tok.eos_ids()).chain(extra.iter().copied()) {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
        stop
    }
}

/// Loads a base model from a HF folder or a GGUF file, with its tokenizer and chat template.
pub fn load_model<B: Backend>(
    path: &Path,
    quantize: bool,
    device: &B::Device,
) -> Result<Loaded<B>> {
    let opts = LoadOptions { quantize };
    if !path.exists() {
        bail!(
            "{}: model not found (expected a Hugging Face folder or a .gguf file)",
            path.display()
        );
    }
    let name = path.display().to_string();
    if path.is_dir() {
        let model = Llama::from_hf_dir(path, opts, device)?;
        let (tok, chat) = load_tokenizer(path)?;
        Ok(Loaded {
            model,
            tok,
            chat,
            name,
        })
    } else {
        crate::model::gguf_source::load_gguf(path, opts, device).map(|(model, tok, chat)| Loaded {
            model,
            tok,
            chat,
            name,
        })
    }
}

/// The checks `[generation]` gets in a run config, for the flags of `rlhf generate`.
fn check_generate_args(args: &GenerateArgs) -> Result<()> {
    let t = args.temperature;
    if !(t.is_finite() && t >= 0.0) {
        bail!("--temperature: expected a number >= 0 (0 = greedy), got {t}");
    }
    let p = args.top_p;
    if !(p.is_finite() && p > 0.0 && p <= 1.0) {
        bail!("--top-p: expected a number in (0, 1], got {p}");
    }
    if args.min_new_tokens > args.max_new_tokens {
        bail!(
            "--min-new-tokens: {} exceeds --max-new-tokens {}",
            args.min_new_tokens,
            args.max_new_tokens
        );
    }
    Ok(())
}

/// The prompt plus the tokens to generate must fit the model's context.
fn check_context(prompt_tokens: usize, args: &GenerateArgs, context: usize) -> Result<()> {
    let total = prompt_tokens.saturating_add(args.max_new_tokens);
    if total > context {
        bail!(
            "--prompt: {prompt_tokens} tokens + --max-new-tokens {} = {total} exceed the model's context length of {context} tokens",
            args.max_new_tokens
        );
    }
    Ok(())
}

/// The tokenizer and chat template of a model folder or GGUF file without its weights, so that
/// data is read and tokenized before minutes of loading.
pub fn load_tokenizer(
    path: &Path,
) -> Result<(
    crate::tokenizer::Tok,
    Option<crate::tokenizer::ChatTemplate>,
)> {
    use crate::tokenizer::{ChatTemplate, Tok};
    if path.is_dir() {
        let tok = Tok::from_file(path.join("tokenizer.json"))?;
        return Ok((tok, ChatTemplate::from_dir(path)?));
    }
    let g = crate::gguf::Gguf::open(path)?;
    let chat = match g.get("tokenizer.chat_template") {
        Some(_) => Some(ChatTemplate::from_gguf(&g)?),
        None => None,
    };
    Ok((Tok::from_gguf(&g)?, chat))
}

fn run_generate<B: Backend>(args: &GenerateArgs, device: &B::Device) -> Result<()> {
    check_generate_args(args)?;
    let loaded = load_model::<B>(&args.model, !args.no_quantize, device)?;
    let adapter = match &args.adapter {
        Some(dir) => Some(
            Adapter::<B>::load_peft(dir, "policy", &loaded.model.cfg, device)
                .with_context(|| format!("{}: cannot load adapter", dir.display()))?
                .0,
        ),
        None => None,
    };
    let text = if args.chat {
        let chat = loaded
            .chat
            .as_ref()
            .context("--chat: the model has no chat template")?;
        chat.render_user(&args.prompt, true)?
    } else {
        args.prompt.clone()
    };
    let ids = loaded.tok.encode(&text, !args.chat)?;
    check_context(ids.len(), args, loaded.model.cfg.max_position_embeddings)?;
    let stop = loaded.stop_ids(&[]);
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        stop_ids: stop.clone(),
        pad_id: loaded.pad_id(),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let out = generate(&loaded.model, adapter.as_ref(), &[ids], &params, &mut rng)?;
    let toks: Vec<u32> = out[0]
        .tokens
        .iter()
        .copied()
        .filter(|t| !stop.contains(t))
        .collect();
    println!("{}", loaded.tok.decode(&toks, true)?);
    Ok(())
}
