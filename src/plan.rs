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

use crate::config::{Device, LoraConfig, Quantize, RunConfig};
use crate::model::config::LlamaConfig;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

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
    /// CUDA primary context, cuBLASLt handle and workspace, loaded kernels (bytes).
    pub cuda_context_bytes: f64,
    /// Allocator slack on long-lived buffers (weights, adapters, optimizer state), as a fraction.
    pub slack_persistent: f64,
    /// Allocator slack on per-phase buffers (activations, logits, KV cache): pool rounding and
    /// fragmentation, as a fraction.
    pub slack_transient: f64,
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
    /// one and the next are fitted: `h`-wide f32 values per prompt token alive when the decode
    /// is set up after the prefill (the prefill's last block and hidden states).
    pub engine_prefill: f64,
    /// PPO's training step as a multiple of one pass's checkpoints (policy and value graphs,
    /// rollout buffers); fitted on a single PPO run, so the least certain constant here.
    pub engine_ppo_kept: f64,
}

/// The planner's constants. See [`Calibration`].
pub const CALIBRATION: Calibration = Calibration {
    source: "engine training terms counted from the allocator's live tensors, checked against 11 runs on an H200 (BENCHMARKS.md, sessions 6-7; engine_prefill and engine_ppo_kept fitted); the rest estimates",
    // nvidia-smi minus the allocator's reservation, 0.555-0.578 GiB in the same 11 runs.
    cuda_context_bytes: 0.57 * GIB,
    slack_persistent: 0.02,
    slack_transient: 0.10,
    logits_buffers_train: 3.0,
    logits_buffers_infer: 2.0,
    attention_kept_per_layer: 2.0,
    sampling_buffers: 6.0,
    engine_prefill: 27.5,
    engine_ppo_kept: 2.84,
};

/// Rows of a block's MLP the engine recomputes at once: each `[rows, i]` f32 tensor within
/// `checkpoint::MLP_CHUNK_BOUND`, all rows under LoRA dropout.
fn engine_mlp_rows(n: u64, i: u64, dropout: bool) -> u64 {
    if dropout {
        return n;
    }
    let bound = crate::model::checkpoint::MLP_CHUNK_BOUND as u64;
    let chunks = (n * i * 4).div_ceil(bound).max(1);
    n.div_ceil(chunks)
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
    Dpo,
    Rm,
    Grpo,
    Ppo,
    Generate,
}

impl Algo {
    pub const ALL: [Algo; 5] = [Algo::Dpo, Algo::Rm, Algo::Grpo, Algo::Ppo, Algo::Generate];

    pub fn name(self) -> &'static str {
        match self {
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
                format!("unknown algorithm `{s}`: expected dpo, rm, grpo, ppo or generate")
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
    pub peak_bytes: u64,
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
        (0..self.phases.len())
            .map(|i| {
                let fixed: u64 = self
                    .terms
                    .iter()
                    .filter(|t| t.name == T_CONTEXT || t.name == T_SLACK)
                    .map(|t| t.bytes[i])
                    .sum();
                self.totals[i] - fixed
            })
            .max()
            .unwrap_or(0)
    }
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
        "calibration: cuda context {:.2} GiB, slack {:.0}% persistent / {:.0}% transient ({})",
        p.calibration.cuda_context_bytes / GIB,
        p.calibration.slack_persistent * 100.0,
        p.calibration.slack_transient * 100.0,
        p.calibration.source
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Formulas. Each is a plain function of the shapes so the tests can check it by hand.

/// Bytes of one linear of `n` parameters in NF4 with double quantization (bitsandbytes layout,
/// blocksize 64, absmax re-quantized to 8 bits in blocks of 256 with an fp32 offset). The
/// 16-entry NF4 codebook and the 256-entry absmax code table are shared by all tensors.
pub fn nf4_bytes(n: u64) -> u64 {
    let blocks = n.div_ceil(64);
    n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4
}

/// `(out, in)` of the seven linears of a Llama block, in PEFT's names.
fn linears(m: &LlamaConfig) -> [(&'static str, u64, u64); 7] {
    let shape = |name: &'static str| {
        let (o, i) = m.linear_shape(name).unwrap_or((0, 0));
        (name, o as u64, i as u64)
    };
    [
        shape("q_proj"),
        shape("k_proj"),
        shape("v_proj"),
        shape("o_proj"),
        shape("gate_proj"),
        shape("up_proj"),
        shape("down_proj"),
    ]
}

/// Parameters of the largest linear (the dequant workspace holds one at a time).
fn largest_linear(m: &LlamaConfig) -> u64 {
    linears(m).iter().map(|(_, o, i)| o * i).max().unwrap_or(0)
}

/// Bytes of the base's quantized (or, with `quantize = none`, dense) linears.
pub fn linear_weight_bytes(m: &LlamaConfig, quantize: Quantize, d: u64) -> u64 {
    let per_layer: u64 = linears(m)
        .iter()
        .map(|(_, o, i)| match quantize {
            Quantize::Nf4 => nf4_bytes(o * i),
            Quantize::None => o * i * d,
        })
        .sum();
    per_layer * m.num_hidden_layers as u64
}

/// Parameters kept at the compute dtype: embeddings, lm_head (unless tied), `2L + 1` RMSNorm
/// weights, and q/k/v biases where the architecture has them.
pub fn dense_params(m: &LlamaConfig) -> u64 {
    let (h, l, v) = (
        m.hidden_size as u64,
        m.num_hidden_layers as u64,
        m.vocab_size as u64,
    );
    let heads = if m.tie_word_embeddings { 1 } else { 2 };
    let q = (m.num_attention_heads * m.head_dim) as u64;
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    let bias = if m.attention_bias {
        l * (q + 2 * kv)
    } else {
        0
    };
    heads * v * h + (2 * l + 1) * h + bias
}

/// Parameters of one LoRA adapter: `r x (in + out)` per targeted linear per layer.
pub fn lora_params(m: &LlamaConfig, lora: &LoraConfig) -> u64 {
    lora_params_per_layer(m, lora) * m.num_hidden_layers as u64
}

fn lora_params_per_layer(m: &LlamaConfig, lora: &LoraConfig) -> u64 {
    linears(m)
        .iter()
        .filter(|(name, _, _)| targets(lora, name))
        .map(|(_, o, i)| lora.r as u64 * (o + i))
        .sum()
}

fn targets(lora: &LoraConfig, module: &str) -> bool {
    lora.target_modules.iter().any(|t| t == module)
}

/// Widths of the distinct linear inputs the adapters read (q/k/v share one, gate/up share one).
fn lora_input_widths(m: &LlamaConfig, lora: &LoraConfig) -> Vec<u64> {
    let (h, q, i) = (
        m.hidden_size as u64,
        (m.num_attention_heads * m.head_dim) as u64,
        m.intermediate_size as u64,
    );
    let any = |ms: &[&str]| ms.iter().any(|x| targets(lora, x));
    let mut w = Vec::new();
    if any(&["q_proj", "k_proj", "v_proj"]) {
        w.push(h);
    }
    if any(&["o_proj"]) {
        w.push(q);
    }
    if any(&["gate_proj", "up_proj"]) {
        w.push(h);
    }
    if any(&["down_proj"]) {
        w.push(i);
    }
    w
}

/// Bytes one decoder block keeps for backward per token (the formula in the module docs).
/// `lora = None` for a pass without adapters.
pub fn saved_bytes_per_token(m: &LlamaConfig, lora: Option<&LoraConfig>, d: u64) -> u64 {
    let (h, q, i) = (
        m.hidden_size as u64,
        (m.num_attention_heads * m.head_dim) as u64,
        m.intermediate_size as u64,
    );
    let base = d * (2 * h + 3 * q + 4 * i) + 8;
    let Some(lora) = lora else { return base };
    let inputs: u64 = if lora.dropout > 0.0 {
        linears(m)
            .iter()
            .filter(|(n, _, _)| targets(lora, n))
            .map(|(_, _, inp)| 5 * inp)
            .sum()
    } else {
        lora_input_widths(m, lora).iter().map(|w| 4 * w).sum()
    };
    let n_mod = linears(m)
        .iter()
        .filter(|(n, _, _)| targets(lora, n))
        .count() as u64;
    base + inputs + 4 * lora.r as u64 * n_mod
}

/// Transient bytes per token while one block is back-propagated: gradients of the residual
/// stream and the normed input (`3h`), of the three `i`-wide SwiGLU tensors, and the f32
/// gradient of the widest adapter input.
pub fn backward_bytes_per_token(m: &LlamaConfig, lora: Option<&LoraConfig>, d: u64) -> u64 {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let widest = lora.map_or(0, |l| {
        lora_input_widths(m, l).into_iter().max().unwrap_or(0)
    });
    d * (3 * h + 3 * i) + 4 * widest
}

/// Bytes per token alive inside one block of a gradient-free pass: residual stream, normed
/// input and output (`3h`) plus the larger of attention's q, k, v, output (`4q`, k/v repeated
/// to all heads) and SwiGLU's gate, up, product (`3i`), plus the f32 copy of the widest adapter
/// input.
pub fn inference_bytes_per_token(m: &LlamaConfig, lora: Option<&LoraConfig>, d: u64) -> u64 {
    let (h, q, i) = (
        m.hidden_size as u64,
        (m.num_attention_heads * m.head_dim) as u64,
        m.intermediate_size as u64,
    );
    let widest = lora.map_or(0, |l| {
        lora_input_widths(m, l).into_iter().max().unwrap_or(0)
    });
    d * (3 * h + (4 * q).max(3 * i)) + 4 * widest
}

/// KV cache bytes: `2 x L x kv_heads x head_dim x tokens x rows x d`.
pub fn kv_cache_bytes(m: &LlamaConfig, tokens: u64, rows: u64, d: u64) -> u64 {
    2 * (m.num_hidden_layers * m.num_key_value_heads * m.head_dim) as u64 * tokens * rows * d
}

// ---------------------------------------------------------------------------------------------
// What each algorithm runs.

/// Where PPO's reward comes from.
#[derive(Debug, Clone)]
enum RewardSource {
    /// Not PPO.
    None,
    /// A reward adapter + score head on the shared base.
    Adapter,
    /// A separate 4-bit checkpoint; `assumed` when its config could not be read and the base's
    /// dims stand in.
    Checkpoint {
        config: Option<Box<LlamaConfig>>,
        path: PathBuf,
        why_assumed: Option<String>,
    },
}

impl RewardSource {
    fn resolve(run: &RunConfig, algo: Algo) -> Result<Self> {
        if algo != Algo::Ppo {
            return Ok(RewardSource::None);
        }
        match (&run.ppo.reward_adapter, &run.ppo.reward_model_path) {
            (Some(_), Some(_)) => bail!(
                "keys `ppo.reward_adapter` and `ppo.reward_model_path`: expected one reward source, got both"
            ),
            (Some(_), None) | (None, None) => Ok(RewardSource::Adapter),
            (None, Some(path)) => Ok(match read_model_config(path) {
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
            }),
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

fn check_len(m: &LlamaConfig, total: usize, key: &str, what: &str) -> Result<()> {
    if total > m.max_position_embeddings && m.rope_scaling.is_none() {
        bail!(
            "key `{key}`: {what} = {total} tokens exceeds the model's max_position_embeddings {} (its config has no rope_scaling)",
            m.max_position_embeddings
        );
    }
    Ok(())
}

fn positive(v: usize, key: &str) -> Result<u64> {
    if v == 0 {
        bail!("key `{key}`: expected a positive integer, got 0");
    }
    Ok(v as u64)
}

fn workload(
    run: &RunConfig,
    m: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
) -> Result<Workload> {
    run.validate()?;
    let b = positive(run.train.batch_size, "train.batch_size")?;
    if algo.trains() && run.lora.target_modules.is_empty() {
        bail!("key `lora.target_modules`: expected at least one module to train");
    }
    let fwd = |label, rows, tokens, logits_tokens, lora, grad| Pass {
        label,
        kind: PassKind::Forward { grad },
        rows,
        tokens,
        logits_tokens,
        lora,
        reward_model: false,
    };
    let mut notes = Vec::new();
    let w = match algo {
        Algo::Dpo | Algo::Rm => {
            let t = positive(run.data.max_length, "data.max_length")?;
            check_len(m, run.data.max_length, "data.max_length", "data.max_length")?;
            // Chosen and rejected of every pair go through together.
            let rows = 2 * b;
            if algo == Algo::Dpo {
                notes.push(format!(
                    "dpo: {b} pairs = {rows} sequences of {t} tokens; the reference pass (adapter off, no grads) runs before the policy's"
                ));
                Workload {
                    adapters: vec![("policy", true)],
                    heads: vec![],
                    phases: vec![
                        (Phase::Load, vec![]),
                        (
                            Phase::Scoring,
                            vec![fwd("reference", rows, t, t, false, false)],
                        ),
                        (
                            Phase::TrainStep,
                            vec![fwd("policy", rows, t, t, true, true)],
                        ),
                    ],
                    rollout: None,
                    notes,
                }
            } else {
                notes.push(format!(
                    "rm: {b} pairs = {rows} sequences of {t} tokens through the reward adapter and score head (no lm_head)"
                ));
                Workload {
                    adapters: vec![("reward", true)],
                    heads: vec![("score", true)],
                    phases: vec![
                        (Phase::Load, vec![]),
                        (
                            Phase::TrainStep,
                            vec![fwd("reward", rows, t, 0, true, true)],
                        ),
                    ],
                    rollout: None,
                    notes,
                }
            }
        }
        Algo::Grpo => {
            let g = run.grpo.num_generations as u64;
            if !b.is_multiple_of(g) {
                bail!(
                    "key `train.batch_size`: expected a multiple of `grpo.num_generations` ({g}) so every prompt's group is whole, got {b}"
                );
            }
            let p = positive(run.data.max_prompt_length, "data.max_prompt_length")?;
            let c = positive(run.grpo.max_completion_length, "grpo.max_completion_length")?;
            check_len(
                m,
                (p + c) as usize,
                "grpo.max_completion_length",
                "data.max_prompt_length + grpo.max_completion_length",
            )?;
            let mut scoring = Vec::new();
            if run.grpo.beta > 0.0 {
                scoring.push(fwd("reference", b, p + c, c, false, false));
            }
            if run.grpo.num_iterations > 1 {
                scoring.push(fwd("old policy", b, p + c, c, true, false));
            }
            let mut phases = vec![
                (Phase::Load, vec![]),
                (Phase::Rollout, vec![generate_pass(b, p, c)]),
            ];
            if !scoring.is_empty() {
                phases.push((Phase::Scoring, scoring));
            }
            phases.push((
                Phase::TrainStep,
                vec![fwd("policy", b, p + c, c, true, true)],
            ));
            notes.push(format!(
                "grpo: {b} completions per micro-batch = {} prompt(s) x {g} generations, {p} prompt + {c} completion tokens; logits over completion tokens only",
                b / g
            ));
            Workload {
                adapters: vec![("policy", true)],
                heads: vec![],
                phases,
                rollout: Some((b, p + c)),
                notes,
            }
        }
        Algo::Ppo => {
            let p = positive(run.data.max_prompt_length, "data.max_prompt_length")?;
            let c = positive(run.ppo.response_length, "ppo.response_length")?;
            check_len(
                m,
                (p + c) as usize,
                "ppo.response_length",
                "data.max_prompt_length + ppo.response_length",
            )?;
            let mut adapters = vec![("policy", true), ("value", true)];
            let mut heads = vec![("value", true)];
            let mut reward_pass = fwd("reward", b, p + c, 0, true, false);
            match reward {
                RewardSource::Checkpoint {
                    path, why_assumed, ..
                } => {
                    reward_pass.lora = false;
                    reward_pass.reward_model = true;
                    match why_assumed {
                        None => notes.push(format!(
                            "ppo: separate 4-bit reward checkpoint {} resident in every phase",
                            path.display()
                        )),
                        Some(e) => notes.push(format!(
                            "ppo: could not read the reward checkpoint's config ({e}); assuming the base model's dims"
                        )),
                    }
                }
                _ => {
                    adapters.push(("reward", false));
                    heads.push(("score", false));
                    if run.ppo.reward_adapter.is_none() {
                        notes.push(
                            "ppo: no reward source configured; assuming a reward adapter shaped like [lora]".into(),
                        );
                    }
                }
            }
            notes.push(format!(
                "ppo: {b} rollouts of {p} prompt + {c} response tokens; policy and value losses are back-propagated one after the other (disjoint adapters)"
            ));
            Workload {
                adapters,
                heads,
                phases: vec![
                    (Phase::Load, vec![]),
                    (Phase::Rollout, vec![generate_pass(b, p, c)]),
                    (
                        Phase::Scoring,
                        vec![
                            fwd("old policy", b, p + c, c, true, false),
                            fwd("reference", b, p + c, c, false, false),
                            fwd("value", b, p + c, 0, true, false),
                            reward_pass,
                        ],
                    ),
                    (
                        Phase::TrainStep,
                        vec![
                            fwd("policy", b, p + c, c, true, true),
                            fwd("value", b, p + c, 0, true, true),
                        ],
                    ),
                ],
                rollout: Some((b, p + c)),
                notes,
            }
        }
        Algo::Generate => {
            let p = positive(run.data.max_prompt_length, "data.max_prompt_length")?;
            let c = positive(run.generation.max_new_tokens, "generation.max_new_tokens")?;
            check_len(
                m,
                (p + c) as usize,
                "generation.max_new_tokens",
                "data.max_prompt_length + generation.max_new_tokens",
            )?;
            notes.push(format!(
                "generate: {b} rows of {p} prompt + {c} new tokens, adapter loaded"
            ));
            Workload {
                adapters: vec![("policy", false)],
                heads: vec![],
                phases: vec![
                    (Phase::Load, vec![]),
                    (Phase::Rollout, vec![generate_pass(b, p, c)]),
                ],
                rollout: None,
                notes,
            }
        }
    };
    Ok(w)
}

fn generate_pass(rows: u64, prompt: u64, completion: u64) -> Pass {
    Pass {
        label: "generate",
        kind: PassKind::Generate { prompt, completion },
        rows,
        tokens: prompt + completion,
        logits_tokens: 0,
        lora: true,
        reward_model: false,
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation: what is alive in each phase.

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

fn item(name: &'static str, life: Life, bytes: u64, detail: String) -> Item {
    Item {
        name,
        life,
        bytes,
        detail,
    }
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

fn plan_with(
    run: &RunConfig,
    model: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
) -> Result<Plan> {
    let w = workload(run, model, reward, algo)?;
    Ok(evaluate(run, model, reward, algo, w))
}

/// Sums what is alive in each phase of `w`.
fn evaluate(
    run: &RunConfig,
    model: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
    w: Workload,
) -> Plan {
    let reward_model = match reward {
        RewardSource::Checkpoint { config, .. } => Some(config.as_deref().unwrap_or(model)),
        _ => None,
    };
    let s = Setup {
        run,
        base: model,
        reward_model,
        d: run.model.dtype.bytes() as u64,
        cuda: run.model.device == Device::Cuda,
        engine: run.model.device == Device::Cuda
            && run.model.dtype == crate::config::Dtype::F32
            && run.model.quantize == Quantize::Nf4,
    };
    let per_phase: Vec<(Phase, Vec<Item>)> = w
        .phases
        .iter()
        .map(|(ph, passes)| (*ph, phase_items(&s, &w, *ph, passes)))
        .collect();
    assemble(&s, algo, w.notes, per_phase)
}

fn phase_items(s: &Setup, w: &Workload, phase: Phase, passes: &[Pass]) -> Vec<Item> {
    let (run, m, d) = (s.run, s.base, s.d);
    let l = m.num_hidden_layers as u64;
    let cal = &CALIBRATION;
    let mut items = Vec::new();
    if s.cuda {
        items.push(item(
            T_CONTEXT,
            Life::Fixed,
            cal.cuda_context_bytes as u64,
            "CALIBRATION.cuda_context_bytes".into(),
        ));
    }
    // Base weights.
    let lin_params = m.block_linear_params() as u64 * l;
    let (lin_bytes, lin_detail) = match run.model.quantize {
        Quantize::Nf4 => {
            let b = linear_weight_bytes(m, Quantize::Nf4, d);
            (
                b,
                format!(
                    "{l} layers x 7 linears = {} params in nf4+dq ({:.3} bits/param)",
                    count(lin_params),
                    b as f64 * 8.0 / lin_params as f64
                ),
            )
        }
        Quantize::None => (
            linear_weight_bytes(m, Quantize::None, d),
            format!("{} params x {d} B (quantize = none)", count(lin_params)),
        ),
    };
    items.push(item(T_LINEARS, Life::Persistent, lin_bytes, lin_detail));
    let dense = dense_params(m);
    let norms = (2 * l + 1) * m.hidden_size as u64;
    // The engine keeps frozen embedding tables in bf16 on CUDA (`quant::dense_at_rest`).
    let dense_bytes = if s.engine {
        (dense - norms) * 2 + norms * 4
    } else {
        dense * d
    };
    items.push(item(
        T_DENSE,
        Life::Persistent,
        dense_bytes,
        format!(
            "{} params x {} B (embeddings{}, {} norms)",
            count(dense),
            if s.engine {
                "2 (4 for norms)".to_string()
            } else {
                d.to_string()
            },
            if m.tie_word_embeddings {
                ", lm_head tied"
            } else {
                " + lm_head"
            },
            2 * l + 1
        ),
    ));
    if phase == Phase::Load && run.model.quantize == Quantize::Nf4 {
        let n = largest_linear(m);
        items.push(item(
            T_STAGING,
            Life::Transient,
            4 * n,
            format!(
                "largest linear {} params x 4 B (f32 while quantized)",
                count(n)
            ),
        ));
    }
    if let Some(rm) = s.reward_model {
        let lin = linear_weight_bytes(rm, Quantize::Nf4, d);
        // A sequence-classification model: embeddings, norms, a 1-wide score head; no lm_head.
        let dense = (rm.vocab_size * rm.hidden_size
            + (2 * rm.num_hidden_layers + 2) * rm.hidden_size) as u64;
        items.push(item(
            T_REWARD_MODEL,
            Life::Persistent,
            lin + dense * d,
            format!(
                "separate checkpoint: {} linear params nf4+dq + {} params x {d} B",
                count(rm.block_linear_params() as u64 * rm.num_hidden_layers as u64),
                count(dense)
            ),
        ));
    }
    // Adapters, their gradients and optimizer state.
    let per_adapter = lora_params(m, &run.lora);
    let n_adapters = w.adapters.len() as u64;
    let trainable = w.adapters.iter().filter(|a| a.1).count() as u64;
    let roles: Vec<&str> = w.adapters.iter().map(|a| a.0).collect();
    items.push(item(
        T_ADAPTERS,
        Life::Persistent,
        n_adapters * per_adapter * 4,
        format!(
            "{n_adapters} x {} params x 4 B ({}; r = {})",
            count(per_adapter),
            roles.join(", "),
            run.lora.r
        ),
    ));
    let accumulating = run.train.gradient_accumulation_steps > 1;
    // The engine creates adapter gradients layer by layer in backward while it releases the
    // checkpoints; none exist yet at its measured high points (logits pass, top block).
    let grads_alive = trainable > 0
        && (!s.engine || accumulating)
        && (phase == Phase::TrainStep || (phase != Phase::Load && accumulating));
    if grads_alive {
        items.push(item(
            T_GRADS,
            Life::Persistent,
            trainable * per_adapter * 4,
            format!(
                "{trainable} x {} params x 4 B{}",
                count(per_adapter),
                if accumulating && phase != Phase::TrainStep {
                    " (accumulated across micro-batches)"
                } else {
                    ""
                }
            ),
        ));
    }
    let paged = run.optimizer.paged;
    if trainable > 0 && phase != Phase::Load {
        if !paged {
            items.push(item(
                T_MOMENTS,
                Life::Persistent,
                2 * trainable * per_adapter * 4,
                format!("2 x {trainable} x {} params x 4 B", count(per_adapter)),
            ));
        } else if phase == Phase::TrainStep {
            let group = lora_params_per_layer(m, &run.lora);
            items.push(item(
                T_MOMENTS,
                Life::Transient,
                2 * group * 4,
                format!(
                    "paged: one group (one layer of one adapter) = 2 x {} params x 4 B on the GPU",
                    count(group)
                ),
            ));
        }
    }
    if !w.heads.is_empty() {
        let h = m.hidden_size as u64 + 1;
        let n = w.heads.len() as u64;
        let t = w.heads.iter().filter(|x| x.1).count() as u64;
        let mut copies = n;
        if grads_alive {
            copies += t;
        }
        if phase != Phase::Load && !paged {
            copies += 2 * t;
        }
        let names: Vec<&str> = w.heads.iter().map(|x| x.0).collect();
        items.push(item(
            T_HEADS,
            Life::Persistent,
            copies * h * 4,
            format!(
                "{copies} x {h} x 4 B ({}: params, grads, moments)",
                names.join(", ")
            ),
        ));
    }
    if !passes.is_empty() && run.model.quantize == Quantize::Nf4 && !s.engine {
        let n = largest_linear(m).max(s.reward_model.map_or(0, largest_linear));
        items.push(item(
            T_WORKSPACE,
            Life::Transient,
            n * d,
            format!("largest linear {} params x {d} B", count(n)),
        ));
    }
    if let Some((rows, tokens)) = w.rollout {
        if phase != Phase::Load {
            items.push(item(
                T_ROLLOUT,
                Life::Transient,
                rows * tokens * ROLLOUT_BYTES_PER_TOKEN,
                format!("{rows} rows x {tokens} tokens x {ROLLOUT_BYTES_PER_TOKEN} B"),
            ));
        }
    }
    // Passes run one after the other: keep the one with the largest working set.
    let grad_passes = passes
        .iter()
        .filter(|p| p.kind == PassKind::Forward { grad: true })
        .count();
    let graphs = if s.engine && grad_passes > 1 {
        cal.engine_ppo_kept
    } else {
        1.0
    };
    let heaviest = passes
        .iter()
        .map(|p| pass_items(s, p, graphs))
        .max_by_key(|v| v.iter().map(|i| i.bytes).sum::<u64>());
    if let Some(v) = heaviest {
        items.extend(v);
    }
    let sum = |life: Life| {
        items
            .iter()
            .filter(|i| i.life == life)
            .map(|i| i.bytes)
            .sum::<u64>()
    };
    let (pers, trans) = (sum(Life::Persistent), sum(Life::Transient));
    items.push(item(
        T_SLACK,
        Life::Fixed,
        (pers as f64 * cal.slack_persistent + trans as f64 * cal.slack_transient) as u64,
        format!(
            "{:.0}% of {:.2} GiB persistent + {:.0}% of {:.2} GiB transient",
            cal.slack_persistent * 100.0,
            pers as f64 / GIB,
            cal.slack_transient * 100.0,
            trans as f64 / GIB
        ),
    ));
    items
}

/// The working set of one pass: KV cache and sampling (generation), kept activations, the
/// block being processed, attention scores and logits. `graphs`: how many passes' checkpoints
/// a training step holds at once (PPO's policy and value, [`Calibration::engine_ppo_kept`]).
fn pass_items(s: &Setup, p: &Pass, graphs: f64) -> Vec<Item> {
    let m = if p.reward_model {
        s.reward_model.unwrap_or(s.base)
    } else {
        s.base
    };
    let d = s.d;
    let cal = &CALIBRATION;
    let lora = p.lora.then_some(&s.run.lora);
    let (l, h, a, v) = (
        m.num_hidden_layers as u64,
        m.hidden_size as u64,
        m.num_attention_heads as u64,
        m.vocab_size as u64,
    );
    let (r, t) = (p.rows, p.tokens);
    let n = r * t;
    let tag = |s: String| format!("{s} [{}]", p.label);
    let mut items = Vec::new();
    let logits = |buffers: f64| {
        let want = r * p.logits_tokens;
        let rows = logits_rows(s.run, want);
        let detail = if rows < want {
            format!(
                "chunk of {rows} of {r} x {} tokens, x {v} x 4 B x {buffers} buffers",
                p.logits_tokens
            )
        } else {
            format!(
                "{r} x {} tokens x {v} x 4 B x {buffers} buffers",
                p.logits_tokens
            )
        };
        (((rows * v * 4) as f64 * buffers) as u64, detail)
    };
    if s.engine {
        if let Some(v) = engine_pass_items(s, m, p, graphs) {
            return v;
        }
    }
    match p.kind {
        PassKind::Generate { prompt, completion } => {
            items.push(item(
                T_KV,
                Life::Transient,
                kv_cache_bytes(m, prompt + completion, r, d),
                tag(format!(
                    "2 x {l} layers x {} kv heads x {} x {} tokens x {r} rows x {d} B",
                    m.num_key_value_heads,
                    m.head_dim,
                    prompt + completion
                )),
            ));
            items.push(item(
                T_SAMPLING,
                Life::Transient,
                (r as f64 * v as f64 * 4.0 * cal.sampling_buffers) as u64,
                tag(format!("{} x [{r}, {v}] x 4 B", cal.sampling_buffers)),
            ));
            let per_tok = inference_bytes_per_token(m, lora, d);
            let prefill = per_tok * r * prompt;
            // One decode step: one token per row, attention over the whole cache in f32.
            let decode = r * (per_tok + a * t * 4);
            items.push(item(
                T_BLOCK,
                Life::Transient,
                prefill.max(decode),
                tag(format!(
                    "prefill: {per_tok} B/token x {r} x {prompt} tokens"
                )),
            ));
            items.push(item(
                T_ATTENTION,
                Life::Transient,
                2 * r * a * prompt * prompt * d,
                tag(format!(
                    "prefill: 2 x [{r}, {a}, {prompt}, {prompt}] x {d} B (scores and probabilities, no flash kernel)"
                )),
            ));
        }
        PassKind::Forward { grad: false } => {
            let per_tok = inference_bytes_per_token(m, lora, d);
            items.push(item(
                T_BLOCK,
                Life::Transient,
                per_tok * n,
                tag(format!("{per_tok} B/token x {r} x {t} tokens")),
            ));
            items.push(item(
                T_ATTENTION,
                Life::Transient,
                2 * r * a * t * t * d,
                tag(format!(
                    "2 x [{r}, {a}, {t}, {t}] x {d} B (scores and probabilities, no flash kernel)"
                )),
            ));
            if p.logits_tokens > 0 {
                let (b, detail) = logits(cal.logits_buffers_infer);
                items.push(item(T_LOGITS, Life::Transient, b, tag(detail)));
            }
        }
        PassKind::Forward { grad: true } => {
            let saved = saved_bytes_per_token(m, lora, d);
            let bwd = backward_bytes_per_token(m, lora, d);
            let ak = cal.attention_kept_per_layer;
            let scores = r * a * t * t * d;
            if s.run.train.gradient_checkpointing {
                items.push(item(
                    T_KEPT,
                    Life::Transient,
                    l * h * d * n,
                    tag(format!(
                        "checkpointed: {l} layers x {h} x {d} B x {r} x {t} tokens"
                    )),
                ));
                items.push(item(
                    T_BLOCK,
                    Life::Transient,
                    (saved + bwd) * n,
                    tag(format!(
                        "one block recomputed ({saved} B/token) + backward ({bwd} B/token) x {r} x {t} tokens"
                    )),
                ));
                items.push(item(
                    T_ATTENTION,
                    Life::Transient,
                    ((ak + 2.0) * scores as f64) as u64,
                    tag(format!(
                        "({ak} kept + 2 grads) x [{r}, {a}, {t}, {t}] x {d} B, one layer"
                    )),
                ));
            } else {
                items.push(item(
                    T_KEPT,
                    Life::Transient,
                    l * saved * n,
                    tag(format!("{l} layers x {saved} B/token x {r} x {t} tokens")),
                ));
                items.push(item(
                    T_BLOCK,
                    Life::Transient,
                    bwd * n,
                    tag(format!("backward {bwd} B/token x {r} x {t} tokens")),
                ));
                items.push(item(
                    T_ATTENTION,
                    Life::Transient,
                    ((l as f64 * ak + 2.0) * scores as f64) as u64,
                    tag(format!(
                        "({l} x {ak} kept + 2 grads) x [{r}, {a}, {t}, {t}] x {d} B"
                    )),
                ));
            }
            if p.logits_tokens > 0 {
                let (b, detail) = logits(cal.logits_buffers_train);
                items.push(item(T_LOGITS, Life::Transient, b, tag(detail)));
            }
        }
    }
    items
}

/// [`pass_items`] for the CUDA engine ([`Setup::engine`]): generation (fused decode after an
/// ordinary prefill), checkpointed training passes and passes without gradients, in the
/// engine's layout with the measured `engine_*` constants. `None` for training without
/// checkpointing (the general formulas).
fn engine_pass_items(s: &Setup, m: &LlamaConfig, p: &Pass, graphs: f64) -> Option<Vec<Item>> {
    let cal = &CALIBRATION;
    let (l, h, a, v, i) = (
        m.num_hidden_layers as u64,
        m.hidden_size as u64,
        m.num_attention_heads as u64,
        m.vocab_size as u64,
        m.intermediate_size as u64,
    );
    let kv = (m.num_key_value_heads * m.head_dim) as u64;
    let (r, t) = (p.rows, p.tokens);
    let n = r * t;
    let tag = |s: String| format!("{s} [{}]", p.label);
    // The high points of a pass, counted from the allocator's live tensors at each labelled
    // point (BENCHMARKS.md, session 7); all f32 (4 B) unless said. `[N, h]` and `[N, kv]` are
    // activations over all N = rows x tokens, `[r, T, T]` the mask bias made once per forward.
    let nh = n * h * 4;
    let nkv = n * kv * 4;
    let mask = r * t * t * 4;
    // Logits pass: one `[chunk, V]` log-softmax beside the final hidden states shifted by one
    // token and their gradient.
    let chunk = logits_rows(s.run, r * p.logits_tokens);
    let logits = chunk * v * 4 + 2 * nh;
    // Attention backward of a recomputed block: four `[N, h]` and five `[N, kv]` (the trace's
    // attention side and the gradients in flight, as the allocator listed them), the mask bias
    // and the recomputed probabilities `[r, a, T, T]`.
    let attention = 4 * nh + 5 * nkv + mask + r * a * t * t * 4;
    let mut items = Vec::new();
    match p.kind {
        PassKind::Generate { prompt, completion } => {
            let prefill = 2 * l * kv * prompt * r * 4;
            let decode = 2 * l * kv * (prompt + completion) * r * 2;
            items.push(item(
                T_KV,
                Life::Transient,
                prefill + decode,
                tag(format!(
                    "prefill's f32 cache ({prompt} tokens) + the decode's bf16 copy ({} tokens): 2 x {l} layers x {kv} x {r} rows",
                    prompt + completion
                )),
            ));
            let work = 2 * i * h * 2 + (cal.engine_prefill * (r * prompt * h * 4) as f64) as u64;
            items.push(item(
                T_BLOCK,
                Life::Transient,
                work,
                tag(format!(
                    "decode's gate/up dequant workspace 2 x {i} x {h} x 2 B + {} x [{r} x {prompt}, {h}] x 4 B after the prefill",
                    cal.engine_prefill
                )),
            ));
        }
        PassKind::Forward { grad: true } if s.run.train.gradient_checkpointing => {
            let kept = ((l * n * h * 2 + n * h * 4) as f64 * graphs) as u64;
            items.push(item(
                T_KEPT,
                Life::Transient,
                kept,
                tag(format!(
                    "checkpoints {l} x [{n}, {h}] x 2 B (bf16) + final hidden [{n}, {h}] x 4 B{}",
                    if graphs > 1.0 {
                        format!(", x {graphs} (policy and value graphs)")
                    } else {
                        String::new()
                    }
                )),
            ));
            // MLP backward of a recomputed block, one row chunk at a time: the block's trace
            // (six `[N, h]`, two `[N, kv]`, the mask bias), the input gradient gathered over all
            // rows `[N, h]`, and the chunk's gate and up `[c, i]` with its input `[c, h]`.
            let c = engine_mlp_rows(n, i, s.run.lora.dropout > 0.0);
            let mlp = 7 * nh + 2 * nkv + mask + 2 * c * i * 4 + c * h * 4;
            let (bytes, what) = [
                (logits, "logits pass"),
                (mlp, "MLP backward"),
                (attention, "attention backward"),
            ]
            .into_iter()
            .max_by_key(|(b, _)| *b)
            .expect("three candidates");
            items.push(item(
                T_BLOCK,
                Life::Transient,
                bytes,
                tag(format!(
                    "{what}, the largest of: logits ([{chunk}, {v}] + 2 x [{n}, {h}], {:.2} GiB), MLP backward (7 x [{n}, {h}] + 2 x [{n}, {kv}] + [{r}, {t}, {t}] + 2 x [{c}, {i}] + [{c}, {h}], {:.2} GiB), attention backward (4 x [{n}, {h}] + 5 x [{n}, {kv}] + [{r}, {t}, {t}] + [{r}, {a}, {t}, {t}], {:.2} GiB), f32",
                    logits as f64 / GIB,
                    mlp as f64 / GIB,
                    attention as f64 / GIB
                )),
            ));
        }
        PassKind::Forward { grad: false } => {
            // Not a high point of the calibration runs (they peak in training): the attention
            // as in training, the MLP forward over all rows, no checkpoints.
            let logits = if p.logits_tokens > 0 { logits } else { 0 };
            let mlp = n * (3 * h + 3 * i) * 4;
            items.push(item(
                T_BLOCK,
                Life::Transient,
                logits.max(attention).max(mlp),
                tag(format!(
                    "the largest of logits ([{chunk}, {v}] + 2 x [{n}, {h}] f32), one block's attention (as in training) and its MLP ([{n}, 3 x {h} + 3 x {i}] f32), no grads"
                )),
            ));
        }
        _ => return None,
    }
    Some(items)
}

fn assemble(
    s: &Setup,
    algo: Algo,
    mut notes: Vec<String>,
    per_phase: Vec<(Phase, Vec<Item>)>,
) -> Plan {
    let run = s.run;
    let m = s.base;
    let phases: Vec<Phase> = per_phase.iter().map(|(p, _)| *p).collect();
    let totals: Vec<u64> = per_phase
        .iter()
        .map(|(_, items)| items.iter().map(|i| i.bytes).sum())
        .collect();
    let (peak_idx, &peak_bytes) = totals
        .iter()
        .enumerate()
        .max_by_key(|(i, b)| (**b, std::cmp::Reverse(*i)))
        .expect("every algorithm has a load phase");
    let peak_phase = phases[peak_idx];
    let mut terms = Vec::new();
    for name in TERM_ORDER {
        let bytes: Vec<u64> = per_phase
            .iter()
            .map(|(_, items)| items.iter().find(|i| i.name == name).map_or(0, |i| i.bytes))
            .collect();
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        // Describe the term where it matters most: the peak phase, else where it is largest.
        let at = if bytes[peak_idx] > 0 {
            peak_idx
        } else {
            (0..bytes.len()).max_by_key(|&i| bytes[i]).unwrap_or(0)
        };
        let detail = per_phase[at]
            .1
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.detail.clone())
            .unwrap_or_default();
        terms.push(Term {
            name,
            detail,
            bytes,
        });
    }
    let budget_bytes = (run.plan.budget_gib * GIB) as u64;
    let fits = peak_bytes <= budget_bytes;
    let verdict = if fits {
        format!(
            "fits: peak {:.2} GiB in {peak_phase} <= budget {:.2} GiB ({:.2} GiB headroom)",
            peak_bytes as f64 / GIB,
            run.plan.budget_gib,
            (budget_bytes - peak_bytes) as f64 / GIB
        )
    } else {
        format!(
            "does not fit: peak {:.2} GiB in {peak_phase} > budget {:.2} GiB (over by {:.2} GiB)",
            peak_bytes as f64 / GIB,
            run.plan.budget_gib,
            (peak_bytes - budget_bytes) as f64 / GIB
        )
    };
    if phases.contains(&Phase::TrainStep) {
        if s.cuda {
            notes.push("cuda: the allocator (cubecl) reserves pages of up to a quarter of the card's memory: on an H200 cubecl reserved 1.55-2.7x the measured tensor peak, and nvidia-smi read that + 0.57 GiB, in training runs (BENCHMARKS.md, planner vs measured); the slack here is not that reservation; the patched allocator gives its cached pages back and retries when the card is full (tested on a simulated device, not yet on a small card)".into());
        }
        notes.push(if run.train.gradient_checkpointing {
            "gradient checkpointing at block level: each layer keeps its input, one block is recomputed in backward (model::checkpoint)".into()
        } else {
            "no gradient checkpointing: every layer keeps its activations until backward".into()
        });
        notes.push("attention is the decomposed form everywhere ([rows, heads, T, T] scores), not a flash kernel".into());
    }
    if !s.cuda {
        notes.push("device = cpu: no CUDA context; the budget is compared with host memory".into());
    }
    if run.model.dtype != crate::config::Dtype::F32 {
        notes.push(format!(
            "model.dtype = {:?} is planned here, but the engine computes in f32 today: training commands check the f32 plan (set model.dtype = \"f32\" to see it)",
            run.model.dtype
        ));
    }
    let quantized_params = match run.model.quantize {
        Quantize::Nf4 => (m.block_linear_params() * m.num_hidden_layers) as u64,
        Quantize::None => 0,
    };
    Plan {
        algo,
        model: ModelSummary {
            params: (m.block_linear_params() * m.num_hidden_layers) as u64 + dense_params(m),
            quantized_params,
            layers: m.num_hidden_layers,
            hidden_size: m.hidden_size,
            vocab_size: m.vocab_size,
            storage: match run.model.quantize {
                Quantize::Nf4 => "nf4+dq",
                Quantize::None => "dense",
            },
            dtype: match run.model.dtype {
                crate::config::Dtype::F32 => "f32",
                crate::config::Dtype::Bf16 => "bf16",
                crate::config::Dtype::F16 => "f16",
            },
            device: if s.cuda { "cuda" } else { "cpu" },
        },
        phases,
        terms,
        totals,
        peak_phase,
        peak_bytes,
        budget_bytes,
        fits,
        verdict,
        notes,
        suggestions: Vec::new(),
        calibration: CALIBRATION,
    }
}

// ---------------------------------------------------------------------------------------------
// Suggestions: re-plan variants of the config and keep the ones that fit.

/// Largest `x` in `[lo, hi]` with `ok(x)`, for `ok` true up to some point and false after.
fn largest(lo: u64, hi: u64, mut ok: impl FnMut(u64) -> bool) -> Option<u64> {
    if lo > hi || !ok(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi + 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

/// The length a suggestion may shorten, per algorithm: (key, current value).
fn length_key(run: &RunConfig, algo: Algo) -> (&'static str, usize) {
    match algo {
        Algo::Dpo | Algo::Rm => ("data.max_length", run.data.max_length),
        Algo::Grpo => ("grpo.max_completion_length", run.grpo.max_completion_length),
        Algo::Ppo => ("ppo.response_length", run.ppo.response_length),
        Algo::Generate => ("generation.max_new_tokens", run.generation.max_new_tokens),
    }
}

fn set_length(run: &mut RunConfig, algo: Algo, v: usize) -> Vec<String> {
    let mut changes = vec![format!("{} = {v}", length_key(run, algo).0)];
    match algo {
        Algo::Dpo | Algo::Rm => {
            run.data.max_length = v;
            if run.data.max_prompt_length > v {
                run.data.max_prompt_length = v;
                changes.push(format!("data.max_prompt_length = {v}"));
            }
        }
        Algo::Grpo => run.grpo.max_completion_length = v,
        Algo::Ppo => run.ppo.response_length = v,
        Algo::Generate => run.generation.max_new_tokens = v,
    }
    changes
}

/// The config with the largest length below the current one that fits, and its changes.
/// Lengths under `floor` are not worth offering (`None`).
fn longest(
    base: &RunConfig,
    algo: Algo,
    floor: u64,
    fits: &dyn Fn(&RunConfig) -> bool,
) -> Option<(RunConfig, Vec<String>)> {
    let with_len = |v: u64| {
        let mut c = base.clone();
        let ch = set_length(&mut c, algo, v as usize);
        (c, ch)
    };
    let now = length_key(base, algo).1 as u64;
    let v = largest(floor.max(1), now.saturating_sub(1), |v| {
        fits(&with_len(v).0)
    })?;
    Some(with_len(round_len(v)))
}

/// Rounds a length down to a multiple of 32 once it is long enough for that to read better.
fn round_len(v: u64) -> u64 {
    if v >= 64 {
        v / 32 * 32
    } else {
        v
    }
}

fn suggest(
    run: &RunConfig,
    model: &LlamaConfig,
    reward: &RewardSource,
    algo: Algo,
    current: &Plan,
) -> Vec<Suggestion> {
    let budget = current.budget_bytes;
    let peak = |cfg: &RunConfig| {
        plan_with(cfg, model, reward, algo)
            .ok()
            .map(|p| p.peak_bytes)
    };
    let fits = |cfg: &RunConfig| peak(cfg).is_some_and(|b| b <= budget);
    let mut out: Vec<Suggestion> = Vec::new();
    let mut push = |cfg: &RunConfig, changes: Vec<String>, why: String| -> bool {
        match peak(cfg) {
            Some(b) if b <= budget => {
                out.push(Suggestion {
                    changes,
                    peak_bytes: b,
                    why,
                });
                true
            }
            _ => false,
        }
    };

    // The memory switches that are off, each as (change, config with it on).
    let has_logits = current.terms.iter().any(|t| t.name == T_LOGITS);
    let mut switches: Vec<(String, RunConfig)> = Vec::new();
    if algo.trains() && !run.train.gradient_checkpointing {
        let mut c = run.clone();
        c.train.gradient_checkpointing = true;
        switches.push(("train.gradient_checkpointing = true".into(), c));
    }
    if algo.trains() && !run.optimizer.paged {
        let mut c = run.clone();
        c.optimizer.paged = true;
        switches.push(("optimizer.paged = true".into(), c));
    }
    if has_logits && run.plan.logits_chunk == 0 {
        // The largest chunk that fits on its own, else a small one for the combinations below.
        let chunk = [4096, 2048, 1024, 512, 256]
            .into_iter()
            .find(|&k| {
                let mut c = run.clone();
                c.plan.logits_chunk = k;
                fits(&c)
            })
            .unwrap_or(256);
        let mut c = run.clone();
        c.plan.logits_chunk = chunk;
        switches.push((format!("plan.logits_chunk = {chunk}"), c));
    }
    let mut any = false;
    for (change, cfg) in &switches {
        any |= push(cfg, vec![change.clone()], "memory switch".into());
    }

    // Largest micro-batch, largest length, under `base` with `base_changes` already applied.
    let step = if algo == Algo::Grpo {
        run.grpo.num_generations as u64
    } else {
        1
    };
    let batch_and_length =
        |base: &RunConfig,
         base_changes: &[String],
         push: &mut dyn FnMut(&RunConfig, Vec<String>, String) -> bool| {
            let mut found = false;
            let k_now = base.train.batch_size as u64 / step;
            let with_batch = |k: u64| {
                let mut c = base.clone();
                c.train.batch_size = (k * step) as usize;
                c
            };
            if let Some(k) = largest(1, k_now.saturating_sub(1), |k| fits(&with_batch(k))) {
                let mut ch = base_changes.to_vec();
                ch.push(format!("train.batch_size = {}", k * step));
                let why = if algo == Algo::Grpo {
                    format!("largest micro-batch: {k} prompt(s) x {step} generations")
                } else {
                    "largest micro-batch".into()
                };
                found |= push(&with_batch(k), ch, why);
            }
            let batch_found = found;
            // A length cut below a quarter is a different run; the smallest batch may do better.
            let quarter = length_key(base, algo).1 as u64 / 4;
            if let Some((c, ch)) = longest(base, algo, quarter, &fits) {
                let mut all = base_changes.to_vec();
                all.extend(ch);
                found |= push(&c, all, "largest length".into());
            }
            if !batch_found && k_now > 1 {
                // Not even a smaller batch fits at this length: the longest at the smallest batch.
                if let Some((c, ch)) = longest(&with_batch(1), algo, 1, &fits) {
                    let mut all = base_changes.to_vec();
                    all.push(format!("train.batch_size = {step}"));
                    all.extend(ch);
                    found |= push(&c, all, "smallest micro-batch, largest length".into());
                }
            }
            found
        };
    any |= batch_and_length(run, &[], &mut push);

    // GRPO: fewer generations per group when even one prompt's group is too big.
    if algo == Algo::Grpo {
        let g = run.grpo.num_generations as u64;
        let with_g = |g2: u64| {
            let mut c = run.clone();
            c.grpo.num_generations = g2 as usize;
            c.train.batch_size = g2 as usize;
            c
        };
        if !fits(&with_g(g)) {
            if let Some(g2) = largest(2, g - 1, |x| fits(&with_g(x))) {
                any |= push(
                    &with_g(g2),
                    vec![
                        format!("grpo.num_generations = {g2}"),
                        format!("train.batch_size = {g2}"),
                    ],
                    "fewer generations per micro-batch".into(),
                );
            }
        }
    }

    if !any && !switches.is_empty() {
        // No single change fits: all switches together, then with batch and length.
        let mut all = run.clone();
        let mut changes = Vec::new();
        for (change, _) in &switches {
            changes.push(change.clone());
        }
        all.train.gradient_checkpointing |= algo.trains();
        all.optimizer.paged |= algo.trains();
        if let Some((_, c)) = switches
            .iter()
            .find(|(ch, _)| ch.starts_with("plan.logits_chunk"))
        {
            all.plan.logits_chunk = c.plan.logits_chunk;
        }
        any |= push(&all, changes.clone(), "all memory switches".into());
        if !any {
            any |= batch_and_length(&all, &changes, &mut push);
        }
    }

    if !any {
        // Nothing in reach of this run's settings: say what card it needs with every switch on.
        let mut all = run.clone();
        let mut changes = Vec::new();
        if algo.trains() {
            all.train.gradient_checkpointing = true;
            all.optimizer.paged = true;
            if !run.train.gradient_checkpointing {
                changes.push("train.gradient_checkpointing = true".to_string());
            }
            if !run.optimizer.paged {
                changes.push("optimizer.paged = true".to_string());
            }
        }
        if has_logits && run.plan.logits_chunk == 0 {
            all.plan.logits_chunk = 1024;
            changes.push("plan.logits_chunk = 1024".to_string());
        }
        let card = |cfg: &RunConfig, mut changes: Vec<String>, what: &str| {
            let p = plan_with(cfg, model, reward, algo).ok()?;
            let need = (p.peak_bytes as f64 / GIB * 2.0).ceil() / 2.0;
            let weights = p.bytes_of(T_LINEARS, Phase::Load) + p.bytes_of(T_DENSE, Phase::Load);
            changes.push(format!("plan.budget_gib = {need:.1}"));
            Some(Suggestion {
                changes,
                peak_bytes: p.peak_bytes,
                why: format!(
                    "nothing fits {:.2} GiB: the base weights alone take {:.2} GiB; {what}",
                    budget as f64 / GIB,
                    weights as f64 / GIB
                ),
            })
        };
        out.extend(card(&all, changes.clone(), "the card this run needs"));
        // And the smallest card for this model: one prompt's micro-batch, every switch on.
        let min_batch = if algo == Algo::Grpo {
            run.grpo.num_generations
        } else {
            1
        };
        if run.train.batch_size > min_batch {
            let mut small = all.clone();
            small.train.batch_size = min_batch;
            let mut ch = changes;
            ch.push(format!("train.batch_size = {min_batch}"));
            out.extend(card(&small, ch, "the smallest card at these lengths"));
        }
    }
    out
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

/// The algorithm a config file is for, from a `dpo`/`rm`/`grpo`/`ppo`/`generate` word in its
/// file name (`20b-grpo-24gb.toml` -> grpo). For `rlhf plan` when no `--algo` is given.
pub fn algo_from_file_name(path: &Path) -> Option<Algo> {
    let stem = path.file_stem()?.to_str()?;
    stem.split(['-', '_', '.'])
        .find_map(|w| Algo::ALL.into_iter().find(|a| a.name() == w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dtype;
    use std::time::Instant;

    const GIB_U: u64 = 1 << 30;

    fn manifest(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    fn model(name: &str) -> LlamaConfig {
        LlamaConfig::from_file(&manifest(&format!("configs/models/{name}.json"))).unwrap()
    }

    fn config(name: &str) -> RunConfig {
        RunConfig::load(&manifest(&format!("configs/{name}"))).unwrap()
    }

    /// bf16 compute on cuda, everything else at its default.
    fn cuda_run() -> RunConfig {
        let mut r = RunConfig::default();
        r.model.dtype = Dtype::Bf16;
        r.model.device = Device::Cuda;
        r
    }

    /// Applies `key = value` suggestions through TOML, as a user editing the file would.
    fn apply(run: &RunConfig, changes: &[String]) -> RunConfig {
        let mut v = toml::Value::try_from(run).unwrap();
        for c in changes {
            let (key, val) = c.split_once(" = ").unwrap();
            let (section, field) = key.split_once('.').unwrap();
            let val = toml::from_str::<toml::Table>(&format!("x = {val}")).unwrap()["x"].clone();
            v.get_mut(section)
                .and_then(|s| s.as_table_mut())
                .unwrap()
                .insert(field.into(), val);
        }
        v.try_into().unwrap()
    }

    /// A plain causal-LM fine-tuning step over `rows` sequences of `tokens`, the setup of the
    /// published QLoRA memory figures (not a command of ours, so built here).
    fn sft_plan(run: &RunConfig, m: &LlamaConfig, rows: u64, tokens: u64) -> Plan {
        let pass = Pass {
            label: "sft",
            kind: PassKind::Forward { grad: true },
            rows,
            tokens,
            logits_tokens: tokens,
            lora: true,
            reward_model: false,
        };
        let w = Workload {
            adapters: vec![("policy", true)],
            heads: vec![],
            phases: vec![(Phase::Load, vec![]), (Phase::TrainStep, vec![pass])],
            rollout: None,
            notes: vec![],
        };
        evaluate(run, m, &RewardSource::None, Algo::Dpo, w)
    }

    #[test]
    fn nf4_double_quant_is_4_127_bits_per_param() {
        // 20B gate_proj, 16384 x 6144 = 100_663_296 params:
        // 4-bit codes n/2 = 50_331_648; absmax codes n/64 = 1_572_864 bytes;
        // second-level fp32 absmax 1_572_864/256 = 6_144 x 4 = 24_576; offset 4.
        let n = 16_384 * 6_144;
        assert_eq!(nf4_bytes(n), 50_331_648 + 1_572_864 + 24_576 + 4);
        let bits = nf4_bytes(n) as f64 * 8.0 / n as f64;
        assert!((bits - 4.127).abs() < 5e-4, "{bits}");
        // Partial blocks round up: 100 params -> 50 + 2 blocks + 1 nested block x 4 + 4 = 60.
        assert_eq!(nf4_bytes(100), 60);
    }

    #[test]
    fn base_weight_terms_20b() {
        let m = model("llama-20b-class");
        let p = plan(&config("20b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
        // Per layer: q, o 6144x6144 -> 18_874_368 + 589_824 + 4 x 2_304 + 4 = 19_473_412 each;
        // k, v 1024x6144 -> 3_145_728 + 98_304 + 4 x 384 + 4 = 3_245_572 each;
        // gate, up, down 16384x6144 -> 51_929_092 each (above).
        let layer = 2 * 19_473_412 + 2 * 3_245_572 + 3 * 51_929_092;
        assert_eq!(layer, 201_225_244);
        assert_eq!(p.bytes_of(T_LINEARS, Phase::Load), 48 * layer);
        assert_eq!(p.bytes_of(T_LINEARS, Phase::TrainStep), 9_658_811_712);
        // Embeddings + untied lm_head 2 x 65536 x 6144, 2 x 48 + 1 norms of 6144, bf16.
        assert_eq!(
            p.bytes_of(T_DENSE, Phase::Rollout),
            (2 * 65_536 * 6_144 + 97 * 6_144) * 2
        );
        // Quantize staging: the largest linear (gate) in f32 while loading; dequant workspace:
        // the same linear in bf16 whenever a pass runs.
        assert_eq!(p.bytes_of(T_STAGING, Phase::Load), 100_663_296 * 4);
        assert_eq!(p.bytes_of(T_STAGING, Phase::Rollout), 0);
        assert_eq!(p.bytes_of(T_WORKSPACE, Phase::Load), 0);
        assert_eq!(p.bytes_of(T_WORKSPACE, Phase::TrainStep), 100_663_296 * 2);
        assert_eq!(
            p.bytes_of(T_CONTEXT, Phase::Load),
            CALIBRATION.cuda_context_bytes as u64
        );

        // quantize = none, f32: 2 x 37_748_736 + 2 x 6_291_456 + 3 x 100_663_296 = 390_070_272
        // params per layer x 48 x 4 B; dense 805_902_336 params x 4 B; no staging, no workspace.
        let mut run = config("20b-grpo-24gb.toml");
        run.model.quantize = Quantize::None;
        run.model.dtype = Dtype::F32;
        run.plan.budget_gib = 1000.0;
        let p = plan(&run, &m, Algo::Grpo).unwrap();
        assert_eq!(p.bytes_of(T_LINEARS, Phase::Load), 390_070_272 * 48 * 4);
        assert_eq!(p.bytes_of(T_DENSE, Phase::Load), 805_902_336 * 4);
        assert_eq!(p.bytes_of(T_STAGING, Phase::Load), 0);
        assert_eq!(p.bytes_of(T_WORKSPACE, Phase::TrainStep), 0);
        assert_eq!(p.model.params, 390_070_272 * 48 + 805_902_336);
    }

    #[test]
    fn adapter_grad_and_optimizer_terms() {
        let m = model("llama-20b-class");
        // r = 16 per layer: q, o 16 x (6144 + 6144) = 196_608; k, v 16 x (6144 + 1024) = 114_688;
        // gate, up, down 16 x (6144 + 16384) = 360_448.
        let layer = 2 * 196_608 + 2 * 114_688 + 3 * 360_448;
        assert_eq!(layer, 1_703_936);
        let adapter = 48 * layer * 4; // 81_788_928 params x 4 B = 327_155_712
        assert_eq!(adapter, 327_155_712);

        // Paged AdamW, gradient accumulation 4: grads live from the first micro-batch on; on the
        // GPU only one layer's moments at a time, 2 x 1_703_936 x 4 B.
        let run = config("20b-grpo-24gb.toml");
        let p = plan(&run, &m, Algo::Grpo).unwrap();
        assert_eq!(p.bytes_of(T_ADAPTERS, Phase::Load), adapter);
        assert_eq!(p.bytes_of(T_GRADS, Phase::Load), 0);
        assert_eq!(p.bytes_of(T_GRADS, Phase::Rollout), adapter);
        assert_eq!(p.bytes_of(T_MOMENTS, Phase::Rollout), 0);
        assert_eq!(p.bytes_of(T_MOMENTS, Phase::TrainStep), 2 * 1_703_936 * 4);

        // Not paged, no accumulation: moments everywhere after load, grads in the step only.
        let mut run = config("20b-grpo-24gb.toml");
        run.optimizer.paged = false;
        run.train.gradient_accumulation_steps = 1;
        let p = plan(&run, &m, Algo::Grpo).unwrap();
        assert_eq!(p.bytes_of(T_GRADS, Phase::Rollout), 0);
        assert_eq!(p.bytes_of(T_GRADS, Phase::TrainStep), adapter);
        assert_eq!(p.bytes_of(T_MOMENTS, Phase::Load), 0);
        assert_eq!(p.bytes_of(T_MOMENTS, Phase::Rollout), 2 * adapter);

        // PPO: policy + value trained, reward adapter frozen; heads of 6144 + 1 params, f32:
        // value and score params + the value head's grads (moments paged) = 3 copies.
        let p = plan(&config("20b-ppo-24gb.toml"), &m, Algo::Ppo).unwrap();
        assert_eq!(p.bytes_of(T_ADAPTERS, Phase::Rollout), 3 * adapter);
        assert_eq!(p.bytes_of(T_GRADS, Phase::TrainStep), 2 * adapter);
        assert_eq!(p.bytes_of(T_HEADS, Phase::TrainStep), 3 * 6_145 * 4);
        assert_eq!(p.bytes_of(T_HEADS, Phase::Load), 2 * 6_145 * 4);
    }

    #[test]
    fn rollout_terms_20b_grpo() {
        let m = model("llama-20b-class");
        let p = plan(&config("20b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
        assert_eq!(
            p.phases,
            [
                Phase::Load,
                Phase::Rollout,
                Phase::Scoring,
                Phase::TrainStep
            ]
        );
        // 8 rows of 256 prompt + 512 completion tokens:
        // 2 x 48 layers x 8 kv heads x 128 x 768 x 8 rows x 2 B.
        assert_eq!(
            p.bytes_of(T_KV, Phase::Rollout),
            2 * 48 * 8 * 128 * 768 * 8 * 2
        );
        assert_eq!(p.bytes_of(T_KV, Phase::Rollout), 1_207_959_552);
        assert_eq!(p.bytes_of(T_KV, Phase::TrainStep), 0);
        // 6 [8, 65536] f32 buffers while sampling.
        assert_eq!(p.bytes_of(T_SAMPLING, Phase::Rollout), 6 * 8 * 65_536 * 4);
        // Rollout tensors: 8 x 768 tokens x 32 B, until the step.
        assert_eq!(p.bytes_of(T_ROLLOUT, Phase::TrainStep), 8 * 768 * 32);
        // Prefill working set: 2 x (3 x 6144 + max(4 x 6144, 3 x 16384)) + 4 x 16384
        // = 2 x 67_584 + 65_536 = 200_704 B/token x 8 rows x 256 prompt tokens.
        assert_eq!(p.bytes_of(T_BLOCK, Phase::Rollout), 200_704 * 8 * 256);
        // Scoring (beta > 0): the reference pass over 768 tokens, logits of the 512 completion
        // tokens chunked to 1024 rows x 65536 x 4 B x 2 buffers.
        assert_eq!(p.bytes_of(T_LOGITS, Phase::Scoring), 1024 * 65_536 * 4 * 2);

        // beta = 0 and one iteration: no gradient-free pass, no scoring phase.
        let mut run = config("20b-grpo-24gb.toml");
        run.grpo.beta = 0.0;
        let p = plan(&run, &m, Algo::Grpo).unwrap();
        assert_eq!(p.phases, [Phase::Load, Phase::Rollout, Phase::TrainStep]);

        // generate: load and rollout only, 4 rows of 256 + 128 new tokens.
        let mut run = config("20b-grpo-24gb.toml");
        run.train.batch_size = 4;
        run.generation.max_new_tokens = 128;
        let p = plan(&run, &m, Algo::Generate).unwrap();
        assert_eq!(p.phases, [Phase::Load, Phase::Rollout]);
        assert_eq!(
            p.bytes_of(T_KV, Phase::Rollout),
            2 * 48 * 8 * 128 * 384 * 4 * 2
        );
        assert_eq!(p.bytes_of(T_GRADS, Phase::Rollout), 0);
    }

    #[test]
    fn per_token_activation_formulas_7b() {
        let m = model("llama-2-7b");
        let mut lora = LoraConfig {
            r: 8,
            ..LoraConfig::default()
        };
        // saved = 2 x (2 x 4096 + 3 x 4096 + 4 x 11008)      = 2 x 64_512 = 129_024
        //       + 4 x (4096 [q/k/v in] + 4096 [o in] + 4096 [gate/up in] + 11008 [down in]) = 93_184
        //       + 4 x 8 x 7 modules = 224, + 8
        assert_eq!(
            saved_bytes_per_token(&m, Some(&lora), 2),
            129_024 + 93_184 + 224 + 8
        );
        assert_eq!(saved_bytes_per_token(&m, None, 2), 129_024 + 8);
        // backward = 2 x (3 x 4096 + 3 x 11008) + 4 x 11008 = 90_624 + 44_032
        assert_eq!(backward_bytes_per_token(&m, Some(&lora), 2), 134_656);
        // inference = 2 x (3 x 4096 + max(4 x 4096, 3 x 11008)) + 4 x 11008 = 90_624 + 44_032
        assert_eq!(inference_bytes_per_token(&m, Some(&lora), 2), 134_656);
        // f32 compute, no adapters: 4 x (12_288 + 33_024)
        assert_eq!(inference_bytes_per_token(&m, None, 4), 181_248);
        // Dropout: 5 B per input element per targeted module (dropped f32 copy + mask):
        // 5 x (3 x 4096 + 4096 + 2 x 4096 + 11008) = 5 x 35_584 = 177_920.
        lora.dropout = 0.1;
        assert_eq!(
            saved_bytes_per_token(&m, Some(&lora), 2),
            129_024 + 177_920 + 224 + 8
        );
        // Only q and v targeted, no dropout: one shared f32 input copy of 4096.
        lora.dropout = 0.0;
        lora.target_modules = vec!["q_proj".into(), "v_proj".into()];
        assert_eq!(
            saved_bytes_per_token(&m, Some(&lora), 2),
            129_024 + 4 * 4096 + 4 * 8 * 2 + 8
        );
    }

    #[test]
    fn training_activation_terms_7b_dpo() {
        let m = model("llama-2-7b");
        let mut run = cuda_run();
        run.lora.r = 8;
        run.train.batch_size = 1; // one pair = 2 rows
        run.data.max_length = 512;
        run.data.max_prompt_length = 256;
        run.plan.budget_gib = 1000.0;
        let p = plan(&run, &m, Algo::Dpo).unwrap();
        // Checkpointed: 32 layers x 4096 x 2 B x 2 rows x 512 tokens.
        assert_eq!(p.bytes_of(T_KEPT, Phase::TrainStep), 32 * 4096 * 2 * 1024);
        // One block recomputed + its backward: (222_440 + 134_656) B/token x 1024 tokens.
        assert_eq!(
            p.bytes_of(T_BLOCK, Phase::TrainStep),
            (222_440 + 134_656) * 1024
        );
        // (2 kept + 2 grads) x [2, 32, 512, 512] x 2 B.
        assert_eq!(
            p.bytes_of(T_ATTENTION, Phase::TrainStep),
            4 * 2 * 32 * 512 * 512 * 2
        );
        // Logits: 2 x 512 tokens x 32000 x 4 B x 3 buffers.
        assert_eq!(
            p.bytes_of(T_LOGITS, Phase::TrainStep),
            1024 * 32_000 * 4 * 3
        );
        // The reference pass: no adapters, no grads; decomposed attention, 2 x [2, 32, 512, 512]
        // x 2 B (no flash kernel on cuda either).
        assert_eq!(p.bytes_of(T_BLOCK, Phase::Scoring), 90_624 * 1024);
        assert_eq!(p.bytes_of(T_LOGITS, Phase::Scoring), 1024 * 32_000 * 4 * 2);
        assert_eq!(
            p.bytes_of(T_ATTENTION, Phase::Scoring),
            2 * 2 * 32 * 512 * 512 * 2
        );

        // No checkpointing: every layer keeps 222_440 B/token, 32 x 2 score tensors + 2 grads.
        run.train.gradient_checkpointing = false;
        let p = plan(&run, &m, Algo::Dpo).unwrap();
        assert_eq!(p.bytes_of(T_KEPT, Phase::TrainStep), 32 * 222_440 * 1024);
        assert_eq!(p.bytes_of(T_BLOCK, Phase::TrainStep), 134_656 * 1024);
        assert_eq!(
            p.bytes_of(T_ATTENTION, Phase::TrainStep),
            (32 * 2 + 2) * 2 * 32 * 512 * 512 * 2
        );

        // Chunked logits: 256 rows x 32000 x 4 B x 3.
        run.plan.logits_chunk = 256;
        let p = plan(&run, &m, Algo::Dpo).unwrap();
        assert_eq!(p.bytes_of(T_LOGITS, Phase::TrainStep), 256 * 32_000 * 4 * 3);

        // On the cpu, f32: no CUDA context; the reference pass's attention is decomposed,
        // 2 x [2, 32, 512, 512] x 4 B.
        run.model.device = Device::Cpu;
        run.model.dtype = Dtype::F32;
        let p = plan(&run, &m, Algo::Dpo).unwrap();
        assert_eq!(p.bytes_of(T_CONTEXT, Phase::Load), 0);
        assert_eq!(
            p.bytes_of(T_ATTENTION, Phase::Scoring),
            2 * 2 * 32 * 512 * 512 * 4
        );
    }

    #[test]
    fn reward_model_checkpoint_is_counted() {
        let m = model("llama-20b-class");
        let mut run = config("20b-ppo-24gb.toml");
        run.ppo.reward_adapter = None;
        run.ppo.reward_model_path = Some(manifest("configs/models/llama-2-7b.json"));
        run.plan.budget_gib = 1000.0;
        let p = plan(&run, &m, Algo::Ppo).unwrap();
        // 7B linears: 4 x nf4(4096 x 4096) + 3 x nf4(11008 x 4096) per layer, x 32:
        // nf4(16_777_216) = 8_388_608 + 262_144 + 4 x 1_024 + 4 = 8_654_852;
        // nf4(45_088_768) = 22_544_384 + 704_512 + 4 x 2_752 + 4 = 23_259_908.
        let linears = (4 * 8_654_852 + 3 * 23_259_908) * 32;
        assert_eq!(linears, 3_340_772_224);
        // Embeddings and 2 x 32 + 1 norms + the 1-wide score head, bf16.
        let dense = (32_000 * 4096 + 66 * 4096) * 2;
        assert_eq!(p.bytes_of(T_REWARD_MODEL, Phase::Scoring), linears + dense);
        // Two trained adapters only: the reward is not an adapter now.
        assert_eq!(p.bytes_of(T_ADAPTERS, Phase::Load), 2 * 327_155_712);

        // An unreadable config: the base's dims stand in, and the plan says so.
        run.ppo.reward_model_path = Some(manifest("no/such/reward-model"));
        let p = plan(&run, &m, Algo::Ppo).unwrap();
        let base_dense = (65_536 * 6144 + 98 * 6144) * 2;
        assert_eq!(
            p.bytes_of(T_REWARD_MODEL, Phase::Load),
            9_658_811_712 + base_dense
        );
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("assuming the base model's dims")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn anchor_70b_nf4_weights_alone_exceed_24_gib() {
        let m = model("llama-3-70b");
        let p = plan(&config("70b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
        // 80 x (2 x nf4(8192^2) + 2 x nf4(1024 x 8192) + 3 x nf4(28672 x 8192))
        // = 80 x (2 x 34_619_396 + 2 x 4_327_428 + 3 x 121_167_876) = 35_311_782_080 B = 32.89 GiB.
        let linears = p.bytes_of(T_LINEARS, Phase::Load);
        assert_eq!(linears, 35_311_782_080);
        assert!(linears > 24 * GIB_U);
        assert!(!p.fits);
    }

    #[test]
    fn anchor_65b_qlora_fits_48_gb_at_short_sequence() {
        // QLoRA paper (Dettmers et al. 2023): LLaMA-65B finetuned on one 48 GB GPU; its memory
        // figure uses batch 1, sequence 512; r = 64 on all linears, dropout 0.05, paged AdamW,
        // gradient checkpointing, bf16 compute.
        let m = model("llama-65b");
        let mut run = cuda_run();
        run.lora.r = 64;
        run.lora.dropout = 0.05;
        run.optimizer.paged = true;
        let p = sft_plan(&run, &m, 1, 512);
        assert!(p.peak_bytes < 48_000_000_000, "{:.2} GiB", p.peak_gib());
        // And it is mostly weights: 80 layers of 809.5M linear params at 4.127 bits = 33.4 GB.
        assert!(p.bytes_of(T_LINEARS, Phase::TrainStep) > 33_000_000_000);
        // The same run without paging and checkpointing at batch 4 x 2048 tokens does not fit.
        run.optimizer.paged = false;
        run.train.gradient_checkpointing = false;
        assert!(sft_plan(&run, &m, 4, 2048).peak_bytes > 48_000_000_000);
    }

    #[test]
    fn anchor_7b_qlora_needs_5_to_6_gb() {
        // LLaMA-Factory's hardware table: QLoRA 4-bit 7B = 6 GB, with its defaults lora_rank 8
        // on all linears, AdamW (not paged), gradient checkpointing; batch 1, sequence 512.
        let m = model("llama-2-7b");
        let mut run = cuda_run();
        run.lora.r = 8;
        let p = sft_plan(&run, &m, 1, 512);
        assert!(
            p.peak_bytes >= 5_000_000_000 && p.peak_bytes <= 6 * GIB_U,
            "{:.2} GiB",
            p.peak_gib()
        );
    }

    #[test]
    fn every_config_plans_and_the_20b_ones_fit() {
        let mut checked = Vec::new();
        let dir = manifest("configs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for file in files {
            let run = RunConfig::load(&file).unwrap();
            if run.model.path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let m = read_model_config(&manifest(run.model.path.to_str().unwrap())).unwrap();
            let name = file.file_name().unwrap().to_str().unwrap().to_string();
            let algo = algo_from_file_name(&file)
                .unwrap_or_else(|| panic!("{name}: no algorithm in the name"));
            let p = plan(&run, &m, algo).unwrap();
            let table = render_table(&p);
            assert!(table.contains("verdict: "), "{name}\n{table}");
            if name.starts_with("20b-") {
                assert!(p.fits, "{name}\n{table}");
                assert!(
                    p.peak_bytes > 12 * GIB_U,
                    "{name}: a 24 GiB config should use the card\n{table}"
                );
            }
            if name.starts_with("70b-") {
                assert!(!p.fits, "{name}\n{table}");
                assert!(!p.suggestions.is_empty(), "{name}\n{table}");
                for s in &p.suggestions {
                    let fixed = plan(&apply(&run, &s.changes), &m, algo).unwrap();
                    assert!(
                        fixed.fits,
                        "{name}: {:?}\n{}",
                        s.changes,
                        render_table(&fixed)
                    );
                    assert_eq!(fixed.peak_bytes, s.peak_bytes);
                }
            }
            checked.push(name);
        }
        for want in [
            "20b-dpo", "20b-grpo", "20b-ppo", "70b-dpo", "70b-grpo", "70b-ppo",
        ] {
            assert!(
                checked.iter().any(|c| c.starts_with(want)),
                "{want} missing: {checked:?}"
            );
        }
    }

    #[test]
    fn suggestions_fit_and_are_the_largest() {
        let m = model("llama-20b-class");
        let mut run = config("20b-grpo-24gb.toml");
        run.train.batch_size = 16; // 2 prompts x 8
        let p = plan(&run, &m, Algo::Grpo).unwrap();
        assert!(!p.fits);
        let batch = p
            .suggestions
            .iter()
            .find(|s| s.changes.iter().any(|c| c.starts_with("train.batch_size")))
            .expect("a batch suggestion");
        let fixed = apply(&run, &batch.changes);
        assert!(fixed.train.batch_size.is_multiple_of(8));
        assert!(plan(&fixed, &m, Algo::Grpo).unwrap().fits);
        // One more prompt's group would not fit.
        let mut bigger = fixed.clone();
        bigger.train.batch_size += 8;
        assert!(!plan(&bigger, &m, Algo::Grpo).unwrap().fits);
        let len = p
            .suggestions
            .iter()
            .find(|s| {
                s.changes
                    .iter()
                    .any(|c| c.starts_with("grpo.max_completion_length"))
            })
            .expect("a length suggestion");
        let fixed = apply(&run, &len.changes);
        assert!(plan(&fixed, &m, Algo::Grpo).unwrap().fits);
        let mut longer = fixed.clone();
        longer.grpo.max_completion_length += 32;
        assert!(!plan(&longer, &m, Algo::Grpo).unwrap().fits);
        for s in &p.suggestions {
            assert!(s.peak_bytes <= p.budget_bytes, "{s:?}");
        }

        // Too long for even one prompt's group: the longest completion at 8, and fewer generations.
        run.train.batch_size = 32;
        run.grpo.max_completion_length = 1536;
        let p = plan(&run, &m, Algo::Grpo).unwrap();
        let both = p
            .suggestions
            .iter()
            .find(|s| s.changes.len() == 2 && s.changes[0] == "train.batch_size = 8")
            .unwrap_or_else(|| panic!("{}", render_table(&p)));
        assert!(both.changes[1].starts_with("grpo.max_completion_length = "));
        assert!(
            plan(&apply(&run, &both.changes), &m, Algo::Grpo)
                .unwrap()
                .fits
        );
        let fewer = p
            .suggestions
            .iter()
            .find(|s| s.changes[0].starts_with("grpo.num_generations"))
            .unwrap_or_else(|| panic!("{}", render_table(&p)));
        assert!(
            plan(&apply(&run, &fewer.changes), &m, Algo::Grpo)
                .unwrap()
                .fits
        );

        // DPO with the switches off: each switch is offered when it alone makes the run fit.
        let mut run = config("20b-dpo-24gb.toml");
        run.train.gradient_checkpointing = false;
        run.train.batch_size = 1;
        run.data.max_length = 512;
        run.data.max_prompt_length = 256;
        let p = plan(&run, &m, Algo::Dpo).unwrap();
        assert!(!p.fits, "{}", render_table(&p));
        assert!(
            p.suggestions
                .iter()
                .any(|s| s.changes == ["train.gradient_checkpointing = true"]),
            "{}",
            render_table(&p)
        );
        for s in &p.suggestions {
            assert!(
                plan(&apply(&run, &s.changes), &m, Algo::Dpo).unwrap().fits,
                "{s:?}"
            );
        }
    }

    #[test]
    fn bad_input_names_the_key() {
        let m = model("llama-2-7b");
        let err = |run: &RunConfig, algo| plan(run, &m, algo).unwrap_err().to_string();

        let mut run = cuda_run();
        run.train.batch_size = 0;
        let e = err(&run, Algo::Dpo);
        assert!(
            e.contains("train.batch_size") && e.contains("positive"),
            "{e}"
        );

        let mut run = cuda_run();
        run.train.batch_size = 12;
        let e = err(&run, Algo::Grpo);
        assert!(
            e.contains("train.batch_size") && e.contains("multiple of `grpo.num_generations` (8)"),
            "{e}"
        );

        // Llama-2-7B has 4096 positions and no rope scaling.
        let mut run = cuda_run();
        run.train.batch_size = 8;
        run.data.max_prompt_length = 256;
        run.grpo.max_completion_length = 3900;
        let e = err(&run, Algo::Grpo);
        assert!(
            e.contains("grpo.max_completion_length") && e.contains("4156") && e.contains("4096"),
            "{e}"
        );
        let mut run = cuda_run();
        run.data.max_length = 8192;
        let e = err(&run, Algo::Dpo);
        assert!(
            e.contains("data.max_length") && e.contains("max_position_embeddings 4096"),
            "{e}"
        );
        // With rope scaling the same length is the user's call.
        let mut scaled = m.clone();
        scaled.rope_scaling = Some(crate::model::config::RopeScaling::Linear { factor: 2.0 });
        plan(&run, &scaled, Algo::Dpo).unwrap();

        let mut run = cuda_run();
        run.ppo.reward_adapter = Some("a".into());
        run.ppo.reward_model_path = Some("b".into());
        let e = err(&run, Algo::Ppo);
        assert!(
            e.contains("ppo.reward_adapter") && e.contains("ppo.reward_model_path"),
            "{e}"
        );

        let mut run = cuda_run();
        run.train.batch_size = 8;
        run.grpo.max_completion_length = 0;
        assert!(err(&run, Algo::Grpo).contains("grpo.max_completion_length"));
        let mut run = cuda_run();
        run.lora.target_modules.clear();
        assert!(err(&run, Algo::Dpo).contains("lora.target_modules"));
    }

    #[test]
    fn table_json_and_summary() {
        let m = model("llama-20b-class");
        let p = plan(&config("20b-grpo-24gb.toml"), &m, Algo::Grpo).unwrap();
        let table = render_table(&p);
        assert!(table.contains(&format!("*{}", p.peak_phase)), "{table}");
        for t in &p.terms {
            assert!(table.contains(t.name), "{table}");
        }
        // Totals are the column sums.
        for (i, total) in p.totals.iter().enumerate() {
            assert_eq!(*total, p.terms.iter().map(|t| t.bytes[i]).sum::<u64>());
        }
        assert_eq!(p.peak_bytes, *p.totals.iter().max().unwrap());
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["algo"], "grpo");
        assert_eq!(v["phases"][3], "train_step");
        assert_eq!(v["fits"], true);
        assert!(summary_line(&p).contains("fits"));

        let p = plan(
            &config("70b-dpo-24gb.toml"),
            &model("llama-3-70b"),
            Algo::Dpo,
        )
        .unwrap();
        assert!(
            summary_line(&p).contains("does NOT fit"),
            "{}",
            summary_line(&p)
        );
        assert!(render_table(&p).contains("plan.budget_gib"));
    }

    #[test]
    fn plans_a_70b_config_in_well_under_a_second() {
        let m = model("llama-3-70b");
        let run = config("70b-ppo-24gb.toml");
        let t = Instant::now();
        let p = plan(&run, &m, Algo::Ppo).unwrap();
        let took = t.elapsed();
        assert!(!p.suggestions.is_empty());
        assert!(took.as_secs_f64() < 0.25, "{took:?}");
    }

    #[test]
    fn algo_from_names() {
        assert_eq!(
            algo_from_file_name(Path::new("configs/20b-grpo-24gb.toml")),
            Some(Algo::Grpo)
        );
        assert_eq!(algo_from_file_name(Path::new("my_rm.toml")), Some(Algo::Rm));
        assert_eq!(algo_from_file_name(Path::new("run.toml")), None);
        assert_eq!("ppo".parse::<Algo>().unwrap(), Algo::Ppo);
        assert!("sft".parse::<Algo>().is_err());
    }
}
