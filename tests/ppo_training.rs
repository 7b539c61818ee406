//! PPO end to end on CPU with the tiny random model: a reward model trained by `rlhf rm` to
//! prefer responses with the MARK token, then `rlhf ppo` on the same base raises its score;
//! the paged optimizer gives the resident optimizer's adapters; a killed run resumes exactly.

mod common;
use common::*;
use std::path::Path;

/// Reward-model training as `tests/preference_training.rs` does it.
const RM: &str = "batch_size = 8\nmax_steps = 48\nlearning_rate = 0.01\nlr_scheduler = \"constant\"\nsave_steps = 100\n\n[lora]\nr = 8\nalpha = 16.0\n";

/// A reward adapter good enough to drive PPO (trained like the RM acceptance test).
fn train_reward_model(run: &Run, steps: usize) -> String {
    let body = RM.replace("max_steps = 48", &format!("max_steps = {steps}"));
    let cfg = run.config("rm.toml", "rm", &body);
    rlhf(&["rm", "--config", cfg.to_str().unwrap()]);
    run.path("rm/reward").to_str().unwrap().to_string()
}

/// The `[train]` body (after output_dir) and the PPO sections of a run.
fn ppo_body(train: &str, reward: &str, extra: &str) -> String {
    format!(
        "{train}\n[lora]\nr = 8\nalpha = 16.0\n\n[generation]\ntemperature = 1.0\n\n[ppo]\nreward_adapter = {reward:?}\nresponse_length = 6\n{extra}"
    )
}

/// Every line of `metrics.jsonl`.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn metric(line: &serde_json::Value, key: &str) -> f64 {
    line[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {line}"))
}

/// All tensors of a safetensors file, by name, as f32.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

/// Largest absolute difference between two adapter files (same tensor names required).
fn max_abs_diff(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let mut worst = 0.0f64;
    for (k, va) in &ta {
        let vb = &tb[k];
        assert_eq!(va.len(), vb.len(), "{k}");
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((*x as f64 - *y as f64).abs());
        }
    }
    worst
}

#[test]
fn ppo_raises_the_reward_model_score() {
    let run = Run::new(41);
    let reward = train_reward_model(&run, 48);
    let train = "batch_size = 16\nmax_steps = 80\nlearning_rate = 0.01\nlr_scheduler = \"constant\"\nsave_steps = 1000\n";
    let cfg = run.config(
        "ppo.toml",
        "ppo",
        &ppo_body(
            train,
            &reward,
            "num_ppo_epochs = 2\nnum_mini_batches = 2\nkl_coef = 0.05\n",
        ),
    );
    rlhf(&["ppo", "--config", cfg.to_str().unwrap()]);
    let lines = metrics(&run.path("ppo"));
    assert_eq!(lines.len(), 80);
    for l in &lines {
        for key in [
            "objective/kl",
            "objective/entropy",
            "objective/scores",
            "objective/rlhf_reward",
            "policy/approxkl_avg",
            "policy/clipfrac_avg",
            "loss/policy_avg",
            "loss/value_avg",
            "val/clipfrac_avg",
            "val/ratio",
            "eps",
        ] {
            assert!(metric(l, key).is_finite(), "{key} not finite in {l}");
        }
    }
    // One rollout serves 2 epochs x 2 minibatches = 4 steps: 20 rollouts.
    let scores: Vec<f64> = lines
        .iter()
        .step_by(4)
        .map(|l| metric(l, "objective/scores"))
        .collect();
    let kls: Vec<f64> = lines
        .iter()
        .step_by(4)
        .map(|l| metric(l, "objective/kl"))
        .collect();
    eprintln!("rollout scores {scores:?}\nrollout KL {kls:?}");
    let early = scores[..4].iter().sum::<f64>() / 4.0;
    let late = scores[16..].iter().sum::<f64>() / 4.0;
    let policy = eval_metric(&run.path("ppo"), "eval_objective/scores");
    let reference = eval_metric(&run.path("ppo"), "eval_objective/scores_reference");
    eprintln!("held-out score: policy {policy}, reference {reference}");
    eprintln!("first step {}\nlast step {}", lines[0], lines[79]);
    assert!(late > early + 1.0, "rollout scores {scores:?}");
    assert!(kls.iter().all(|k| k.is_finite()), "KL {kls:?}");
    assert!(
        policy > reference + 0.5,
        "policy {policy}, reference {reference}"
    );
    assert!(run.path("ppo/policy/adapter_model.safetensors").exists());
    let value = tensors(&run.path("ppo/value/adapter_model.safetensors"));
    assert_eq!(value["base_model.model.score.weight"].len(), 32);
}

#[test]
fn paged_and_resident_optimizers_give_the_same_adapters() {
    let run = Run::new(51);
    let reward = train_reward_model(&run, 8);
    let train = "batch_size = 8\nmax_steps = 5\nlearning_rate = 0.01\nsave_steps = 1000\n";
    let extra = "num_ppo_epochs = 2\nnum_mini_batches = 2\n";
    for (name, paged) in [("resident", false), ("paged", true)] {
        let body = format!(
            "{}\n[optimizer]\npaged = {paged}\n",
            ppo_body(train, &reward, extra)
        );
        let cfg = run.config(&format!("{name}.toml"), name, &body);
        rlhf(&["ppo", "--config", cfg.to_str().unwrap()]);
    }
    for role in ["policy", "value"] {
        let file = format!("{role}/adapter_model.safetensors");
        let d = max_abs_diff(
            &run.path(&format!("resident/{file}")),
            &run.path(&format!("paged/{file}")),
        );
        eprintln!("{role}: max |resident - paged| = {d}");
        assert!(d <= 1e-6, "{role} adapters differ by {d}");
    }
    // The runs trained: the policy moved away from its zero-initialised LoRA B.
    let policy = tensors(&run.path("paged/policy/adapter_model.safetensors"));
    assert!(policy
        .iter()
        .any(|(k, v)| k.contains("lora_B") && v.iter().any(|x| *x != 0.0)));
}

#[test]
fn killed_ppo_run_resumes_to_the_same_adapters() {
    let run = Run::new(61);
    let reward = train_reward_model(&run, 8);
    // 2 epochs x 2 minibatches: rollouts at steps 1, 5, 9, 13; checkpoint-3 holds a part-used one.
    let train =
        "batch_size = 8\nmax_steps = 16\nlearning_rate = 0.01\nsave_steps = 1\nwarmup_steps = 2\n";
    let body = ppo_body(
        train,
        &reward,
        "num_ppo_epochs = 2\nnum_mini_batches = 2\nadaptive_kl_target = 0.5\nadaptive_kl_horizon = 100.0\n",
    );
    let full = run.config("full.toml", "full", &body);
    rlhf(&["ppo", "--config", full.to_str().unwrap()]);

    let cut = run.config("cut.toml", "cut", &body);
    let mut child = common::rlhf_command()
        .args(["ppo", "--config", cut.to_str().unwrap()])
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
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no clean exit
    child.wait().unwrap();
    assert!(
        !run.path("cut/policy").exists(),
        "the run finished before the kill"
    );
    // The checkpoint carries the cached rollout and the KL controller.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.path("cut/checkpoint-3/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["rollouts"], 1, "{state}");
    assert_eq!(state["served"], 3);
    assert_eq!(state["cache"]["rows"].as_array().unwrap().len(), 8);
    // Resume from checkpoint-3 itself (the kill may have come a step later): half a rollout is
    // left in its cache.
    let ckpt = run.path("cut/checkpoint-3");
    rlhf(&[
        "ppo",
        "--config",
        cut.to_str().unwrap(),
        "--resume",
        ckpt.to_str().unwrap(),
    ]);
    for role in ["policy", "value"] {
        let file = format!("{role}/adapter_model.safetensors");
        let a = std::fs::read(run.path(&format!("full/{file}"))).unwrap();
        let b = std::fs::read(run.path(&format!("cut/{file}"))).unwrap();
        assert!(
            a == b,
            "resumed {role} adapter differs from the uninterrupted one"
        );
    }
    let (a, b) = (metrics(&run.path("full")), metrics(&run.path("cut")));
    let last = |m: &[serde_json::Value]| metric(m.last().unwrap(), "objective/kl_coef");
    assert_eq!(
        last(&a),
        last(&b),
        "KL controller state differs after resume"
    );
}
