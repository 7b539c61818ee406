//! `rlhf grpo` end to end on CPU: a tiny random model learns to emit a marker token with a
//! built-in reward and with the example reward plugin; a resumed run with cached rollouts
//! (num_iterations > 1) ends with exactly the adapter of an uninterrupted one; broken plugins stop
//! the run with exit code 2, an error naming the plugin, and the last checkpoint intact; the
//! SmolLM2 arithmetic example runs 10 steps.

mod common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Runs `rlhf` and returns (exit code, stderr).
fn rlhf_status(args: &[&str]) -> (i32, String) {
    let out = common::rlhf_command().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The metrics lines of a run.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Mean of `key` over metrics lines.
fn mean(lines: &[serde_json::Value], key: &str) -> f64 {
    let v: Vec<f64> = lines
        .iter()
        .map(|l| {
            l[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {l}"))
        })
        .collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// The run settings of the marker-learning runs: 2 prompts x 8 completions per step.
const LEARN: &str = "batch_size = 16\nmax_steps = 30\nlearning_rate = 0.02\nlr_scheduler = \"constant\"\nsave_steps = 100\nlogging_steps = 1\n\n[lora]\nr = 8\nalpha = 16.0\n\n[generation]\ntemperature = 1.0\n\n[grpo]\nnum_generations = 8\nmax_completion_length = 8\n";

/// Trains with `rewards` (TOML `[[grpo.rewards]]` entries) and checks that the mean reward of the
/// last steps, and on the held-out prompts, is at least 3x that of the first steps.
fn learns_the_marker(seed: u64, rewards: &str, reward_key: &str) {
    let run = Run::new(seed);
    let cfg = run.config("grpo.toml", "out", &format!("{LEARN}\n{rewards}"));
    rlhf(&["grpo", "--config", cfg.to_str().unwrap()]);
    let out = run.path("out");
    let m = metrics(&out);
    assert_eq!(m.len(), 30);
    let samples = std::fs::read_to_string(out.join("completions.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 30 * 16, "16 completions per step");
    let before = mean(&m[..3], "reward");
    let after = mean(&m[m.len() - 3..], "reward");
    let held_out = eval_metric(&out, "eval_reward");
    eprintln!("{reward_key}: reward {before:.3} in steps 1-3 -> {after:.3} in steps 28-30 (held-out {held_out:.3})");
    assert!(
        m.iter().all(|l| l.get(reward_key).is_some()
            && l.get("reward_std").is_some()
            && l.get("frac_reward_zero_std").is_some()
            && l.get("completions/mean_length").is_some()
            && l.get("completions/clipped_ratio").is_some()
            && l.get("clip_ratio/region_mean").is_some()),
        "TRL metric names missing: {:?}",
        m[0]
    );
    assert!(
        before > 0.0,
        "no reward at all at the start: nothing to learn from"
    );
    assert!(after >= 3.0 * before, "reward {before} -> {after}");
    assert!(
        held_out >= 3.0 * before,
        "held-out reward {held_out} vs {before}"
    );
    assert!(run.path("out/policy/adapter_model.safetensors").exists());
}

#[test]
fn grpo_learns_the_marker_with_a_builtin_reward() {
    learns_the_marker(
        41,
        "[[grpo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\n",
        "rewards/contains/mean",
    );
}

#[test]
fn grpo_learns_the_marker_with_the_example_plugin() {
    let lib = plugin("marker_reward");
    learns_the_marker(
        51,
        &format!(
            "[[grpo.rewards]]\ntype = \"plugin\"\npath = {:?}\nconfig = {{ marker = \"MARK\" }}\n",
            lib
        ),
        "rewards/marker_count/mean",
    );
}

#[test]
fn resumed_run_with_cached_rollouts_matches_an_uninterrupted_one() {
    // Rollouts are reused for 3 steps (and carry reference log-probs, beta > 0); the cut falls
    // after step 2, so the resumed run must take step 3's rollout from the checkpoint.
    let run = Run::new(61);
    let body = |steps: usize| {
        format!(
            "batch_size = 8\ngradient_accumulation_steps = 2\nmax_steps = {steps}\nlearning_rate = 0.01\nlr_scheduler = \"constant\"\nsave_steps = 1\n\n[lora]\nr = 4\nalpha = 8.0\n\n[grpo]\nnum_generations = 4\nmax_completion_length = 6\nnum_iterations = 3\nbeta = 0.04\n\n[[grpo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\n"
        )
    };
    let full = run.config("full.toml", "full", &body(5));
    rlhf(&["grpo", "--config", full.to_str().unwrap()]);
    let first = run.config("cut.toml", "cut", &body(2));
    rlhf(&["grpo", "--config", first.to_str().unwrap()]);
    let trainer: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.path("cut/checkpoint-2/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(trainer["steps_done"], 2);
    assert_eq!(trainer["cache"].as_array().unwrap().len(), 2, "{trainer}");
    let rest = run.config("cut.toml", "cut", &body(5));
    rlhf(&["grpo", "--config", rest.to_str().unwrap(), "--resume"]);
    let a = std::fs::read(run.path("full/policy/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(run.path("cut/policy/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    let m = metrics(&run.path("full"));
    assert!(m.iter().all(|l| l["kl"].is_number()), "{:?}", m[0]);
    // Steps 2 and 3 train on step 1's completions (and step 5 on step 4's).
    for (a, b) in [(0, 1), (0, 2), (3, 4)] {
        for key in ["reward", "completions/mean_length"] {
            assert_eq!(m[a][key], m[b][key], "{key}: steps {} and {}", a + 1, b + 1);
        }
    }
}

/// Renames the tiny model's words `w<i>` to `boom<i>`, so that every completion that is not
/// empty contains "boom" (the test panicking plugin panics on it).
fn boom_vocabulary(model: &Path) {
    let path = model.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap().clone();
    let renamed: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .map(|(k, v)| match k.strip_prefix('w') {
            Some(n) => (format!("boom{n}"), v),
            None => (k, v),
        })
        .collect();
    tok["model"]["vocab"] = serde_json::Value::Object(renamed);
    std::fs::write(&path, tok.to_string()).unwrap();
}

/// Every file of a folder, by relative name.
fn snapshot(dir: &Path) -> HashMap<PathBuf, Vec<u8>> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn broken_plugins_stop_with_a_clear_error_and_keep_the_checkpoint() {
    let run = Run::new(71);
    boom_vocabulary(&run.path("model"));
    let body = |steps: usize, rewards: &str| {
        format!(
            "batch_size = 4\nmax_steps = {steps}\nsave_steps = 1\n\n[lora]\nr = 4\nalpha = 8.0\n\n[generation]\nmin_new_tokens = 1\n\n[grpo]\nnum_generations = 2\nmax_completion_length = 4\n\n{rewards}"
        )
    };
    let plugin_entry =
        |lib: &Path| format!("[[grpo.rewards]]\ntype = \"plugin\"\npath = {lib:?}\n");
    let good = run.config(
        "good.toml",
        "out",
        &body(
            2,
            "[[grpo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\n",
        ),
    );
    rlhf(&["grpo", "--config", good.to_str().unwrap()]);
    let checkpoint = run.path("out/checkpoint-2");
    let before = snapshot(&checkpoint);
    assert!(before.contains_key(Path::new("trainer_state.json")));

    let cases = [
        (
            "panicking_plugin",
            vec!["`panicky`", "panicked on completion", "boom"],
            true,
        ),
        (
            "wrong_abi_plugin",
            vec!["ABI version 999", "wrong_abi_plugin"],
            false,
        ),
        (
            "not_a_plugin",
            vec!["not an rlhf reward plugin", "not_a_plugin"],
            false,
        ),
    ];
    for (name, expected, during_training) in cases {
        let lib = plugin(name);
        let cfg = run.config(
            &format!("{name}.toml"),
            "out",
            &body(4, &plugin_entry(&lib)),
        );
        let (code, stderr) = rlhf_status(&["grpo", "--config", cfg.to_str().unwrap(), "--resume"]);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{name}: no error line in {stderr}"));
        eprintln!("{name}: {error}");
        assert_eq!(code, 2, "{name}: exit code {code}: {stderr}");
        for e in expected {
            assert!(error.contains(e), "{name}: `{e}` not in {error}");
        }
        if during_training {
            assert!(
                error.contains("step 3") && error.contains(checkpoint.to_str().unwrap()),
                "{name}: the error should name the step and the intact checkpoint: {error}"
            );
        }
        assert!(!run.path("out/checkpoint-3").exists(), "{name}");
        assert!(
            snapshot(&checkpoint) == before,
            "{name}: checkpoint-2 changed"
        );
    }

    // Plugins run in worker processes: one that aborts, exits, overflows its stack or loops
    // fails its reward (the loop by its timeout), and the trainer stops cleanly with exit 2,
    // naming the reward, the step and the intact checkpoint. Only the loop sets `timeout_secs`:
    // the others are plain plugin entries, which a trainer loading plugins in its own process
    // also reads (and dies of, or exits 0 with no adapter).
    let lib = plugin("misbehaving_plugin");
    for (mode, expected, timeout) in [
        ("abort", "worker exited", ""),
        ("exit", "worker exited (exit status: 0)", ""),
        ("overflow", "worker exited", ""),
        ("loop", "no answer within 1 s", "timeout_secs = 1\n"),
    ] {
        let entry = format!(
            "[[grpo.rewards]]\ntype = \"plugin\"\npath = {lib:?}\n{timeout}config = {{ mode = \"{mode}\" }}\n"
        );
        let cfg = run.config(&format!("{mode}.toml"), "out", &body(4, &entry));
        let (code, stderr) = rlhf_status(&["grpo", "--config", cfg.to_str().unwrap(), "--resume"]);
        assert_eq!(code, 2, "{mode}: exit code {code} (-1: killed): {stderr}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{mode}: no error line in {stderr}"));
        eprintln!("{mode}: {error}");
        for e in ["`misbehaving`", "completion 0", expected, "step 3"] {
            assert!(error.contains(e), "{mode}: `{e}` not in {error}");
        }
        assert!(error.contains(checkpoint.to_str().unwrap()), "{error}");
        assert!(!run.path("out/checkpoint-3").exists(), "{mode}");
        assert!(
            snapshot(&checkpoint) == before,
            "{mode}: checkpoint-2 changed"
        );
    }

    // A batch that is not whole groups is refused before the model is loaded, naming the key.
    let cfg = run.config(
        "odd.toml",
        "odd",
        "batch_size = 3\n\n[grpo]\nnum_generations = 2\n\n[[grpo.rewards]]\ntype = \"contains\"\ntext = \"x\"\n",
    );
    let (code, stderr) = rlhf_status(&["grpo", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("train.batch_size"), "{stderr}");
    let cfg = run.config(
        "typo.toml",
        "typo",
        "batch_size = 4\n\n[grpo]\nnum_generations = 2\n\n[[grpo.rewards]]\ntype = \"contains\"\ntxt = \"x\"\n",
    );
    let (code, stderr) = rlhf_status(&["grpo", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("grpo.rewards[0]") && stderr.contains("txt"),
        "{stderr}"
    );
}

#[test]
fn smollm2_arithmetic_example_runs_ten_steps() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for asset in [
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "data/arithmetic.jsonl",
    ] {
        assert!(
            root.join(asset).exists(),
            "{asset} missing: run scripts/fetch_assets.sh"
        );
    }
    let text = std::fs::read_to_string(root.join("configs/grpo-smollm2-arithmetic.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let original = "output_dir = \"runs/grpo-smollm2-arithmetic\"";
    assert!(text.contains(original));
    let cfg = dir.path().join("grpo-smollm2-arithmetic.toml");
    std::fs::write(
        &cfg,
        text.replace(original, &format!("output_dir = {:?}", out)),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let status = common::rlhf_command()
        .current_dir(root)
        .args(["grpo", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    eprintln!("SmolLM2 GRPO: 10 steps in {:?}", started.elapsed());
    let m = metrics(&out);
    assert_eq!(m.len(), 10);
    for l in &m {
        for key in [
            "reward",
            "reward_std",
            "rewards/exact_answer/mean",
            "frac_reward_zero_std",
            "completions/mean_length",
            "loss",
        ] {
            assert!(l[key].is_number(), "{key} missing in {l}");
        }
    }
    let samples = std::fs::read_to_string(out.join("completions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert!(
        first["prompt"].as_str().unwrap().contains("What is"),
        "{first}"
    );
    assert!(
        first["completion"].is_string() && first["reward"].is_number(),
        "{first}"
    );
    assert_eq!(samples.lines().count(), 40, "4 completions per step");
    assert!(out.join("policy/adapter_model.safetensors").exists());
}

/// Builds the example plugin and the rewards crate's test doubles (as rewards/tests/plugins.rs
/// does, into the same folder) and returns the library of target `name`.
fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reward-plugins");
        let out = Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--message-format=json-render-diagnostics"])
            .arg("--target-dir")
            .arg(&target)
            .args(["--no-default-features", "-p", "rlhf-example-reward-plugin"])
            .args(["-p", "rlhf-rewards", "--lib", "--examples"])
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building the plugins failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut libs = HashMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" {
                continue;
            }
            let target = msg["target"]["name"].as_str().unwrap_or_default();
            for f in msg["filenames"].as_array().into_iter().flatten() {
                let f = f.as_str().unwrap_or_default();
                if f.ends_with(std::env::consts::DLL_SUFFIX) {
                    libs.insert(target.to_string(), PathBuf::from(f));
                }
            }
        }
        Ok(libs)
    });
    match built {
        Ok(libs) => libs
            .get(name)
            .unwrap_or_else(|| panic!("cargo built no library `{name}`: {libs:?}"))
            .clone(),
        Err(e) => panic!("{e}"),
    }
}
