//! `rlhf sft --config run.toml`: supervised fine-tuning of the policy adapter, as TRL 1.16's
//! `SFTTrainer`. Rows are `prompt`/`completion`, `messages` or `text` (see `data::sft`);
//! `[sft]` picks the trained tokens and `data.max_length` keeps each sequence's start. The plan
//! is one policy forward and backward over `batch_size` rows of `data.max_length` tokens; no
//! reference model.

use super::setup::{self, Outcome, TrainRun};
use crate::config::RunConfig;
use crate::data::sft::{load_sft, SftOptions};
use crate::data::TextCodec;
use crate::plan::Algo;
use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::sft::{SftExample, SftTrainer};
use std::path::Path;

/// Which tokens `[sft]` trains, within `data.max_length`.
pub fn sft_options(cfg: &RunConfig) -> SftOptions {
    SftOptions {
        max_length: Some(cfg.data.max_length),
        completion_only_loss: cfg.sft.completion_only_loss,
        assistant_only_loss: cfg.sft.assistant_only_loss,
    }
}

/// Reads and tokenizes an SFT file; rows that truncation leaves without a trained token are
/// skipped with a note, as TRL does.
pub fn load_examples(
    path: &Path,
    codec: &dyn TextCodec,
    cfg: &RunConfig,
) -> Result<Vec<SftExample>> {
    let set = load_sft(path, codec, &sft_options(cfg))?;
    if let Some(first) = set.dropped.first() {
        eprintln!(
            "note: {} of {} rows have no trained token within data.max_length = {} and are skipped, \
             as TRL does (the first: {first}); raise data.max_length to keep them",
            set.dropped.len(),
            set.dropped.len() + set.rows.len(),
            cfg.data.max_length
        );
    }
    Ok(set
        .rows
        .into_iter()
        .map(|t| SftExample {
            ids: t.ids,
            trained: t.trained,
        })
        .collect())
}

/// `rlhf sft` on backend `B`.
pub fn run<B: AutodiffBackend>(run: &TrainRun, device: &B::Device) -> Result<Outcome> {
    let cfg = &run.cfg;
    let load = |p: &Path, codec: &setup::Codec<'_>| load_examples(p, codec, cfg);
    setup::train_policy::<B, _>(run, Algo::Sft, false, device, load, |pad_id| SftTrainer {
        pad_id,
    })
}
