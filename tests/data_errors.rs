//! Bad training data and bad checkpoints: one clear error line, exit 2, nothing overwritten.

mod common;
use common::*;

fn fails(args: &[&str], needles: &[&str]) {
    let out = common::rlhf_command().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    for n in needles {
        assert!(last.contains(n), "`{n}` not in `{last}`");
    }
}

fn with_train(run: &Run, name: &str, content: &[u8]) -> std::path::PathBuf {
    std::fs::write(run.path("train.jsonl"), content).unwrap();
    run.config(name, "out", "batch_size = 2\nmax_steps = 1\n")
}

#[test]
fn missing_column() {
    let run = Run::new(41);
    let cfg = with_train(
        &run,
        "a.toml",
        b"{\"prompt\": \"w1\", \"chosen\": \"w2\"}\n",
    );
    fails(
        &["dpo", "--config", cfg.to_str().unwrap()],
        &["train.jsonl", "line 1", "rejected"],
    );
    assert!(!run.path("out").exists(), "nothing may be written");
}

#[test]
fn empty_file() {
    let run = Run::new(42);
    let cfg = with_train(&run, "b.toml", b"");
    fails(
        &["dpo", "--config", cfg.to_str().unwrap()],
        &["train.jsonl", "empty"],
    );
}

#[test]
fn non_utf8_line() {
    let run = Run::new(43);
    let cfg = with_train(
        &run,
        "c.toml",
        b"{\"prompt\": \"w1\", \"chosen\": \"w2\", \"rejected\": \"w3\"}\n{\"prompt\": \"\xff\xfe\", \"chosen\": \"w2\", \"rejected\": \"w3\"}\n",
    );
    fails(
        &["dpo", "--config", cfg.to_str().unwrap()],
        &["train.jsonl", "line 2", "UTF-8"],
    );
}

#[test]
fn prompt_longer_than_max_length() {
    let run = Run::new(44);
    let long = vec!["w1"; 40].join(" ");
    let row = format!("{{\"prompt\": \"{long}\", \"chosen\": \"w2\", \"rejected\": \"w3\"}}\n");
    std::fs::write(run.path("train.jsonl"), row).unwrap();
    let cfg = run.path("d.toml");
    let text =
        std::fs::read_to_string(run.config("tmp.toml", "out", "batch_size = 2\nmax_steps = 1\n"))
            .unwrap()
            .replace("max_prompt_length = 16", "max_prompt_length = 32");
    std::fs::write(&cfg, text).unwrap();
    fails(
        &["dpo", "--config", cfg.to_str().unwrap()],
        &["train.jsonl", "line 1", "max_length"],
    );
}

#[test]
fn checkpoint_from_a_different_model() {
    let run = Run::new(45);
    let cfg = run.config(
        "e.toml",
        "out",
        "batch_size = 4\nmax_steps = 1\nsave_steps = 1\n",
    );
    rlhf(&["dpo", "--config", cfg.to_str().unwrap()]);
    // A second model (other weights), resumed from the first model's checkpoint.
    let other = run.path("other");
    write_tiny_model(&other, 99);
    let cfg2 = run.path("f.toml");
    let t = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(run.path("model").to_str().unwrap(), other.to_str().unwrap());
    std::fs::write(&cfg2, t).unwrap();
    let before = std::fs::read(run.path("out/policy/adapter_model.safetensors")).unwrap();
    let ckpt = run.path("out/checkpoint-1");
    fails(
        &[
            "dpo",
            "--config",
            cfg2.to_str().unwrap(),
            "--resume",
            ckpt.to_str().unwrap(),
        ],
        &["checkpoint-1", "model"],
    );
    assert_eq!(
        before,
        std::fs::read(run.path("out/policy/adapter_model.safetensors")).unwrap()
    );
}
