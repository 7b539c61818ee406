//! The post-training workflow end to end on the real small model (SmolLM2-135M-Instruct,
//! `scripts/fetch_assets.sh`): `rlhf sft` -> `rlhf rm` -> `rlhf ppo` started from the SFT adapter
//! (which is also its reference) with the reward adapter -> `rlhf merge`. The merged folder loads
//! with our own loader and gives the base + PPO adapter's logits. Short runs: this checks that
//! each stage hands the next what it needs, not that the model improves.

mod common;

use common::{max_diff, rlhf};
use rlhf::cli::setup::CpuBackend as B;
use rlhf::model::gguf_source::load_gguf;
use rlhf::model::lora::Adapter;
use rlhf::model::{Batch, Llama, LoadOptions};
use std::path::Path;

const DENSE: LoadOptions = LoadOptions { quantize: false };

fn asset(rel: &str) -> Option<std::path::PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} missing (run scripts/fetch_assets.sh)",
            p.display()
        );
        None
    }
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_string_lossy().to_string()
}

fn logits(model: &Llama<B>, adapter: Option<&Adapter<B>>, rows: &[Vec<u32>]) -> Vec<f32> {
    let out = model.forward(&Batch::dense(rows, &model.device), adapter);
    out.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// The `objective/kl` of the first logged PPO step.
fn first_kl(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    first["objective/kl"]
        .as_f64()
        .unwrap_or_else(|| panic!("no objective/kl in {first}"))
}

#[test]
fn sft_then_rm_then_ppo_from_the_sft_adapter_then_merge() {
    let (Some(gguf), Some(pairs), Some(prompts)) = (
        asset("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        asset("data/dpo_en_demo.json"),
        asset("data/arithmetic.jsonl"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = |s: &str| dir.path().join(s);
    let base = format!("[model]\npath = {gguf:?}\nquantize = \"nf4\"\ndevice = \"cpu\"\n");
    let lora = "[lora]\nr = 8\nalpha = 16.0\n";
    let model = format!("{base}\n{lora}");
    let steps = "max_steps = 2\nlogging_steps = 1\nsave_steps = 2\n";

    let sft = write(
        &d("sft.toml"),
        &format!(
            "{model}\n[data]\ntrain = {pairs:?}\nmax_length = 192\nmax_prompt_length = 128\n\n[train]\noutput_dir = {:?}\nbatch_size = 1\nlearning_rate = 2e-4\n{steps}",
            d("sft")
        ),
    );
    rlhf(&["sft", "--config", &sft]);

    let rm = write(
        &d("rm.toml"),
        &format!(
            "{model}\n[data]\ntrain = {pairs:?}\nmax_length = 192\nmax_prompt_length = 128\n\n[train]\noutput_dir = {:?}\nbatch_size = 1\nlearning_rate = 1e-4\n{steps}",
            d("rm")
        ),
    );
    rlhf(&["rm", "--config", &rm]);

    let ppo = write(
        &d("ppo.toml"),
        &format!(
            "{base}adapter = {:?}\nreference = \"initial\"\n\n{lora}\n[data]\ntrain = {prompts:?}\nmax_prompt_length = 48\n\n[train]\noutput_dir = {:?}\nbatch_size = 2\nlearning_rate = 1e-4\n{steps}\n[ppo]\nreward_adapter = {:?}\nresponse_length = 8\nnum_ppo_epochs = 1\nnum_mini_batches = 1\n",
            d("sft/policy"),
            d("ppo"),
            d("rm/reward")
        ),
    );
    rlhf(&["ppo", "--config", &ppo]);
    // The policy starts as the SFT adapter and so does the reference: the first rollout's KL is
    // that of a model against itself.
    let kl = first_kl(&d("ppo"));
    assert!(
        kl.abs() < 1e-3,
        "first-step KL against the SFT reference: {kl}"
    );

    let merged = d("merged");
    rlhf(&[
        "merge",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        d("ppo/policy").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);

    let dev = Default::default();
    let (base, tok, chat) = load_gguf::<B>(&gguf, DENSE, &dev).unwrap();
    let (adapter, _) =
        Adapter::<B>::load_peft(&d("ppo/policy"), "policy", &base.cfg, &dev).unwrap();
    let text = chat
        .expect("SmolLM2 has a chat template")
        .render_user("What is 12 + 30?", true)
        .unwrap();
    let rows = vec![tok.encode(&text, false).unwrap()];
    let want = logits(&base, Some(&adapter), &rows);
    let plain = logits(&base, None, &rows);
    let got = logits(
        &Llama::<B>::from_hf_dir(&merged, DENSE, &dev).unwrap(),
        None,
        &rows,
    );
    let (effect, err) = (max_diff(&want, &plain), max_diff(&want, &got));
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("trained adapter's effect on the logits {effect}, merged error {err}, largest logit {scale}");
    assert!(
        effect > 1e-3,
        "the trained adapter barely moves the logits ({effect})"
    );
    // f32 rounding of a 30-layer forward whose two forms sum in different orders: ~30 ulp of the
    // largest logit (1.1e-4 at 38.8 measured), so the bound is relative to that logit.
    assert!(
        err < 1e-5 * scale.max(1.0),
        "merged logits differ from base + adapter by {err} (largest logit {scale})"
    );
}
