//! The parsers of untrusted files, driven from raw bytes: the entry points of the fuzz targets
//! (`fuzz/`, cargo-fuzz) and of `tests/fuzz_corpus.rs`, which replays their corpus and every
//! input a fuzzer once crashed on. Each reads the bytes the way a run reads that file and goes
//! on to what a run does next with it; the contract is that it returns (the parse may fail),
//! never panics, and never allocates without bound.
//!
//! GGUF files and datasets are read through paths (memory-mapped, extension-sniffed), so the
//! bytes go to a scratch file first: one per process and format, under the temp folder.

use crate::config::RunConfig;
use crate::model::config::LlamaConfig;
use std::path::PathBuf;

/// Tensors larger than this are not dequantized (a fuzzed header can claim any shape; the
/// check that the bytes lie inside the file is what `Gguf::open` guarantees).
const MAX_DEQUANT_ELEMENTS: u64 = 1 << 20;

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("rlhf-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).expect("the temp folder is writable");
    path
}

/// A GGUF file: header, metadata and tensor table; then what loading does next: the model
/// config, the tokenizer and chat template, and each small tensor dequantized.
pub fn gguf(bytes: &[u8]) {
    let path = scratch("model.gguf", bytes);
    let Ok(g) = crate::gguf::Gguf::open(&path) else {
        return;
    };
    if let Ok(v) = g.model_config() {
        let _ = LlamaConfig::from_json(&v);
    }
    let _ = crate::tokenizer::Tok::from_gguf(&g);
    let _ = crate::tokenizer::ChatTemplate::from_gguf(&g);
    for t in g.tensors() {
        let n: u64 = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap_or(u64::MAX);
        if n <= MAX_DEQUANT_ELEMENTS {
            let _ = g.tensor_f32(&t.name);
        }
    }
}

/// A Hugging Face `config.json`.
pub fn model_config(bytes: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
        if let Ok(c) = LlamaConfig::from_json(&v) {
            let _ = c.block_linear_params();
        }
    }
}

/// A safetensors file: the header, then every tensor converted to f32 as the loaders do.
pub fn safetensors(bytes: &[u8]) {
    let Ok(st) = safetensors::SafeTensors::deserialize(bytes) else {
        return;
    };
    for (_, view) in st.tensors() {
        let _ = crate::model::weights::view_to_f32(&view);
    }
}

/// A run file (TOML), parsed and validated as `--config` is.
pub fn run_config(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = RunConfig::parse(text, std::path::Path::new("fuzz.toml"));
    }
}

/// A dataset (`.jsonl`, and the same bytes as `.json`): rows, then each row read as a
/// preference pair and as a prompt.
pub fn dataset(bytes: &[u8]) {
    for ext in ["jsonl", "json"] {
        let path = scratch(&format!("rows.{ext}"), bytes);
        let Ok(rows) = crate::data::read_rows(&path) else {
            continue;
        };
        for row in rows {
            let _ = crate::data::parse_preference(&row);
            let _ = crate::data::parse_prompt(row);
        }
    }
}
