//! A run that starts from an existing PEFT adapter (`model.adapter`), with the reference either
//! a frozen copy of that adapter (`model.reference = "initial"`, TRL's SFT-model reference) or
//! the base with adapters off, on the tiny model through the binary.

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Output;

const SFT: &str = "batch_size = 8\nmax_steps = 12\nlearning_rate = 0.01\nlr_scheduler = \"constant\"\nsave_steps = 100\n\n[lora]\nr = 8\nalpha = 16.0\n";

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

/// Writes the config `name` (output folder `out`, `body` after `[train]`) with `model_keys`
/// added to its `[model]` section.
fn config_with(run: &Run, name: &str, out: &str, model_keys: &str, body: &str) -> String {
    let p = run.config(name, out, body);
    let text = std::fs::read_to_string(&p).unwrap().replacen(
        "quantize = \"nf4\"\n",
        &format!("quantize = \"nf4\"\n{model_keys}"),
        1,
    );
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// Trains an SFT adapter on the chosen answers (so it prefers them over the base) into
/// `sft/policy`, and returns that folder.
fn sft_adapter(run: &Run) -> String {
    let pairs = std::fs::read_to_string(run.path("train.jsonl")).unwrap();
    let rows: String = pairs
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let row = serde_json::json!({"prompt": v["prompt"], "completion": format!(" {}", v["chosen"].as_str().unwrap())});
            format!("{row}\n")
        })
        .collect();
    std::fs::write(run.path("sft.jsonl"), rows).unwrap();
    let cfg = run.config("sft.toml", "sft", SFT);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("train.jsonl", "sft.jsonl")
        .replace("eval.jsonl", "sft.jsonl");
    std::fs::write(&cfg, text).unwrap();
    rlhf(&["sft", "--config", cfg.to_str().unwrap()]);
    run.path("sft/policy").to_str().unwrap().to_string()
}

fn first_step(run: &Run, out: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(run.path(&format!("{out}/metrics.jsonl"))).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

/// Every tensor of a PEFT adapter file, by name, as raw bytes.
fn tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort();
    out
}

const DPO_ONE_STEP: &str =
    "batch_size = 8\nmax_steps = 1\nlearning_rate = 0.01\nsave_steps = 100\n\n[dpo]\nbeta = 0.1\n";

#[test]
fn dpo_from_an_adapter_starts_at_ln2_only_against_the_initial_reference() {
    let run = Run::new(211);
    let adapter = sft_adapter(&run);
    let keys = format!("adapter = {adapter:?}\n");
    // Default reference with model.adapter: the frozen starting adapter, so the policy equals
    // the reference at step 1.
    let cfg = config_with(&run, "initial.toml", "initial", &keys, DPO_ONE_STEP);
    ok(rlhf_with(&["dpo", "--config", &cfg], None));
    let m = first_step(&run, "initial");
    let (loss, margins) = (
        m["loss"].as_f64().unwrap(),
        m["rewards/margins"].as_f64().unwrap(),
    );
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{m}");
    assert!(margins.abs() < 1e-7, "{m}");
    // The same adapter against the base: the SFT adapter already prefers the chosen answers.
    let keys = format!("adapter = {adapter:?}\nreference = \"base\"\n");
    let cfg = config_with(&run, "base.toml", "base", &keys, DPO_ONE_STEP);
    ok(rlhf_with(&["dpo", "--config", &cfg], None));
    let m = first_step(&run, "base");
    let (loss, margins) = (
        m["loss"].as_f64().unwrap(),
        m["rewards/margins"].as_f64().unwrap(),
    );
    eprintln!("against the base: loss {loss}, margins {margins}");
    assert!(margins > 1e-3, "{m}");
    assert!((loss - std::f64::consts::LN_2).abs() > 1e-4, "{m}");
}

#[test]
fn a_dpo_run_starts_from_the_sft_adapter_and_takes_its_shape() {
    let run = Run::new(221);
    let adapter = sft_adapter(&run);
    // Learning rate 0: the adapter written after one step is the one the run started from.
    // `[lora]` asks for another rank; the adapter's shape wins, with a note.
    let body =
        "batch_size = 8\nmax_steps = 1\nlearning_rate = 0.0\nsave_steps = 100\n\n[lora]\nr = 4\n";
    let cfg = config_with(
        &run,
        "dpo.toml",
        "dpo",
        &format!("adapter = {adapter:?}\n"),
        body,
    );
    let err = ok(rlhf_with(&["dpo", "--config", &cfg], None));
    assert!(
        err.contains("note: [lora] r = 4 (adapter: 8) ignored") && err.contains(&adapter),
        "{err}"
    );
    let start = tensors(Path::new(&adapter));
    let written = tensors(&run.path("dpo/policy"));
    assert!(!start.is_empty());
    assert_eq!(
        start.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>(),
        written.iter().map(|t| (&t.0, &t.1)).collect::<Vec<_>>()
    );
    for (a, b) in start.iter().zip(&written) {
        assert!(a.2 == b.2, "{} differs from the SFT adapter's", a.0);
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.path("dpo/policy/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16);
}

#[test]
fn a_killed_run_against_the_initial_reference_resumes_to_the_same_adapter() {
    let run = Run::new(231);
    let adapter = sft_adapter(&run);
    let keys = format!("adapter = {adapter:?}\nreference = \"initial\"\n");
    let body = "batch_size = 4\ngradient_accumulation_steps = 2\nmax_steps = 6\nlearning_rate = 0.005\nsave_steps = 1\nwarmup_steps = 2\n\n[dpo]\nbeta = 0.1\n";
    let full = config_with(&run, "full.toml", "full", &keys, body);
    ok(rlhf_with(&["dpo", "--config", &full], None));
    let cut = config_with(&run, "cut.toml", "cut", &keys, body);
    let out = rlhf_with(&["dpo", "--config", &cut], Some("step@4"));
    assert_eq!(out.status.signal(), Some(9), "not killed at step 4");
    assert!(run.path("cut/checkpoint-3").is_dir());
    ok(rlhf_with(&["dpo", "--config", &cut, "--resume"], None));
    let a = std::fs::read(run.path("full/policy/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(run.path("cut/policy/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    // The run trained away from its start, so the comparison is not of two untouched copies.
    assert!(tensors(&run.path("full/policy")) != tensors(Path::new(&adapter)));
}

#[test]
fn config_errors_name_the_keys_and_the_folder() {
    let run = Run::new(241);
    let fails = |cfg: &str| {
        let out = rlhf_with(&["dpo", "--config", cfg], None);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{err}");
        err
    };
    let cfg = config_with(
        &run,
        "a.toml",
        "a",
        "reference = \"initial\"\n",
        DPO_ONE_STEP,
    );
    let err = fails(&cfg);
    assert!(
        err.contains("a.toml") && err.contains("model.reference") && err.contains("model.adapter"),
        "{err}"
    );
    let missing = run.path("no-such-adapter");
    let keys = format!("adapter = {:?}\n", missing.to_str().unwrap());
    let cfg = config_with(&run, "b.toml", "b", &keys, DPO_ONE_STEP);
    let err = fails(&cfg);
    assert!(
        err.contains("b.toml") && err.contains("model.adapter") && err.contains("no-such-adapter"),
        "{err}"
    );
    assert!(!run.path("a").exists() && !run.path("b").exists());
    // An adapter for another base: a tensor of the wrong shape, named with its file.
    let bad = run.path("bad-adapter");
    std::fs::create_dir_all(&bad).unwrap();
    let config = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#;
    std::fs::write(bad.join("adapter_config.json"), config).unwrap();
    let mut views = Vec::new();
    let a = vec![0u8; 2 * 31 * 4];
    let b = vec![0u8; 32 * 2 * 4];
    for l in 0..2 {
        let p = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
        views.push((format!("{p}.lora_A.weight"), vec![2, 31], &a));
        views.push((format!("{p}.lora_B.weight"), vec![32, 2], &b));
    }
    let views: Vec<_> = views
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d);
            (n.clone(), v.unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, &None).unwrap();
    std::fs::write(bad.join("adapter_model.safetensors"), bytes).unwrap();
    let keys = format!("adapter = {:?}\n", bad.to_str().unwrap());
    let cfg = config_with(&run, "c.toml", "c", &keys, DPO_ONE_STEP);
    let err = fails(&cfg);
    assert!(
        err.contains("model.adapter")
            && err.contains("bad-adapter/adapter_model.safetensors")
            && err.contains("[2, 31]"),
        "{err}"
    );
}

#[test]
fn a_reward_model_continues_from_an_rm_folder_with_its_head() {
    let run = Run::new(251);
    let body = "batch_size = 8\nmax_steps = 4\nlearning_rate = 0.01\nsave_steps = 100\n\n[lora]\nr = 4\nalpha = 8.0\n";
    let cfg = run.config("rm.toml", "rm", body);
    rlhf(&["rm", "--config", cfg.to_str().unwrap()]);
    let start = run.path("rm/reward");
    let keys = format!("adapter = {:?}\n", start.to_str().unwrap());
    let again = body
        .replace("learning_rate = 0.01", "learning_rate = 0.0")
        .replace("max_steps = 4", "max_steps = 1");
    let cfg = config_with(&run, "again.toml", "again", &keys, &again);
    ok(rlhf_with(&["rm", "--config", &cfg], None));
    let (a, b) = (tensors(&start), tensors(&run.path("again/reward")));
    assert!(a.iter().any(|t| t.0 == "base_model.model.score.weight"));
    assert!(
        a == b,
        "the reward adapter or its head did not start from the rm folder"
    );
}

#[test]
fn grpo_kl_is_taken_against_the_reference_that_model_reference_names() {
    let run = Run::new(261);
    let adapter = sft_adapter(&run);
    let body = "batch_size = 8\nmax_steps = 1\nlearning_rate = 0.01\nsave_steps = 100\n\n[grpo]\nnum_generations = 4\nmax_completion_length = 6\nbeta = 0.04\n\n[[grpo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\n";
    let kl = |name: &str, keys: &str| {
        let cfg = config_with(&run, &format!("{name}.toml"), name, keys, body);
        ok(rlhf_with(&["grpo", "--config", &cfg], None));
        first_step(&run, name)["kl"].as_f64().unwrap()
    };
    // The policy starts as the frozen initial adapter: no divergence at step 1.
    let initial = kl("initial", &format!("adapter = {adapter:?}\n"));
    let base = kl(
        "base",
        &format!("adapter = {adapter:?}\nreference = \"base\"\n"),
    );
    eprintln!("step-1 kl: initial {initial}, base {base}");
    assert!(
        initial.abs() < 1e-7,
        "kl against the initial adapter {initial}"
    );
    assert!(base > 1e-4, "kl against the base {base}");
}
