//! GGUF files as a tensor source: tensors are dequantized one at a time (then re-quantized to NF4
//! by the loader), named back to their Hugging Face names, with llama.cpp's Q/K row permutation
//! undone. The tokenizer and chat template come from the same file's metadata.

use super::config::LlamaConfig;
use super::llama::Llama;
use super::load::{LoadOptions, TensorSource};
use crate::gguf::{gguf_to_hf_name, Gguf};
use crate::tokenizer::{ChatTemplate, Tok};
use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use std::collections::BTreeMap;
use std::path::Path;

/// Reads tensors from a GGUF file by their HF names.
pub struct GgufSource<'a> {
    gguf: &'a Gguf,
    /// HF name -> GGUF name
    names: BTreeMap<String, String>,
}

/// The GGUF names of the tensors every Llama-family model must have, for clearer errors.
fn gguf_name_of(hf: &str) -> String {
    hf.replace("model.embed_tokens.weight", "token_embd.weight")
        .replace("model.norm.weight", "output_norm.weight")
        .replace("lm_head.weight", "output.weight")
        .replace("model.layers.", "blk.")
        .replace(".self_attn.q_proj", ".attn_q")
        .replace(".self_attn.k_proj", ".attn_k")
        .replace(".self_attn.v_proj", ".attn_v")
        .replace(".self_attn.o_proj", ".attn_output")
        .replace(".mlp.gate_proj", ".ffn_gate")
        .replace(".mlp.up_proj", ".ffn_up")
        .replace(".mlp.down_proj", ".ffn_down")
        .replace(".input_layernorm", ".attn_norm")
        .replace(".post_attention_layernorm", ".ffn_norm")
}

impl<'a> GgufSource<'a> {
    pub fn new(gguf: &'a Gguf) -> Self {
        let names = gguf
            .tensors()
            .iter()
            .filter_map(|t| gguf_to_hf_name(&t.name).map(|hf| (hf, t.name.clone())))
            .collect();
        Self { gguf, names }
    }
}

impl TensorSource for GgufSource<'_> {
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let g = self
            .names
            .get(name)
            .cloned()
            .with_context(|| format!("tensor `{}` ({name}) missing", gguf_name_of(name)))?;
        let (values, mut shape) = self.gguf.tensor_f32_hf(&g)?;
        // GGUF stores 1-D tensors as [n]; HF biases and norms are [n] too. Linears are [out, in].
        if shape.len() == 2
            && shape[1] == 1
            && !name.ends_with("proj.weight")
            && !name.ends_with("head.weight")
        {
            shape.truncate(1);
        }
        Ok((values, shape))
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
}

/// Loads model, tokenizer and chat template from one GGUF file.
pub fn load_gguf<B: Backend>(
    path: &Path,
    opts: LoadOptions,
    device: &B::Device,
) -> Result<(Llama<B>, Tok, Option<ChatTemplate>)> {
    let gguf = Gguf::open(path)?;
    let json = gguf.model_config()?;
    let cfg = LlamaConfig::from_json(&json)
        .with_context(|| format!("{}: unsupported model", path.display()))?;
    let mut src = GgufSource::new(&gguf);
    let mut model =
        Llama::load(cfg, &mut src, opts, device).with_context(|| format!("{}", path.display()))?;
    if let Some(freqs) = json.get("gguf_rope_freqs").and_then(|v| v.as_str()) {
        // Llama 3.x GGUFs store the rope scaling as per-frequency divisors.
        let (div, _) = gguf.tensor_f32(freqs)?;
        anyhow::ensure!(
            div.len() == model.inv_freq.len(),
            "{}: `{freqs}` has {} values, expected {}",
            path.display(),
            div.len(),
            model.inv_freq.len()
        );
        for (f, d) in model.inv_freq.iter_mut().zip(div) {
            *f /= d;
        }
    }
    let tok = Tok::from_gguf(&gguf)?;
    // No template is fine (plain prompts); a broken one is an error.
    let chat = match gguf.get("tokenizer.chat_template") {
        Some(_) => Some(ChatTemplate::from_gguf(&gguf)?),
        None => None,
    };
    Ok((model, tok, chat))
}
