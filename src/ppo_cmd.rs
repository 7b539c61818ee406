//! `rlhf ppo` (being built: see issue).

use crate::commands::TrainFlags;
use anyhow::{bail, Result};
use std::path::Path;

/// Runs `rlhf ppo` on the configured device.
pub fn run_on_device(config: &Path, _flags: &TrainFlags) -> Result<i32> {
    crate::config::RunConfig::load(config)?;
    bail!("`rlhf ppo` is not yet built in this version")
}
