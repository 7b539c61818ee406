//! `rlhf generate`: sample from the base model, optionally with a LoRA adapter.

use super::setup::{load_model, on_backend, DeviceArg, OnBackend, Outcome, NO_CUDA};
use crate::generate::{generate, SamplingParams};
use crate::model::lora::Adapter;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use rand::SeedableRng;
use std::path::PathBuf;

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

/// Runs `rlhf generate` on the device `--device` names.
pub fn run(args: &GenerateArgs) -> Result<Outcome> {
    on_backend(args.device.device(), args, NO_CUDA)?;
    Ok(Outcome::Done)
}

impl OnBackend for GenerateArgs {
    type Output = ();
    fn run<B: Backend>(&self, device: &B::Device) -> Result<()> {
        println!("{}", answer::<B>(self, device)?);
        Ok(())
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

/// What `rlhf generate` prints, computed on backend `B` (any backend: the tests run it on each
/// CPU backend).
pub fn answer<B: Backend>(args: &GenerateArgs, device: &B::Device) -> Result<String> {
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
    loaded.tok.decode(&toks, true)
}
