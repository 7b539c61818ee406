//! A separate reward model: any Hugging Face `*ForSequenceClassification` folder with one label
//! (`rlhf merge` of an `rlhf rm` adapter writes one; so does transformers for a TRL reward
//! model). It is a second frozen base, loaded with the same loader and quantization rules as the
//! policy base, plus its `score` head `[1, hidden]`; no adapters. It is only ever scored without
//! a graph.
//!
//! The sequence reward is the score at the right-most token that is not the config's
//! `pad_token_id`, exactly what transformers' `*ForSequenceClassification` reads (with right
//! padding: the token at `sequence_length - 1`). As there, a sequence ending in the pad token
//! (pad = eos, a response that stopped) is scored at the token before it.

use super::config::LlamaConfig;
use super::llama::{Batch, Llama};
use super::load::{LoadOptions, SafetensorsSource, TensorSource};
use crate::tokenizer::{ChatTemplate, Tok};
use anyhow::{anyhow, bail, ensure, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// The sequence-classification architectures we load, with the causal-LM name of their body.
const ARCHITECTURES: [(&str, &str); 3] = [
    ("LlamaForSequenceClassification", "LlamaForCausalLM"),
    ("MistralForSequenceClassification", "MistralForCausalLM"),
    ("Qwen2ForSequenceClassification", "Qwen2ForCausalLM"),
];

/// A loaded reward model: frozen body, score head, its own tokenizer and chat template.
pub struct RewardModel<B: Backend> {
    pub base: Llama<B>,
    /// `score.weight`, `[1, hidden]`.
    pub score: Tensor<B, 2>,
    /// The config's `pad_token_id`: the token that is not scored (see the module docs).
    pub pad_token_id: Option<u32>,
    pub tok: Tok,
    pub chat: Option<ChatTemplate>,
    pub dir: PathBuf,
}

/// The architecture and head of a reward folder's `config.json`, checked. `key` names the run
/// config key in errors. Reads nothing but `config.json`, so it serves the planner too.
pub fn reward_config(dir: &Path, key: &str) -> Result<(LlamaConfig, Option<u32>)> {
    ensure!(
        dir.is_dir(),
        "key `{key}`: {}: reward model folder not found (expected a Hugging Face *ForSequenceClassification folder)",
        dir.display()
    );
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file)
        .map_err(|e| anyhow!("key `{key}`: {}: cannot read ({e})", file.display()))?;
    let mut v: Json = serde_json::from_str(&text)
        .map_err(|e| anyhow!("key `{key}`: {}: not valid JSON ({e})", file.display()))?;
    let arch = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .unwrap_or("")
        .to_string();
    let Some(&(_, causal)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        let names: Vec<&str> = ARCHITECTURES.iter().map(|(a, _)| *a).collect();
        bail!(
            "key `{key}`: {}: unsupported architecture `{arch}` for a reward model: expected {}",
            file.display(),
            names.join(", ")
        );
    };
    // transformers' default is two labels; `id2label` alone also sets the count.
    let labels = match (v.get("num_labels"), v.get("id2label")) {
        (Some(n), _) => n.as_u64(),
        (None, Some(Json::Object(m))) => Some(m.len() as u64),
        (None, _) => Some(2),
    };
    ensure!(
        labels == Some(1),
        "key `{key}`: {}: num_labels is {}, expected 1 (a reward model scores with one label)",
        file.display(),
        labels.map_or("not a number".to_string(), |n| n.to_string())
    );
    let pad = v
        .get("pad_token_id")
        .and_then(Json::as_u64)
        .map(|p| p as u32);
    v["architectures"] = serde_json::json!([causal]);
    let cfg = LlamaConfig::from_json(&v)
        .map_err(|e| anyhow!("key `{key}`: {}: {e:#}", file.display()))?;
    Ok((cfg, pad))
}

/// What can be checked of a reward folder before any weight is read: its config (as
/// [`reward_config`]), its tokenizer and its weights file.
pub fn check_reward_folder(dir: &Path, key: &str) -> Result<()> {
    reward_config(dir, key)?;
    let tok = dir.join("tokenizer.json");
    ensure!(
        tok.is_file(),
        "key `{key}`: {}: missing; a reward model needs its own tokenizer",
        tok.display()
    );
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    ensure!(
        single.is_file() || index.is_file(),
        "key `{key}`: {}: missing (no model.safetensors.index.json either)",
        single.display()
    );
    Ok(())
}

impl<B: Backend> RewardModel<B> {
    /// Loads the folder `dir` (the value of run-config key `key`): config, tokenizer and chat
    /// template, the body (NF4 when `quantize`, as the policy base) and `score.weight`. Every
    /// error is one line naming `key` and the file.
    pub fn load(dir: &Path, key: &str, quantize: bool, device: &B::Device) -> Result<Self> {
        let (mut cfg, pad_token_id) = reward_config(dir, key)?;
        let tok_file = dir.join("tokenizer.json");
        ensure!(
            tok_file.is_file(),
            "key `{key}`: {}: missing; a reward model needs its own tokenizer",
            tok_file.display()
        );
        let tok = Tok::from_file(&tok_file).map_err(|e| anyhow!("key `{key}`: {e:#}"))?;
        ensure!(
            tok.vocab_size() <= cfg.vocab_size,
            "key `{key}`: {}: {} tokens, more than the model's vocab_size {} in config.json",
            tok_file.display(),
            tok.vocab_size(),
            cfg.vocab_size
        );
        let chat = ChatTemplate::from_dir(dir).map_err(|e| anyhow!("key `{key}`: {e:#}"))?;
        let mut src = SafetensorsSource::open(dir).map_err(|e| anyhow!("key `{key}`: {e:#}"))?;
        let weights = dir.join("model.safetensors");
        ensure!(
            src.contains("score.weight"),
            "key `{key}`: {}: no score head `score.weight`; expected a *ForSequenceClassification checkpoint",
            weights.display()
        );
        let (head, shape) = src
            .read("score.weight")
            .map_err(|e| anyhow!("key `{key}`: {}: {e:#}", weights.display()))?;
        ensure!(
            shape == [1, cfg.hidden_size],
            "key `{key}`: {}: `score.weight` has shape {shape:?}, expected [1, {}]",
            weights.display(),
            cfg.hidden_size
        );
        ensure!(
            head.iter().all(|x| x.is_finite()),
            "key `{key}`: {}: `score.weight` holds NaN/inf",
            weights.display()
        );
        // A classifier has no LM head: load the body as if tied, then keep the table as the
        // lookup-only table it is (bf16 on CUDA, as the policy base's untied table).
        let tied = cfg.tie_word_embeddings;
        cfg.tie_word_embeddings = true;
        let mut base = Llama::load(cfg, &mut src, LoadOptions { quantize }, device)
            .map_err(|e| anyhow!("key `{key}`: {}: {e:#}", dir.display()))?;
        base.cfg.tie_word_embeddings = tied;
        base.embed = super::ops::dense_at_rest(base.embed);
        let h = base.cfg.hidden_size;
        let score = Tensor::from_data(TensorData::new(head, [1, h]), device);
        crate::devmem::note::<B>(device, "reward model loaded");
        crate::alloc::trim();
        Ok(Self {
            base,
            score,
            pad_token_id,
            tok,
            chat,
            dir: dir.to_path_buf(),
        })
    }

    /// The longest sequence it scores: its `max_position_embeddings` (none when RoPE scaling
    /// extends it).
    pub fn max_positions(&self) -> Option<usize> {
        let c = &self.base.cfg;
        c.rope_scaling
            .is_none()
            .then_some(c.max_position_embeddings)
    }

    /// The position scored in each row: the right-most valid token that is not `pad_token_id`,
    /// else the last valid one.
    pub fn scored_positions(&self, rows: &[Vec<u32>], valid: &[Vec<bool>]) -> Vec<usize> {
        rows.iter()
            .zip(valid)
            .map(|(ids, ok)| {
                let real = |i: &usize| ok[*i];
                let not_pad = (0..ids.len())
                    .filter(real)
                    .rfind(|&i| Some(ids[i]) != self.pad_token_id);
                not_pad.or_else(|| (0..ids.len()).rfind(real)).unwrap_or(0)
            })
            .collect()
    }

    /// One reward per row of right-padded `rows` (`valid` false on padding): one forward of the
    /// body, the hidden state of each row's scored position times the head. Call it on a
    /// backend without autodiff (the engine loads it on its inner backend): no graph is recorded.
    pub fn score_rows(&self, rows: &[Vec<u32>], valid: &[Vec<bool>]) -> Result<Vec<f32>> {
        ensure!(!rows.is_empty(), "reward model: empty batch");
        let t = rows[0].len();
        ensure!(
            t > 0 && rows.iter().all(|r| r.len() == t),
            "reward model: rows must be padded to one non-zero length"
        );
        let vocab = self.base.cfg.vocab_size;
        if let Some(&bad) = rows.iter().flatten().find(|&&id| id as usize >= vocab) {
            bail!(
                "{}: token id {bad} is outside the reward model's vocabulary ({vocab})",
                self.dir.display()
            );
        }
        let device = &self.base.device;
        let batch = Batch::new(rows, valid.to_vec(), device);
        let hidden = self.base.forward_hidden(&batch, None, None);
        let [b, _, h] = hidden.dims();
        let at: Vec<i64> = self
            .scored_positions(rows, valid)
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as i64)
            .collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(at, [b]), device);
        let picked = hidden.reshape([b * t, h]).select(0, idx);
        let scores = picked.matmul(self.score.clone().transpose()).reshape([b]);
        scores
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow!("reward model scores: {e:?}"))
    }

    /// Bytes at rest of the body and head (what the planner's reward-model term counts).
    pub fn storage_bytes(&self) -> usize {
        self.base.storage_bytes() + self.base.cfg.hidden_size * 4
    }
}
