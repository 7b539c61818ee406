//! The planner's formulas: each a plain function of the shapes, so the tests can check it by
//! hand.

use crate::config::{LoraConfig, Quantize};
use crate::model::config::LlamaConfig;

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
pub(super) fn largest_linear(m: &LlamaConfig) -> u64 {
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

pub(super) fn lora_params_per_layer(m: &LlamaConfig, lora: &LoraConfig) -> u64 {
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
