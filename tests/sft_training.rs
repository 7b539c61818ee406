//! `rlhf sft` on the tiny model, through the binary: the completion's NLL falls on held-out rows,
//! the adapter is written in PEFT's layout, and the trained tokens are the completion's or the
//! assistant turns'.

mod common;
use common::*;
use serde_json::{json, Value};

const TRAIN: &str = "batch_size = 8\nmax_steps = 40\nlearning_rate = 0.01\nlr_scheduler = \"constant\"\nsave_steps = 100\nlogging_steps = 1\n\n[lora]\nr = 8\nalpha = 16.0\n";

/// Rewrites a marker-pair file into SFT rows made by `row` from each pair's prompt.
fn to_sft(path: &std::path::Path, row: impl Fn(&str) -> Value) {
    let text = std::fs::read_to_string(path).unwrap();
    let out: String = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{}\n", row(v["prompt"].as_str().unwrap()))
        })
        .collect();
    std::fs::write(path, out).unwrap();
}

fn metrics(run: &Run, out: &str) -> Vec<Value> {
    std::fs::read_to_string(run.path(&format!("{out}/metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sft_learns_the_marker_completion_and_writes_the_adapter() {
    let run = Run::new(151);
    // The completion: MARK, the prompt's first word, MARK (then EOS): four trained tokens.
    let row = |p: &str| {
        let first = p.split(' ').next().unwrap();
        json!({"prompt": p, "completion": format!(" MARK {first} MARK")})
    };
    to_sft(&run.path("train.jsonl"), row);
    to_sft(&run.path("eval.jsonl"), row);
    // The held-out NLL before training: one step at learning rate 0.
    let base_body = TRAIN
        .replace("learning_rate = 0.01", "learning_rate = 0.0")
        .replace("max_steps = 40", "max_steps = 1");
    let cfg = run.config("base.toml", "base", &base_body);
    rlhf(&["sft", "--config", cfg.to_str().unwrap()]);
    let before = eval_metric(&run.path("base"), "eval_loss");

    let cfg = run.config("sft.toml", "out", TRAIN);
    rlhf(&["sft", "--config", cfg.to_str().unwrap()]);
    let after = eval_metric(&run.path("out"), "eval_loss");
    let m = metrics(&run, "out");
    let mean = |ls: &[Value]| {
        ls.iter().map(|l| l["loss"].as_f64().unwrap()).sum::<f64>() / ls.len() as f64
    };
    let (first, last) = (mean(&m[..3]), mean(&m[m.len() - 3..]));
    eprintln!("SFT held-out NLL {before:.3} -> {after:.3}; train loss {first:.3} -> {last:.3}");
    assert_eq!(m.len(), 40);
    // Completion-only loss: 8 rows x 4 completion tokens per micro-batch (the prompt's 3 words
    // would make it 8 x 6).
    for l in &m {
        assert_eq!(l["num_tokens"].as_f64(), Some(32.0), "{l}");
    }
    assert_eq!(eval_metric(&run.path("out"), "eval_num_tokens"), 32.0);
    assert!(before > 1.0, "untrained NLL {before}");
    assert!(after <= 0.5 * before, "held-out NLL {before} -> {after}");
    assert!(last < 0.5 * first, "train loss {first} -> {last}");
    let adapter = run.path("out/policy");
    assert!(adapter.join("adapter_config.json").is_file());
    assert!(adapter.join("adapter_model.safetensors").is_file());
}

#[test]
fn sft_trains_only_the_assistant_turns_with_assistant_only_loss() {
    let run = Run::new(161);
    // A chat template whose words tokenize with the tiny word-level tokenizer (roles are <unk>).
    std::fs::write(
        run.path("model/chat_template.jinja"),
        "{% for m in messages %}{{ m.role }} {{ m.content }} </s> {% endfor %}\
         {% if add_generation_prompt %}assistant {% endif %}",
    )
    .unwrap();
    let row = |p: &str| {
        json!({"messages": [
            {"role": "user", "content": p},
            {"role": "assistant", "content": "MARK"},
            {"role": "user", "content": "w1 w2"},
            {"role": "assistant", "content": "MARK MARK"},
        ]})
    };
    to_sft(&run.path("train.jsonl"), row);
    to_sft(&run.path("eval.jsonl"), row);
    let body = TRAIN
        .replace("batch_size = 8", "batch_size = 4")
        .replace("max_steps = 40", "max_steps = 2");
    // Assistant turns: "MARK </s>" and "MARK MARK </s>", 5 tokens per row.
    let cfg = run.config(
        "assistant.toml",
        "assistant",
        &format!("{body}\n[sft]\nassistant_only_loss = true\n"),
    );
    rlhf(&["sft", "--config", cfg.to_str().unwrap()]);
    for l in metrics(&run, "assistant") {
        assert_eq!(l["num_tokens"].as_f64(), Some(4.0 * 5.0), "{l}");
    }
    // Every token: 16 per row (roles, 3 + 1 + 2 + 2 words, 4 closing </s>), 15 predicted.
    let cfg = run.config("all.toml", "all", &body);
    rlhf(&["sft", "--config", cfg.to_str().unwrap()]);
    for l in metrics(&run, "all") {
        assert_eq!(l["num_tokens"].as_f64(), Some(4.0 * 15.0), "{l}");
    }
}

#[test]
fn sft_refuses_assistant_only_loss_on_text_rows() {
    let run = Run::new(171);
    to_sft(&run.path("train.jsonl"), |p| json!({"text": p}));
    let cfg = run.config(
        "text.toml",
        "out",
        &format!("{TRAIN}\n[sft]\nassistant_only_loss = true\n"),
    );
    let out = common::rlhf_command()
        .args(["sft", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("train.jsonl line 1") && stderr.contains("assistant_only_loss"),
        "{stderr}"
    );
    assert!(
        !run.path("out").exists(),
        "bad data must leave no run folder"
    );
}
