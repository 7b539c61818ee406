//! The run configuration (`run.toml`).
//!
//! Every default lives in this file, in the `Default` impls below, so a reader finds them in one
//! place. Unknown keys are errors, and every error names the file, the key and what was expected.

use anyhow::{bail, Context, Result};
pub use rlhf_algorithms::losses::{
    CpoConfig, DpoConfig, GrpoLossType, ImportanceSamplingLevel, KtoConfig, OrpoConfig, PpoConfig,
    RlooConfig, ScaleRewards,
};
pub use rlhf_algorithms::sft::SftConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// LoRA target modules a Llama-family block offers, in PEFT's names.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A whole run: one file drives `rlhf sft|dpo|orpo|cpo|kto|grpo|rloo|ppo|rm|plan`. The algorithm sections' types (and
/// their named options) live in the algorithms crate, next to the code that reads them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optimizer: OptimizerConfig,
    pub generation: GenerationConfig,
    pub dpo: DpoConfig,
    pub rm: RmConfig,
    pub grpo: GrpoConfig,
    pub ppo: PpoConfig,
    pub orpo: OrpoConfig,
    pub cpo: CpoConfig,
    pub kto: KtoConfig,
    pub rloo: RlooConfig,
    pub sft: SftConfig,
    pub plan: PlanConfig,
}

/// Where the base model comes from and how it is stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model folder, a `.gguf` file, or (for `rlhf plan` only) a `config.json`.
    pub path: PathBuf,
    /// `nf4` (4-bit NormalFloat with double quantization) or `none` (keep the base at `dtype`).
    pub quantize: Quantize,
    /// Compute dtype of activations and unquantized weights: `f32` or `bf16`.
    pub dtype: Dtype,
    /// `cpu` or `cuda`.
    pub device: Device,
    /// A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) the trained
    /// role's adapter starts from instead of a fresh one; its LoRA shape replaces `[lora]`'s, as
    /// `PeftModel.from_pretrained` takes the shape from the adapter (`cli::start`).
    pub adapter: Option<PathBuf>,
    /// What the reference role is; unset: `initial` with `model.adapter`, `base` without
    /// (see [`ModelConfig::reference`]).
    pub reference: Option<ReferenceModel>,
}

/// The model the reference role stands for (`model.reference`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceModel {
    /// The base with every adapter off.
    Base,
    /// A frozen copy of the starting adapter of `model.adapter`, as TRL takes the SFT model a
    /// run starts from as its reference.
    Initial,
}

impl ModelConfig {
    /// `model.reference` resolved: as set, else `initial` when the run starts from
    /// `model.adapter` and `base` otherwise.
    pub fn reference(&self) -> ReferenceModel {
        self.reference.unwrap_or(if self.adapter.is_some() {
            ReferenceModel::Initial
        } else {
            ReferenceModel::Base
        })
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            quantize: Quantize::Nf4,
            dtype: Dtype::F32,
            device: Device::Cpu,
            adapter: None,
            reference: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    Nf4,
    None,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
}

/// How much of the card the CUDA allocator may keep (`plan.cache`). Either way a refused
/// allocation gives the cache back and retries, so a run the plan admits fits the budget.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheBound {
    /// Up to `plan.budget_gib` minus the CUDA context: freed pages stay cached for reuse, so the
    /// card may show more than the plan's peak, never more than the budget.
    #[default]
    Budget,
    /// Up to the plan's peak minus the context: the card shows what the plan predicts, at the
    /// price of giving pages back and allocating anew within the step (DPO 8b: 1.8x the step
    /// time, BENCHMARKS.md).
    Plan,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

/// LoRA adapter shape, PEFT's names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Dataset files and their truncation (TRL's names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// JSON or JSONL training file.
    pub train: PathBuf,
    /// Optional held-out file for `rlhf eval` / evaluation during training.
    pub eval: Option<PathBuf>,
    /// Prompt + completion tokens kept per sequence.
    pub max_length: usize,
    /// Prompt tokens kept.
    pub max_prompt_length: usize,
    /// Which end of an over-long prompt survives: `keep_end` or `keep_start`.
    pub truncation_mode: Truncation,
    /// Render conversational rows with the model's chat template.
    pub chat_template: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            max_length: 512,
            max_prompt_length: 256,
            truncation_mode: Truncation::KeepEnd,
            chat_template: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    KeepEnd,
    KeepStart,
}

/// The run loop: batches, schedule, logging, checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub output_dir: PathBuf,
    pub seed: u64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (0 = run the epochs).
    pub max_steps: usize,
    /// Sequences (DPO: pairs; GRPO: completions) per micro-batch.
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub gradient_checkpointing: bool,
    pub logging_steps: usize,
    pub save_steps: usize,
    /// Abort after this many non-finite losses in a row.
    pub max_nonfinite_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/out"),
            seed: 42,
            epochs: 1,
            max_steps: 0,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            lr_scheduler: LrScheduler::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            logging_steps: 1,
            save_steps: 500,
            max_nonfinite_steps: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Constant,
    Linear,
    Cosine,
}

/// AdamW over adapter and head parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Keep AdamW moments in host memory; move them to the GPU only for the update.
    pub paged: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            paged: false,
        }
    }
}

/// Sampling for rollouts (GRPO, PPO) and `rlhf generate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    /// Extra stop token ids besides the tokenizer's eos.
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            min_new_tokens: 0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            stop_token_ids: Vec::new(),
        }
    }
}

/// Reward modelling (TRL's RewardConfig names).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RmConfig {
    pub center_rewards_coefficient: f64,
}

/// GRPO (TRL's GRPOConfig names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Completions per prompt (G).
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: Option<f64>,
    pub num_iterations: usize,
    pub scale_rewards: ScaleRewards,
    pub loss_type: GrpoLossType,
    /// `sequence`: one importance ratio per completion (GSPO).
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// SAPO gate temperatures (loss_type = "sapo").
    pub sapo_temperature_pos: f64,
    pub sapo_temperature_neg: f64,
    pub mask_truncated_completions: bool,
    /// Reward functions, each a table with `type` (built-in name, `plugin`, or
    /// `reward_model`: see [`RewardModelReward`]) and `weight`.
    pub rewards: Vec<toml::Table>,
}

/// `[[grpo.rewards]] type = "reward_model"`: a separate Hugging Face sequence-classification
/// checkpoint scores each prompt + completion (the engine loads and runs it, so it is not one of
/// the rewards crate's functions). `path` is taken relative to the current directory, as
/// `model.path` and `ppo.reward_model_path` are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardModelReward {
    pub path: PathBuf,
    #[serde(default = "one")]
    pub weight: f32,
    /// Metric name (default `reward_model`).
    pub name: Option<String>,
}

fn one() -> f32 {
    1.0
}

impl GrpoConfig {
    /// The `type = "reward_model"` entries of `grpo.rewards`, by index, parsed; errors name
    /// `grpo.rewards[i]`.
    pub fn reward_models(&self) -> Result<Vec<(usize, RewardModelReward)>> {
        let mut out = Vec::new();
        for (i, table) in self.rewards.iter().enumerate() {
            if table.get("type").and_then(|t| t.as_str()) != Some("reward_model") {
                continue;
            }
            let mut t = table.clone();
            t.remove("type");
            let entry: RewardModelReward = toml::Value::Table(t)
                .try_into()
                .map_err(|e| anyhow::anyhow!("key `grpo.rewards[{i}]`: {}", e.message().trim()))?;
            out.push((i, entry));
        }
        if out.len() > 1 {
            bail!(
                "key `grpo.rewards`: {} entries of type \"reward_model\"; expected at most one",
                out.len()
            );
        }
        Ok(out)
    }
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: 8,
            max_completion_length: 256,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            num_iterations: 1,
            scale_rewards: ScaleRewards::Group,
            loss_type: GrpoLossType::Dapo,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            mask_truncated_completions: false,
            rewards: Vec::new(),
        }
    }
}

/// The VRAM budget the planner checks the run against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PlanConfig {
    pub budget_gib: f64,
    /// Compute log-probs in chunks of this many tokens so [B, T, V] logits never exist whole (0 = off).
    pub logits_chunk: usize,
    /// What bounds the CUDA allocator's cache: the budget (default) or the plan's peak.
    pub cache: CacheBound,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            budget_gib: 24.0,
            logits_chunk: 0,
            cache: CacheBound::Budget,
        }
    }
}

impl RunConfig {
    /// Reads and validates a TOML run file. Relative paths inside it are taken relative to the
    /// current directory (as a user running the CLI from the repo root expects).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config file", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses TOML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let de = toml::Deserializer::new(text);
        let cfg: RunConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.message().trim().to_string();
            let at = inner
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            if key.is_empty() || key == "." {
                anyhow::anyhow!("{}{at}: {msg}", origin.display())
            } else {
                anyhow::anyhow!("{}{at}: key `{key}`: {msg}", origin.display())
            }
        })?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", origin.display()))?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot run. Errors name the key and what was expected.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.batch_size == 0 {
            bail!("key `train.batch_size`: expected a positive integer, got 0");
        }
        if t.gradient_accumulation_steps == 0 {
            bail!("key `train.gradient_accumulation_steps`: expected a positive integer, got 0");
        }
        self.validate_floats()?;
        if self.model.reference == Some(ReferenceModel::Initial) && self.model.adapter.is_none() {
            bail!(
                "keys `model.reference` and `model.adapter`: reference = \"initial\" is a frozen copy of the starting adapter, but `model.adapter` is not set: set it to a PEFT adapter folder, or use reference = \"base\""
            );
        }
        if self
            .model
            .adapter
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            bail!("key `model.adapter`: empty: set it to a PEFT adapter folder or leave it out");
        }
        if self.lora.r == 0 {
            bail!("key `lora.r`: expected a positive integer, got 0");
        }
        for m in &self.lora.target_modules {
            if !ALL_TARGETS.contains(&m.as_str()) {
                bail!(
                    "key `lora.target_modules`: unknown module `{m}`, expected some of {}",
                    ALL_TARGETS.join(", ")
                );
            }
        }
        if self.data.max_length == 0 {
            bail!("key `data.max_length`: expected a positive integer, got 0");
        }
        if self.data.max_prompt_length > self.data.max_length {
            bail!(
                "key `data.max_prompt_length`: {} exceeds `data.max_length` {}",
                self.data.max_prompt_length,
                self.data.max_length
            );
        }
        let g = &self.generation;
        if g.min_new_tokens > g.max_new_tokens {
            bail!("key `generation.min_new_tokens`: exceeds `generation.max_new_tokens`");
        }
        if self.grpo.num_generations < 2 {
            bail!(
                "key `grpo.num_generations`: expected at least 2 (advantages are group-relative)"
            );
        }
        if self.grpo.num_iterations == 0 {
            bail!("key `grpo.num_iterations`: expected a positive integer, got 0");
        }
        self.dpo.validate()?;
        self.ppo.validate()?;
        self.orpo.validate()?;
        self.cpo.validate()?;
        self.kto.validate()?;
        self.rloo.validate()?;
        if !(self.plan.budget_gib.is_finite() && self.plan.budget_gib > 0.0) {
            bail!("key `plan.budget_gib`: expected a positive number of GiB");
        }
        Ok(())
    }

    /// Every float of the run is finite and in its range (a NaN beta or an infinite weight decay
    /// would otherwise train an adapter of NaNs without one failing step).
    fn validate_floats(&self) -> Result<()> {
        fn check(key: &str, v: f64, ok: bool, expected: &str) -> Result<()> {
            if v.is_finite() && ok {
                Ok(())
            } else {
                bail!("key `{key}`: expected {expected}, got {v}")
            }
        }
        let (ge0, gt0) = ("a number >= 0", "a number > 0");
        let (unit, unit_open) = ("a number in [0, 1]", "a number in [0, 1)");
        let (t, o, l) = (&self.train, &self.optimizer, &self.lora);
        check(
            "train.learning_rate",
            t.learning_rate,
            t.learning_rate >= 0.0,
            ge0,
        )?;
        check(
            "train.warmup_ratio",
            t.warmup_ratio,
            (0.0..=1.0).contains(&t.warmup_ratio),
            unit,
        )?;
        let clip = t.max_grad_norm;
        check(
            "train.max_grad_norm",
            clip,
            clip >= 0.0,
            "a number >= 0 (0 = no clipping)",
        )?;
        check(
            "optimizer.beta1",
            o.beta1,
            (0.0..1.0).contains(&o.beta1),
            unit_open,
        )?;
        check(
            "optimizer.beta2",
            o.beta2,
            (0.0..1.0).contains(&o.beta2),
            unit_open,
        )?;
        check("optimizer.eps", o.eps, o.eps > 0.0, gt0)?;
        check(
            "optimizer.weight_decay",
            o.weight_decay,
            o.weight_decay >= 0.0,
            ge0,
        )?;
        check("lora.alpha", l.alpha.into(), l.alpha > 0.0, gt0)?;
        check(
            "lora.dropout",
            l.dropout.into(),
            (0.0..1.0).contains(&l.dropout),
            unit_open,
        )?;
        let g = &self.generation;
        let temp = "a number >= 0 (0 = greedy)";
        check(
            "generation.temperature",
            g.temperature.into(),
            g.temperature >= 0.0,
            temp,
        )?;
        let top_p = g.top_p > 0.0 && g.top_p <= 1.0;
        check(
            "generation.top_p",
            g.top_p.into(),
            top_p,
            "a number in (0, 1]",
        )?;
        let d = &self.dpo;
        check("dpo.beta", d.beta, d.beta > 0.0, gt0)?;
        let ls = d.label_smoothing;
        check(
            "dpo.label_smoothing",
            ls,
            (0.0..1.0).contains(&ls),
            unit_open,
        )?;
        for &w in d.loss_weights.iter().flatten() {
            check("dpo.loss_weights", w, w >= 0.0, "numbers >= 0")?;
        }
        let c = self.rm.center_rewards_coefficient;
        check("rm.center_rewards_coefficient", c, c >= 0.0, ge0)?;
        let r = &self.grpo;
        check("grpo.beta", r.beta, r.beta >= 0.0, ge0)?;
        check("grpo.epsilon", r.epsilon, r.epsilon >= 0.0, ge0)?;
        if let Some(e) = r.epsilon_high {
            check("grpo.epsilon_high", e, e >= 0.0, ge0)?;
        }
        let p = &self.ppo;
        check("ppo.kl_coef", p.kl_coef, p.kl_coef >= 0.0, ge0)?;
        check("ppo.cliprange", p.cliprange, p.cliprange > 0.0, gt0)?;
        check(
            "ppo.cliprange_value",
            p.cliprange_value,
            p.cliprange_value > 0.0,
            gt0,
        )?;
        check("ppo.vf_coef", p.vf_coef, p.vf_coef >= 0.0, ge0)?;
        check("ppo.gamma", p.gamma, (0.0..=1.0).contains(&p.gamma), unit)?;
        check("ppo.lam", p.lam, (0.0..=1.0).contains(&p.lam), unit)?;
        if let Some(v) = p.missing_eos_penalty {
            check("ppo.missing_eos_penalty", v, true, "a finite number")?;
        }
        if let Some(v) = p.adaptive_kl_target {
            check("ppo.adaptive_kl_target", v, v > 0.0, gt0)?;
        }
        let h = p.adaptive_kl_horizon;
        check("ppo.adaptive_kl_horizon", h, h > 0.0, gt0)?;
        let b = self.plan.budget_gib;
        check("plan.budget_gib", b, b > 0.0, "a positive number of GiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RunConfig> {
        RunConfig::parse(s, Path::new("run.toml"))
    }

    #[test]
    fn defaults_fill_missing_sections() {
        let c = parse("[model]\npath = \"m\"\n").unwrap();
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.train.batch_size, 4);
        assert_eq!(c.plan.budget_gib, 24.0);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse("[train]\nbatch_sise = 3\n").unwrap_err().to_string();
        assert!(e.contains("run.toml"), "{e}");
        assert!(e.contains("batch_sise"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = parse("[train]\nbatch_size = \"four\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.batch_size"), "{e}");
    }

    #[test]
    fn impossible_values_are_refused() {
        let e = parse("[train]\nbatch_size = 0\n").unwrap_err().to_string();
        assert!(e.contains("train.batch_size"), "{e}");
        let e = parse("[lora]\ntarget_modules = [\"qq\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("qq"), "{e}");
    }

    #[test]
    fn every_grpo_loss_type_and_gspo_parse_and_wrong_names_list_the_accepted_ones() {
        for t in GrpoLossType::ALL {
            let c = parse(&format!("[grpo]\nloss_type = \"{t}\"\n")).unwrap();
            assert_eq!(c.grpo.loss_type, *t);
        }
        let c = parse("[grpo]\nimportance_sampling_level = \"sequence\"\n").unwrap();
        assert_eq!(
            c.grpo.importance_sampling_level,
            ImportanceSamplingLevel::Sequence
        );
        let e = parse("[grpo]\nloss_type = \"ppo\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpo.loss_type") && e.contains("line 2"), "{e}");
        for name in ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"] {
            assert!(e.contains(name), "{e}");
        }
        for (key, bad, listed) in [
            (
                "grpo.scale_rewards",
                "[grpo]\nscale_rewards = \"x\"",
                "group, batch, none",
            ),
            (
                "grpo.importance_sampling_level",
                "[grpo]\nimportance_sampling_level = \"x\"",
                "token, sequence",
            ),
            ("ppo.kl_estimator", "[ppo]\nkl_estimator = \"k2\"", "k1, k3"),
            (
                "dpo.loss_type",
                "[dpo]\nloss_type = [\"sigmoid\", \"x\"]",
                "sigmoid_norm",
            ),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(listed), "{e}");
        }
    }

    #[test]
    fn dpo_loss_type_takes_one_name_or_a_list() {
        let c = parse("[dpo]\nloss_type = \"ipo\"\n").unwrap();
        assert_eq!(c.dpo.loss_types.len(), 1);
        let c = parse("[dpo]\nloss_type = [\"sigmoid\", \"sft\"]\n");
        assert!(c.is_err());
        let e = parse("[dpo]\nbeta = 0\n").unwrap_err().to_string();
        assert!(e.contains("dpo.beta"), "{e}");
    }

    #[test]
    fn every_float_is_finite_and_in_range() {
        for (text, key) in [
            ("[optimizer]\nbeta1 = nan\n", "optimizer.beta1"),
            ("[optimizer]\nbeta2 = 1.0\n", "optimizer.beta2"),
            ("[optimizer]\neps = 0.0\n", "optimizer.eps"),
            (
                "[optimizer]\nweight_decay = inf\n",
                "optimizer.weight_decay",
            ),
            ("[train]\nlearning_rate = -1e-5\n", "train.learning_rate"),
            ("[train]\nmax_grad_norm = nan\n", "train.max_grad_norm"),
            ("[lora]\nalpha = inf\n", "lora.alpha"),
            ("[dpo]\nbeta = -inf\n", "dpo.beta"),
            ("[dpo]\nloss_weights = [nan]\n", "dpo.loss_weights"),
            ("[generation]\ntop_p = nan\n", "generation.top_p"),
            (
                "[generation]\ntemperature = inf\n",
                "generation.temperature",
            ),
            ("[ppo]\ngamma = 1.5\n", "ppo.gamma"),
            (
                "[ppo]\nadaptive_kl_target = nan\n",
                "ppo.adaptive_kl_target",
            ),
            ("[grpo]\nepsilon_high = -0.1\n", "grpo.epsilon_high"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
        assert!(parse("[optimizer]\nbeta1 = 0.0\nbeta2 = 0.95\nweight_decay = 0.1\n").is_ok());
    }

    #[test]
    fn plan_cache_is_budget_unless_set_and_wrong_names_list_the_accepted_ones() {
        assert_eq!(parse("").unwrap().plan.cache, CacheBound::Budget);
        let c = parse("[plan]\ncache = \"plan\"\n").unwrap();
        assert_eq!(c.plan.cache, CacheBound::Plan);
        let e = format!("{:#}", parse("[plan]\ncache = \"tight\"\n").unwrap_err());
        assert!(
            e.contains("plan.cache") && e.contains("`budget`") && e.contains("`plan`"),
            "{e}"
        );
    }

    #[test]
    fn sft_section_has_trl_defaults_and_refuses_unknown_keys() {
        let c = parse("[model]\npath = \"m\"\n").unwrap();
        assert!(c.sft.completion_only_loss && !c.sft.assistant_only_loss);
        let c = parse("[sft]\ncompletion_only_loss = false\nassistant_only_loss = true\n").unwrap();
        assert!(!c.sft.completion_only_loss && c.sft.assistant_only_loss);
        let e = parse("[sft]\npacking = true\n").unwrap_err().to_string();
        assert!(e.contains("packing") && e.contains("line 2"), "{e}");
        let e = parse("[sft]\nassistant_only_loss = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sft.assistant_only_loss"), "{e}");
    }

    #[test]
    fn malformed_toml_is_an_error() {
        let e = parse("[train\n").unwrap_err().to_string();
        assert!(e.contains("run.toml"), "{e}");
    }
}
