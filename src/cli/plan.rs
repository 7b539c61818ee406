//! `rlhf plan`: the VRAM plan of a run, without loading a weight.

use super::setup::{self, Outcome};
use crate::config::RunConfig;
use crate::plan::{self, Algo};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The run's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// sft, dpo, rm, grpo, ppo or generate (default: guessed from the file name).
    #[arg(long)]
    pub algo: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `rlhf plan`: prints the table (or JSON); [`Outcome::DoesNotFit`] when the run does not fit.
pub fn run(config: &Path, algo: Option<Algo>, json: bool) -> Result<Outcome> {
    let mut cfg = RunConfig::load(config)?;
    let text = std::fs::read_to_string(config)?;
    if let Some(note) = super::start::apply_start_adapter(&mut cfg, &text)
        .with_context(|| config.display().to_string())?
    {
        eprintln!("{note}");
    }
    let algo = match algo.or_else(|| plan::algo_from_file_name(config)) {
        Some(a) => a,
        None => bail!(
            "{}: cannot tell the algorithm from the file name: pass --algo sft|dpo|rm|grpo|ppo|generate",
            config.display()
        ),
    };
    let mcfg = setup::model_config(&cfg.model.path)?;
    let p = plan::plan(&cfg, &mcfg, algo).with_context(|| format!("{}", config.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        println!("{}", plan::render_table(&p));
    }
    Ok(if p.fits {
        Outcome::Done
    } else {
        Outcome::DoesNotFit
    })
}
