//! The one run set-up the training commands (`sft`, `dpo`, `rm`, `orpo`, `cpo`, `kto`, `grpo`, `rloo`,
//! `ppo`) and `bench` share, in
//! its order: read the config, pick the backend, check the VRAM plan before any weight is loaded,
//! lock the output folder, read and tokenize the data with the model's tokenizer, load the base,
//! attach the trained role's adapter; after the run loop, evaluate and report the metrics.

use crate::config::{CacheBound, Device, Dtype, Quantize, ReferenceModel, RunConfig};
use crate::data::{Message, TextCodec};
use crate::engine::RlhfModel;
use crate::model::{Llama, LlamaConfig, LoadOptions};
use crate::plan::{self, Algo};
use crate::rundir::RunDir;
use crate::train::{evaluate, train, RunOptions};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::ValueEnum;
use rlhf_algorithms::trainer::{Metrics, Role, Trainer};
use std::path::{Path, PathBuf};

pub use crate::model::ops::CpuBackend;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;

/// How a command ended when it did not fail; `main` maps it to the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command did what it was asked.
    Done,
    /// The run does not fit `plan.budget_gib` (the plan was printed; nothing was loaded).
    DoesNotFit,
    /// The command failed and has reported why where its caller reads it (a reward worker's
    /// handshake on stdout), so no `error:` line follows.
    Reported,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> Device {
        match self {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        }
    }
}

/// What `--device cuda` answers in a binary built without the `cuda` feature.
pub const NO_CUDA: &str = "this binary was built without CUDA: rebuild with `--features cuda`";

/// A command generic over the burn backend it runs on.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(&self, device: &B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the backend of `device`; `no_cuda` is the error when CUDA is asked of a binary
/// built without it.
pub fn on_backend<J: OnBackend>(device: Device, job: &J, no_cuda: &str) -> Result<J::Output> {
    #[cfg(feature = "cuda")]
    let _ = no_cuda;
    match device {
        Device::Cpu => job.run::<CpuBackend>(&Default::default()),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            return job.run::<CudaBackend>(&Default::default());
            #[cfg(not(feature = "cuda"))]
            bail!("{no_cuda}")
        }
    }
}

/// Flags shared by the training commands.
#[derive(Debug, Clone, Default)]
pub struct TrainFlags {
    /// `Some(None)`: resume from the latest checkpoint in `train.output_dir`.
    pub resume: Option<Option<PathBuf>>,
    /// Start even when the plan says the run does not fit the budget.
    pub force: bool,
    /// Replace an earlier run's checkpoints, adapters and logs in `train.output_dir`.
    pub overwrite: bool,
}

impl TrainFlags {
    /// Locks `train.output_dir` for this run (after the data is read, so bad data leaves no
    /// folder behind; before any weight is loaded) and finds the checkpoint to resume from (see
    /// [`RunDir::open`]).
    pub fn open_run_dir(&self, cfg: &RunConfig) -> Result<RunDir> {
        RunDir::open(&cfg.train.output_dir, self.resume.as_ref(), self.overwrite)
    }

    /// What the run loop needs: the checkpoint `run_dir` resumes from, the base's name, the
    /// config text.
    pub fn run_options(
        &self,
        run_dir: &RunDir,
        base_name: &str,
        config_text: String,
    ) -> RunOptions {
        RunOptions {
            resume: run_dir.resume.clone(),
            base_name: base_name.to_string(),
            config_text,
        }
    }
}

/// The data files exist (checked before anything is loaded or written).
pub fn check_data_files(cfg: &RunConfig) -> Result<()> {
    let data = [
        ("data.train", Some(&cfg.data.train)),
        ("data.eval", cfg.data.eval.as_ref()),
    ];
    for (key, path) in data {
        match path {
            Some(p) if p.as_os_str().is_empty() => {
                bail!("key `{key}`: missing: set it to a JSON or JSONL file")
            }
            Some(p) if !p.is_file() => bail!("key `{key}`: {}: file not found", p.display()),
            _ => {}
        }
    }
    Ok(())
}

/// What a training command's run loop starts from.
pub struct Prepared<B: Backend, T> {
    /// The loaded base with its tokenizer.
    pub loaded: Loaded<B>,
    /// `data.train`, tokenized.
    pub train_set: Vec<T>,
    /// `data.eval`, tokenized, when set.
    pub eval_set: Option<Vec<T>>,
    /// `train.output_dir`, locked until this is dropped at the end of the run.
    pub run_dir: RunDir,
}

/// A training command's run: its config file, read once (the text goes into every checkpoint),
/// and its flags.
pub struct TrainRun {
    pub path: PathBuf,
    pub text: String,
    pub cfg: RunConfig,
    pub flags: TrainFlags,
}

impl TrainRun {
    pub fn read(path: &Path, flags: TrainFlags) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config file", path.display()))?;
        let mut cfg = RunConfig::parse(&text, path)?;
        let note = super::start::apply_start_adapter(&mut cfg, &text)
            .with_context(|| path.display().to_string())?;
        if let Some(note) = note {
            eprintln!("{note}");
        }
        Ok(Self {
            path: path.to_path_buf(),
            text,
            cfg,
            flags,
        })
    }

    /// Runs `job` on the backend that `model.device` names.
    pub fn on_backend<J: OnBackend>(&self, job: &J) -> Result<J::Output> {
        let no_cuda = format!(
            "{}: model.device = \"cuda\" but this binary was built without CUDA (rebuild with --features cuda)",
            self.path.display()
        );
        on_backend(self.cfg.model.device, job, &no_cuda)
    }

    /// `r`, its error prefixed with the config file's path.
    pub fn in_file<T>(&self, r: Result<T>) -> Result<T> {
        r.with_context(|| self.path.display().to_string())
    }

    /// The set-up up to the run loop, cheapest failure first: the plan (`None` when the run
    /// does not fit and `--force` is off; nothing was loaded), the data files read and tokenized
    /// by `load` with the model's tokenizer (seconds), the output folder locked (so bad data
    /// leaves no folder behind), then the weights (minutes for a large model).
    pub fn prepare<B: Backend, T>(
        &self,
        algo: Algo,
        device: &B::Device,
        load: impl Fn(&Path, &Codec) -> Result<Vec<T>>,
    ) -> Result<Option<Prepared<B, T>>> {
        let cfg = &self.cfg;
        if !check_plan(cfg, algo, self.flags.force)? {
            return Ok(None);
        }
        check_data_files(cfg)?;
        let (tok, chat) = load_tokenizer(&cfg.model.path)?;
        let codec = Codec::new(&tok, chat.as_ref(), cfg);
        let (train_set, eval_set) = data_sets(cfg, |p| load(p, &codec))?;
        let run_dir = self.flags.open_run_dir(cfg)?;
        let loaded = load_model(&cfg.model.path, cfg.model.quantize == Quantize::Nf4, device)?;
        Ok(Some(Prepared {
            loaded,
            train_set,
            eval_set,
            run_dir,
        }))
    }

    /// What the run loop needs: the checkpoint to resume from, the base's name, the config text.
    pub fn run_options(&self, run_dir: &RunDir, base_name: &str) -> RunOptions {
        self.flags
            .run_options(run_dir, base_name, self.text.clone())
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
    let loaded = if path.is_dir() {
        let model = Llama::from_hf_dir(path, opts, device)?;
        let (tok, chat) = load_tokenizer(path)?;
        Loaded {
            model,
            tok,
            chat,
            name,
        }
    } else {
        let (model, tok, chat) = crate::model::gguf_source::load_gguf(path, opts, device)?;
        Loaded {
            model,
            tok,
            chat,
            name,
        }
    };
    // The persistent weights alone: the reading the planner's load terms are checked against.
    crate::devmem::note::<B>(device, "base loaded");
    // The load's staging buffers are not needed again: host memory back to the system.
    crate::alloc::trim();
    Ok(loaded)
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

/// The tokenizer + chat template of a model, as data preparation sees them.
pub struct Codec<'a> {
    pub tok: &'a crate::tokenizer::Tok,
    pub chat: Option<&'a crate::tokenizer::ChatTemplate>,
}

impl<'a> Codec<'a> {
    /// `tok` with `chat` unless `data.chat_template` is off.
    pub fn new(
        tok: &'a crate::tokenizer::Tok,
        chat: Option<&'a crate::tokenizer::ChatTemplate>,
        cfg: &RunConfig,
    ) -> Self {
        Codec {
            tok,
            chat: chat.filter(|_| cfg.data.chat_template),
        }
    }
}

impl TextCodec for Codec<'_> {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tok.encode(text, add_special_tokens)
    }

    fn eos_id(&self) -> Option<u32> {
        self.tok.eos_id()
    }

    fn bos_id(&self) -> Option<u32> {
        self.tok.bos_id()
    }

    fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Option<Result<String>> {
        let chat = self.chat?;
        Some(chat.render(&chat_messages(messages), add_generation_prompt))
    }
}

/// A dataset row's messages as the chat template takes them.
pub fn chat_messages(messages: &[Message]) -> Vec<crate::tokenizer::ChatMessage> {
    messages
        .iter()
        .map(|m| crate::tokenizer::ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect()
}

/// The model's architecture without loading weights: a HF folder, a config `.json`, or a GGUF.
pub fn model_config(path: &Path) -> Result<LlamaConfig> {
    if path.as_os_str().is_empty() {
        bail!("key `model.path`: missing: set it to a Hugging Face model folder or a .gguf file");
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        let g = crate::gguf::Gguf::open(path)?;
        LlamaConfig::from_json(&g.model_config()?)
            .with_context(|| format!("{}: unsupported model", path.display()))
    } else {
        plan::read_model_config(path)
    }
}

/// Runs the planner for `algo` and prints the summary line; `false` (with the table printed)
/// when the run does not fit and `force` is off.
pub fn check_plan(cfg: &RunConfig, algo: Algo, force: bool) -> Result<bool> {
    let mcfg = model_config(&cfg.model.path)?;
    // The engine computes in f32 whatever `model.dtype` says: check the plan of what will run.
    let mut run = cfg.clone();
    if run.model.dtype != Dtype::F32 {
        eprintln!(
            "note: model.dtype = {:?} is not implemented yet; the run computes in f32, so its f32 plan is checked",
            run.model.dtype
        );
        run.model.dtype = Dtype::F32;
    }
    let p = plan::plan(&run, &mcfg, algo)?;
    eprintln!("{}", plan::summary_line(&p));
    bound_by_plan(&p, cfg.plan.cache);
    crate::oom::enter("load");
    if !p.fits {
        if force {
            eprintln!("warning: --force: starting although the plan exceeds the budget; expect out-of-memory");
        } else {
            eprintln!("{}", plan::render_table(&p));
            eprintln!("error: the run does not fit plan.budget_gib; apply a suggestion above or pass --force");
            return Ok(false);
        }
    }
    Ok(true)
}

/// The card the plan promises, held to: the CUDA allocator may hold the budget without the
/// CUDA context (`plan.cache = "budget"`: freed pages stay cached, no give-back within a step
/// that fits) or the plan's peak without it (`"plan"`: the card shows what the plan says, pages
/// are given back and allocated anew); and the out-of-memory message knows what was promised.
fn bound_by_plan(p: &plan::Plan, cache: CacheBound) {
    let context = p.bytes_of(plan::T_CONTEXT, p.peak_phase);
    if context > 0 {
        let held = match cache {
            CacheBound::Budget => p.budget_bytes,
            CacheBound::Plan => p.peak_bytes.min(p.budget_bytes),
        };
        crate::devmem::bound_allocator(held.saturating_sub(context));
    }
    crate::oom::set_planned(p.tensor_peak_bytes(), p.peak_bytes, p.budget_bytes);
}

/// The plan check, then the base: `None` when the run does not fit (nothing was loaded). For
/// `bench`, whose data and scratch output folder are its own; training commands take
/// [`TrainRun::prepare`].
pub fn plan_and_load<B: Backend>(
    cfg: &RunConfig,
    algo: Algo,
    force: bool,
    device: &B::Device,
) -> Result<Option<Loaded<B>>> {
    if !check_plan(cfg, algo, force)? {
        return Ok(None);
    }
    let quantize = cfg.model.quantize == Quantize::Nf4;
    load_model(&cfg.model.path, quantize, device).map(Some)
}

/// `data.train` and, when set, `data.eval`, each read by `load`.
pub fn data_sets<T>(
    cfg: &RunConfig,
    load: impl Fn(&Path) -> Result<Vec<T>>,
) -> Result<(Vec<T>, Option<Vec<T>>)> {
    let train = load(&cfg.data.train)?;
    let eval = cfg.data.eval.as_deref().map(&load).transpose()?;
    Ok((train, eval))
}

/// The run's model: the loaded base (its tokenizer kept for decoding rollouts) with the adapter
/// of the trained `role`: read from `model.adapter` when set, else new and seeded by
/// `train.seed`. With `reference` (the algorithm scores against a reference) and
/// `model.reference` resolved to `initial`, a frozen copy of the starting adapter becomes the
/// reference role; a resumed run rebuilds it the same way, from the same `model.adapter`.
pub fn model_for_run<B: Backend>(
    base: Llama<B>,
    tok: &crate::tokenizer::Tok,
    cfg: &RunConfig,
    role: Role,
    reference: bool,
) -> Result<RlhfModel<B>> {
    let mut model = RlhfModel::for_run(base, tok, cfg);
    match &cfg.model.adapter {
        Some(dir) => {
            model
                .add_adapter_from(role, dir, cfg.lora.dropout)
                .with_context(|| format!("key `model.adapter` ({})", dir.display()))?;
            if reference && cfg.model.reference() == ReferenceModel::Initial {
                model.freeze_reference_from(role)?;
            }
        }
        None => model.add_new_adapter(role, &cfg.lora, cfg.train.seed)?,
    }
    Ok(model)
}

/// Evaluates on `set` and writes the metrics, prefixed `eval_`, to `eval_metrics.json` in
/// `train.output_dir`.
pub fn evaluate_and_write<B: AutodiffBackend, T: Trainer<B>>(
    cfg: &RunConfig,
    model: &mut RlhfModel<B>,
    trainer: &mut T,
    set: &[T::Example],
) -> Result<Metrics> {
    let m = evaluate(cfg, model, trainer, set).map_err(|e| e.context("evaluation on data.eval"))?;
    let line: serde_json::Map<String, serde_json::Value> = m
        .iter()
        .map(|(k, v)| (format!("eval_{k}"), serde_json::json!(v)))
        .collect();
    crate::util::write_atomic(
        &cfg.train.output_dir.join("eval_metrics.json"),
        serde_json::to_string_pretty(&line)?.as_bytes(),
    )?;
    Ok(m)
}

/// Prints `what: key=value ...` on stdout.
pub fn print_metrics(what: &str, m: &Metrics) {
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    println!("{what}: {}", parts.join(" "));
}

/// The run loop, then the evaluation on `data.eval` when there is one.
pub fn train_and_eval<B: AutodiffBackend, T: Trainer<B>>(
    run: &TrainRun,
    model: &mut RlhfModel<B>,
    trainer: &mut T,
    train_set: &[T::Example],
    eval_set: Option<Vec<T::Example>>,
    opts: &RunOptions,
) -> Result<(Metrics, Option<Metrics>)> {
    let last = train(&run.cfg, model, trainer, train_set, opts)?;
    let eval = match eval_set {
        Some(set) => Some(evaluate_and_write(&run.cfg, model, trainer, &set)?),
        None => None,
    };
    Ok((last, eval))
}

/// Prints the last training metrics, the evaluation's when there was one, and where the trained
/// `role`'s adapter was written.
pub fn report(cfg: &RunConfig, role: Role, last: &Metrics, eval: Option<&Metrics>) {
    print_metrics("train", last);
    if let Some(m) = eval {
        print_metrics("eval", m);
    }
    eprintln!(
        "adapter written to {}",
        cfg.train.output_dir.join(role.name()).display()
    );
}

/// A run that trains the policy adapter alone on examples that `load` reads from a data file
/// (`rlhf sft`, `orpo`, `cpo`, `kto`): the plan of `algo`, the base, `data.train` (and `data.eval`), a
/// new policy adapter, the trainer that `trainer` builds from the padding id, the run loop and
/// the evaluation. `reference`: the trainer scores against the reference role (KTO).
pub fn train_policy<B: AutodiffBackend, T: Trainer<B>>(
    run: &TrainRun,
    algo: Algo,
    reference: bool,
    device: &B::Device,
    load: impl Fn(&Path, &Codec<'_>) -> Result<Vec<T::Example>>,
    trainer: impl FnOnce(u32) -> T,
) -> Result<Outcome> {
    let cfg = &run.cfg;
    let Some(Prepared {
        loaded,
        train_set,
        eval_set,
        run_dir,
    }) = run.prepare::<B, T::Example>(algo, device, load)?
    else {
        return Ok(Outcome::DoesNotFit);
    };
    let mut trainer = trainer(loaded.pad_id());
    let mut model = model_for_run(loaded.model, &loaded.tok, cfg, Role::Policy, reference)?;
    let opts = run.run_options(&run_dir, &loaded.name);
    let (last, eval) = train_and_eval(run, &mut model, &mut trainer, &train_set, eval_set, &opts)?;
    report(cfg, Role::Policy, &last, eval.as_ref());
    Ok(Outcome::Done)
}
