//! `rlhf reward-worker` (hidden): the worker process a reward plugin runs in during training.
//! It builds one reward entry of a run config and answers JSON lines on stdin/stdout (the
//! protocol of `rlhf_rewards::command`), so a plugin that aborts, exits or loops takes down only
//! this process, which the trainer restarts or stops by its timeout.

use super::setup::Outcome;
use anyhow::{Context, Result};
use rlhf_rewards::RewardConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RewardWorkerArgs {
    /// One `[[grpo.rewards]]` entry as JSON.
    #[arg(long)]
    pub reward: String,
    /// The run config's directory (relative plugin paths are taken from it).
    #[arg(long)]
    pub base_dir: PathBuf,
}

/// Serves until stdin closes. A reward that cannot be built is reported as the handshake's
/// `error`, which the trainer shows when it sets the run up ([`Outcome::Reported`]).
pub fn run(args: &RewardWorkerArgs) -> Result<Outcome> {
    let stdout = std::io::stdout();
    let built = serde_json::from_str::<RewardConfig>(&args.reward)
        .context("--reward: not a reward entry")
        .and_then(|c| c.build(&args.base_dir));
    let reward = match built {
        Ok(r) => r,
        Err(e) => {
            use std::io::Write;
            let line = serde_json::json!({ "error": format!("{e:#}") });
            writeln!(stdout.lock(), "{line}")?;
            return Ok(Outcome::Reported);
        }
    };
    rlhf_rewards::command::serve(&*reward, std::io::stdin().lock(), stdout.lock())?;
    Ok(Outcome::Done)
}
