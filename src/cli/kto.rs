//! `rlhf kto --config run.toml`: KTO on unpaired rows, as TRL's `KTOTrainer`. A row is
//! `prompt`, `completion` (both strings or both messages) and a boolean `label` (desirable or
//! not); it is tokenized exactly as a preference pair's prompt and chosen completion. Preference
//! files are unpaired first, as TRL does. Rows are shuffled by the run loop; each row's KL
//! completion is fixed when the data is read, so the KL estimate stays one of mismatched pairs. The plan is
//! a DPO pair forward's: each row is scored with its own and with a mismatched (KL) completion.

use super::setup::{self, Outcome, TrainRun};
use super::trainers::tokenize_opts;
use crate::config::RunConfig;
use crate::data::{Row, TextCodec};
use crate::plan::Algo;
use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use rlhf_algorithms::kto::{assign_kl_completions, KtoExample, KtoTrainer};
use serde_json::Value;
use std::path::Path;

/// Reads and tokenizes an unpaired file; KL completions are assigned as TRL does. A preference
/// file (`chosen`/`rejected` columns) is unpaired first, as TRL's `unpair_preference_dataset`:
/// per block of 1000 pairs, every chosen row (label true), then every rejected row.
pub fn load_unpaired(
    path: &Path,
    codec: &dyn TextCodec,
    cfg: &RunConfig,
) -> Result<Vec<KtoExample>> {
    let rows = crate::data::read_rows(path)?;
    anyhow::ensure!(!rows.is_empty(), "{}: no examples", path.display());
    let opts = tokenize_opts(cfg);
    let first = &rows[0].columns;
    if first.contains_key("chosen") && first.contains_key("rejected") {
        let pairs = crate::data::load_preferences(path)?;
        let toks = crate::data::tokenize_preferences(codec, &pairs, &opts)?;
        let mut out = Vec::with_capacity(2 * toks.len());
        for block in toks.chunks(1000) {
            for label in [true, false] {
                out.extend(block.iter().map(|t| KtoExample {
                    prompt: t.prompt.clone(),
                    completion: if label {
                        t.chosen.clone()
                    } else {
                        t.rejected.clone()
                    },
                    label,
                    kl_completion: Vec::new(),
                }));
            }
        }
        assign_kl_completions(&mut out);
        return Ok(out);
    }
    let mut out = rows
        .iter()
        .map(|row| {
            let origin = &row.origin;
            let label = match row.columns.get("label") {
                Some(Value::Bool(b)) => *b,
                Some(other) => bail!("{origin}: column \"label\" must be true or false, found {other}"),
                None => bail!("{origin}: missing column \"label\" (true: desirable completion)"),
            };
            let Some(completion) = row.columns.get("completion") else {
                bail!("{origin}: missing column \"completion\" (KTO rows are prompt, completion, label)");
            };
            // A pair whose chosen and rejected are the completion: same tokenization as DPO's.
            let mut columns = serde_json::Map::new();
            columns.insert("prompt".into(), row.columns.get("prompt").cloned().unwrap_or(Value::Null));
            columns.insert("chosen".into(), completion.clone());
            columns.insert("rejected".into(), completion.clone());
            let pair = crate::data::parse_preference(&Row {
                origin: origin.clone(),
                columns,
            })?;
            let t = crate::data::tokenize_pair(codec, &pair, &opts)?;
            Ok(KtoExample {
                prompt: t.prompt,
                completion: t.chosen,
                label,
                kl_completion: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    assign_kl_completions(&mut out);
    Ok(out)
}

/// `rlhf kto` on backend `B`.
pub fn run<B: AutodiffBackend>(run: &TrainRun, device: &B::Device) -> Result<Outcome> {
    let cfg = &run.cfg;
    if cfg.kto.calculate_kl() && cfg.train.batch_size < 2 {
        bail!(
            "{}: key `train.batch_size`: KTO's KL estimate needs at least 2 rows per batch (as TRL)",
            run.path.display()
        );
    }
    let load = |p: &Path, codec: &setup::Codec<'_>| load_unpaired(p, codec, cfg);
    setup::train_policy::<B, _>(run, Algo::Dpo, true, device, load, |pad_id| KtoTrainer {
        cfg: cfg.kto.clone(),
        pad_id,
    })
}
