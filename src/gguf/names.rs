//! Llama's q/k row permutation as llama.cpp's converter applies it, and GGUF tensor names in
//! Hugging Face's naming.

use anyhow::{bail, Result};

/// Whether llama.cpp's converter permuted the `attn_q`/`attn_k` rows for this architecture
/// (it does for Llama, whose ggml RoPE rotates adjacent pairs; Qwen2/3 use the NeoX rotation
/// and are stored unpermuted).
pub fn arch_permutes_qk(arch: &str) -> bool {
    arch == "llama"
}

fn check_qk_dims(len: usize, n_head: usize, rows: usize, cols: usize) -> Result<usize> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("cannot (un)permute {rows} rows into {n_head} heads of an even size");
    }
    if rows.checked_mul(cols) != Some(len) {
        bail!("data has {len} values, expected {rows} x {cols}");
    }
    Ok(rows / n_head / 2)
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py): within each head, row `i * half + j`
/// (HF, first and second rotary halves) moves to row `2 * j + i` (interleaved pairs).
/// `data` is `[rows, cols]` row-major. Kept public for tests and for writing GGUF files.
pub fn permute_qk(data: &[f32], n_head: usize, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let half = check_qk_dims(data.len(), n_head, rows, cols)?;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let src = h * 2 * half + i * half + j;
                let dst = h * 2 * half + 2 * j + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Inverse of [`permute_qk`]: restores the HF row order of a GGUF `attn_q` (with `n_head`)
/// or `attn_k` (with the KV head count) weight `[rows, cols]`, or of a bias (`cols = 1`).
pub fn unpermute_qk(data: &[f32], n_head: usize, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let half = check_qk_dims(data.len(), n_head, rows, cols)?;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * 2 * half + i * half + j;
                let gguf = h * 2 * half + 2 * j + i;
                out[hf * cols..(hf + 1) * cols]
                    .copy_from_slice(&data[gguf * cols..(gguf + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Whole-model tensors: (GGUF name, HF name).
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A layer's modules: (GGUF module, HF module), one table for both directions.
const LAYER_MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// `name` translated by the tables: `from` picks the side it is written in (0 GGUF, 1 HF);
/// layer tensors are `{prefix[from]}{layer}.{module}.{weight|bias}`.
fn translate(name: &str, from: usize) -> Option<String> {
    let to = 1 - from;
    if let Some(g) = GLOBAL_NAMES.iter().find(|g| [g.0, g.1][from] == name) {
        return Some([g.0, g.1][to].into());
    }
    let prefixes = ["blk.", "model.layers."];
    let rest = name.strip_prefix(prefixes[from])?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let m = LAYER_MODULES.iter().find(|m| [m.0, m.1][from] == module)?;
    Some(format!(
        "{}{layer}.{}.{param}",
        prefixes[to],
        [m.0, m.1][to]
    ))
}

/// The HF checkpoint name of a GGUF tensor (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`), or `None` for tensors with no HF counterpart
/// (e.g. `rope_freqs.weight`) or unknown names.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    translate(name, 0)
}

/// The GGUF (llama.cpp) name of an HF checkpoint tensor: the inverse of [`gguf_to_hf_name`].
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    translate(name, 1)
}
