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

mod chat;
mod files;
mod gguf_json;
mod to_gguf;

pub use chat::{ChatMessage, ChatTemplate};
pub use gguf_json::gguf_tokenizer_json;
pub use to_gguf::hf_tokenizer_gguf_metadata;

use crate::gguf::Gguf;
use anyhow::{anyhow, bail, Result};
use files::{read_json, special_token_text};
use serde_json::Value as Json;
use std::path::Path;

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

#[cfg(test)]
mod tests;
