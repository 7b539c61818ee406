//! `rlhf merge --gguf`: the merged model as one GGUF v3 file in llama.cpp's `llama` layout: its
//! architecture metadata (`llama.*`), its tensor names (`blk.N.attn_q.weight`, ...), the Q/K row
//! permutation its converter applies (our reader undoes it), and the tokenizer as
//! `tokenizer.ggml.*` metadata. Tensors are merged, permuted and encoded one at a time, as for
//! the safetensors file, so the model is never in memory whole.
//!
//! Types follow llama.cpp's `convert_hf_to_gguf.py --outtype f16|q8_0`: 1-D tensors (norms,
//! biases) stay f32; 2-D weights are f16, or Q8_0 where a row holds whole 32-value blocks (f16
//! otherwise).

use super::config::{Arch, LlamaConfig, RopeScaling};
use super::export::{entries, merged_values};
use super::load::TensorSource;
use super::lora::Adapter;
use crate::gguf::{hf_to_gguf_name, permute_qk, write_gguf, GgmlType, Gguf, MetaValue, TensorSpec};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use std::path::Path;

/// The type the merged 2-D weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F16,
    Q8_0,
}

impl GgufType {
    /// As in llama.cpp's file names (`model-q8_0.gguf`).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_F16` / `_Q8_0`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }

    fn weight_type(self, shape: &[usize]) -> GgmlType {
        match (shape, self) {
            ([_], _) => GgmlType::F32,
            ([_, cols], GgufType::Q8_0) if cols.is_multiple_of(32) => GgmlType::Q8_0,
            _ => GgmlType::F16,
        }
    }
}

/// Refuses what llama.cpp's `llama` architecture cannot express, before anything is written.
pub fn check_gguf_arch(cfg: &LlamaConfig) -> Result<()> {
    match cfg.arch {
        // llama.cpp converts Mistral as `llama` too (without the sliding window).
        Arch::Llama | Arch::Mistral => {}
        Arch::Qwen2 => {
            bail!("--gguf: Qwen2 models are not written as GGUF (Llama and Mistral are)")
        }
    }
    Ok(())
}

/// The tokenizer metadata of a GGUF base, as stored (`tokenizer.*`).
pub fn gguf_tokenizer_metadata(g: &Gguf) -> Vec<(String, MetaValue)> {
    g.metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Llama 3's rope scaling as llama.cpp stores it: per-frequency divisors (`rope_freqs.weight`),
/// computed as its converter does.
fn llama3_rope_factors(cfg: &LlamaConfig, s: &RopeScaling) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old_ctx,
    } = *s
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let old_ctx = old_ctx as f64;
    let (low_wavelen, high_wavelen) = (old_ctx / low_freq_factor, old_ctx / high_freq_factor);
    let factors = (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / dim as f32) as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth =
                    (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect();
    Some(factors)
}

/// The `general.*` and `llama.*` metadata of `cfg`.
fn arch_metadata(cfg: &LlamaConfig, ty: GgufType, name: &str) -> Vec<(String, MetaValue)> {
    let u = |v: usize| MetaValue::U32(v as u32);
    let mut meta: Vec<(String, MetaValue)> = vec![
        (
            "general.architecture".into(),
            MetaValue::Str("llama".into()),
        ),
        ("general.name".into(), MetaValue::Str(name.into())),
        ("general.file_type".into(), MetaValue::U32(ty.file_type())),
        ("general.quantization_version".into(), MetaValue::U32(2)),
        ("general.alignment".into(), MetaValue::U32(32)),
        (
            "llama.context_length".into(),
            u(cfg.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        (
            "llama.attention.head_count".into(),
            u(cfg.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(cfg.num_key_value_heads),
        ),
        ("llama.attention.key_length".into(), u(cfg.head_dim)),
        ("llama.attention.value_length".into(), u(cfg.head_dim)),
        (
            "llama.rope.freq_base".into(),
            MetaValue::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            MetaValue::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
    ];
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        meta.push((
            "llama.rope.scaling.type".into(),
            MetaValue::Str("linear".into()),
        ));
        meta.push((
            "llama.rope.scaling.factor".into(),
            MetaValue::F32(factor as f32),
        ));
    }
    meta
}

/// Writes the merged model (base from `src`, plus `adapter`) as a GGUF file at `path`, with
/// `tokenizer` (`tokenizer.*` metadata) and `name` as `general.name`.
pub fn write_merged_gguf<B: Backend>(
    path: &Path,
    cfg: &LlamaConfig,
    src: &mut dyn TensorSource,
    adapter: Option<&Adapter<B>>,
    tokenizer: Vec<(String, MetaValue)>,
    ty: GgufType,
    name: &str,
) -> Result<()> {
    check_gguf_arch(cfg)?;
    let mut meta = arch_metadata(cfg, ty, name);
    meta.extend(tokenizer);
    let entries = entries(cfg, src, false)?;
    let rope_factors = cfg
        .rope_scaling
        .as_ref()
        .and_then(|s| llama3_rope_factors(cfg, s));
    let mut specs = Vec::with_capacity(entries.len() + 1);
    if let Some(f) = &rope_factors {
        specs.push(TensorSpec {
            name: "rope_freqs.weight".into(),
            shape: vec![f.len()],
            ggml_type: GgmlType::F32,
        });
    }
    for e in &entries {
        let name = hf_to_gguf_name(&e.name)
            .with_context(|| format!("tensor `{}` has no llama.cpp name", e.name))?;
        specs.push(TensorSpec {
            name,
            ggml_type: ty.weight_type(&e.shape),
            shape: e.shape.clone(),
        });
    }
    let first = usize::from(rope_factors.is_some());
    write_gguf(path, &meta, &specs, |i| {
        if i < first {
            return Ok(rope_factors.clone().expect("rope factors come first"));
        }
        let e = &entries[i - first];
        let values = merged_values(e, &mut *src, adapter, None)?;
        // llama.cpp's ggml RoPE rotates adjacent pairs: its converter interleaves the two
        // rotary halves of each q/k head (the reader's `unpermute_qk` is the inverse).
        let heads = match specs[i].name.rsplit('.').nth(1) {
            Some("attn_q") => cfg.num_attention_heads,
            Some("attn_k") => cfg.num_key_value_heads,
            _ => return Ok(values),
        };
        let cols = e.shape.get(1).copied().unwrap_or(1);
        permute_qk(&values, heads, e.shape[0], cols).with_context(|| format!("tensor `{}`", e.name))
    })
}
