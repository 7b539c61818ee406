//! Nothing lost, nothing hung: a DPO run killed with SIGKILL at a chosen moment (a fault point
//! armed through `RLHF_FAULT`, see `rlhf::rundir`) and resumed logs every step exactly once and
//! ends with the adapter of an uninterrupted run; one run per output folder; a failed checkpoint
//! leaves no temporary folder; a diverged run exits 5 without writing a non-finite adapter.
//!
//! CI kills at a few fixed moments. The full check, 20 random moments (or `RLHF_KILL_MOMENTS`,
//! seeded by `RLHF_KILL_SEED`):
//!
//!     cargo test --test run_safety -- --ignored --nocapture kill_at_random_moments

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

const STEPS: usize = 6;
const BODY: &str = "batch_size = 4\nmax_steps = 6\nlearning_rate = 0.005\nsave_steps = 1\nwarmup_steps = 2\n\n[lora]\nr = 4\nalpha = 8.0\n";

/// Every fault point of the run loop, at each step where it can fire.
fn all_moments() -> Vec<String> {
    let mut out = Vec::new();
    for step in 1..=STEPS {
        for point in [
            "step",
            "metrics-torn",
            "metrics",
            "checkpoint-write",
            "checkpoint-rename",
            "checkpoint",
        ] {
            out.push(format!("{point}@{step}"));
        }
    }
    out.push(format!("final@{STEPS}"));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The `error:` line of a run that must fail with `code`.
fn fails_with(out: &Output, code: i32) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err.lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {err}"))
        .to_string()
}

/// Steps logged in `dir/metrics.jsonl`, after checking that every line is whole and parses.
fn logged_steps(dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(text.ends_with('\n'), "torn last line: {text:?}");
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}"));
            v["step"].as_u64().unwrap()
        })
        .collect()
}

fn adapter(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("policy/adapter_model.safetensors")).unwrap()
}

/// Kills a run at each of `kills` in turn (each after the first resumes), resumes to the end and
/// checks the folder against the uninterrupted run's adapter.
fn kill_and_resume(run: &Run, name: &str, kills: &[&str], reference: &[u8]) {
    let cfg = run.config(&format!("{name}.toml"), name, BODY);
    let cfg = cfg.to_str().unwrap();
    for (k, fault) in kills.iter().enumerate() {
        let mut args = vec!["dpo", "--config", cfg];
        if k > 0 {
            args.push("--resume");
        }
        let out = rlhf_with(&args, Some(fault));
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{name}: not killed at {fault}: {}",
            stderr(&out)
        );
    }
    let out = rlhf_with(&["dpo", "--config", cfg, "--resume"], None);
    assert!(out.status.success(), "{name}: {}", stderr(&out));
    let dir = run.path(name);
    let expected: Vec<u64> = (1..=STEPS as u64).collect();
    assert_eq!(logged_steps(&dir), expected, "{name} ({kills:?})");
    assert!(
        adapter(&dir) == reference,
        "{name} ({kills:?}): adapter differs"
    );
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        assert!(!n.ends_with(".tmp"), "{name}: {n} left behind");
        assert!(n != ".rlhf.lock", "{name}: lock left behind");
    }
}

/// The uninterrupted run, in `run/full`.
fn reference(run: &Run) -> Vec<u8> {
    let cfg = run.config("full.toml", "full", BODY);
    let out = rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(logged_steps(&run.path("full")), (1..=6).collect::<Vec<_>>());
    adapter(&run.path("full"))
}

#[test]
fn killed_runs_resume_with_each_step_logged_once_and_the_same_adapter() {
    let run = Run::new(71);
    let reference = reference(&run);
    // Logged but not yet checkpointed (the step used to be logged twice); half a line written;
    // before the first checkpoint; inside, before and after checkpoint writes; before the final
    // adapter; and a chain of kills, each resumed.
    for (name, kills) in [
        ("logged", vec!["metrics@3"]),
        ("torn", vec!["metrics-torn@4"]),
        ("first", vec!["step@1"]),
        ("final", vec!["final@6"]),
        (
            "chain",
            vec![
                "checkpoint-write@2",
                "metrics-torn@3",
                "checkpoint-rename@4",
                "checkpoint@5",
            ],
        ),
    ] {
        kill_and_resume(&run, name, &kills, &reference);
    }
}

/// 20 (or `RLHF_KILL_MOMENTS`) random kill moments, each resumed; see the module docs.
#[test]
#[ignore]
fn kill_at_random_moments() {
    let n: usize = std::env::var("RLHF_KILL_MOMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("RLHF_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        });
    eprintln!("RLHF_KILL_SEED={seed}");
    let mut rng = Rng::new(seed);
    let run = Run::new(71);
    let reference = reference(&run);
    let moments = all_moments();
    for t in 0..n {
        let m = &moments[rng.below(moments.len())];
        eprintln!("moment {t}: {m}");
        kill_and_resume(&run, &format!("r{t}"), &[m.as_str()], &reference);
    }
}

#[test]
fn one_run_per_folder_and_no_silent_overwrite() {
    let run = Run::new(72);
    let cfg = run.config("a.toml", "out", BODY);
    let cfg = cfg.to_str().unwrap();
    // A live process holds the folder's lock.
    std::fs::create_dir_all(run.path("out")).unwrap();
    let mut holder = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(run.path("out/.rlhf.lock"), format!("{}\n", holder.id())).unwrap();
    let e = fails_with(&rlhf_with(&["dpo", "--config", cfg], None), 2);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(e.contains(&format!("pid {}", holder.id())), "{e}");
    // Its process is gone now: the lock is stale and taken over.
    let out = rlhf_with(&["dpo", "--config", cfg], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("stale lock"), "{}", stderr(&out));
    let first = adapter(&run.path("out"));

    // A fresh run into the finished run is refused and changes nothing.
    let e = fails_with(&rlhf_with(&["dpo", "--config", cfg], None), 2);
    assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    assert!(adapter(&run.path("out")) == first);
    assert_eq!(logged_steps(&run.path("out")).len(), STEPS);
    // --overwrite replaces it: the same seed gives the same adapter, each step logged once.
    let out = rlhf_with(&["dpo", "--config", cfg, "--overwrite"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(logged_steps(&run.path("out")), (1..=6).collect::<Vec<_>>());
    assert!(adapter(&run.path("out")) == first);
}

#[test]
fn a_failed_checkpoint_leaves_no_temporary_folder() {
    let run = Run::new(73);
    let cfg = run.config("a.toml", "out", BODY);
    let cfg = cfg.to_str().unwrap();
    // A write error (a full disk) between the adapter and the optimizer state of checkpoint 2.
    let e = fails_with(
        &rlhf_with(&["dpo", "--config", cfg], Some("checkpoint-write@2=error")),
        2,
    );
    assert!(e.contains("checkpoint-write"), "{e}");
    let names: Vec<String> = std::fs::read_dir(run.path("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.contains(&"checkpoint-1".to_string()), "{names:?}");
    assert!(
        !names.iter().any(|n| n.contains("checkpoint-2")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n == ".rlhf.lock"), "{names:?}");
    assert!(run.path("out/checkpoint-1/optimizer.safetensors").exists());
}

#[test]
fn diverged_runs_exit_5_and_write_no_nonfinite_adapter() {
    let run = Run::new(74);
    // Every step non-finite (IPO's 1/(2 beta) overflows), fewer steps than the non-finite limit.
    let cfg = run.config(
        "ipo.toml",
        "ipo",
        "batch_size = 4\nmax_steps = 3\nmax_nonfinite_steps = 10\n\n[dpo]\nloss_type = [\"ipo\"]\nbeta = 1e-300\n",
    );
    let e = fails_with(
        &rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None),
        5,
    );
    assert!(e.contains("non-finite"), "{e}");
    assert!(!run.path("ipo/policy").exists());
    // The first update overflows f32: the adapter is non-finite and is never written.
    let cfg = run.config(
        "lr.toml",
        "lr",
        "batch_size = 4\nmax_steps = 3\nsave_steps = 1\nlearning_rate = 1e39\n",
    );
    let e = fails_with(
        &rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None),
        5,
    );
    assert!(e.contains("non-finite"), "{e}");
    assert!(!run.path("lr/policy").exists());
    assert!(!run.path("lr/checkpoint-1").exists());
    assert!(!run.path("lr/.checkpoint-1.tmp").exists());
}

#[test]
fn config_floats_are_checked_before_anything_runs() {
    let run = Run::new(75);
    for (body, key) in [
        ("\n[optimizer]\nbeta1 = nan\n", "optimizer.beta1"),
        (
            "\n[optimizer]\nweight_decay = inf\n",
            "optimizer.weight_decay",
        ),
        ("\n[optimizer]\neps = 0.0\nbeta2 = 1.0\n", "optimizer."),
    ] {
        let cfg = run.config("c.toml", "out", body);
        let e = fails_with(
            &rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None),
            2,
        );
        assert!(e.contains(&format!("`{key}")), "{body}: {e}");
    }
    assert!(!run.path("out").exists());
}

#[test]
fn nonfinite_base_weights_are_an_error() {
    let run = Run::new(76);
    let file = run.path("model/model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let norm = tensors
        .iter_mut()
        .find(|t| t.0 == "model.layers.1.post_attention_layernorm.weight")
        .unwrap();
    norm.2[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    std::fs::write(&file, safetensors::serialize(views, &None).unwrap()).unwrap();
    let model = run.path("model");
    let out = rlhf_with(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "w1",
            "--max-new-tokens",
            "1",
        ],
        None,
    );
    let e = fails_with(&out, 2);
    assert!(
        e.contains("model.layers.1.post_attention_layernorm.weight") && e.contains("NaN"),
        "{e}"
    );
}

#[test]
fn planner_arithmetic_does_not_wrap() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    for (body, key) in [
        ("[lora]\nr = 9223372036854775807\n", "lora.r"),
        ("[lora]\nr = 1000000000000000\n", "lora.r"),
        (
            "[train]\nbatch_size = 4611686018427387904\n",
            "train.batch_size",
        ),
    ] {
        let cfg = tmp.path().join("dpo.toml");
        std::fs::write(&cfg, format!("[model]\npath = {model:?}\n\n{body}")).unwrap();
        let e = fails_with(
            &rlhf_with(&["plan", "--config", cfg.to_str().unwrap()], None),
            2,
        );
        assert!(e.contains(&format!("`{key}`")), "{body}: {e}");
    }
}

#[test]
fn generate_checks_its_flags_and_the_context() {
    let run = Run::new(77);
    let model = run.path("model");
    let model = model.to_str().unwrap();
    let long: String = vec!["w1"; 300].join(" ");
    for (extra, needle) in [
        (vec!["--top-p", "2"], "--top-p"),
        (vec!["--top-p", "nan"], "--top-p"),
        (vec!["--temperature=-1"], "--temperature"),
        (vec!["--temperature", "inf"], "--temperature"),
        (vec!["--prompt", long.as_str()], "context length of 256"),
    ] {
        let mut args = vec!["generate", "--model", model, "--max-new-tokens", "4"];
        if !extra.contains(&"--prompt") {
            args.extend(["--prompt", "w1 w2"]);
        }
        args.extend(extra.iter().copied());
        let e = fails_with(&rlhf_with(&args, None), 2);
        assert!(e.contains(needle), "{extra:?}: {e}");
    }
}

#[test]
fn messages_name_the_key_and_come_before_the_weights() {
    let run = Run::new(78);
    // No model.path at all.
    let cfg = run.path("nomodel.toml");
    std::fs::write(&cfg, "[train]\nmax_steps = 1\n").unwrap();
    let e = fails_with(
        &rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None),
        2,
    );
    assert!(e.contains("`model.path`"), "{e}");
    // A model folder without weights: the data and output folder errors must come first.
    let bare = run.path("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(run.path("model").join(f), bare.join(f)).unwrap();
    }
    let text = |train: &str| {
        format!(
            "[model]\npath = {bare:?}\n\n[data]\ntrain = {train:?}\nmax_length = 32\nmax_prompt_length = 16\n\n[train]\noutput_dir = {:?}\n",
            run.path("out")
        )
    };
    std::fs::write(&cfg, text("")).unwrap();
    let e = fails_with(
        &rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None),
        2,
    );
    assert!(e.contains("`data.train`") && e.contains("missing"), "{e}");
    std::fs::write(&cfg, text("/nonexistent/train.jsonl")).unwrap();
    let e = fails_with(
        &rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None),
        2,
    );
    assert!(
        e.contains("`data.train`") && e.contains("/nonexistent/train.jsonl"),
        "{e}"
    );
    std::fs::write(&cfg, text(run.path("train.jsonl").to_str().unwrap())).unwrap();
    std::fs::create_dir_all(run.path("out/checkpoint-3")).unwrap();
    let e = fails_with(
        &rlhf_with(&["dpo", "--config", cfg.to_str().unwrap()], None),
        2,
    );
    assert!(e.contains("--resume"), "{e}");
    // `bench` takes a folder.
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quants/quants.gguf");
    let out = rlhf_with(
        &["bench", "--model", gguf.to_str().unwrap(), "--algo", "dpo"],
        None,
    );
    let e = fails_with(&out, 2);
    assert!(e.contains("not a file"), "{e}");
}

/// Built-in rewards in process against the same rewards in an `rlhf reward-worker` process (the
/// way plugins run): completions per second. `cargo test --test run_safety -- --ignored
/// --nocapture reward_worker_throughput`.
#[test]
#[ignore]
fn reward_worker_throughput() {
    use rlhf_rewards::command::{CommandReward, WorkerSpec};
    use rlhf_rewards::{Columns, RewardBatch, RewardConfig, RewardFn};
    let n = 20_000;
    let prompts: Vec<String> = (0..n).map(|i| format!("What is {i} + 1?")).collect();
    let completions: Vec<String> = (0..n)
        .map(|i| format!("Let me think. {i} + 1 = {}. #### {}", i + 1, i + 1))
        .collect();
    let columns: Vec<Columns> = (0..n)
        .map(|i| {
            let mut c = Columns::new();
            c.insert("answer".into(), serde_json::json!(format!("{}", i + 1)));
            c
        })
        .collect();
    let batch = RewardBatch::new(&prompts, &completions, &columns).unwrap();
    for entry in [
        serde_json::json!({"type": "contains", "text": "####"}),
        serde_json::json!({"type": "exact_answer"}),
        serde_json::json!({"type": "regex", "pattern": "(?s).*#### \\d+", "mode": "full"}),
    ] {
        let config: RewardConfig = serde_json::from_value(entry.clone()).unwrap();
        let inproc = config.build(Path::new(".")).unwrap();
        let spec = WorkerSpec {
            argv: vec![
                rlhf_bin().to_string_lossy().into_owned(),
                "reward-worker".into(),
                "--reward".into(),
                entry.to_string(),
                "--base-dir".into(),
                ".".into(),
            ],
            cwd: None,
            timeout: std::time::Duration::from_secs(30),
            handshake: true,
        };
        let worker = CommandReward::start(None, spec).unwrap();
        let time = |r: &dyn RewardFn| {
            let t = std::time::Instant::now();
            let s = r.score(&batch).unwrap();
            (t.elapsed().as_secs_f64(), s)
        };
        let (a, sa) = time(&*inproc);
        let (b, sb) = time(&worker);
        assert_eq!(sa, sb);
        eprintln!(
            "{}: in process {:.0} completions/s, in a worker {:.0} completions/s ({:.1} us per completion)",
            config.kind(),
            n as f64 / a,
            n as f64 / b,
            b / n as f64 * 1e6
        );
    }
}
