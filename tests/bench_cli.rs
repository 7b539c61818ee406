//! `rlhf bench` on CPU: a tiny random model folder in make_model.py's layout (config.json,
//! model.safetensors, tokenizer.json, dpo.jsonl, grpo.jsonl); both algorithms print one sane JSON
//! line (and write it to $OUT); bad input is one error line with exit code 2.

mod common;
use common::*;
use std::path::Path;

/// make_model.py's layout around the tiny test model: `rows` DPO rows of 16 + 16 + 16 words
/// (prompt + completion + EOS fill `--max-length 32` exactly, as make_model.py's 128 + 128 fill
/// 256) and GRPO prompts of 6 words whose answer is `w7`.
fn write_bench_dir(dir: &Path, rows: usize) {
    write_tiny_model(dir, 7);
    let mut rng = Rng::new(8);
    let mut text = |n: usize| {
        (0..n)
            .map(|_| format!("w{}", rng.below(WORDS)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut dpo = String::new();
    let mut grpo = String::new();
    for _ in 0..rows {
        let row = serde_json::json!({"prompt": text(16), "chosen": text(16), "rejected": text(16)});
        dpo.push_str(&format!("{row}\n"));
        let row = serde_json::json!({"prompt": text(6), "answer": "w7"});
        grpo.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.join("dpo.jsonl"), dpo).unwrap();
    std::fs::write(dir.join("grpo.jsonl"), grpo).unwrap();
}

/// Runs `rlhf bench` with $OUT set; returns (exit code, stdout, stderr).
fn bench(args: &[&str], out: &Path) -> (i32, String, String) {
    let o = common::rlhf_command()
        .arg("bench")
        .args(args)
        .env("OUT", out)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// Runs a benchmark that must succeed; checks the fields every result has and returns the JSON.
fn bench_ok(args: &[&str], algo: &str, tokens_per_step: u64) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_bench_dir(&model, 16);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut all = vec!["--model", model.to_str().unwrap(), "--algo", algo];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = bench(&all, &out);
    assert_eq!(code, 0, "rlhf bench {all:?} failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one JSON line on stdout: {stdout}");
    eprintln!("{}", lines[0]);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let written = std::fs::read_to_string(out.join(format!("rlhf_{algo}.json"))).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&written).unwrap(),
        v
    );

    assert_eq!(v["system"], "rlhf");
    assert_eq!(v["algo"], algo);
    assert_eq!(v["model"], model.to_str().unwrap());
    assert_eq!(v["quant"], true);
    assert_eq!(v["device"], "cpu");
    let sec = v["sec_per_step"].as_f64().unwrap();
    assert!(sec > 0.0 && sec < 60.0, "{v}");
    assert_eq!(v["tokens_per_step"].as_u64().unwrap(), tokens_per_step);
    let tps = v["tokens_per_sec"].as_f64().unwrap();
    let want = tokens_per_step as f64 / sec;
    assert!((tps - want).abs() <= 0.05 + 1e-3 * want, "{v}");
    assert_eq!(v["steps_timed"], 2, "{v}");
    // CPU: the allocator numbers and nvidia-smi do not apply.
    for k in ["peak_alloc_gib", "peak_reserved_gib", "peak_nvidia_smi_gib"] {
        assert!(v[k].is_null(), "{k}: {v}");
    }
    let planned = v["planned_peak_gib"].as_f64().unwrap();
    assert!(planned > 0.0 && planned < 1.0, "{v}");
    // The scratch output folder is gone: nothing left in the model folder either.
    assert!(!model.join("checkpoint-3").exists());
    v
}

#[test]
fn dpo_bench_prints_one_json_line() {
    let v = bench_ok(
        &[
            "--batch",
            "2",
            "--max-length",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--phase-times",
            "--peak-tflops",
            "0.000001",
        ],
        "dpo",
        2 * 2 * 32,
    );
    // MFU: 8 x the GEMM parameters per trained token (the rows as tokenized, at most the
    // --max-length rows trl_baseline.py counts), over the peak given (1 MFLOP/s here).
    let trained = v["trained_tokens_per_step"].as_f64().unwrap();
    assert!(trained > 0.0 && trained <= (2 * 2 * 32) as f64, "{v}");
    let flop = v["flop_per_token"].as_f64().unwrap();
    assert!(flop > 0.0 && flop % 8.0 == 0.0, "{v}");
    assert!(v["gpu"].is_null(), "{v}");
    let sec = v["sec_per_step"].as_f64().unwrap();
    let want = flop * trained / sec / 1e6;
    let mfu = v["mfu"].as_f64().unwrap();
    assert!(
        (mfu - want).abs() <= 1e-3 * want + 1e-4,
        "mfu {mfu}, want {want}: {v}"
    );
    // The phases are timed inside each step: each took some time, and together no more than
    // the step (two timed steps: the medians are means, so they add up).
    let phases = &v["phase_secs"];
    let mut total = 0.0;
    for k in ["forward", "backward", "optimizer"] {
        let t = phases[k].as_f64().unwrap_or(-1.0);
        assert!(t > 0.0, "{k}: {v}");
        total += t;
    }
    assert!(total <= sec + 1e-4, "phases {total} s > step {sec} s: {v}");
    // DPO's reference pass scores without a graph inside the forward phase; no rollout.
    let part = |k: &str| phases[k].as_f64().unwrap_or(-1.0);
    assert!(part("scoring") > 0.0, "{v}");
    assert!(part("scoring") <= part("forward") + 1e-4, "{v}");
    assert_eq!((part("prefill"), part("decode")), (0.0, 0.0), "{v}");
}

/// One prompt, a group of two, 8-token completions, one warmup and two timed steps.
const GRPO_ARGS: &[&str] = &[
    "--prompts",
    "1",
    "--group",
    "2",
    "--completion-len",
    "8",
    "--steps",
    "2",
    "--warmup",
    "1",
];

#[test]
fn grpo_bench_prints_one_json_line() {
    let v = bench_ok(GRPO_ARGS, "grpo", 2 * 8);
    // MFU is a DPO figure; a GRPO step is mostly decode.
    assert!(v["flop_per_token"].is_null() && v["mfu"].is_null(), "{v}");
    assert!(
        v["phase_secs"].is_null(),
        "phases only with --phase-times: {v}"
    );
}

#[test]
fn grpo_phase_times_split_the_rollout() {
    let v = bench_ok(&[GRPO_ARGS, &["--phase-times"]].concat(), "grpo", 2 * 8);
    // The forward phase's parts: the rollout's prefill and decode, the scoring passes (the
    // reference's), each timed and within the phase.
    let phases = &v["phase_secs"];
    let part = |k: &str| phases[k].as_f64().unwrap_or(-1.0);
    for k in ["prefill", "decode", "scoring"] {
        assert!(part(k) > 0.0, "{k}: {v}");
    }
    let parts = part("prefill") + part("decode") + part("scoring");
    assert!(parts <= part("forward") + 1e-4, "{v}");
}

/// Exit code 2 and a single `error:` line containing every needle.
fn assert_clean_error(args: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, stderr) = bench(args, tmp.path());
    assert_eq!(code, 2, "exit code for {args:?}; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line for {args:?}: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {stderr}");
    }
}

#[test]
fn bad_input_is_one_error_line() {
    assert_clean_error(
        &["--model", "/nonexistent/bench-model", "--algo", "dpo"],
        &["/nonexistent/bench-model", "not found"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_bench_dir(&model, 4);
    let m = model.to_str().unwrap();
    std::fs::remove_file(model.join("dpo.jsonl")).unwrap();
    assert_clean_error(
        &["--model", m, "--algo", "dpo"],
        &["dpo.jsonl", "not found"],
    );
    assert_clean_error(&["--model", m, "--algo", "ppo"], &["--algo", "ppo"]);
    assert_clean_error(
        &["--model", m, "--algo", "grpo", "--group", "1"],
        &["--group"],
    );
    // Fewer prompts in the file than one step needs.
    assert_clean_error(
        &["--model", m, "--algo", "grpo", "--prompts", "5"],
        &["grpo.jsonl", "4 rows"],
    );
}
