//! Prints the scores a reward adapter (a folder `rlhf rm` wrote: LoRA + score head) gives token
//! rows, through the path training and PPO score with (`RlhfModel::head_scores` read at each
//! row's last real token by `rm::last_token_scores`), so that another implementation can be
//! checked against it (`scripts/check_hf_merge.py`):
//!
//!     cargo run --example score -- BASE ADAPTER ROWS.json [--nf4]
//!
//! BASE: an HF folder or GGUF file; `--nf4` quantizes it as training runs do. ROWS.json:
//! `[[token ids], ...]`; shorter rows are right-padded (padding is never scored). Prints
//! `{"scores": [...]}` on stdout.

use anyhow::{ensure, Context, Result};
use burn::backend::Autodiff;
use rlhf::cli::setup::{load_model, CpuBackend};
use rlhf::engine::RlhfModel;
use rlhf_algorithms::rm::last_token_scores;
use rlhf_algorithms::trainer::{Role, TokenBatch};
use std::path::Path;

type B = Autodiff<CpuBackend>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nf4 = args.iter().any(|a| a == "--nf4");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    ensure!(
        pos.len() == 3,
        "usage: score BASE ADAPTER ROWS.json [--nf4]"
    );
    let rows: Vec<Vec<u32>> = serde_json::from_str(
        &std::fs::read_to_string(pos[2]).with_context(|| format!("{}: cannot read", pos[2]))?,
    )
    .with_context(|| format!("{}: expected [[token ids], ...]", pos[2]))?;
    ensure!(
        rows.iter().all(|r| !r.is_empty()),
        "{}: an empty row",
        pos[2]
    );

    let device = Default::default();
    let loaded = load_model::<B>(Path::new(pos[0]), nf4, &device)?;
    let mut model = RlhfModel::new(loaded.model);
    model.add_adapter_from(Role::Reward, Path::new(pos[1]), 0.0)?;
    ensure!(
        model.heads.contains_key(&Role::Reward),
        "{}: no score head; expected a reward adapter written by `rlhf rm`",
        pos[1]
    );
    model.set_training(false);

    // Rows as the trainer batches them: right-padded, padding marked invalid.
    let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (&r[..], &[][..])).collect();
    let batch = TokenBatch::from_pairs(&pairs, 0);
    let scores = last_token_scores(&model, Role::Reward, &batch)?
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    println!("{}", serde_json::json!({ "scores": scores }));
    Ok(())
}
