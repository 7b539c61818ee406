//! Writing a base with a LoRA adapter folded in as a Hugging Face model folder: the weights as
//! one `model.safetensors` under transformers' names, the `config.json` transformers expects,
//! and, for a GGUF base, the tokenizer files rebuilt from the file's metadata.
//!
//! Each tensor is read from the base, merged and written on its own, so the merged model never
//! sits in memory whole. The base is read as stored: a GGUF base is dequantized to f32; an HF
//! base is merged onto its own (unquantized) weights even when runs quantize it to NF4 at load,
//! which is what PEFT's `merge_and_unload` gives on a base reloaded in 16 bits. The adapter was
//! trained against the NF4-rounded weights, so the merged model differs from the trained one
//! by the base's quantization error.

use super::config::LlamaConfig;
use super::load::TensorSource;
use super::lora::Adapter;
use crate::gguf::Gguf;
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::backend::Backend;
use serde_json::{json, Value as Json};
use std::io::Write;
use std::path::Path;

/// The floating-point type the merged weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::Bf16 => "BF16",
        }
    }

    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
        }
    }

    fn width(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// Where one output tensor's values come from.
pub(super) enum Origin {
    /// A base tensor; `Some((layer, module))` when the adapter targets it.
    Base(Option<(usize, &'static str)>),
    /// The sequence-classification head.
    Score,
}

pub(super) struct Entry {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) origin: Origin,
}

const MODULES: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

/// The tensors of the merged model in file order, with transformers' names. Biases are written
/// where the base has them; `lm_head.weight` unless the embeddings are tied or a score head
/// replaces it.
pub(super) fn entries(
    cfg: &LlamaConfig,
    src: &dyn TensorSource,
    score: bool,
) -> Result<Vec<Entry>> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let base = |name: String, shape: Vec<usize>| Entry {
        name,
        shape,
        origin: Origin::Base(None),
    };
    let mut out = vec![base("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push(base(format!("{p}.input_layernorm.weight"), vec![h]));
        for (group, module) in MODULES {
            let (o, i) = cfg.linear_shape(module).expect("known module");
            let name = format!("{p}.{group}.{module}");
            out.push(Entry {
                name: format!("{name}.weight"),
                shape: vec![o, i],
                origin: Origin::Base(Some((l, module))),
            });
            let bias = format!("{name}.bias");
            let required = cfg.attention_bias && ["q_proj", "k_proj", "v_proj"].contains(&module);
            if required || src.contains(&bias) {
                out.push(base(bias, vec![o]));
            }
        }
        out.push(base(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
        ));
    }
    out.push(base("model.norm.weight".into(), vec![h]));
    if score {
        out.push(Entry {
            name: "score.weight".into(),
            shape: vec![1, h],
            origin: Origin::Score,
        });
    } else if !cfg.tie_word_embeddings {
        ensure!(
            src.contains("lm_head.weight"),
            "tensor `lm_head.weight` missing and tie_word_embeddings is false"
        );
        out.push(base("lm_head.weight".into(), vec![v, h]));
    }
    Ok(out)
}

/// `(alpha / r) * B A` for one adapted linear, as f32 values in `[out, in]` order.
fn delta<B: Backend>(adapter: &Adapter<B>, layer: usize, module: &str) -> Result<Option<Vec<f32>>> {
    let Some(pair) = adapter.layers.get(layer).and_then(|m| m.get(module)) else {
        return Ok(None);
    };
    let d = pair.b.clone().matmul(pair.a.clone()) * adapter.scaling();
    let values = d
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("LoRA delta of layer {layer} {module}: {e:?}"))?;
    Ok(Some(values))
}

/// One output tensor's values: the base tensor plus the adapter's delta where it targets it (or
/// the score head), checked finite.
pub(super) fn merged_values<B: Backend>(
    e: &Entry,
    src: &mut dyn TensorSource,
    adapter: Option<&Adapter<B>>,
    score: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let values = match e.origin {
        Origin::Score => score.expect("score entry only with a score").to_vec(),
        Origin::Base(adapted) => {
            let (mut values, shape) = src.read(&e.name)?;
            ensure!(
                shape == e.shape,
                "tensor `{}` has shape {shape:?}, expected {:?}",
                e.name,
                e.shape
            );
            if let Some(d) = adapted
                .zip(adapter)
                .map(|((l, m), a)| delta(a, l, m))
                .transpose()?
                .flatten()
            {
                for (w, d) in values.iter_mut().zip(d) {
                    *w += d;
                }
            }
            values
        }
    };
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        bail!(
            "tensor `{}`: value {i} of the merged weights is {}",
            e.name,
            values[i]
        );
    }
    Ok(values)
}

/// Writes `model.safetensors` at `path`: every base tensor `src` holds for `cfg`, with
/// `W + (alpha / r) B A` for each linear `adapter` targets, and `score` (`[1, hidden]`) as
/// `score.weight` in place of the LM head when given. Written to a temporary name and renamed.
pub fn write_merged_safetensors<B: Backend>(
    path: &Path,
    cfg: &LlamaConfig,
    src: &mut dyn TensorSource,
    adapter: Option<&Adapter<B>>,
    score: Option<&[f32]>,
    dtype: Dtype,
) -> Result<()> {
    if let Some(s) = score {
        ensure!(
            s.len() == cfg.hidden_size,
            "score head has {} values, expected hidden_size {}",
            s.len(),
            cfg.hidden_size
        );
    }
    let entries = entries(cfg, src, score.is_some())?;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for e in &entries {
        let bytes = e.shape.iter().product::<usize>() * dtype.width();
        header.insert(
            e.name.clone(),
            json!({"dtype": dtype.safetensors_name(), "shape": e.shape,
                   "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&Json::Object(header))?;
    // safetensors pads the header with spaces so the data starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    let tmp = path.with_extension("safetensors.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    for e in &entries {
        let mut values = merged_values(e, src, adapter, score)?;
        match dtype {
            Dtype::F32 => {
                for v in &values {
                    w.write_all(&v.to_le_bytes())?;
                }
            }
            Dtype::Bf16 => {
                for v in values.drain(..) {
                    w.write_all(&half::bf16::from_f32(v).to_le_bytes())?;
                }
            }
        }
    }
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// The merged folder's `config.json`: the base's (HF `config.json`, or the one built from GGUF
/// metadata) with the stored dtype, no quantization settings, and for a score head the
/// `*ForSequenceClassification` architecture with one label. transformers finds the scored
/// (last non-padding) token through `pad_token_id`, so one is set (the eos id) when absent.
pub fn hf_config(base: &Json, cfg: &LlamaConfig, dtype: Dtype, classifier: bool) -> Result<Json> {
    let mut v = base.clone();
    let obj = v
        .as_object_mut()
        .context("config.json: not a JSON object")?;
    if obj.remove("gguf_rope_freqs").is_some() && !obj.contains_key("rope_scaling") {
        bail!(
            "the base stores its rope scaling as per-frequency divisors (rope_freqs.weight), \
             which config.json cannot express"
        );
    }
    obj.remove("quantization_config");
    obj.insert("torch_dtype".into(), json!(dtype.torch_name()));
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), json!(dtype.torch_name()));
    }
    if classifier {
        let arch = match cfg.arch {
            super::config::Arch::Llama => "LlamaForSequenceClassification",
            super::config::Arch::Mistral => "MistralForSequenceClassification",
            super::config::Arch::Qwen2 => "Qwen2ForSequenceClassification",
        };
        obj.insert("architectures".into(), json!([arch]));
        obj.insert("num_labels".into(), json!(1));
        obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
        obj.insert("label2id".into(), json!({"LABEL_0": 0}));
        let no_pad = obj.get("pad_token_id").is_none_or(Json::is_null);
        if let (true, Some(eos)) = (no_pad, cfg.eos_token_ids.first()) {
            obj.insert("pad_token_id".into(), json!(eos));
        }
    }
    Ok(v)
}

/// The tokenizer files of an HF folder for a GGUF base: `tokenizer.json` rebuilt from the
/// vocabulary, `tokenizer_config.json` with the special tokens and the chat template, and
/// `generation_config.json` with the ids that end a generation. As `(file name, JSON)`.
pub fn gguf_tokenizer_files(g: &Gguf) -> Result<Vec<(&'static str, Json)>> {
    let tokenizer = crate::tokenizer::gguf_tokenizer_json(g)?;
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let id = |key: &str| -> Result<Option<u64>> { g.opt(key, Gguf::get_u64) };
    let text = |key: &str| -> Result<Option<String>> {
        match id(key)? {
            None => Ok(None),
            Some(i) => tokens
                .get(i as usize)
                .map(|t| Some(t.to_string()))
                .with_context(|| {
                    format!(
                        "GGUF file {}: `{key}` = {i} is outside the vocabulary",
                        g.path().display()
                    )
                }),
        }
    };
    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = text(key)? {
            config.insert(field.into(), json!(t));
        }
    }
    if let Some(ctx) = g.opt(
        &format!("{}.context_length", g.architecture()?),
        Gguf::get_u64,
    )? {
        config.insert("model_max_length".into(), json!(ctx));
    }
    if g.get("tokenizer.chat_template").is_some() {
        config.insert(
            "chat_template".into(),
            json!(g.get_str("tokenizer.chat_template")?),
        );
    }
    let mut generation = serde_json::Map::new();
    if let Some(bos) = id("tokenizer.ggml.bos_token_id")? {
        generation.insert("bos_token_id".into(), json!(bos));
    }
    let mut eos = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(i) = id(key)?.filter(|i| !eos.contains(i)) {
            eos.push(i);
        }
    }
    match eos.as_slice() {
        [] => {}
        [one] => {
            generation.insert("eos_token_id".into(), json!(one));
        }
        many => {
            generation.insert("eos_token_id".into(), json!(many));
        }
    }
    Ok(vec![
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", Json::Object(config)),
        ("generation_config.json", Json::Object(generation)),
    ])
}
