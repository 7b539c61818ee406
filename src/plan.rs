//! The VRAM budget planner: will this run fit the card, known before a single weight is loaded.
//!
//! [`plan`] reads only the run config and the model's architecture (its `config.json`), sums what
//! is alive in each phase of the algorithm (load, rollout, scoring, training step), takes the
//! largest phase as the peak and compares it with `plan.budget_gib`. When the run does not fit,
//! it re-plans variants of the config (largest micro-batch, largest completion length, the memory
//! switches) and reports the ones that fit, each with the peak it would give.
//!
//! # What is counted
//!
//! Notation: `L` layers, `h` hidden size, `q` = heads x head_dim, `kv` = kv_heads x head_dim,
//! `i` intermediate size, `V` vocabulary, `a` attention heads, `r` LoRA rank, `d` bytes of the
//! compute dtype (`model.dtype`), `R` rows (sequences) of a pass, `T` tokens per row, `N = R x T`.
//!
//! * Base linears in NF4 with double quantization, laid out as bitsandbytes stores them:
//!   `n/2` bytes of 4-bit codes, `n/64` bytes of 8-bit absmax codes, `4 x n/(64 x 256)` bytes of
//!   fp32 second-level absmax and a 4-byte fp32 offset per tensor: 4.127 bits/param. Embeddings,
//!   lm_head (unless tied), norms and biases stay at `d`. `model.quantize = "none"` keeps all at `d`.
//! * LoRA adapters, their gradients and AdamW's two moments in f32; heads (`h + 1` params) in f32.
//!   Paged AdamW keeps the moments in host memory and brings one parameter group (one decoder
//!   layer of one adapter) to the GPU at a time.
//! * Activations a block keeps for backward, per token (see [`saved_bytes_per_token`]):
//!
//!   ```text
//!   saved = d x (2h + 3q + 4i)      x and h1 (the two RMSNorm inputs); rotated q; k and v
//!                                   repeated to all heads (the decomposed attention multiplies
//!                                   them); SwiGLU's gate g, sigmoid(g), silu(g) and up u
//!         + sum_inputs 4 x w        f32 copy of each distinct targeted linear input (adapters are
//!                                   f32): w = h for q/k/v, q for o, h for gate/up, i for down;
//!                                   with lora.dropout > 0, 5 x w per targeted module instead
//!                                   (its own dropped f32 copy + a byte mask)
//!         + sum_modules 4 x r       each adapter's x A^T, kept for B's gradient
//!         + 8                       two f32 reciprocal-RMS values
//!   ```
//!
//!   The frozen 4-bit linears keep nothing of their input (their backward needs only the
//!   weight). Without checkpointing all `L` blocks keep `saved x N`; with gradient checkpointing
//!   (block level) each layer keeps its `h`-wide input and one block is recomputed at a time.
//!   Backward adds a transient `d x (3h + 3i) + 4 x w_max` per token (residual and MLP
//!   gradients). Burn's attention backward is not flash: the decomposed form keeps
//!   `[R, a, T, T]` tensors per layer ([`Calibration::attention_kept_per_layer`]) plus two for
//!   the gradient of the block being back-propagated.
//! * Logits as f32 `[rows x tokens, V]` buffers (f32 log-softmax), `min(plan.logits_chunk, N)`
//!   rows of them when chunked. Passes run one after the other (each reduces its logits to
//!   per-token log-probs before the next), so policy and reference logits never coexist here.
//! * Rollout: the KV cache `2 x L x kv_heads x head_dim x (prompt + completion) x rows x d`,
//!   sampling buffers `[rows, V]`, the prefill's per-layer working set, and the rollout's
//!   per-token tensors (ids, masks, log-probs, values, rewards, advantages).
//! * The dequant workspace (the largest linear at `d`), the CUDA context and allocator slack
//!   ([`CALIBRATION`]).

mod evaluate;
mod formulas;
mod suggest;
mod workload;

use crate::config::RunConfig;
use crate::model::config::LlamaConfig;
use anyhow::{bail, Context, Result};
use evaluate::plan_with;
pub use formulas::{
    backward_bytes_per_token, dense_params, inference_bytes_per_token, kv_cache_bytes,
    linear_weight_bytes, lora_params, nf4_bytes, saved_bytes_per_token,
};
use serde::Serialize;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use suggest::suggest;

const GIB: f64 = (1u64 << 30) as f64;

/// Per-token bytes of what a rollout hands to scoring and training: token id, attention mask,
/// old and reference log-probs, value, reward, advantage, return (8 x 4 bytes).
const ROLLOUT_BYTES_PER_TOKEN: u64 = 32;

/// Constants only a measurement can pin down, in one place. The CUDA fast-path issue fits them
/// against peaks sampled from the CubeCL client around each phase; until then they are
/// estimates (`source` says which).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    /// Where these numbers come from.
    pub source: &'static str,
    /// What the card holds beyond the allocator's reservation (bytes): the CUDA primary
    /// context, cuBLASLt's handle and workspace, the loaded kernels.
    pub cuda_context_bytes: f64,
    /// Allocator slack on long-lived buffers (weights, adapters, optimizer state), as a fraction.
    pub slack_persistent: f64,
    /// Allocator slack on per-phase buffers (activations, logits, KV cache), as a fraction of
    /// their first [`Calibration::slack_transient_knee`] bytes: what the allocator holds beyond
    /// the live tensors at the peak (pages of other phases' buffers the peak's shapes could not
    /// reuse).
    pub slack_transient: f64,
    /// Bytes of per-phase buffers that [`Calibration::slack_transient`] covers: the measured
    /// range.
    pub slack_transient_knee: f64,
    /// Slack on the per-phase buffers beyond the knee, as a fraction.
    pub slack_transient_beyond: f64,
    /// `[N, V]` f32 buffers alive at the peak of a log-prob pass with gradients: the saved
    /// log-softmax, its gradient and the logits' gradient.
    pub logits_buffers_train: f64,
    /// `[N, V]` f32 buffers alive in a log-prob pass without gradients: logits and log-softmax.
    pub logits_buffers_infer: f64,
    /// `[R, a, T, T]` tensors autodiff keeps per layer in burn's decomposed attention (the
    /// softmax's exponentials and the probabilities).
    pub attention_kept_per_layer: f64,
    /// `[rows, V]` f32 buffers alive while one token is sampled: logits, scaled logits,
    /// probabilities, sorted values, sorted indices, cumulative sum.
    pub sampling_buffers: f64,
    /// The CUDA engine (f32 compute, NF4 base, block checkpointing; [`Setup::engine`]): its
    /// training high points are counted tensor by tensor ([`engine_pass_items`], from the
    /// allocator's live allocations at each labelled high point, `RLHF_TRACE_ALLOCS=1`). This
    /// one is fitted: `h`-wide f32 values per prompt token alive when the decode
    /// is set up after the prefill (the prefill's last block and hidden states). Fitted on two
    /// 8b GRPO runs of 8 rows, 128- and 512-token prompts (H100, 2026-12-07), to the smallest
    /// worst error (-2.6% / +2.6% of their peaks): what the prefill leaves grows slower than its
    /// prompt (440 and 823 MiB), so longer prompts are planned on the safe side.
    pub engine_prefill: f64,
}

/// The planner's constants. See [`Calibration`].
pub const CALIBRATION: Calibration = Calibration {
    source: "engine training terms counted from the allocator's live tensors, checked against 25 runs on an H200 and an H100 (BENCHMARKS.md, 2026-12-02 to 2026-12-08; engine_prefill fitted); context and slack fitted on 7 card readings (H100, 2026-12-07) and checked on 10 (tiny to 20b, 2026-12-08); the rest estimates",
    // What a run takes of the card beyond what the allocator holds: the card (the process's
    // nvidia-smi line) minus the allocator's reservation was 545-566 MiB on an H100 in every
    // run from tiny to 20b (2026-12-07, tests/data/calibration/measured.json): the allocator
    // keeps its pages, so the driver's pool holds no freed blocks beside it.
    cuda_context_bytes: 0.56 * GIB,
    // The split pool gives long-lived buffers pages of their size (0%); beyond the tensors it
    // held 0.47-0.89 x the peak phase's transient terms in the runs measured (tiny to 20b DPO
    // and GRPO, transients of 0.07-0.84 GiB, H100, 2026-12-07: 34-708 MiB), fitted as one
    // factor (the card within 4.1% on those runs). Beyond 1 GiB the rate is the 10% that held
    // the long-row runs (up to 9.8 GiB of transients) within 2.3% with each tensor in a page of
    // its own; with this pool it held the 20b rm, dpo and grpo runs (3.7-5.2 GiB of transients,
    // under bench/cap.py 23.6, 2026-12-08) within -4.9%..+2.1% of the card.
    slack_persistent: 0.0,
    slack_transient: 0.75,
    slack_transient_knee: GIB,
    slack_transient_beyond: 0.10,
    logits_buffers_train: 3.0,
    logits_buffers_infer: 2.0,
    attention_kept_per_layer: 2.0,
    sampling_buffers: 6.0,
    engine_prefill: 16.3,
};

/// Rows of a block's MLP the engine recomputes at once: each `[rows, i]` f32 tensor within
/// `checkpoint::MLP_CHUNK_BOUND`, all rows under LoRA dropout.
fn engine_mlp_rows(n: u64, i: u64, dropout: bool) -> u64 {
    let bound = crate::model::checkpoint::MLP_CHUNK_BOUND;
    crate::model::row_chunks::rows_within(n as usize, i as usize, bound, dropout) as u64
}

/// Rows of `[rows, V]` logits a log-prob pass computes at once: `want` (rows x tokens scored),
/// at most `plan.logits_chunk` of them when chunked.
fn logits_rows(run: &RunConfig, want: u64) -> u64 {
    match run.plan.logits_chunk as u64 {
        0 => want,
        c => c.min(want),
    }
}

/// Which command's memory to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    Sft,
    Dpo,
    Rm,
    Grpo,
    Ppo,
    Generate,
}

impl Algo {
    pub const ALL: [Algo; 6] = [
        Algo::Sft,
        Algo::Dpo,
        Algo::Rm,
        Algo::Grpo,
        Algo::Ppo,
        Algo::Generate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algo::Sft => "sft",
            Algo::Dpo => "dpo",
            Algo::Rm => "rm",
            Algo::Grpo => "grpo",
            Algo::Ppo => "ppo",
            Algo::Generate => "generate",
        }
    }

    fn trains(self) -> bool {
        self != Algo::Generate
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algo {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Algo::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .with_context(|| {
                format!("unknown algorithm `{s}`: expected sft, dpo, rm, grpo, ppo or generate")
            })
    }
}

/// A stretch of the run with its own set of live buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Weights quantized layer by layer as they arrive.
    Load,
    /// Sampling completions with a KV cache.
    Rollout,
    /// Gradient-free passes: reference, old policy, value and reward.
    Scoring,
    /// Forward and backward of the trained adapters, then the optimizer step.
    TrainStep,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Rollout => "rollout",
            Phase::Scoring => "scoring",
            Phase::TrainStep => "train_step",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One line of the table: a buffer and its size in every phase (0 where it is not alive).
#[derive(Debug, Clone, Serialize)]
pub struct Term {
    pub name: &'static str,
    /// The arithmetic behind the size, for the phase where the term is largest.
    pub detail: String,
    /// Bytes per phase, in the order of [`Plan::phases`].
    pub bytes: Vec<u64>,
}

/// The model as the planner saw it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub params: u64,
    pub quantized_params: u64,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub storage: &'static str,
    pub dtype: &'static str,
    pub device: &'static str,
}

/// A config change that makes the run fit, with the peak the re-plan gives.
#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    /// TOML assignments, e.g. `train.batch_size = 2`.
    pub changes: Vec<String>,
    pub peak_bytes: u64,
    pub why: String,
}

/// The planner's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub algo: Algo,
    pub model: ModelSummary,
    pub phases: Vec<Phase>,
    pub terms: Vec<Term>,
    /// Sum of all terms per phase.
    pub totals: Vec<u64>,
    pub peak_phase: Phase,
    /// What the card holds for the run at its peak: the CUDA context plus what the allocator
    /// holds from the driver (tensors and slack; the allocator is bounded by this number,
    /// `devmem::bound_allocator`). The verdict compares it with the budget.
    pub peak_bytes: u64,
    /// The largest phase's live tensors alone ([`Plan::tensor_peak_bytes`]): what the
    /// allocator's in-use counter should read at the run's high point.
    pub tensor_peak_bytes: u64,
    pub budget_bytes: u64,
    pub fits: bool,
    pub verdict: String,
    /// Assumptions behind the numbers that a reader should know.
    pub notes: Vec<String>,
    /// Empty when the run fits.
    pub suggestions: Vec<Suggestion>,
    pub calibration: Calibration,
}

impl Plan {
    /// Bytes of one term in one phase (0 when absent).
    pub fn bytes_of(&self, term: &str, phase: Phase) -> u64 {
        let Some(p) = self.phases.iter().position(|&x| x == phase) else {
            return 0;
        };
        self.terms
            .iter()
            .find(|t| t.name == term)
            .map_or(0, |t| t.bytes[p])
    }

    /// Sum of all terms in a phase (0 when the algorithm has no such phase).
    pub fn total_of(&self, phase: Phase) -> u64 {
        self.phases
            .iter()
            .position(|&x| x == phase)
            .map_or(0, |p| self.totals[p])
    }

    pub fn peak_gib(&self) -> f64 {
        self.peak_bytes as f64 / GIB
    }

    /// The largest phase without the CUDA context and the allocator's slack: what the
    /// allocator's in-use counter should read at the run's high point (the number the
    /// calibration compares, `tests/planner_calibration.rs`).
    pub fn tensor_peak_bytes(&self) -> u64 {
        self.tensor_peak_bytes
    }

    /// One phase's live tensors, without the CUDA context and the allocator's slack (0 when
    /// the algorithm has no such phase).
    pub fn tensor_bytes_of(&self, phase: Phase) -> u64 {
        self.phases
            .iter()
            .position(|&x| x == phase)
            .map_or(0, |p| phase_tensor_bytes(&self.terms, &self.totals, p))
    }
}

/// The live tensors of phase `p`: its total without the CUDA context and the allocator's slack.
fn phase_tensor_bytes(terms: &[Term], totals: &[u64], p: usize) -> u64 {
    let fixed: u64 = terms
        .iter()
        .filter(|t| t.name == T_CONTEXT || t.name == T_SLACK)
        .map(|t| t.bytes[p])
        .sum();
    totals[p] - fixed
}

// Term names, in table order.
pub const T_CONTEXT: &str = "cuda context";
pub const T_LINEARS: &str = "base linears";
pub const T_DENSE: &str = "embed/lm_head/norms";
pub const T_STAGING: &str = "quantize staging";
pub const T_REWARD_MODEL: &str = "reward model";
pub const T_ADAPTERS: &str = "lora adapters";
pub const T_GRADS: &str = "lora grads";
pub const T_MOMENTS: &str = "adamw moments";
pub const T_HEADS: &str = "value/score heads";
pub const T_WORKSPACE: &str = "dequant workspace";
pub const T_KV: &str = "kv cache";
pub const T_SAMPLING: &str = "sampling buffers";
pub const T_ROLLOUT: &str = "rollout tensors";
pub const T_KEPT: &str = "activations kept";
pub const T_BLOCK: &str = "block workspace";
pub const T_ATTENTION: &str = "attention scores";
pub const T_LOGITS: &str = "logits";
pub const T_SLACK: &str = "allocator slack";

const TERM_ORDER: [&str; 18] = [
    T_CONTEXT,
    T_LINEARS,
    T_DENSE,
    T_STAGING,
    T_REWARD_MODEL,
    T_ADAPTERS,
    T_GRADS,
    T_MOMENTS,
    T_HEADS,
    T_WORKSPACE,
    T_KV,
    T_SAMPLING,
    T_ROLLOUT,
    T_KEPT,
    T_BLOCK,
    T_ATTENTION,
    T_LOGITS,
    T_SLACK,
];

/// Reads a model's architecture for planning: a model folder (its `config.json`) or a config
/// `.json` file itself.
pub fn read_model_config(path: &Path) -> Result<LlamaConfig> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else if path.extension().is_some_and(|e| e == "json") {
        path.to_path_buf()
    } else {
        bail!(
            "{}: expected a model folder containing config.json or a config .json file",
            path.display()
        );
    };
    LlamaConfig::from_file(&file)
}

/// Plans `algo` for `run` on `model`, including suggestions when it does not fit.
///
/// Reads at most one file: the config of a separate reward checkpoint (`ppo.reward_model_path`).
pub fn plan(run: &RunConfig, model: &LlamaConfig, algo: Algo) -> Result<Plan> {
    check_magnitudes(run, model)?;
    let reward = RewardSource::resolve(run, algo)?;
    let mut p = plan_with(run, model, &reward, algo)?;
    if !p.fits {
        p.suggestions = suggest(run, model, &reward, algo, &p);
    }
    Ok(p)
}

/// Bytes beyond any device (1 PiB). Inputs whose terms reach it are refused before planning,
/// which also keeps every u64 product and sum of the planner far from overflow.
const MAX_PLAN_BYTES: f64 = (1u64 << 50) as f64;

/// Refuses, naming the keys, a model or run whose largest terms (computed in f64, which cannot
/// wrap) exceed [`MAX_PLAN_BYTES`]: `lora.r = 9223372036854775807` must not wrap to "fits".
fn check_magnitudes(run: &RunConfig, m: &LlamaConfig) -> Result<()> {
    let f = |v: usize| v as f64;
    let (h, i, l, v) = (
        f(m.hidden_size),
        f(m.intermediate_size),
        f(m.num_hidden_layers),
        f(m.vocab_size),
    );
    let q = f(m.num_attention_heads) * f(m.head_dim);
    let kv = f(m.num_key_value_heads) * f(m.head_dim);
    let too_big = |bytes: f64| bytes.is_nan() || bytes >= MAX_PLAN_BYTES;
    let weights = 4.0 * (l * (2.0 * h * q + 2.0 * h * kv + 3.0 * h * i) + 2.0 * v * h);
    if too_big(weights) {
        bail!(
            "model config: hidden_size {}, intermediate_size {}, num_hidden_layers {}, vocab_size {} describe more than 1 PiB of weights: the config is corrupt",
            m.hidden_size,
            m.intermediate_size,
            m.num_hidden_layers,
            m.vocab_size
        );
    }
    let r = f(run.lora.r);
    // Adapter, gradient and two AdamW moments in f32, every linear targeted.
    if too_big(16.0 * r * l * (4.0 * h + 2.0 * q + 2.0 * kv + 3.0 * (h + i))) {
        bail!(
            "key `lora.r`: {} makes the adapters larger than 1 PiB: expected a rank well below hidden_size {}",
            run.lora.r,
            m.hidden_size
        );
    }
    let (g, d) = (&run.grpo, &run.data);
    let rows = f(run.train.batch_size) * f(g.num_generations.max(2));
    let tokens = [
        d.max_length,
        d.max_prompt_length.saturating_add(g.max_completion_length),
        d.max_prompt_length.saturating_add(run.ppo.response_length),
        d.max_prompt_length
            .saturating_add(run.generation.max_new_tokens),
    ]
    .into_iter()
    .map(f)
    .fold(0.0, f64::max);
    // Activations and KV cache of every block plus f32 logits and their gradient, per token.
    let per_token = l * (8.0 * (2.0 * h + 3.0 * q + 4.0 * i + 2.0 * kv) + 4.0 * r * 7.0) + 8.0 * v;
    if too_big(rows * tokens * per_token) || too_big(f(run.plan.logits_chunk) * v * 8.0) {
        bail!(
            "keys `train.batch_size` ({}), `grpo.num_generations` ({}), `plan.logits_chunk` ({}) and the sequence lengths (`data.max_length`, `data.max_prompt_length`, `grpo.max_completion_length`, `ppo.response_length`, `generation.max_new_tokens`; longest {} tokens) ask for more than 1 PiB of activations",
            run.train.batch_size,
            g.num_generations,
            run.plan.logits_chunk,
            tokens
        );
    }
    Ok(())
}

/// One line for training commands, printed before weights are loaded.
pub fn summary_line(p: &Plan) -> String {
    let mut s = format!(
        "plan ({}): peak {:.2} GiB in {} of {:.2} GiB budget: ",
        p.algo,
        p.peak_gib(),
        p.peak_phase,
        p.budget_bytes as f64 / GIB
    );
    if p.fits {
        let _ = write!(
            s,
            "fits ({:.2} GiB headroom)",
            (p.budget_bytes - p.peak_bytes) as f64 / GIB
        );
    } else {
        s.push_str("does NOT fit");
        if let Some(first) = p.suggestions.first() {
            let _ = write!(
                s,
                "; e.g. {} -> {:.2} GiB (`rlhf plan` lists all)",
                first.changes.join(", "),
                first.peak_bytes as f64 / GIB
            );
        }
    }
    s
}

/// The table: one row per term, one column per phase (GiB, 2 decimals), the peak column marked
/// with `*`, then the verdict, notes and suggestions.
pub fn render_table(p: &Plan) -> String {
    let m = &p.model;
    let mut out = format!(
        "rlhf plan: {} on a {}-param model ({} layers, hidden {}, vocab {}), weights {}, dtype {}, device {}\n\n",
        p.algo,
        count(m.params),
        m.layers,
        m.hidden_size,
        m.vocab_size,
        m.storage,
        m.dtype,
        m.device
    );
    let name_w = TERM_ORDER.iter().map(|t| t.len()).max().unwrap_or(0).max(5);
    let cols: Vec<String> = p
        .phases
        .iter()
        .map(|&ph| {
            if ph == p.peak_phase {
                format!("*{ph}")
            } else {
                ph.to_string()
            }
        })
        .collect();
    let col_w: Vec<usize> = cols.iter().map(|c| c.len().max(8)).collect();
    let _ = write!(out, "{:<name_w$}", "term");
    for (c, w) in cols.iter().zip(&col_w) {
        let _ = write!(out, "  {c:>w$}");
    }
    out.push_str("  detail\n");
    let cell = |b: u64| {
        if b == 0 {
            "-".to_string()
        } else {
            format!("{:.2}", b as f64 / GIB)
        }
    };
    for t in &p.terms {
        let _ = write!(out, "{:<name_w$}", t.name);
        for (b, w) in t.bytes.iter().zip(&col_w) {
            let _ = write!(out, "  {:>w$}", cell(*b));
        }
        let _ = writeln!(out, "  {}", t.detail);
    }
    let _ = write!(out, "{:<name_w$}", "total");
    for (b, w) in p.totals.iter().zip(&col_w) {
        let _ = write!(out, "  {:>w$}", format!("{:.2}", *b as f64 / GIB));
    }
    let _ = writeln!(out, "  GiB\n");
    let _ = writeln!(out, "verdict: {}", p.verdict);
    if !p.notes.is_empty() {
        out.push_str("notes:\n");
        for n in &p.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    if !p.fits {
        if p.suggestions.is_empty() {
            out.push_str("no change found that makes it fit\n");
        } else {
            out.push_str("changes that fit (each re-planned):\n");
            for s in &p.suggestions {
                let _ = writeln!(
                    out,
                    "  - {}  -> peak {:.2} GiB  ({})",
                    s.changes.join(", "),
                    s.peak_bytes as f64 / GIB,
                    s.why
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "calibration: cuda context {:.2} GiB, slack {:.0}% persistent / {:.0}% of the first {:.0} GiB transient and {:.0}% beyond ({})",
        p.calibration.cuda_context_bytes / GIB,
        p.calibration.slack_persistent * 100.0,
        p.calibration.slack_transient * 100.0,
        p.calibration.slack_transient_knee / GIB,
        p.calibration.slack_transient_beyond * 100.0,
        p.calibration.source
    );
    out
}

/// Where PPO's reward comes from, or GRPO's `reward_model` reward.
#[derive(Debug, Clone)]
enum RewardSource {
    /// Not PPO, and no separate reward model.
    None,
    /// A reward adapter + score head on the shared base.
    Adapter,
    /// A separate checkpoint (NF4 as the base, `model.quantize`); `why_assumed` when its config
    /// could not be read and the base's dims stand in.
    Checkpoint {
        config: Option<Box<LlamaConfig>>,
        path: PathBuf,
        why_assumed: Option<String>,
    },
}
impl RewardSource {
    fn resolve(run: &RunConfig, algo: Algo) -> Result<Self> {
        let checkpoint = |path: &PathBuf, key: &str| {
            // A sequence-classification folder as the engine reads it; a config `.json` file
            // (a causal LM's manifest) stands for one of that shape.
            let read = if path.is_dir() {
                crate::model::reward_model::reward_config(path, key).map(|c| c.0)
            } else {
                read_model_config(path)
            };
            match read {
                Ok(c) => RewardSource::Checkpoint {
                    config: Some(Box::new(c)),
                    path: path.clone(),
                    why_assumed: None,
                },
                Err(e) => RewardSource::Checkpoint {
                    config: None,
                    path: path.clone(),
                    why_assumed: Some(format!("{e:#}")),
                },
            }
        };
        match algo {
            Algo::Ppo => match (&run.ppo.reward_adapter, &run.ppo.reward_model_path) {
                (Some(_), Some(_)) => bail!(
                    "keys `ppo.reward_adapter` and `ppo.reward_model_path`: expected one reward source, got both"
                ),
                (Some(_), None) | (None, None) => Ok(RewardSource::Adapter),
                (None, Some(path)) => Ok(checkpoint(path, "ppo.reward_model_path")),
            },
            Algo::Grpo => Ok(match run.grpo.reward_models()?.first() {
                Some((i, rm)) => checkpoint(&rm.path, &format!("grpo.rewards[{i}].path")),
                None => RewardSource::None,
            }),
            _ => Ok(RewardSource::None),
        }
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassKind {
    /// Prefill `prompt` tokens, then decode `completion` tokens with a KV cache.
    Generate { prompt: u64, completion: u64 },
    /// A forward pass, with autodiff when `grad`.
    Forward { grad: bool },
}
/// One pass over `rows` sequences of `tokens` tokens.
#[derive(Debug, Clone)]
struct Pass {
    label: &'static str,
    kind: PassKind,
    rows: u64,
    tokens: u64,
    /// Tokens per row whose log-probs are needed (0: no lm_head, a value/score head instead).
    logits_tokens: u64,
    /// Runs with the adapters (false for the reference pass).
    lora: bool,
    /// Runs on the separate reward checkpoint instead of the base.
    reward_model: bool,
}
#[derive(Debug, Clone)]
struct Workload {
    /// (role, trainable) of every adapter resident on the base.
    adapters: Vec<(&'static str, bool)>,
    /// (role, trainable) of every head.
    heads: Vec<(&'static str, bool)>,
    /// Phases in order, each with its passes (run one after the other).
    phases: Vec<(Phase, Vec<Pass>)>,
    /// (rows, tokens) of the rollout's per-token tensors, for rollout algorithms.
    rollout: Option<(u64, u64)>,
    notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Not subject to allocator slack (the CUDA context).
    Fixed,
    /// Allocated once, lives across phases.
    Persistent,
    /// Allocated and freed within the phase.
    Transient,
}
#[derive(Debug, Clone)]
struct Item {
    name: &'static str,
    life: Life,
    bytes: u64,
    detail: String,
}
/// Everything `evaluate` needs besides the workload.
struct Setup<'a> {
    run: &'a RunConfig,
    base: &'a LlamaConfig,
    /// The separate reward checkpoint's architecture (the base's when it could not be read).
    reward_model: Option<&'a LlamaConfig>,
    d: u64,
    cuda: bool,
    /// The run is what the CUDA engine executes today (f32 compute on an NF4 base): its
    /// activations, checkpoints and rollout are planned from the engine's own layout, with the
    /// measured constants of [`Calibration`] (`engine_*`); other setups (bf16 compute, dense
    /// base, CPU) use the general formulas above.
    engine: bool,
}

/// "18.72B", "81.79M", "6.14K", "512".
fn count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.2}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// The algorithm a config file is for, from a `sft`/`dpo`/`rm`/`grpo`/`ppo`/`generate` word in its
/// file name (`20b-grpo-24gb.toml` -> grpo). For `rlhf plan` when no `--algo` is given.
pub fn algo_from_file_name(path: &Path) -> Option<Algo> {
    let stem = path.file_stem()?.to_str()?;
    stem.split(['-', '_', '.'])
        .find_map(|w| Algo::ALL.into_iter().find(|a| a.name() == w))
}

#[cfg(test)]
mod tests;
