//! An HF model folder's tokenizer as GGUF metadata (`tokenizer.ggml.*`, the chat template): what
//! llama.cpp's converter writes for a byte-level BPE (`gpt2`) tokenizer, and the inverse of
//! `gguf_json`, which rebuilds `tokenizer.json` from that metadata.
//!
//! llama.cpp picks its split regexes from `tokenizer.ggml.pre`, a name rather than the
//! pre-tokenizer itself, so only the pre-tokenizers that name stands for exactly (the same table
//! `gguf_json` reads) are written; any other is refused rather than given a wrong name.
//! SentencePiece-style tokenizers (`byte_fallback`, `▁`) would need piece scores that
//! `tokenizer.json` does not hold, and are refused too.

use super::files::{read_json, special_token_text};
use super::gguf_json::{
    LLAMA3_REGEX, QWEN2_REGEX, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED,
};
use super::{ChatTemplate, Tok};
use crate::gguf::MetaValue;
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token type for ids no token occupies (the embedding rows past the vocabulary).
const TOKEN_UNUSED: i32 = 5;

fn is_byte_level(p: &Json, use_regex: bool) -> bool {
    p["type"] == "ByteLevel"
        && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == use_regex
        && p.get("add_prefix_space").and_then(Json::as_bool) != Some(true)
}

/// The `tokenizer.ggml.pre` name whose pre-tokenizer (as `gguf_json` builds it) is `pre`.
fn pre_name(pre: &Json) -> Option<&'static str> {
    if is_byte_level(pre, true) {
        return Some("gpt-2");
    }
    if pre["type"] != "Sequence" {
        return None;
    }
    match pre["pretokenizers"].as_array()?.as_slice() {
        [d, b] if d["type"] == "Digits" && d["individual_digits"] == true => {
            is_byte_level(b, true).then_some("smollm")
        }
        [s, b] if s["type"] == "Split" && is_byte_level(b, false) => {
            if s["behavior"] != "Isolated" || s["invert"] == true {
                return None;
            }
            match s["pattern"]["Regex"].as_str()? {
                LLAMA3_REGEX => Some("llama-bpe"),
                QWEN2_REGEX => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` for the tokenizer of HF folder `dir`,
/// padded to `vocab_size` ids (the model's embedding rows) with unused `[PAD{id}]` tokens as
/// llama.cpp's converter does.
pub fn hf_tokenizer_gguf_metadata(
    dir: &Path,
    vocab_size: usize,
) -> Result<Vec<(String, MetaValue)>> {
    let path = dir.join("tokenizer.json");
    let j = read_json(&path)?;
    let model = &j["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        bail!(
            "{}: a {} tokenizer{} has no GGUF equivalent this writer knows (only byte-level BPE, tokenizer.ggml.model = gpt2)",
            path.display(),
            model["type"].as_str().unwrap_or("?"),
            if model["byte_fallback"] == true { " with byte fallback" } else { "" }
        );
    }
    let pre = pre_name(&j["pre_tokenizer"]).with_context(|| {
        format!(
            "{}: pre-tokenizer {} matches no llama.cpp pre-tokenizer name this writer knows (gpt-2, smollm, llama-bpe, qwen2)",
            path.display(),
            j["pre_tokenizer"]
        )
    })?;
    let normalizer_ok = match &j["normalizer"] {
        Json::Null => true,
        n => pre == "qwen2" && n["type"] == "NFC",
    };
    if !normalizer_ok {
        bail!(
            "{}: normalizer {} has no equivalent for llama.cpp pre-tokenizer `{pre}`",
            path.display(),
            j["normalizer"]
        );
    }

    // id -> (text, type)
    let mut slots: HashMap<usize, (String, i32)> = HashMap::new();
    let vocab = model["vocab"]
        .as_object()
        .with_context(|| format!("{}: `model.vocab` is not an object", path.display()))?;
    for (text, id) in vocab {
        let id = id.as_u64().with_context(|| {
            format!("{}: vocabulary entry {text:?} has id {id}", path.display())
        })?;
        slots.insert(id as usize, (text.clone(), TOKEN_NORMAL));
    }
    for t in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (t["id"].as_u64(), t["content"].as_str()) else {
            bail!("{}: added token {t} has no id or content", path.display());
        };
        let ty = if t["special"] == true {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        slots.insert(id as usize, (text.to_string(), ty));
    }
    let n = slots.keys().max().map_or(0, |m| m + 1);
    if n > vocab_size {
        bail!(
            "{}: token id {} is past the model's vocab_size {vocab_size}",
            path.display(),
            n - 1
        );
    }
    let (tokens, types): (Vec<MetaValue>, Vec<MetaValue>) = (0..vocab_size)
        .map(|id| {
            let (text, ty) = slots
                .remove(&id)
                .unwrap_or_else(|| (format!("[PAD{id}]"), TOKEN_UNUSED));
            (MetaValue::Str(text), MetaValue::I32(ty))
        })
        .unzip();
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.as_str().map(|t| (t, i)))
        .collect();

    let merges = model["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) => Ok(MetaValue::Str(s.clone())),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(MetaValue::Str(format!("{a} {b}"))),
                _ => bail!("{}: merge #{i} is {m}", path.display()),
            },
            _ => bail!("{}: merge #{i} is {m}", path.display()),
        })
        .collect::<Result<Vec<_>>>()?;

    let mut meta: Vec<(String, MetaValue)> = vec![
        ("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), MetaValue::Str(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(tokens.clone()),
        ),
        ("tokenizer.ggml.token_type".into(), MetaValue::Array(types)),
        ("tokenizer.ggml.merges".into(), MetaValue::Array(merges)),
    ];
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.exists() {
        read_json(&config_path)?
    } else {
        Json::Null
    };
    let mut special = HashMap::new();
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(text) = special_token_text(&config, field, &config_path)? {
            let id = *ids.get(text.as_str()).with_context(|| {
                format!(
                    "{}: `{field}` {text:?} is not in the vocabulary",
                    config_path.display()
                )
            })?;
            special.insert(field, id as u32);
            meta.push((key.into(), MetaValue::U32(id as u32)));
        }
    }
    // Whether encoding adds BOS/EOS is the post-processor's doing: ask the tokenizer itself.
    let tok = Tok::from_file(&path)?;
    let (with, without) = (tok.encode("a", true)?, tok.encode("a", false)?);
    let added = with.len() > without.len();
    let add_bos = added && with.first() == special.get("bos_token");
    let add_eos = added && with.last() == special.get("eos_token");
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(add_bos),
    ));
    meta.push((
        "tokenizer.ggml.add_eos_token".into(),
        MetaValue::Bool(add_eos),
    ));
    if let Some(chat) = ChatTemplate::from_dir(dir)? {
        meta.push((
            "tokenizer.chat_template".into(),
            MetaValue::Str(chat.source().to_string()),
        ));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The `pre_tokenizer` sections of the published tokenizer.json files of GPT-2, SmolLM2,
    /// Llama 3 and Qwen2, and the name llama.cpp's converter gives each.
    #[test]
    fn published_pre_tokenizers_get_llama_cpp_names() {
        let byte_level = |use_regex| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |regex: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                byte_level(false)]})
        };
        let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]});
        assert_eq!(pre_name(&byte_level(true)), Some("gpt-2"));
        assert_eq!(pre_name(&smollm), Some("smollm"));
        assert_eq!(pre_name(&split(llama3)), Some("llama-bpe"));
        assert_eq!(pre_name(&split(qwen2)), Some("qwen2"));
        // Anything else has no name that means the same split.
        assert_eq!(pre_name(&split(r"\s+")), None);
        assert_eq!(pre_name(&byte_level(false)), None);
        let prefixed = json!({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true});
        assert_eq!(pre_name(&prefixed), None);
        assert_eq!(pre_name(&json!({"type": "Metaspace"})), None);
        assert_eq!(pre_name(&Json::Null), None);
    }
}
