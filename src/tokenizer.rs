//! Tokenizers (HF `tokenizer.json`, or rebuilt from GGUF metadata) and chat templates.
//!
//! A GGUF file carries its vocabulary as metadata (`tokenizer.ggml.*`). [`Tok::from_gguf`]
//! rebuilds the equivalent HF `tokenizer.json` (see [`gguf_tokenizer_json`]) and loads it with
//! the `tokenizers` crate, so both sources go through the same, well-tested encoder:
//! - `gpt2` (byte-level BPE): vocab + merges, the pre-tokenizer chosen from
//!   `tokenizer.ggml.pre` the way llama.cpp chooses its split regexes (which mirror the
//!   original `tokenizer.json`), control tokens as special added tokens.
//! - `llama` (SentencePiece): BPE with byte fallback, merges derived from the piece scores as
//!   transformers' GGUF converter does, `▁` for spaces.
//!
//! [`ChatTemplate`] renders HF chat templates (Jinja) with minijinja, configured like
//! transformers' `apply_chat_template`: `trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! `strftime_now`, Python-style string/dict methods and a Python-compatible `tojson`.

use crate::gguf::Gguf;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use std::fmt::Write as _;
use std::path::Path;

// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

// Split regexes in their HF `tokenizer.json` form (llama.cpp spells the case-insensitive
// group out). The GPT-2 regex needs no constant: `ByteLevel` with `use_regex` applies it.

/// Llama 3 family: digits in groups of up to three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 family: like Llama 3 but single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A loaded tokenizer plus the ids of its bos/eos/pad tokens.
#[derive(Clone)]
pub struct Tok {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    /// Other ids that end a generation (GGUF eot/eom tokens, the `eos_token_id` list of an HF
    /// `generation_config.json`).
    extra_eos: Vec<u32>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tok {
    /// Loads an HF `tokenizer.json`. The bos/eos/pad tokens are taken from a
    /// `tokenizer_config.json` next to it when there is one (`tokenizer.json` alone does not
    /// say which token is which). Whether BOS is added on `encode(.., true)` is decided by the
    /// `post_processor` in `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let mut tok = Tok {
            inner,
            bos_id: None,
            eos_id: None,
            pad_id: None,
            extra_eos: vec![],
        };
        let config_path = path.with_file_name("tokenizer_config.json");
        if config_path.exists() {
            let config = read_json(&config_path)?;
            let id_of = |field: &str| -> Result<Option<u32>> {
                match special_token_text(&config, field, &config_path)? {
                    None => Ok(None),
                    Some(text) => tok.inner.token_to_id(&text).map(Some).ok_or_else(|| {
                        anyhow!(
                            "{}: `{field}` is {text:?}, which is not in the vocabulary of {}",
                            config_path.display(),
                            path.display()
                        )
                    }),
                }
            };
            let (bos, eos, pad) = (
                id_of("bos_token")?,
                id_of("eos_token")?,
                id_of("pad_token")?,
            );
            tok.bos_id = bos;
            tok.eos_id = eos;
            tok.pad_id = pad;
        }
        let gen_path = path.with_file_name("generation_config.json");
        if gen_path.exists() {
            let n = tok.vocab_size() as u64;
            let ids = match read_json(&gen_path)?.get("eos_token_id") {
                None | Some(Json::Null) => vec![],
                Some(Json::Array(a)) => a.clone(),
                Some(v) => vec![v.clone()],
            };
            for v in ids {
                match v.as_u64() {
                    Some(id) if id < n => tok.extra_eos.push(id as u32),
                    _ => bail!(
                        "{}: `eos_token_id` {v} is not a token id of {}",
                        gen_path.display(),
                        path.display()
                    ),
                }
            }
        }
        Ok(tok)
    }

    /// Rebuilds the tokenizer stored in a GGUF file's metadata (see the module docs).
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let spec = gguf_tokenizer_json(g)?;
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
            anyhow!(
                "GGUF file {}: cannot build the tokenizer from its metadata: {e}",
                g.path().display()
            )
        })?;
        let n = inner.get_vocab_size(true) as u64;
        let id = |key: &str| -> Result<Option<u32>> {
            match g.opt(key, Gguf::get_u64)? {
                Some(id) if id < n => Ok(Some(id as u32)),
                Some(id) => bail!(
                    "GGUF file {}: `{key}` = {id} is outside the vocabulary of {n} tokens",
                    g.path().display()
                ),
                None => Ok(None),
            }
        };
        let mut extra_eos = vec![];
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            extra_eos.extend(id(key)?);
        }
        Ok(Tok {
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            extra_eos,
            inner,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
    /// recognised, as in HF; `add_special_tokens` adds what the post-processor adds (BOS for
    /// Llama-style tokenizers, nothing for SmolLM2/Qwen).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize {:?}: {e}", truncate(text)))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; with `skip_special_tokens` the special (control) tokens are left out.
    /// No "clean up tokenization spaces" pass: `decode(encode(s)) == s`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            bail!("cannot decode token id {bad}: the vocabulary has {n} tokens");
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot decode {} token ids: {e}", ids.len()))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Every id that ends a generation: the eos token first, then the GGUF end-of-turn /
    /// end-of-message tokens or the ids listed in `generation_config.json`, without repeats.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = vec![];
        for id in self
            .eos_id
            .into_iter()
            .chain(self.extra_eos.iter().copied())
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Overrides the special ids (e.g. from a model's `generation_config.json`).
    pub fn set_special_ids(&mut self, bos: Option<u32>, eos: Option<u32>, pad: Option<u32>) {
        self.bos_id = bos;
        self.eos_id = eos;
        self.pad_id = pad;
    }

    /// The id of a token given its exact vocabulary text (`"<|im_end|>"`, `"Ġthe"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer (for batch encoding, offsets, saving).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// A special token in `tokenizer_config.json`: a string, `{"content": ...}` (an AddedToken),
/// or null/absent.
fn special_token_text(config: &Json, field: &str, path: &Path) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => bail!(
                "{}: `{field}` is an object without a string `content`",
                path.display()
            ),
        },
        Some(other) => bail!(
            "{}: `{field}` should be a string or {{\"content\": ...}}, found {other}",
            path.display()
        ),
    }
}

// ---------------------------------------------------------------------------------------
// GGUF -> tokenizer.json
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled HF chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source_len", &self.source.len())
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts the template sees.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(|e| anyhow!("invalid chat template: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// From an HF `tokenizer_config.json` (`chat_template` as a string, or as a list of
    /// `{name, template}` of which `default` is used; `bos_token`/`eos_token` as strings or
    /// `{content}`).
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config = read_json(path)?;
        let source = match config.get("chat_template") {
            Some(v) => template_from_json(v, path)?,
            None => bail!("{}: no `chat_template`", path.display()),
        };
        Self::with_config_tokens(&source, &config, path)
    }

    /// From an HF model directory: `chat_template.jinja`, else `chat_template.json`, else the
    /// `chat_template` in `tokenizer_config.json` (newer transformers save the template in its
    /// own file). Special tokens come from `tokenizer_config.json`. `Ok(None)` when the
    /// directory has no template at all (base models); an unreadable or invalid one is an error.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            read_json(&config_path)?
        } else {
            json!({})
        };
        let jinja = dir.join("chat_template.jinja");
        let json_file = dir.join("chat_template.json");
        let source = if jinja.exists() {
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?
        } else if json_file.exists() {
            match read_json(&json_file)?.get("chat_template") {
                Some(v) => template_from_json(v, &json_file)?,
                None => bail!("{}: no `chat_template`", json_file.display()),
            }
        } else {
            match config.get("chat_template") {
                Some(Json::Null) | None => return Ok(None),
                Some(v) => template_from_json(v, &config_path)?,
            }
        };
        Self::with_config_tokens(&source, &config, &config_path).map(Some)
    }

    fn with_config_tokens(source: &str, config: &Json, path: &Path) -> Result<Self> {
        let bos = special_token_text(config, "bos_token", path)?.unwrap_or_default();
        let eos = special_token_text(config, "eos_token", path)?.unwrap_or_default();
        Self::new(source, &bos, &eos)
            .with_context(|| format!("chat template of {}", path.display()))
    }

    /// From GGUF metadata: `tokenizer.chat_template`, with the bos/eos texts looked up in
    /// `tokenizer.ggml.tokens`.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let source = g.get_str("tokenizer.chat_template")?;
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let text = |key: &str| -> Result<String> {
            Ok(match g.opt(key, Gguf::get_u64)? {
                Some(id) => tokens
                    .get(id as usize)
                    .ok_or_else(|| {
                        anyhow!(
                            "GGUF file {}: `{key}` = {id} is outside the vocabulary",
                            g.path().display()
                        )
                    })?
                    .to_string(),
                None => String::new(),
            })
        };
        let (bos, eos) = (
            text("tokenizer.ggml.bos_token_id")?,
            text("tokenizer.ggml.eos_token_id")?,
        );
        Self::new(source, &bos, &eos)
            .with_context(|| format!("chat template of GGUF file {}", g.path().display()))
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the header that
    /// opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_json(&json!(messages), add_generation_prompt, &json!({}))
    }

    /// Renders a single user message (with the template's default system prompt, if any).
    pub fn render_user(&self, user: &str, add_generation_prompt: bool) -> Result<String> {
        self.render(&[ChatMessage::new("user", user)], add_generation_prompt)
    }

    /// Renders messages given as JSON (any fields: `role`, `content`, `tool_calls`, ...) with
    /// extra template variables (`tools`, `documents`, `date_string`, ...) from `extra`, an
    /// object.
    pub fn render_json(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra: &Json,
    ) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        if let Some(obj) = extra.as_object() {
            ctx.extend(obj.clone());
        } else if !extra.is_null() {
            bail!("chat template variables must be a JSON object, got {extra}");
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), json!(add_generation_prompt));
        ctx.entry("bos_token")
            .or_insert_with(|| json!(self.bos_token));
        ctx.entry("eos_token")
            .or_insert_with(|| json!(self.eos_token));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template: {e:#}"))?;
        tmpl.render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| anyhow!("cannot render chat template: {e:#}"))
    }
}

fn template_from_json(v: &Json, path: &Path) -> Result<String> {
    match v {
        Json::String(s) => Ok(s.clone()),
        Json::Array(list) => {
            for item in list {
                if item.get("name").and_then(Json::as_str) == Some("default") {
                    if let Some(t) = item.get("template").and_then(Json::as_str) {
                        return Ok(t.to_string());
                    }
                }
            }
            bail!(
                "{}: `chat_template` is a list without a `default` entry",
                path.display()
            )
        }
        other => bail!(
            "{}: `chat_template` should be a string or a list of {{name, template}}, found {other}",
            path.display()
        ),
    }
}

/// transformers' `{% generation %}...{% endgeneration %}` only marks assistant tokens for
/// masks; rendering ignores it. minijinja has no such tag, so the markers are removed.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner =
            tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(msg: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

/// Prints values the way Jinja2 (Python `str`) does where it differs: `True`, `False`,
/// `None`.
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &minijinja::State<'_, '_>,
    value: &minijinja::Value,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        ValueKind::None => out.write_str("None")?,
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

/// transformers' `tojson`: Python `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. Unlike minijinja's built-in it does not
/// HTML-escape, and it uses Python's `", "`/`": "` separators, so tool schemas render exactly
/// as in Python.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<minijinja::Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    )
                })?;
            (parts[0].clone(), parts[1].clone())
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = PyJson {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    opts.write(&value, 0, &mut out)?;
    Ok(out)
}

struct PyJson {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    }

    fn write(
        &self,
        v: &minijinja::Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        use minijinja::value::ValueKind;
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float_repr(f));
                }
            }
            ValueKind::String => self.write_str(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<minijinja::Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match k.as_str() {
                        Some(s) => self.write_str(s, out),
                        None => self.write_str(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<minijinja::Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            _ => {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a value of kind {}", v.kind()),
                ))
            }
        }
        Ok(())
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for exponents in
/// [-4, 16), otherwise `d.ddde+XX`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let frac = &digits[1..];
        let m = if frac.is_empty() {
            digits.clone()
        } else {
            format!("{}.{frac}", &digits[..1])
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// transformers' `strftime_now(format)`: the current time (here UTC) formatted with C
/// `strftime` directives. Supports %Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&format, secs)
}

fn strftime_utc(format: &str, unix_secs: i64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = chars.next().unwrap_or('%');
        let _ = match spec {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'b' => write!(out, "{}", &MONTHS[month as usize - 1][..3]),
            'B' => write!(out, "{}", MONTHS[month as usize - 1]),
            'a' => write!(out, "{}", &DAYS[weekday][..3]),
            'A' => write!(out, "{}", DAYS[weekday]),
            'j' => write!(out, "{day_of_year:03}"),
            '%' => write!(out, "%"),
            other => {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ))
            }
        };
    }
    Ok(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`]: (year, month 1-12, day 1-31).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests;
