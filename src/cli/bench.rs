//! `rlhf bench`: our side of the peer benchmark against TRL (`bench/trl_baseline.py`).
//!
//! It reads the same folder (`make_model.py`'s config.json, model.safetensors, tokenizer.json,
//! dpo.jsonl, grpo.jsonl), takes the same flags with the same defaults, and runs the same workload
//! through our real training path: the run config is built here, the VRAM plan is checked as
//! every training command does, and the trainers of `rlhf dpo` / `rlhf grpo` go through the one
//! run loop ([`crate::train::train_observed`]). The loop's observer hook times each optimizer
//! step (device synchronized at both ends) and samples the device allocator after each phase
//! and at the high points the large transient ops report (`devmem::note`);
//! a thread polls `nvidia-smi` on CUDA. One JSON line goes to stdout, with the TRL script's
//! fields and ours.
//!
//! Checkpoints and logs go to a temporary folder that is removed afterwards; the timed interval
//! ends before the run loop writes them.

use super::gpu_info::{self, SmiPoller};
use super::setup::{self, on_backend, Codec, DeviceArg, OnBackend, Outcome, NO_CUDA};
use super::trainers::{
    check_grpo_config, dpo_config, grpo_loss_config, grpo_settings, load_grpo_examples, load_pairs,
};
use crate::config::{CacheBound, Dtype, Quantize, RunConfig, ALL_TARGETS};
use crate::devmem::DeviceMemory;
use crate::engine::RlhfModel;
use crate::plan::Algo;
use crate::train::{train_observed, RunOptions, StepObserver, StepPhase};
use anyhow::{bail, ensure, Context, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use rlhf_algorithms::dpo::{DpoTrainer, PairExample};
use rlhf_algorithms::grpo::{GrpoExample, GrpoTrainer};
use rlhf_algorithms::trainer::{Role, Trainer};
use rlhf_rewards::{RewardBatch, RewardFn, RewardSet};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

const GIB: f64 = (1u64 << 30) as f64;

/// The dataset column the benchmark's reward compares words with (make_model.py writes `w7`).
const ANSWER_COLUMN: &str = "answer";

/// Flags of `rlhf bench`; the shared ones have trl_baseline.py's names and defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A folder made by make_model.py (config.json, model.safetensors, tokenizer.json,
    /// dpo.jsonl, grpo.jsonl).
    #[arg(long)]
    pub model: PathBuf,
    /// dpo or grpo.
    #[arg(long, value_name = "dpo|grpo")]
    pub algo: String,
    /// DPO: preference pairs per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// GRPO: prompts per step.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// GRPO: completions per prompt.
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    /// GRPO: tokens per completion (exactly: stop tokens are not sampled before it).
    #[arg(long, default_value_t = 128)]
    pub completion_len: usize,
    /// DPO: prompt + completion tokens.
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed optimizer steps before them.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Keep the base unquantized instead of NF4.
    #[arg(long)]
    pub no_quant: bool,
    /// Let burn's autodiff keep every op's activations instead of checkpointing each block
    /// (TRL runs with gradient checkpointing; this measures what it saves).
    #[arg(long)]
    pub no_checkpoint: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Also write the JSON to DIR/rlhf_<algo>.json when DIR is an existing folder
    /// (default: $OUT).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Start even when the VRAM plan exceeds the budget (the GPU's memory on cuda).
    #[arg(long)]
    pub force: bool,
    /// Also report each step's phases (forward: for GRPO the rollout, scoring and loss;
    /// backward; optimizer: clipping and AdamW) as medians in `phase_secs`, with the forward's
    /// parts: the rollout's prefill and decode, and the scoring passes. Synchronizes the device
    /// at every phase boundary and after each scoring pass, which can add a little to the step
    /// time.
    #[arg(long)]
    pub phase_times: bool,
    /// Hold the CUDA allocator's cache to the plan's peak (`plan.cache = "plan"`), so the card
    /// shows what the plan predicts; without it the cache may grow to the card.
    #[arg(long)]
    pub cache_plan: bool,
    /// The card's dense bf16 tensor-core peak in TFLOP/s, for `mfu` (default: the datasheet
    /// value of a card `nvidia-smi` names, see `cli::gpu_info`; none for others).
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,
}

/// The JSON line: trl_baseline.py's fields first (same names and units), then ours.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub system: &'static str,
    pub algo: &'static str,
    pub model: String,
    pub quant: bool,
    /// Median over the timed steps.
    pub sec_per_step: f64,
    pub tokens_per_step: usize,
    pub tokens_per_sec: f64,
    /// Max bytes in live tensors seen after any phase (GiB); null where the backend does not
    /// track device memory (CPU).
    pub peak_alloc_gib: Option<f64>,
    /// Max bytes the allocator held from the driver (GiB); null on CPU.
    pub peak_reserved_gib: Option<f64>,
    pub steps_timed: usize,
    /// Max of `nvidia-smi`'s memory.used for the device during training (the whole device,
    /// other processes included); null on CPU or without nvidia-smi.
    pub peak_nvidia_smi_gib: Option<f64>,
    /// Max of `nvidia-smi`'s used memory for this process alone (CUDA context included): what
    /// the run takes of the card. Null where nvidia-smi cannot see the process (containers).
    pub peak_process_gib: Option<f64>,
    /// Times the allocator gave its cached pages back (the plan's reservation limit, or a
    /// refused allocation); 0 on CPU.
    pub allocator_releases: u64,
    pub device: &'static str,
    /// The planner's peak for this run (src/plan.rs).
    pub planned_peak_gib: f64,
    /// Tokens per row the planner was given (the longest row as tokenized).
    pub planned_seq_len: usize,
    /// The planner's peak without CUDA context and allocator slack (GiB): compare with
    /// `peak_alloc_gib`.
    pub planned_tensors_gib: f64,
    /// With `--phase-times`: median seconds per timed step in each phase (micro-batches
    /// summed); null otherwise.
    pub phase_secs: Option<PhaseSecs>,
    /// DPO: tokens of the rows as tokenized (padded to the longest, as the step runs them);
    /// `tokens_per_step` counts `--max-length` per row, as trl_baseline.py does.
    pub trained_tokens_per_step: usize,
    /// DPO: model FLOPs per trained token (8 x the base's GEMM parameters,
    /// `gpu_info::dpo_flop_per_token`); null for GRPO, whose step is mostly decode.
    pub flop_per_token: Option<f64>,
    /// The card `nvidia-smi` names; null on CPU.
    pub gpu: Option<String>,
    /// The dense bf16 peak MFU divides by (`--peak-tflops`, else the card's datasheet value).
    pub peak_tflops: Option<f64>,
    /// DPO: model FLOPs per second (trained tokens) over `peak_tflops`.
    pub mfu: Option<f64>,
}

/// Median seconds of a step's phases ([`StepPhase`]).
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSecs {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    /// Parts of `forward` (`phase_clock`): the rollout's prompt pass and decode set-up, its
    /// later tokens, and the passes that score without a graph (0 where a step has none).
    pub prefill: f64,
    pub decode: f64,
    pub scoring: f64,
}

/// The benchmark's reward, trl_baseline.py's `c.split().count(ans)`: how many
/// whitespace-separated words of the completion equal the row's `answer`.
pub struct CountAnswer;

impl RewardFn for CountAnswer {
    fn name(&self) -> &str {
        "count"
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        batch
            .completions()
            .iter()
            .zip(batch.columns())
            .map(|(completion, cols)| {
                let answer = answer_of(cols)?;
                let n = completion
                    .split_whitespace()
                    .filter(|w| *w == answer)
                    .count();
                Ok(Some(n as f32))
            })
            .collect()
    }
}

fn answer_of(cols: &rlhf_rewards::Columns) -> Result<&str> {
    cols.get(ANSWER_COLUMN)
        .and_then(|v| v.as_str())
        .with_context(|| format!("the row has no string column `{ANSWER_COLUMN}`"))
}

/// A folder under the system temp dir, removed with everything in it when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("rlhf-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tokenized training set of either algorithm.
enum Examples {
    Dpo(Vec<PairExample>),
    Grpo(Vec<GrpoExample>),
}

/// `rlhf bench`: [`Outcome::DoesNotFit`] when the plan does not fit and `--force` is off.
pub fn run(args: &BenchArgs) -> Result<Outcome> {
    let algo = match args.algo.as_str() {
        "dpo" => Algo::Dpo,
        "grpo" => Algo::Grpo,
        other => bail!("--algo: unknown algorithm `{other}`, expected dpo or grpo"),
    };
    check_args(args, algo)?;
    on_backend(args.device.device(), &BenchJob { args, algo }, NO_CUDA)
}

struct BenchJob<'a> {
    args: &'a BenchArgs,
    algo: Algo,
}

impl OnBackend for BenchJob<'_> {
    type Output = Outcome;
    fn run<B: Backend>(&self, device: &B::Device) -> Result<Outcome> {
        run_on::<Autodiff<B>>(self.args, self.algo, device)
    }
}

/// Refuses flag values the run cannot honour, naming the flag (only the flags `algo` uses).
fn check_args(a: &BenchArgs, algo: Algo) -> Result<()> {
    ensure!(a.steps > 0, "--steps: expected a positive integer, got 0");
    if algo == Algo::Dpo {
        ensure!(a.batch > 0, "--batch: expected a positive integer, got 0");
        ensure!(
            a.max_length >= 2,
            "--max-length: expected at least 2 tokens, got {}",
            a.max_length
        );
    } else {
        ensure!(
            a.prompts > 0,
            "--prompts: expected a positive integer, got 0"
        );
        ensure!(
            a.completion_len > 0,
            "--completion-len: expected a positive integer, got 0"
        );
        ensure!(
            a.group >= 2,
            "--group: expected at least 2 completions per prompt (GRPO advantages are group-relative), got {}",
            a.group
        );
    }
    if a.model.is_file() {
        bail!(
            "--model {}: bench takes a model folder (config.json + safetensors + dpo.jsonl/grpo.jsonl from shared/bench/make_model.py), not a file",
            a.model.display()
        );
    }
    if !a.model.is_dir() {
        bail!(
            "{}: model folder not found (make it with bench/make_model.py)",
            a.model.display()
        );
    }
    let data = data_file(a, algo);
    if !data.is_file() {
        bail!(
            "{}: not found (make_model.py writes dpo.jsonl and grpo.jsonl next to the model)",
            data.display()
        );
    }
    Ok(())
}

fn data_file(a: &BenchArgs, algo: Algo) -> PathBuf {
    a.model.join(if algo == Algo::Dpo {
        "dpo.jsonl"
    } else {
        "grpo.jsonl"
    })
}

/// Tokens one optimizer step processes, counted as trl_baseline.py counts them.
pub fn tokens_per_step(a: &BenchArgs, algo: Algo) -> usize {
    match algo {
        Algo::Grpo => a.prompts * a.group * a.completion_len,
        _ => a.batch * 2 * a.max_length,
    }
}

/// The run config of the benchmark: the TRL script's QLoRA settings in our keys. Sequence-length
/// keys are filled in by [`prepare`] once the data is tokenized.
pub fn run_config(a: &BenchArgs, algo: Algo, output_dir: &Path) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.path = a.model.clone();
    cfg.model.quantize = if a.no_quant {
        Quantize::None
    } else {
        Quantize::Nf4
    };
    // Our backends compute in f32 (TRL: bf16); the planner must count what actually runs.
    cfg.model.dtype = Dtype::F32;
    cfg.model.device = a.device.device();
    cfg.lora.r = 16;
    cfg.lora.alpha = 32.0;
    cfg.lora.dropout = 0.0;
    cfg.lora.target_modules = ALL_TARGETS.iter().map(|s| s.to_string()).collect();
    // Log-probs from 512-token slices of the logits (TRL's selective_log_softmax also avoids
    // a whole f32 log-softmax of the batch).
    cfg.plan.logits_chunk = 512;
    if a.cache_plan {
        cfg.plan.cache = CacheBound::Plan;
    }
    cfg.data.train = data_file(a, algo);
    // make_model.py's tokenizer has no chat template; rows are plain text.
    cfg.data.chat_template = false;
    let t = &mut cfg.train;
    t.output_dir = output_dir.to_path_buf();
    t.seed = 0;
    t.max_steps = a.warmup + a.steps;
    t.gradient_checkpointing = !a.no_checkpoint;
    t.gradient_accumulation_steps = 1;
    t.learning_rate = 5e-6;
    // Only the final checkpoint (always written), after the last timed step.
    t.save_steps = t.max_steps;
    t.batch_size = match algo {
        // GRPO's batch counts completions, as TRL's per_device_train_batch_size does.
        Algo::Grpo => a.prompts * a.group,
        _ => a.batch,
    };
    cfg.dpo.beta = 0.1;
    cfg.dpo.loss_types = vec![rlhf_algorithms::losses::DpoLossType::Sigmoid];
    cfg.dpo.precompute_ref_log_probs = false;
    cfg.grpo.num_generations = a.group;
    cfg.grpo.max_completion_length = a.completion_len;
    cfg.grpo.beta = 0.04;
    cfg.grpo.num_iterations = 1;
    cfg.generation.temperature = 1.0;
    cfg.generation.max_new_tokens = a.completion_len;
    cfg.generation.min_new_tokens = a.completion_len;
    cfg
}

/// Tokenizes the data (before any weight is loaded, so a bad file fails fast) and sets the
/// sequence lengths: DPO truncates prompt + completion to `--max-length` only (TRL 1.16 has no
/// prompt limit); GRPO keeps whole prompts, and the planner is told the longest one.
fn prepare(cfg: &mut RunConfig, a: &BenchArgs, algo: Algo) -> Result<Examples> {
    let tok = crate::tokenizer::Tok::from_file(a.model.join("tokenizer.json"))?;
    let codec = Codec {
        tok: &tok,
        chat: None,
    };
    let per_step = match algo {
        Algo::Grpo => a.prompts,
        _ => a.batch,
    };
    let (examples, rows) = match algo {
        Algo::Grpo => {
            cfg.data.max_prompt_length = usize::MAX;
            let ex = load_grpo_examples(&cfg.data.train, &codec, cfg)?;
            for e in &ex {
                answer_of(&e.columns).with_context(|| e.source.clone())?;
            }
            let longest = ex.iter().map(|e| e.prompt_ids.len()).max().unwrap_or(1);
            cfg.data.max_prompt_length = longest;
            cfg.data.max_length = longest + a.completion_len;
            check_grpo_config(cfg)?;
            let n = ex.len();
            (Examples::Grpo(ex), n)
        }
        _ => {
            cfg.data.max_length = a.max_length;
            cfg.data.max_prompt_length = a.max_length;
            let ex = load_pairs(&cfg.data.train, &codec, cfg)
                .with_context(|| format!("--max-length {}", a.max_length))?;
            // Plan for the longest pair as tokenized (TRL pads each batch to its longest row, as
            // the trainer does): the planner's peak is compared with the measured one.
            let longest = ex
                .iter()
                .map(|e| e.prompt.len() + e.chosen.len().max(e.rejected.len()))
                .max()
                .unwrap_or(1);
            cfg.data.max_length = longest.min(a.max_length);
            cfg.data.max_prompt_length = cfg.data.max_length;
            let n = ex.len();
            (Examples::Dpo(ex), n)
        }
    };
    ensure!(
        rows >= per_step,
        "{}: {rows} rows, fewer than the {per_step} a step needs",
        cfg.data.train.display()
    );
    cfg.validate()
        .context("the benchmark's run config is invalid")?;
    Ok(examples)
}

/// Runs the benchmark on backend `B` and prints the JSON line.
fn run_on<B: AutodiffBackend>(args: &BenchArgs, algo: Algo, device: &B::Device) -> Result<Outcome> {
    let scratch = ScratchDir::new()?;
    let mut cfg = run_config(args, algo, &scratch.0);
    if args.device == DeviceArg::Cuda {
        // Plan against the card we run on.
        if let Some(mib) = gpu_info::nvidia_smi_mib("memory.total") {
            cfg.plan.budget_gib = mib / 1024.0;
        }
    }
    let examples = prepare(&mut cfg, args, algo)?;
    let Some(loaded) = setup::plan_and_load::<B>(&cfg, algo, args.force, device)? else {
        return Ok(Outcome::DoesNotFit);
    };
    let mcfg = setup::model_config(&cfg.model.path)?;
    let planned = crate::plan::plan(&cfg, &mcfg, algo)?;
    let pad_id = loaded.pad_id();
    let stop_ids = loaded.stop_ids(&cfg.generation.stop_token_ids);
    let opts = RunOptions {
        resume: None,
        base_name: loaded.name.clone(),
        config_text: toml::to_string(&cfg).context("writing the run config")?,
    };
    let mut model = setup::model_for_run(loaded.model, &loaded.tok, &cfg, Role::Policy, true)?;

    crate::devmem::note::<B>(device, "model and adapter loaded");
    let _ = crate::devmem::take_noted();
    let mut probe = Probe::<B>::new(device.clone(), args.phase_times);
    crate::phase_clock::enable(args.phase_times);
    let poll_smi = args.device == DeviceArg::Cuda;
    let mut timed = Timed {
        cfg: &cfg,
        model: &mut model,
        opts: &opts,
        probe: &mut probe,
        poll_smi,
    };
    let smi_peak = match examples {
        Examples::Dpo(set) => {
            let mut trainer = DpoTrainer {
                cfg: dpo_config(&cfg)?,
                pad_id,
            };
            timed.run(&mut trainer, &set)?
        }
        Examples::Grpo(set) => {
            let loss = grpo_loss_config(&cfg)?;
            let mut settings = grpo_settings(&cfg, loss, stop_ids, pad_id)?;
            // TRL writes no completions file with these settings; keep file I/O out of the steps.
            settings.completions_log = None;
            let rewards = RewardSet::new(vec![(Box::new(CountAnswer) as Box<dyn RewardFn>, 1.0)])?;
            let mut trainer = GrpoTrainer::new(settings, rewards)?;
            timed.run(&mut trainer, &set)?
        }
    };
    if let Some(e) = probe.error.take() {
        bail!("device synchronization failed: {e}");
    }

    let times = &probe.secs;
    let steady = if times.len() > args.warmup {
        &times[args.warmup..]
    } else {
        &times[..]
    };
    let sec = median(steady);
    let tokens = tokens_per_step(args, algo);
    let trained = match algo {
        Algo::Grpo => tokens,
        _ => args.batch * 2 * cfg.data.max_length,
    };
    let flop_per_token = (algo == Algo::Dpo).then(|| {
        let head = mcfg.vocab_size * mcfg.hidden_size;
        gpu_info::dpo_flop_per_token(mcfg.block_linear_params() * mcfg.num_hidden_layers + head)
    });
    let gpu = (args.device == DeviceArg::Cuda)
        .then(gpu_info::gpu_name)
        .flatten();
    let peak_tflops = args
        .peak_tflops
        .or_else(|| gpu.as_deref().and_then(gpu_info::bf16_peak_tflops));
    let mfu = flop_per_token
        .zip(peak_tflops)
        .map(|(f, p)| round(gpu_info::mfu(f, trained as f64 / sec.max(1e-12), p), 4));
    let gib = |b: u64| round(b as f64 / GIB, 6);
    let result = BenchResult {
        system: "rlhf",
        algo: algo.name(),
        model: args.model.display().to_string(),
        quant: !args.no_quant,
        sec_per_step: round(sec, 6),
        tokens_per_step: tokens,
        tokens_per_sec: round(tokens as f64 / sec.max(1e-12), 1),
        peak_alloc_gib: probe.peak.map(|m| gib(m.in_use)),
        peak_reserved_gib: probe.peak.map(|m| gib(m.reserved)),
        steps_timed: steady.len(),
        peak_nvidia_smi_gib: smi_peak.map(|(mib, _)| round(mib / 1024.0, 6)),
        peak_process_gib: smi_peak
            .and_then(|(_, own)| own)
            .map(|mib| round(mib / 1024.0, 6)),
        allocator_releases: crate::devmem::release_count(),
        device: match args.device {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
        },
        planned_peak_gib: round(planned.peak_gib(), 6),
        planned_seq_len: cfg.data.max_length,
        planned_tensors_gib: round(planned.tensor_peak_bytes() as f64 / GIB, 6),
        phase_secs: args.phase_times.then(|| {
            let timed = |i: usize| {
                let v: Vec<f64> = probe
                    .phases
                    .iter()
                    .skip(args.warmup)
                    .map(|p| p[i])
                    .collect();
                round(median(&v), 6)
            };
            PhaseSecs {
                forward: timed(0),
                backward: timed(1),
                optimizer: timed(2),
                prefill: timed(3),
                decode: timed(4),
                scoring: timed(5),
            }
        }),
        trained_tokens_per_step: trained,
        flop_per_token,
        gpu,
        peak_tflops,
        mfu,
    };
    let line = serde_json::to_string(&result)?;
    println!("{line}");
    let out = args
        .out
        .clone()
        .or_else(|| std::env::var_os("OUT").map(PathBuf::from));
    if let Some(dir) = out.filter(|d| d.is_dir()) {
        let path = dir.join(format!("rlhf_{}.json", algo.name()));
        std::fs::write(&path, &line)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(Outcome::Done)
}

/// The run loop with the probe attached and, when `poll_smi`, `nvidia-smi` polled meanwhile.
struct Timed<'a, B: AutodiffBackend> {
    cfg: &'a RunConfig,
    model: &'a mut RlhfModel<B>,
    opts: &'a RunOptions,
    probe: &'a mut Probe<B>,
    poll_smi: bool,
}

impl<B: AutodiffBackend> Timed<'_, B> {
    /// Trains `trainer` on `examples`; returns nvidia-smi's peaks in MiB (the device, this
    /// process where listed).
    fn run<T: Trainer<B>>(
        &mut self,
        trainer: &mut T,
        examples: &[T::Example],
    ) -> Result<Option<(f64, Option<f64>)>> {
        let smi = self.poll_smi.then(SmiPoller::start);
        let trained = train_observed(
            self.cfg, self.model, trainer, examples, self.opts, self.probe,
        );
        let peak = smi.and_then(SmiPoller::finish);
        trained.map(|_| peak)
    }
}

/// Times optimizer steps and keeps the allocator's peak numbers.
struct Probe<B: Backend> {
    device: B::Device,
    started: Option<Instant>,
    /// Seconds of every step, warmup included.
    secs: Vec<f64>,
    /// Max of each field over all samples; `None` on backends without device memory numbers.
    peak: Option<DeviceMemory>,
    /// The first failed synchronization (the observer hooks cannot return errors).
    error: Option<String>,
    /// With phase timing: the device is synchronized at every phase boundary and each step's
    /// seconds per phase (forward, backward, optimizer; micro-batches summed) are kept, then
    /// the parts of the forward `phase_clock` timed (prefill, decode, scoring).
    time_phases: bool,
    phases: Vec<[f64; 6]>,
    /// When the last phase (or the step) began.
    mark: Option<Instant>,
}

impl<B: Backend> Probe<B> {
    fn new(device: B::Device, time_phases: bool) -> Self {
        Self {
            device,
            started: None,
            secs: Vec::new(),
            peak: None,
            error: None,
            time_phases,
            phases: Vec::new(),
            mark: None,
        }
    }

    /// Waits for queued device work, so the clock reads finished work only.
    fn sync(&mut self) {
        if let Err(e) = B::sync(&self.device) {
            self.error.get_or_insert_with(|| e.to_string());
        }
    }

    /// Now, and the high points the big transient ops noted since the last sample.
    fn sample(&mut self) {
        let now = crate::devmem::usage::<B>(&self.device);
        for m in [now, crate::devmem::take_noted()].into_iter().flatten() {
            let p = self.peak.get_or_insert(m);
            p.in_use = p.in_use.max(m.in_use);
            p.reserved = p.reserved.max(m.reserved);
        }
    }
}

impl<B: Backend> StepObserver for Probe<B> {
    fn step_started(&mut self, _step: usize) {
        self.sync();
        self.sample();
        self.started = Some(Instant::now());
        if self.time_phases {
            self.phases.push([0.0; 6]);
            self.mark = self.started;
            crate::phase_clock::take();
        }
    }

    fn phase_done(&mut self, phase: StepPhase) {
        if self.time_phases {
            self.sync();
            let now = Instant::now();
            let i = match phase {
                StepPhase::Forward => 0,
                StepPhase::Backward => 1,
                StepPhase::Optimizer => 2,
            };
            if let (Some(t), Some(p)) = (self.mark.replace(now), self.phases.last_mut()) {
                p[i] += (now - t).as_secs_f64();
            }
        }
        self.sample();
    }

    fn step_finished(&mut self, _step: usize) {
        self.sync();
        if let Some(t) = self.started.take() {
            self.secs.push(t.elapsed().as_secs_f64());
        }
        if let (true, Some(p)) = (self.time_phases, self.phases.last_mut()) {
            p[3..].copy_from_slice(&crate::phase_clock::take());
        }
        self.sample();
    }
}

/// The median, as Python's `statistics.median` (mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_rewards::Columns;

    fn cols(answer: serde_json::Value) -> Columns {
        let mut c = Columns::new();
        c.insert(ANSWER_COLUMN.into(), answer);
        c
    }

    #[test]
    fn count_reward_counts_whole_words_like_python_split_count() {
        let prompts = vec!["p".to_string(); 4];
        let completions = vec![
            "w7 w1 w7\tw7\nw77".to_string(), // w77 and w7x are other words
            "w7x".to_string(),
            "".to_string(),
            "  w3   w3 ".to_string(),
        ];
        let columns = vec![
            cols("w7".into()),
            cols("w7".into()),
            cols("w7".into()),
            cols("w3".into()),
        ];
        let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
        let scores = CountAnswer.score(&batch).unwrap();
        assert_eq!(scores, vec![Some(3.0), Some(0.0), Some(0.0), Some(2.0)]);
    }

    #[test]
    fn count_reward_needs_a_string_answer() {
        let prompts = vec!["p".to_string()];
        let completions = vec!["w7".to_string()];
        let columns = vec![cols(7.into())];
        let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
        let e = CountAnswer.score(&batch).unwrap_err().to_string();
        assert!(e.contains("answer"), "{e}");
    }

    #[test]
    fn median_matches_python() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
