//! The training commands (`rlhf dpo`, `rlhf rm`) and `rlhf plan`: read the config, check the
//! VRAM plan before any weight is loaded, load the one base, attach the role adapters, and hand
//! the algorithm to the shared run loop.

use crate::cli::Loaded;
use crate::config::{Device, Dtype, Quantize, RunConfig, Truncation};
use crate::data::{Message, TextCodec, TokenizeOptions};
use crate::engine::{new_head, RlhfModel};
use crate::model::LlamaConfig;
use crate::plan::{self, Algo};
use crate::rundir::RunDir;
use crate::train::{evaluate, train, RunOptions};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::dpo::{DpoTrainer, PairExample};
use rlhf_algorithms::losses::{DpoConfig, DpoLossType, RewardLossConfig};
use rlhf_algorithms::rm::RewardTrainer;
use rlhf_algorithms::trainer::{Metrics, Role, Trainer};
use std::path::{Path, PathBuf};
use std::str::FromStr;

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
    ) -> Result<RunOptions> {
        Ok(RunOptions {
            resume: run_dir.resume.clone(),
            base_name: base_name.to_string(),
            config_text,
        })
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

/// The tokenizer + chat template of a loaded model, as data preparation sees them.
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
        let msgs: Vec<crate::tokenizer::ChatMessage> = messages
            .iter()
            .map(|m| crate::tokenizer::ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        Some(chat.render(&msgs, add_generation_prompt))
    }
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

/// Runs the planner for `algo`; prints the summary line. Refuses (exit 3) when the run does not
/// fit and `force` is off.
pub fn check_plan(cfg: &RunConfig, algo: Algo, force: bool) -> Result<Option<i32>> {
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
    if !p.fits {
        if force {
            eprintln!("warning: --force: starting although the plan exceeds the budget; expect out-of-memory");
        } else {
            eprintln!("{}", plan::render_table(&p));
            eprintln!("error: the run does not fit plan.budget_gib; apply a suggestion above or pass --force");
            return Ok(Some(crate::cli::EXIT_DOES_NOT_FIT));
        }
    }
    Ok(None)
}

/// `rlhf plan`: prints the table (or JSON); exit 0 fits, 3 does not.
pub fn run_plan(config: &Path, algo: Option<Algo>, json: bool) -> Result<i32> {
    let cfg = RunConfig::load(config)?;
    let algo = match algo.or_else(|| plan::algo_from_file_name(config)) {
        Some(a) => a,
        None => bail!(
            "{}: cannot tell the algorithm from the file name: pass --algo dpo|rm|grpo|ppo|generate",
            config.display()
        ),
    };
    let mcfg = model_config(&cfg.model.path)?;
    let p = plan::plan(&cfg, &mcfg, algo).with_context(|| format!("{}", config.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        println!("{}", plan::render_table(&p));
    }
    Ok(if p.fits {
        0
    } else {
        crate::cli::EXIT_DOES_NOT_FIT
    })
}

fn tokenize_opts(cfg: &RunConfig) -> TokenizeOptions {
    TokenizeOptions {
        max_length: Some(cfg.data.max_length),
        max_prompt_length: Some(cfg.data.max_prompt_length),
        keep_end: cfg.data.truncation_mode == Truncation::KeepEnd,
    }
}

/// Reads and tokenizes a preference file into training pairs.
pub fn load_pairs(path: &Path, codec: &Codec, cfg: &RunConfig) -> Result<Vec<PairExample>> {
    let rows = crate::data::load_preferences(path)?;
    anyhow::ensure!(!rows.is_empty(), "{}: no examples", path.display());
    let toks = crate::data::tokenize_preferences(codec, &rows, &tokenize_opts(cfg))?;
    Ok(toks
        .into_iter()
        .map(|t| PairExample {
            prompt: t.prompt,
            chosen: t.chosen,
            rejected: t.rejected,
            ref_logps: None,
        })
        .collect())
}

/// The DPO loss of `[dpo]`.
pub fn dpo_config(cfg: &RunConfig) -> Result<DpoConfig> {
    let loss_types = cfg
        .dpo
        .loss_type
        .iter()
        .map(|s| DpoLossType::from_str(s))
        .collect::<Result<Vec<_>>>()?;
    let c = DpoConfig {
        beta: cfg.dpo.beta,
        label_smoothing: cfg.dpo.label_smoothing,
        loss_types,
        loss_weights: cfg.dpo.loss_weights.clone(),
        ..Default::default()
    };
    c.validate()?;
    Ok(c)
}

/// `rlhf dpo` / `rlhf rm` on backend `B`.
pub fn run_preference<B: AutodiffBackend>(
    algo: Algo,
    config: &Path,
    flags: &TrainFlags,
    device: &B::Device,
) -> Result<i32> {
    let config_text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read config file", config.display()))?;
    let cfg = RunConfig::parse(&config_text, config)?;
    if let Some(code) = check_plan(&cfg, algo, flags.force)? {
        return Ok(code);
    }
    crate::commands::check_data_files(&cfg)?;
    // Data is read and tokenized before the weights load (minutes for a large model).
    let (tok, chat) = crate::cli::load_tokenizer(&cfg.model.path)?;
    let codec = Codec::new(&tok, chat.as_ref(), &cfg);
    let train_set = load_pairs(&cfg.data.train, &codec, &cfg)?;
    let eval_set = match &cfg.data.eval {
        Some(p) => Some(load_pairs(p, &codec, &cfg)?),
        None => None,
    };
    let run_dir = flags.open_run_dir(&cfg)?;
    let loaded: Loaded<B> =
        crate::cli::load_model(&cfg.model.path, cfg.model.quantize == Quantize::Nf4, device)?;
    let pad_id = loaded.pad_id();
    let mut model = RlhfModel::for_run(loaded.model, &loaded.tok, &cfg);
    let role = if algo == Algo::Rm {
        Role::Reward
    } else {
        Role::Policy
    };
    let seed = cfg.train.seed;
    model.add_new_adapter(role, &cfg.lora, seed)?;
    if role == Role::Reward {
        model.heads.insert(
            role,
            new_head(model.base.cfg.hidden_size, seed ^ 0x5EED, device),
        );
    }
    let opts = flags.run_options(&run_dir, &loaded.name, config_text)?;
    let (last, eval) = match algo {
        Algo::Dpo => {
            let mut trainer = DpoTrainer {
                cfg: dpo_config(&cfg)?,
                pad_id,
            };
            let mut train_set = train_set;
            if cfg.dpo.precompute_ref_log_probs {
                precompute_reference(&trainer, &model, &mut train_set, cfg.train.batch_size)?;
            }
            run_and_eval(
                &cfg,
                &mut model,
                &mut trainer,
                &train_set,
                eval_set.as_deref(),
                &opts,
            )?
        }
        Algo::Rm => {
            let c = cfg.rm.center_rewards_coefficient;
            let mut trainer = RewardTrainer {
                cfg: RewardLossConfig {
                    center_rewards_coefficient: (c != 0.0).then_some(c),
                },
                pad_id,
            };
            run_and_eval(
                &cfg,
                &mut model,
                &mut trainer,
                &train_set,
                eval_set.as_deref(),
                &opts,
            )?
        }
        other => bail!("`{other}` is not a preference algorithm"),
    };
    print_metrics("train", &last);
    if let Some(m) = eval {
        print_metrics("eval", &m);
    }
    eprintln!(
        "adapter written to {}",
        cfg.train.output_dir.join(role.name()).display()
    );
    Ok(0)
}

fn run_and_eval<B: AutodiffBackend, T: Trainer<B>>(
    cfg: &RunConfig,
    model: &mut RlhfModel<B>,
    trainer: &mut T,
    train_set: &[T::Example],
    eval_set: Option<&[T::Example]>,
    opts: &RunOptions,
) -> Result<(Metrics, Option<Metrics>)> {
    let last = train(cfg, model, trainer, train_set, opts)?;
    let eval = match eval_set {
        Some(e) => {
            let m = evaluate(cfg, model, trainer, e)?;
            let line: serde_json::Map<String, serde_json::Value> = m
                .iter()
                .map(|(k, v)| (format!("eval_{k}"), serde_json::json!(v)))
                .collect();
            crate::util::write_atomic(
                &cfg.train.output_dir.join("eval_metrics.json"),
                serde_json::to_string_pretty(&line)?.as_bytes(),
            )?;
            Some(m)
        }
        None => None,
    };
    Ok((last, eval))
}

/// Computes every example's reference log-probs once (adapters off), as TRL's
/// `precompute_ref_log_probs` does.
fn precompute_reference<B: AutodiffBackend>(
    trainer: &DpoTrainer,
    model: &RlhfModel<B>,
    set: &mut [PairExample],
    batch: usize,
) -> Result<()> {
    for chunk in set.chunks_mut(batch) {
        let r = trainer.reference_logps(model, chunk)?;
        for (e, v) in chunk.iter_mut().zip(r) {
            e.ref_logps = Some(v);
        }
    }
    Ok(())
}

fn print_metrics(what: &str, m: &Metrics) {
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    println!("{what}: {}", parts.join(" "));
}

/// A training command, generic over the autodiff backend it runs on.
pub trait TrainJob {
    fn run<B: AutodiffBackend>(
        &self,
        config: &Path,
        flags: &TrainFlags,
        device: &B::Device,
    ) -> Result<i32>;
}

/// `rlhf dpo` / `rlhf rm`.
pub struct PreferenceJob(pub Algo);

impl TrainJob for PreferenceJob {
    fn run<B: AutodiffBackend>(
        &self,
        config: &Path,
        flags: &TrainFlags,
        device: &B::Device,
    ) -> Result<i32> {
        run_preference::<B>(self.0, config, flags, device)
    }
}

/// Runs `job` on the backend that `model.device` names.
pub fn run_on_device(job: &impl TrainJob, config: &Path, flags: &TrainFlags) -> Result<i32> {
    match RunConfig::load(config)?.model.device {
        Device::Cpu => job.run::<burn::backend::Autodiff<crate::cli::CpuBackend>>(
            config,
            flags,
            &Default::default(),
        ),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            return job.run::<burn::backend::Autodiff<crate::cli::CudaBackend>>(
                config,
                flags,
                &Default::default(),
            );
            #[cfg(not(feature = "cuda"))]
            bail!(
                "{}: model.device = \"cuda\" but this binary was built without CUDA (rebuild with --features cuda)",
                config.display()
            )
        }
    }
}
