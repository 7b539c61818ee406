//! A GGUF file's vocabulary (`tokenizer.ggml.*`) rebuilt as the equivalent HF `tokenizer.json`.

use crate::gguf::Gguf;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value as Json};
use std::path::Path;

// GGUF token types (llama.cpp `llama_token_type`).
pub(super) const TOKEN_NORMAL: i32 = 1;
pub(super) const TOKEN_UNKNOWN: i32 = 2;
pub(super) const TOKEN_CONTROL: i32 = 3;
pub(super) const TOKEN_USER_DEFINED: i32 = 4;

// Split regexes in their HF `tokenizer.json` form (llama.cpp spells the case-insensitive
// group out). The GPT-2 regex needs no constant: `ByteLevel` with `use_regex` applies it.

/// Llama 3 family: digits in groups of up to three.
pub(super) const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 family: like Llama 3 but single digits.
pub(super) const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer, normalizer and flags for a `tokenizer.ggml.pre` value, following the
/// table in llama.cpp's `llama-vocab.cpp` and the matching HF `tokenizer.json` files.
struct PreTok {
    pre_tokenizer: Json,
    normalizer: Json,
    ignore_merges: bool,
    add_bos_default: bool,
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_byte_level(regex: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

fn gpt2_pre_tokenizer(pre: Option<&str>, path: &Path) -> Result<PreTok> {
    let plain = |pre_tokenizer| PreTok {
        pre_tokenizer,
        normalizer: Json::Null,
        ignore_merges: false,
        add_bos_default: false,
    };
    Ok(match pre {
        // Old files without `pre`, and llama.cpp's "default", get the GPT-2 split, as
        // transformers does.
        None
        | Some(
            "default" | "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es"
            | "jina-de" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de" | "jina-v2-code"
            | "roberta-bpe" | "gigachat" | "trillion" | "granite-docling" | "a.x-4.0" | "mellum",
        ) => plain(byte_level(true)),
        // Digits one by one, then the GPT-2 split (SmolLM, StarCoder).
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva",
        ) => plain(json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]})),
        Some(
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
            | "lfm2",
        ) => PreTok {
            pre_tokenizer: split_then_byte_level(LLAMA3_REGEX),
            normalizer: Json::Null,
            ignore_merges: true,
            add_bos_default: true,
        },
        Some("dbrx" | "smaug-bpe") => plain(split_then_byte_level(LLAMA3_REGEX)),
        // Qwen2's tokenizer.json also NFC-normalizes.
        Some("qwen2" | "deepseek-r1-qwen" | "stablelm2") => PreTok {
            pre_tokenizer: split_then_byte_level(QWEN2_REGEX),
            normalizer: json!({"type": "NFC"}),
            ignore_merges: false,
            add_bos_default: false,
        },
        Some(other) => bail!(
            "GGUF file {}: pre-tokenizer `{other}` is not supported (supported: gpt-2, smollm, starcoder, llama3/llama-bpe, qwen2 and their aliases); use the model's tokenizer.json instead",
            path.display()
        ),
    })
}

/// HF added-token entry.
fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": special,
    })
}

/// Post-processor adding BOS and/or EOS on `encode(.., add_special_tokens = true)`.
fn template_processor(bos: Option<(u32, &str)>, eos: Option<(u32, &str)>) -> Json {
    let mut single = vec![];
    let mut pair = vec![];
    let mut specials = serde_json::Map::new();
    let special =
        |(_, t): (u32, &str), type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let out = if seq == "A" { &mut single } else { &mut pair };
        if let Some(b) = bos {
            out.push(special(b, type_id));
        }
        out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some(e) = eos {
            out.push(special(e, type_id));
        }
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    for (id, text) in bos.into_iter().chain(eos) {
        specials.insert(
            text.into(),
            json!({"id": text, "ids": [id], "tokens": [text]}),
        );
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// The HF `tokenizer.json` equivalent to a GGUF file's tokenizer metadata. Exposed so the
/// result can be inspected or saved next to a converted model.
pub fn gguf_tokenizer_json(g: &Gguf) -> Result<Json> {
    let path = g.path();
    let model = g.get_str("tokenizer.ggml.model")?;
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types = match g.opt("tokenizer.ggml.token_type", Gguf::get_i32_array)? {
        Some(t) if t.len() != n => bail!(
            "GGUF file {}: `tokenizer.ggml.token_type` has {} entries for {n} tokens",
            path.display(),
            t.len()
        ),
        Some(t) => t,
        None => vec![TOKEN_NORMAL; n],
    };
    let token_at = |key: &str| -> Result<Option<(u32, &str)>> {
        match g.opt(key, Gguf::get_u64)? {
            None => Ok(None),
            Some(id) if (id as usize) < n => Ok(Some((id as u32, tokens[id as usize]))),
            Some(id) => bail!(
                "GGUF file {}: `{key}` = {id} is outside the vocabulary of {n} tokens",
                path.display()
            ),
        }
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let add_eos = g
        .opt("tokenizer.ggml.add_eos_token", Gguf::get_bool)?
        .unwrap_or(false);

    let mut vocab = serde_json::Map::with_capacity(n);
    for (id, t) in tokens.iter().enumerate() {
        // Duplicate strings: the last id wins, as in transformers' converter.
        vocab.insert((*t).to_string(), json!(id));
    }
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter_map(|(id, (t, &ty))| match ty {
            TOKEN_CONTROL | TOKEN_UNKNOWN => Some(added_token(id, t, true)),
            TOKEN_USER_DEFINED => Some(added_token(id, t, false)),
            _ => None,
        })
        .collect();

    let (model_json, normalizer, pre_tokenizer, decoder, add_bos_default) = match model {
        "gpt2" => {
            let pre = g.opt("tokenizer.ggml.pre", Gguf::get_str)?;
            let p = gpt2_pre_tokenizer(pre, path)?;
            let merges: Vec<Json> = g
                .get_str_array("tokenizer.ggml.merges")?
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    // "a b": the first space after the first character separates the pair.
                    let split = m
                        .char_indices()
                        .nth(1)
                        .and_then(|(start, _)| m[start..].find(' ').map(|p| start + p));
                    match split {
                        Some(p) => Ok(json!([&m[..p], &m[p + 1..]])),
                        None => bail!(
                            "GGUF file {}: merge #{i} {m:?} is not two tokens separated by a space",
                            path.display()
                        ),
                    }
                })
                .collect::<Result<_>>()?;
            let model_json = json!({
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": p.ignore_merges,
                "vocab": vocab, "merges": merges,
            });
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            (
                model_json,
                p.normalizer,
                p.pre_tokenizer,
                decoder,
                p.add_bos_default,
            )
        }
        "llama" => {
            let scores = g.get_f32_array("tokenizer.ggml.scores")?;
            if scores.len() != n {
                bail!(
                    "GGUF file {}: `tokenizer.ggml.scores` has {} entries for {n} tokens",
                    path.display(),
                    scores.len()
                );
            }
            let unk = token_at("tokenizer.ggml.unknown_token_id")?
                .or_else(|| tokens.first().map(|t| (0, *t)))
                .map(|(_, t)| t);
            let merges = spm_merges(&tokens, &scores, &types);
            let model_json = json!({
                "type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            });
            let space_prefix = g
                .opt("tokenizer.ggml.add_space_prefix", Gguf::get_bool)?
                .unwrap_or(true);
            let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
            let normalizer = if space_prefix {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace]})
            } else {
                replace
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let decoder = json!({"type": "Sequence", "decoders": decoders});
            (model_json, normalizer, Json::Null, decoder, true)
        }
        other => bail!(
            "GGUF file {}: tokenizer model `{other}` is not supported (supported: gpt2, llama)",
            path.display()
        ),
    };
    let add_bos = g
        .opt("tokenizer.ggml.add_bos_token", Gguf::get_bool)?
        .unwrap_or(add_bos_default);
    let bos_added = if add_bos {
        Some(bos.ok_or_else(|| {
            anyhow!(
                "GGUF file {}: `tokenizer.ggml.add_bos_token` is set but there is no `tokenizer.ggml.bos_token_id`",
                path.display()
            )
        })?)
    } else {
        None
    };
    let eos_added = if add_eos {
        Some(eos.ok_or_else(|| {
            anyhow!(
                "GGUF file {}: `tokenizer.ggml.add_eos_token` is set but there is no `tokenizer.ggml.eos_token_id`",
                path.display()
            )
        })?)
    } else {
        None
    };
    let post_processor = if bos_added.is_some() || eos_added.is_some() {
        template_processor(bos_added, eos_added)
    } else if model == "gpt2" {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    } else {
        Json::Null
    };

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model_json,
    }))
}

/// BPE merges for a SentencePiece vocabulary, derived from the piece scores like
/// transformers' GGUF converter: every split of a piece into two vocabulary pieces is a
/// merge, ranked by the score of the merged piece (higher first); splits of one piece are
/// ordered by the scores of their halves. Only normal pieces are merge results, as in
/// SentencePiece (control, user-defined and byte pieces are never built by merging).
fn spm_merges(tokens: &[&str], scores: &[f32], types: &[i32]) -> Vec<Json> {
    let index: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f32, f32, f32, &str, &str)> = vec![];
    for (i, piece) in tokens.iter().enumerate() {
        if types[i] != TOKEN_NORMAL {
            continue;
        }
        let start = merges.len();
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((scores[i], scores[li], scores[ri], l, r));
            }
        }
        merges[start..].sort_by(|a, b| {
            (b.1, b.2)
                .partial_cmp(&(a.1, a.2))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
    // Stable: ties keep vocabulary order.
    merges.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| json!([l, r]))
        .collect()
}
