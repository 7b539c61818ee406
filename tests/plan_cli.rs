//! `rlhf plan` on every shipped config, and its refusals.

mod common;
use std::path::Path;

fn plan(args: &[&str]) -> (i32, String, String) {
    let out = common::rlhf_command()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("plan")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn algo_of(name: &str) -> &'static str {
    ["dpo", "grpo", "ppo", "rm"]
        .into_iter()
        .find(|a| name.contains(a))
        .unwrap_or("dpo")
}

#[test]
fn every_config_gets_a_table_and_a_verdict() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let (code, out, err) = plan(&["--config", p.to_str().unwrap(), "--algo", algo_of(&name)]);
        assert!(code == 0 || code == 3, "{name}: exit {code}: {err}");
        assert!(out.contains("peak"), "{name}: no table:\n{out}");
        if name.starts_with("20b-") {
            assert_eq!(code, 0, "{name} must fit 24 GiB:\n{out}");
        }
        if name.starts_with("70b-") {
            assert_eq!(code, 3, "{name} cannot fit 24 GiB:\n{out}");
        }
        n += 1;
    }
    assert!(n >= 6, "only {n} configs");
}

#[test]
fn json_output_parses() {
    let (code, out, err) = plan(&["--config", "configs/20b-grpo-24gb.toml", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["peak_bytes"].as_u64().unwrap() > 0);
}

fn bad(edit: (&str, &str), needle: &str) {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/20b-grpo-24gb.toml"),
    )
    .unwrap();
    assert!(src.contains(edit.0), "config lacks `{}`", edit.0);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("20b-grpo.toml");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/llama-20b-class.json");
    let text = src.replace(edit.0, edit.1).replace(
        "configs/models/llama-20b-class.json",
        model.to_str().unwrap(),
    );
    std::fs::write(&f, text).unwrap();
    let (code, _, err) = plan(&["--config", f.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(needle), "`{needle}` not in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn impossible_values_exit_2() {
    bad(("batch_size = ", "batch_size = 0 #"), "batch_size");
    bad(
        ("num_generations = ", "num_generations = 7 #"),
        "num_generations",
    );
    bad(
        (
            "max_completion_length = ",
            "max_completion_length = 100000 #",
        ),
        "max_position_embeddings",
    );
}

/// The engine computes in f32 whatever `model.dtype` says, so a training command checks the f32
/// plan (the CUDA engine's measured layout), not the bf16 one the file asks for: with the budget
/// between the two peaks, the verdict follows the f32 plan.
#[test]
fn training_checks_the_f32_plan_of_a_bf16_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/20b-dpo-24gb.toml");
    let mut cfg = rlhf::config::RunConfig::load(&path).unwrap();
    assert_eq!(cfg.model.dtype, rlhf::config::Dtype::Bf16);
    let mcfg = rlhf::model::LlamaConfig::from_file(&cfg.model.path).unwrap();
    let paper = rlhf::plan::plan(&cfg, &mcfg, rlhf::plan::Algo::Dpo).unwrap();
    assert!(paper.fits);
    assert!(paper.notes.iter().any(|n| n.contains("computes in f32")));
    let mut f32 = cfg.clone();
    f32.model.dtype = rlhf::config::Dtype::F32;
    let engine = rlhf::plan::plan(&f32, &mcfg, rlhf::plan::Algo::Dpo).unwrap();
    assert_ne!(engine.peak_bytes, paper.peak_bytes);
    cfg.plan.budget_gib = (engine.peak_gib() + paper.peak_gib()) / 2.0;
    let fits = rlhf::cli::setup::check_plan(&cfg, rlhf::plan::Algo::Dpo, false).unwrap();
    assert_eq!(fits, engine.peak_bytes <= paper.peak_bytes);
}
