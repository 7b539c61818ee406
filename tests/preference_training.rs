//! DPO and reward-model training learn a synthetic preference on CPU, and a killed run resumes
//! to exactly the adapter an uninterrupted run produces.

mod common;
use common::*;

const TRAIN: &str = "batch_size = 8\nmax_steps = 48\nlearning_rate = 0.01\nlr_scheduler = \"constant\"\nsave_steps = 100\n\n[lora]\nr = 8\nalpha = 16.0\n";

#[test]
fn dpo_learns_the_marker_preference() {
    let run = Run::new(11);
    let cfg = run.config("dpo.toml", "out", &format!("{TRAIN}\n[dpo]\nbeta = 0.1\n"));
    rlhf(&["dpo", "--config", cfg.to_str().unwrap()]);
    let acc = eval_metric(&run.path("out"), "eval_rewards/accuracies");
    eprintln!("DPO held-out accuracy {acc}");
    assert!(acc >= 0.9, "held-out rewards/accuracies {acc}");
    // The adapter is written in PEFT layout and `generate --adapter` uses it.
    assert!(run.path("out/policy/adapter_model.safetensors").exists());
    let metrics = std::fs::read_to_string(run.path("out/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 48);
    assert!(metrics.contains("\"rewards/margins\""));
    let gen = |adapter: Option<&str>| {
        let mut args = vec![
            "generate",
            "--model",
            run.path("model").to_str().unwrap().to_string().leak(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        args.extend([
            "--prompt",
            "w1 w2 w3",
            "--temperature",
            "0",
            "--min-new-tokens",
            "8",
            "--max-new-tokens",
            "8",
        ]);
        rlhf(&args)
    };
    let tuned = gen(Some(
        run.path("out/policy").to_str().unwrap().to_string().leak(),
    ));
    let base = gen(None);
    eprintln!("base: {base:?} tuned: {tuned:?}");
    assert!(
        tuned.contains("MARK") && !base.contains("MARK"),
        "base {base:?}, tuned {tuned:?}"
    );
}

#[test]
fn reward_model_learns_the_marker_preference() {
    let run = Run::new(21);
    let cfg = run.config("rm.toml", "out", TRAIN);
    rlhf(&["rm", "--config", cfg.to_str().unwrap()]);
    let acc = eval_metric(&run.path("out"), "eval_accuracy");
    eprintln!("RM held-out accuracy {acc}");
    assert!(acc >= 0.9, "held-out accuracy {acc}");
    let st = std::fs::read(run.path("out/reward/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(
        st.tensor("base_model.model.score.weight").unwrap().shape(),
        &[1, 32]
    );
    // PEFT loads a reward folder onto a sequence classifier only as SEQ_CLS with `score` saved.
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.path("out/reward/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
}

#[test]
fn killed_run_resumes_to_the_same_adapter() {
    let run = Run::new(31);
    let body = "batch_size = 4\ngradient_accumulation_steps = 2\nmax_steps = 8\nlearning_rate = 0.005\nsave_steps = 1\nwarmup_steps = 2\n\n[lora]\nr = 4\nalpha = 8.0\n";
    let full = run.config("full.toml", "full", body);
    rlhf(&["dpo", "--config", full.to_str().unwrap()]);

    let cut = run.config("cut.toml", "cut", body);
    let mut child = common::rlhf_command()
        .args(["dpo", "--config", cut.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !run.path("cut/checkpoint-3").exists() {
        assert!(
            started.elapsed().as_secs() < 300,
            "no checkpoint-3 after 300 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no clean exit
    child.wait().unwrap();
    assert!(
        !run.path("cut/policy").exists(),
        "the run finished before the kill"
    );
    rlhf(&["dpo", "--config", cut.to_str().unwrap(), "--resume"]);
    let a = std::fs::read(run.path("full/policy/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(run.path("cut/policy/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
}

/// Writes a tiny model, a DPO-trained adapter (unquantized base) and our greedy completion into
/// `$RLHF_EXPORT_DIR`, for the one-off PEFT load check on the GPU machine
/// (scripts/fixtures/peft_check.py). Run with `cargo test -- --ignored export_for_peft_check`.
#[test]
#[ignore]
fn export_for_peft_check() {
    let out =
        std::path::PathBuf::from(std::env::var("RLHF_EXPORT_DIR").expect("set RLHF_EXPORT_DIR"));
    let run = Run::new(51);
    let cfg = run.config("dpo.toml", "out", &format!("{TRAIN}\n[dpo]\nbeta = 0.1\n"));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("quantize = \"nf4\"", "quantize = \"none\"");
    std::fs::write(&cfg, text).unwrap();
    rlhf(&["dpo", "--config", cfg.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("model")).unwrap();
    std::fs::create_dir_all(out.join("adapter")).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(run.path("model").join(f), out.join("model").join(f)).unwrap();
    }
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(run.path("out/policy").join(f), out.join("adapter").join(f)).unwrap();
    }
    let ours = rlhf(&[
        "generate",
        "--model",
        run.path("model").to_str().unwrap(),
        "--adapter",
        run.path("out/policy").to_str().unwrap(),
        "--no-quantize",
        "--prompt",
        "w1 w2 w3",
        "--temperature",
        "0",
        "--min-new-tokens",
        "8",
        "--max-new-tokens",
        "8",
    ]);
    std::fs::write(out.join("rlhf_generate.txt"), ours).unwrap();
}
