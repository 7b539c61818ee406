//! The model's architecture, read from a Hugging Face `config.json` (or built from GGUF metadata
//! into the same JSON shape, so there is one parser).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Llama-family hyper-parameters (Llama 2/3, Mistral, Qwen2, SmolLM).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Mistral's sliding-window attention: each token sees at most this many previous positions.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

/// Llama 3's frequency-dependent RoPE scaling ("llama3"), or plain linear position scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Linear {
        factor: f64,
    },
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 stores rope_theta and the scaling together here.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl LlamaConfig {
    /// Reads `config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read model config", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&v).with_context(|| format!("{}: unsupported model config", path.display()))
    }

    /// Interprets an HF config as a Llama-family architecture, refusing others.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_value(v.clone()).context("missing or mistyped field")?;
        let name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or(raw.model_type.clone())
            .unwrap_or_default();
        let arch = match name.as_str() {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            other => bail!(
                "unknown architecture `{other}`: expected LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM"
            ),
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported: expected silu");
            }
        }
        let heads = raw.num_attention_heads;
        if heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 || raw.vocab_size == 0 {
            bail!("hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be positive");
        }
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if kv == 0 || !heads.is_multiple_of(kv) {
            bail!("num_key_value_heads {kv} must divide num_attention_heads {heads}");
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if raw.head_dim.is_none() && !raw.hidden_size.is_multiple_of(heads) {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {heads}",
                raw.hidden_size
            );
        }
        if !head_dim.is_multiple_of(2) {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10000.0);
        let scaling = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref());
        let rope_scaling = match scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|x| x.as_str())
                    .unwrap_or("");
                let f = |k: &str| s.get(k).and_then(|x| x.as_f64());
                match kind {
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f("factor").context("rope_scaling.factor missing")?,
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: f("original_max_position_embeddings")
                            .unwrap_or(8192.0)
                            as usize,
                    }),
                    "linear" => Some(RopeScaling::Linear {
                        factor: f("factor").context("rope_scaling.factor missing")?,
                    }),
                    "default" | "" => None,
                    other => bail!(
                        "rope_scaling type `{other}` is not supported: expected llama3 or linear"
                    ),
                }
            }
        };
        let sliding_window = match (&raw.sliding_window, raw.use_sliding_window) {
            (_, Some(false)) => None,
            (Some(serde_json::Value::Number(n)), _)
                if arch != Arch::Qwen2 || raw.use_sliding_window == Some(true) =>
            {
                n.as_u64().map(|x| x as usize)
            }
            _ => None,
        };
        Ok(Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            sliding_window,
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
        })
    }

    /// Parameters of one decoder block's seven linear projections (the ones NF4 quantizes).
    pub fn block_linear_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
    }

    /// (out_features, in_features) of a target module by PEFT name.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        Some(match module {
            "q_proj" => (q, h),
            "k_proj" | "v_proj" => (kv, h),
            "o_proj" => (h, q),
            "gate_proj" | "up_proj" => (i, h),
            "down_proj" => (h, i),
            _ => return None,
        })
    }
}
