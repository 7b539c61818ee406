//! `rlhf merge`: fold a LoRA adapter into its base and write a Hugging Face model folder that
//! transformers (and `rlhf` itself) loads without PEFT. An adapter written by `rlhf rm` (or a PPO
//! value adapter) carries a score head: the folder is then a `*ForSequenceClassification` model
//! whose `score.weight` is that head. See `model::export` for what is read from the base (its
//! stored weights, never the NF4 copy runs train against). `--gguf f16|q8_0` also writes the
//! causal LM as `model-<type>.gguf` in the folder for llama.cpp (`model::export_gguf`).

use super::setup::{on_backend, OnBackend, Outcome, NO_CUDA};
use crate::engine::HEAD_KEY;
use crate::gguf::Gguf;
use crate::model::export::{self, Dtype};
use crate::model::export_gguf::{self, GgufType};
use crate::model::gguf_source::GgufSource;
use crate::model::load::{SafetensorsSource, TensorSource};
use crate::model::lora::Adapter;
use crate::model::LlamaConfig;
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::backend::Backend;
use clap::ValueEnum;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base the adapter was trained on: a Hugging Face model folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT-layout LoRA adapter folder (with a score head for a reward or value adapter).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The folder to write; it must not exist or be empty.
    #[arg(long)]
    pub out: PathBuf,
    /// The stored dtype of the merged weights.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
    /// Also write the merged causal LM as one GGUF file for llama.cpp, `OUT/model-f16.gguf` or
    /// `OUT/model-q8_0.gguf` (2-D weights in that type, norms f32).
    #[arg(long, value_enum)]
    pub gguf: Option<GgufArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum GgufArg {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DtypeArg {
    Bf16,
    F32,
}

/// The tokenizer files an HF base's folder may hold, copied as they are.
const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
];

/// Runs `rlhf merge` (on the CPU: merging is a pass over the weights, not a forward pass).
pub fn run(args: &MergeArgs) -> Result<Outcome> {
    check_out(&args.out)?;
    on_backend(super::setup::DeviceArg::Cpu.device(), args, NO_CUDA)?;
    Ok(Outcome::Done)
}

impl OnBackend for MergeArgs {
    type Output = ();
    fn run<B: Backend>(&self, device: &B::Device) -> Result<()> {
        merge::<B>(self, device)
    }
}

/// `--out` must not exist, or be an empty folder: merging never overwrites a model.
fn check_out(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    ensure!(
        out.is_dir(),
        "--out {}: exists and is not a folder",
        out.display()
    );
    let mut entries =
        std::fs::read_dir(out).with_context(|| format!("--out {}: cannot read", out.display()))?;
    ensure!(
        entries.next().is_none(),
        "--out {}: the folder is not empty (merge writes a new folder and never overwrites one)",
        out.display()
    );
    Ok(())
}

/// Where the base's tensors and tokenizer files come from.
enum Base {
    Hf(PathBuf),
    Gguf(Gguf),
}

impl Base {
    fn source(&self) -> Result<Box<dyn TensorSource + '_>> {
        Ok(match self {
            Base::Hf(folder) => Box::new(SafetensorsSource::open(folder)?),
            Base::Gguf(g) => Box::new(GgufSource::new(g)),
        })
    }
}

fn merge<B: Backend>(args: &MergeArgs, device: &B::Device) -> Result<()> {
    let model = &args.model;
    ensure!(
        model.exists(),
        "--model {}: not found (expected a Hugging Face folder or a .gguf file)",
        model.display()
    );
    let (base, base_json) = if model.is_dir() {
        let path = model.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--model {}: cannot read", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--model {}: not valid JSON", path.display()))?;
        (Base::Hf(model.clone()), json)
    } else {
        let g = Gguf::open(model).with_context(|| format!("--model {}", model.display()))?;
        let json = g.model_config()?;
        (Base::Gguf(g), json)
    };
    let cfg = LlamaConfig::from_json(&base_json)
        .with_context(|| format!("--model {}: unsupported model", model.display()))?;
    let (adapter, head) = read_adapter::<B>(&args.adapter, &cfg, device)?;
    let dtype = match args.dtype {
        DtypeArg::Bf16 => Dtype::Bf16,
        DtypeArg::F32 => Dtype::F32,
    };
    let config = export::hf_config(&base_json, &cfg, dtype, head.is_some())
        .with_context(|| format!("--model {}", model.display()))?;
    let gguf = match args.gguf {
        None => None,
        Some(ty) => {
            // llama.cpp's llama architecture has no sequence-classification head: dropping the
            // head would hand out a model that is not the reward or value model trained.
            ensure!(
                head.is_none(),
                "--gguf: {} is a reward or value adapter (a score head), which llama.cpp's llama architecture cannot hold; merge it without --gguf",
                args.adapter.display()
            );
            export_gguf::check_gguf_arch(&cfg)?;
            let tokenizer = match &base {
                Base::Hf(dir) => crate::tokenizer::hf_tokenizer_gguf_metadata(dir, cfg.vocab_size)
                    .with_context(|| format!("--gguf: --model {}", model.display()))?,
                Base::Gguf(g) => export_gguf::gguf_tokenizer_metadata(g),
            };
            let ty = match ty {
                GgufArg::F16 => GgufType::F16,
                GgufArg::Q8_0 => GgufType::Q8_0,
            };
            Some((ty, tokenizer))
        }
    };

    let gguf_file = gguf
        .as_ref()
        .map(|(ty, _)| format!("model-{}.gguf", ty.name()));

    // Everything is written to a sibling folder that is renamed to `--out` at the end, so a
    // failed merge leaves no half-written model behind.
    let out = &args.out;
    let name = out
        .file_name()
        .with_context(|| format!("--out {}: not a folder name", out.display()))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("--out {}: cannot create", parent.display()))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir(&staging)
        .with_context(|| format!("--out {}: cannot create", staging.display()))?;
    let written = write_folder(
        &staging,
        &base,
        &cfg,
        &config,
        &adapter,
        head.as_deref(),
        dtype,
    )
    .and_then(|()| match gguf {
        None => Ok(()),
        Some((ty, tokenizer)) => {
            let file = staging.join(gguf_file.as_deref().expect("set with gguf"));
            let name = name.to_string_lossy();
            let mut src = base.source()?;
            export_gguf::write_merged_gguf(
                &file,
                &cfg,
                &mut *src,
                Some(&adapter),
                tokenizer,
                ty,
                &name,
            )
            .with_context(|| format!("--gguf {}", ty.name()))
        }
    })
    .and_then(|()| {
        std::fs::rename(&staging, out).with_context(|| format!("--out {}", out.display()))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let arch = config["architectures"][0].as_str().unwrap_or("");
    println!(
        "merged {} into {}: wrote {} ({arch}, {}{})",
        args.adapter.display(),
        model.display(),
        out.display(),
        dtype.torch_name(),
        gguf_file.map_or(String::new(), |f| format!(", {f}"))
    );
    Ok(())
}

/// The adapter and its score head, if any, checked against the base.
fn read_adapter<B: Backend>(
    dir: &Path,
    cfg: &LlamaConfig,
    device: &B::Device,
) -> Result<(Adapter<B>, Option<Vec<f32>>)> {
    ensure!(
        dir.is_dir(),
        "--adapter {}: adapter folder not found",
        dir.display()
    );
    let ctx = || format!("--adapter {}", dir.display());
    let config: serde_json::Value = std::fs::read_to_string(dir.join("adapter_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for flag in ["use_rslora", "use_dora"] {
        if config.get(flag).and_then(|v| v.as_bool()) == Some(true) {
            bail!(
                "--adapter {}: `{flag}` adapters are not supported (only plain LoRA merges as W + alpha/r BA)",
                dir.display()
            );
        }
    }
    // transformers' score layer is a bias-free linear, so a head with a bias has no place in a
    // `*ForSequenceClassification` folder: refuse it rather than drop it (rlhf's heads have none).
    if let Ok(bytes) = std::fs::read(dir.join("adapter_model.safetensors")) {
        if let Ok(st) = safetensors::SafeTensors::deserialize(&bytes) {
            if st.names().iter().any(|n| n.ends_with("score.bias")) {
                bail!(
                    "--adapter {}: the score head has a bias, which the score layer of a transformers sequence classifier cannot hold",
                    dir.display()
                );
            }
        }
    }
    let (adapter, mut extra) = Adapter::<B>::load_peft(dir, "merge", cfg, device)
        .with_context(|| format!("{}: cannot load adapter", ctx()))?;
    let head = match extra.remove(HEAD_KEY) {
        None => None,
        Some(h) => {
            ensure!(
                h.dims() == [1, cfg.hidden_size],
                "{}: `{HEAD_KEY}` has shape {:?}, expected [1, {}]",
                ctx(),
                h.dims(),
                cfg.hidden_size
            );
            let v = h
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{}: `{HEAD_KEY}`: {e:?}", ctx()))?;
            Some(v)
        }
    };
    if let Some(name) = extra.keys().next() {
        bail!(
            "{}: tensor `{name}` is neither a LoRA weight nor the score head `{HEAD_KEY}`",
            ctx()
        );
    }
    Ok((adapter, head))
}

/// Writes the weights, `config.json` and the tokenizer files into `dir`.
fn write_folder<B: Backend>(
    dir: &Path,
    base: &Base,
    cfg: &LlamaConfig,
    config: &serde_json::Value,
    adapter: &Adapter<B>,
    head: Option<&[f32]>,
    dtype: Dtype,
) -> Result<()> {
    let weights = dir.join("model.safetensors");
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("{}: cannot write", path.display()))
    };
    match base {
        Base::Hf(folder) => {
            let mut src = SafetensorsSource::open(folder)?;
            export::write_merged_safetensors(&weights, cfg, &mut src, Some(adapter), head, dtype)
                .with_context(|| format!("--model {}", folder.display()))?;
            for name in TOKENIZER_FILES {
                let from = folder.join(name);
                if from.exists() {
                    std::fs::copy(&from, dir.join(name))
                        .with_context(|| format!("{}: cannot copy", from.display()))?;
                }
            }
        }
        Base::Gguf(g) => {
            let mut src = GgufSource::new(g);
            export::write_merged_safetensors(&weights, cfg, &mut src, Some(adapter), head, dtype)
                .with_context(|| format!("--model {}", g.path().display()))?;
            for (name, json) in export::gguf_tokenizer_files(g)? {
                write_json(name, &json)?;
            }
        }
    }
    write_json("config.json", config)
}
