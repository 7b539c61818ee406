//! Bad input gives one clear error line and exit code 2, never a panic.

mod common;
use std::path::{Path, PathBuf};

fn rlhf(args: &[&str]) -> (i32, String) {
    let out = common::rlhf_command().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

/// Asserts exit code 2 and a single `error:` line that contains every `needle`.
fn assert_clean_error(args: &[&str], needles: &[&str]) {
    let (code, stderr) = rlhf(args);
    assert_eq!(code, 2, "exit code for {args:?}; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line for {args:?}, got: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {stderr}");
    }
}

fn tiny_model_copy() -> (tempfile::TempDir, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("model");
    std::fs::create_dir(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    (tmp, dst)
}

fn generate_args(model: &Path) -> Vec<String> {
    [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_generate(model: &Path, needles: &[&str]) {
    let a = generate_args(model);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    assert_clean_error(&a, needles);
}

#[test]
fn missing_model_folder() {
    run_generate(
        Path::new("/nonexistent/model"),
        &["/nonexistent/model", "not found"],
    );
}

#[test]
fn truncated_safetensors() {
    let (_tmp, dir) = tiny_model_copy();
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    run_generate(&dir, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn tensor_shape_mismatch() {
    let (_tmp, dir) = tiny_model_copy();
    let f = dir.join("config.json");
    let text = std::fs::read_to_string(&f)
        .unwrap()
        .replace("\"intermediate_size\": 160", "\"intermediate_size\": 96");
    std::fs::write(&f, text).unwrap();
    run_generate(&dir, &["gate_proj", "shape", "[160, 64]", "[96, 64]"]);
}

#[test]
fn unknown_architecture() {
    let (_tmp, dir) = tiny_model_copy();
    let f = dir.join("config.json");
    let text = std::fs::read_to_string(&f)
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&f, text).unwrap();
    run_generate(
        &dir,
        &["config.json", "unknown architecture `GPT2LMHeadModel`"],
    );
}

#[test]
fn malformed_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("run.toml");
    std::fs::write(&f, "[train\nbatch_size = 2\n").unwrap();
    assert_clean_error(
        &["dpo", "--config", f.to_str().unwrap()],
        &["run.toml", "line 1"],
    );
}

#[test]
fn unknown_config_key() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("run.toml");
    std::fs::write(
        &f,
        "[model]\npath = \"m\"\n\n[train]\nlearning_rat = 1e-4\n",
    )
    .unwrap();
    assert_clean_error(
        &["dpo", "--config", f.to_str().unwrap()],
        &["run.toml", "learning_rat", "line 5"],
    );
}

/// A GGUF file with Llama metadata but no tensors at all.
fn gguf_without_tensors(path: &Path) {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let kv_u32 = [
        ("llama.block_count", 1u32),
        ("llama.embedding_length", 8),
        ("llama.feed_forward_length", 16),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 2),
        ("llama.context_length", 64),
        ("llama.vocab_size", 4),
    ];
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes()); // tensors
    out.extend((kv_u32.len() as u64 + 2).to_le_bytes());
    s(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    s(&mut out, "llama");
    s(&mut out, "llama.attention.layer_norm_rms_epsilon");
    out.extend(6u32.to_le_bytes()); // f32
    out.extend(1e-5f32.to_le_bytes());
    for (k, v) in kv_u32 {
        s(&mut out, k);
        out.extend(4u32.to_le_bytes()); // u32
        out.extend(v.to_le_bytes());
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn missing_gguf_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("m.gguf");
    gguf_without_tensors(&f);
    run_generate(&f, &["m.gguf", "token_embd.weight", "missing"]);
}

#[test]
fn missing_config_file() {
    let (code, stderr) = rlhf(&["dpo", "--config", "/nonexistent/run.toml"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/run.toml"), "{stderr}");
}
