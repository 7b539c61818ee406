//! ORPO, SimPO (CPO with `loss_type = "simpo"`), KTO and RLOO learn the tiny-model marker task on
//! CPU, through the `rlhf` binary.

mod common;
use common::*;

const TRAIN: &str = "batch_size = 8\nmax_steps = 48\nlearning_rate = 0.01\nlr_scheduler = \"constant\"\nsave_steps = 100\n\n[lora]\nr = 8\nalpha = 16.0\n";

/// Greedy 8-token completions of the held-out prompts: the fraction that contain MARK.
fn marker_rate(run: &Run, adapter: Option<&str>, prompts: usize) -> f64 {
    let text = std::fs::read_to_string(run.path("eval.jsonl")).unwrap();
    let mut hits = 0;
    for line in text.lines().take(prompts) {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let model = run.path("model");
        let mut args = vec!["generate", "--model", model.to_str().unwrap()];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let prompt = row["prompt"].as_str().unwrap();
        args.extend([
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--min-new-tokens",
            "8",
            "--max-new-tokens",
            "8",
        ]);
        if rlhf(&args).contains("MARK") {
            hits += 1;
        }
    }
    hits as f64 / prompts as f64
}

#[test]
fn orpo_learns_the_marker_preference() {
    let run = Run::new(111);
    let cfg = run.config(
        "orpo.toml",
        "out",
        &format!("{TRAIN}\n[orpo]\nbeta = 0.5\n"),
    );
    rlhf(&["orpo", "--config", cfg.to_str().unwrap()]);
    let acc = eval_metric(&run.path("out"), "eval_rewards/accuracies");
    eprintln!("ORPO held-out accuracy {acc}");
    assert!(acc >= 0.9, "held-out rewards/accuracies {acc}");
    let m = std::fs::read_to_string(run.path("out/metrics.jsonl")).unwrap();
    assert!(m.contains("\"nll_loss\"") && m.contains("\"log_odds_ratio\""));
}

#[test]
fn simpo_learns_the_marker_preference() {
    let run = Run::new(121);
    let body = format!(
        "{TRAIN}\n[cpo]\nloss_type = \"simpo\"\ncpo_alpha = 0.0\nbeta = 2.0\nsimpo_gamma = 0.5\n"
    );
    let cfg = run.config("simpo.toml", "out", &body);
    rlhf(&["cpo", "--config", cfg.to_str().unwrap()]);
    let acc = eval_metric(&run.path("out"), "eval_rewards/accuracies");
    eprintln!("SimPO held-out accuracy {acc}");
    assert!(acc >= 0.9, "held-out rewards/accuracies {acc}");
}

#[test]
fn kto_learns_the_marker_from_unpaired_rows() {
    let run = Run::new(131);
    // Unpaired rows: every chosen answer desirable, every rejected one undesirable.
    let mut rows = String::new();
    for line in std::fs::read_to_string(run.path("train.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for (key, label) in [("chosen", true), ("rejected", false)] {
            rows.push_str(
                &serde_json::json!({"prompt": v["prompt"], "completion": v[key], "label": label})
                    .to_string(),
            );
            rows.push('\n');
        }
    }
    std::fs::write(run.path("train.jsonl"), rows).unwrap();
    let cfg = run.config("kto.toml", "out", &format!("{TRAIN}\n[kto]\nbeta = 0.1\n"));
    rlhf(&["kto", "--config", cfg.to_str().unwrap()]);
    // The eval file is a preference file: KTO unpairs it as TRL does (chosen rows, then rejected
    // rows, so the evaluation batches are all of one kind: compare their mean rewards).
    let margin = eval_metric(&run.path("out"), "eval_rewards/chosen")
        - eval_metric(&run.path("out"), "eval_rewards/rejected");
    let kl = eval_metric(&run.path("out"), "eval_kl");
    let out = run.path("out/policy");
    let tuned = marker_rate(&run, Some(out.to_str().unwrap()), 20);
    let base = marker_rate(&run, None, 20);
    eprintln!("KTO held-out margin {margin}, kl {kl}; MARK in greedy completions: base {base}, tuned {tuned}");
    assert!(margin > 0.0, "held-out rewards/margins {margin}");
    // The held-out "reward" of this task: how often a greedy completion carries MARK.
    assert!(
        tuned >= 3.0 * base && tuned >= 0.5,
        "held-out prompts completed with MARK: base {base}, tuned {tuned}"
    );
}

#[test]
fn rloo_learns_the_marker_with_a_builtin_reward() {
    let run = Run::new(141);
    let body = "batch_size = 16\nmax_steps = 30\nlearning_rate = 0.02\nlr_scheduler = \"constant\"\nsave_steps = 100\nlogging_steps = 1\n\n[lora]\nr = 8\nalpha = 16.0\n\n[generation]\ntemperature = 1.0\n\n[rloo]\nnum_generations = 8\nmax_completion_length = 8\nbeta = 0.05\n\n[[rloo.rewards]]\ntype = \"contains\"\ntext = \"MARK\"\n";
    let cfg = run.config("rloo.toml", "out", body);
    rlhf(&["rloo", "--config", cfg.to_str().unwrap()]);
    let m: Vec<serde_json::Value> = std::fs::read_to_string(run.path("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(m.len(), 30);
    let mean = |ls: &[serde_json::Value]| {
        ls.iter()
            .map(|l| l["reward"].as_f64().unwrap())
            .sum::<f64>()
            / ls.len() as f64
    };
    let (before, after) = (mean(&m[..3]), mean(&m[27..]));
    let held_out = eval_metric(&run.path("out"), "eval_reward");
    eprintln!("RLOO reward {before:.3} -> {after:.3} (held-out {held_out:.3})");
    assert!(m
        .iter()
        .all(|l| l["kl"].is_number() && l["clip_ratio/region_mean"].is_number()));
    assert!(before > 0.0, "no reward at the start");
    assert!(after >= 3.0 * before, "reward {before} -> {after}");
    assert!(
        held_out >= 3.0 * before,
        "held-out reward {held_out} vs {before}"
    );
}
