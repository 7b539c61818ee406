//! The planner against measured peaks: every run of `tests/data/calibration/measured.json`
//! (allocator in-use high points of `rlhf bench` / `rlhf ppo` on an H200 and an H100, commands
//! in bench/run_all.sh; each run's source in the file) is re-planned from its shapes with today's
//! planner, and the tensor peak (the plan without CUDA context and allocator slack) must stay
//! within the issue's ±5% of what was measured; where the card was read, the plan's card peak
//! too. The training terms are counted tensors, not fitted; the 8b GRPO's rollout is fitted on
//! `engine_prefill`, the context on the card readings.

use rlhf::cli::bench::{run_config, BenchArgs};
use rlhf::cli::DeviceArg;
use rlhf::config::RunConfig;
use rlhf::plan::{plan, read_model_config, Algo};
use serde_json::Value;
use std::path::{Path, PathBuf};

const TOLERANCE: f64 = 0.05;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/calibration")
        .join(name)
}

fn bench_args(model: PathBuf, algo: &str, run: &Value) -> BenchArgs {
    let n = |k: &str, d: usize| run[k].as_u64().map_or(d, |v| v as usize);
    BenchArgs {
        model,
        algo: algo.to_string(),
        batch: n("batch", 4),
        prompts: n("prompts", 4),
        group: n("group", 8),
        completion_len: n("completion_len", 128),
        max_length: n("seq_len", 256),
        steps: 2,
        warmup: 1,
        no_quant: false,
        no_checkpoint: false,
        device: DeviceArg::Cuda,
        out: None,
        force: false,
        phase_times: false,
        cache_plan: run["cache"] == "plan",
        peak_tflops: None,
    }
}

/// The run config the measured run planned with: bench's settings and its tokenized lengths,
/// or the PPO run's TOML.
fn run_of(run: &Value, model: &Path, algo: Algo) -> RunConfig {
    if let Some(file) = run["config"].as_str() {
        return RunConfig::load(&data(file)).expect("calibration TOML");
    }
    let args = bench_args(model.to_path_buf(), run["algo"].as_str().unwrap(), run);
    let mut cfg = run_config(&args, algo, Path::new("/tmp/rlhf-calibration"));
    let seq = args.max_length;
    cfg.data.max_length = seq;
    cfg.data.max_prompt_length = match algo {
        Algo::Grpo => seq - args.completion_len,
        _ => seq,
    };
    cfg
}

/// The plan's live tensors (without context and slack) in `phase`, or at its largest phase.
/// A run names a phase where its labelled readings cover only that one (`phase_why` says why).
fn planned_tensors(p: &rlhf::plan::Plan, phase: Option<&str>) -> u64 {
    let Some(phase) = phase else {
        return p.tensor_peak_bytes();
    };
    let phase = *p
        .phases
        .iter()
        .find(|x| x.name() == phase)
        .unwrap_or_else(|| panic!("no phase {phase} in the plan"));
    p.tensor_bytes_of(phase)
}

/// Today's plan of a measured run.
fn replan(run: &Value) -> rlhf::plan::Plan {
    let model = data(&format!("{}.json", run["model"].as_str().unwrap()));
    let algo: Algo = run["algo"].as_str().unwrap().parse().unwrap();
    let cfg = run_of(run, &model, algo);
    let m = read_model_config(&model).unwrap();
    plan(&cfg, &m, algo).unwrap()
}

#[test]
fn planned_tensor_peaks_match_the_measured_ones() {
    let text = std::fs::read_to_string(data("measured.json")).unwrap();
    let table: Value = serde_json::from_str(&text).unwrap();
    let runs = table["runs"].as_array().unwrap();
    assert!(runs.len() >= 8, "the issue asks for at least 8 configs");
    let mut worst: (f64, String) = (0.0, String::new());
    let mut within5 = 0;
    println!("| run | measured MiB | planned MiB | error |");
    println!("|---|---:|---:|---:|");
    for run in runs {
        let name = run["name"].as_str().unwrap();
        let p = replan(run);
        let planned = planned_tensors(&p, run["phase"].as_str()) as f64 / (1u64 << 20) as f64;
        let measured = run["peak_mib"].as_f64().unwrap();
        let err = (planned - measured) / measured;
        let phase = run["phase"]
            .as_str()
            .map_or(String::new(), |p| format!(" ({p} only)"));
        println!(
            "| {name}{phase} | {measured:.1} | {planned:.1} | {:+.1}% |",
            err * 100.0
        );
        if err.abs() <= 0.05 {
            within5 += 1;
        }
        if err.abs() > worst.0 {
            worst = (err.abs(), name.to_string());
        }
    }
    println!(
        "within 5%: {within5} of {}; worst {:.1}% ({})",
        runs.len(),
        worst.0 * 100.0,
        worst.1
    );
    assert!(
        worst.0 <= TOLERANCE,
        "{}: planned {:.1}% off the measured peak (tolerance {:.1}%)",
        worst.1,
        worst.0 * 100.0,
        TOLERANCE * 100.0
    );
}

/// The card: every run's largest nvidia-smi reading for its process (`card_mib`, CUDA context
/// included) against the plan's peak, within ±5%. One kind of reading is reported, not checked:
/// a run with a rollout under the default bound (`cache` = "budget"), whose allocator keeps the
/// rollout's freed pages cached through the training step (up to the budget, by design); the
/// same run held to the plan (`cache` = "plan") is the check of what it needs. Those readings
/// must still stay within the run's budget.
#[test]
fn planned_card_peaks_match_the_measured_ones() {
    let text = std::fs::read_to_string(data("measured.json")).unwrap();
    let table: Value = serde_json::from_str(&text).unwrap();
    let runs: Vec<&Value> = table["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["card_mib"].is_number())
        .collect();
    let mut worst: (f64, String) = (0.0, String::new());
    let mut checked = 0;
    println!("| run | card MiB | planned MiB | error |");
    println!("|---|---:|---:|---:|");
    for run in runs {
        let name = run["name"].as_str().unwrap();
        let p = replan(run);
        let planned = p.peak_bytes as f64 / (1u64 << 20) as f64;
        let card = run["card_mib"].as_f64().unwrap();
        let err = (planned - card) / card;
        let rollout = p.phases.iter().any(|x| x.name() == "rollout");
        let kept = rollout && run["cache"] == "budget";
        let what = if kept {
            " (cache kept, not checked)"
        } else {
            ""
        };
        println!(
            "| {name}{what} | {card:.0} | {planned:.0} | {:+.1}% |",
            err * 100.0
        );
        if kept {
            let budget = p.budget_bytes as f64 / (1u64 << 20) as f64;
            assert!(card <= budget, "{name}: card {card} MiB above the budget");
            continue;
        }
        checked += 1;
        if err.abs() > worst.0 {
            worst = (err.abs(), name.to_string());
        }
    }
    // Tiny to 20b, dpo, rm and grpo; the 12 include bf16 runs, which the engine lacks.
    assert!(checked >= 10, "{checked} card readings checked");
    assert!(
        worst.0 <= TOLERANCE,
        "{}: planned card {:.1}% off the measured one (tolerance {:.1}%)",
        worst.1,
        worst.0 * 100.0,
        TOLERANCE * 100.0
    );
}
