//! The [`RewardFn`] trait and the batch it scores.

use anyhow::{bail, Result};
use serde_json::{Map, Value};

/// A row's extra dataset columns (every column but the prompt), e.g. `answer` for GSM8K.
pub type Columns = Map<String, Value>;

/// The batch a reward function scores: row `i` is `prompts[i]` (rendered text),
/// `completions[i]` and `columns[i]`. As in TRL, a prompt is repeated once per generation.
#[derive(Debug, Clone, Copy)]
pub struct RewardBatch<'a> {
    prompts: &'a [String],
    completions: &'a [String],
    columns: &'a [Columns],
}

impl<'a> RewardBatch<'a> {
    /// Checks that the three slices have one entry per row.
    pub fn new(
        prompts: &'a [String],
        completions: &'a [String],
        columns: &'a [Columns],
    ) -> Result<Self> {
        if prompts.len() != completions.len() || prompts.len() != columns.len() {
            bail!(
                "reward batch: {} prompts, {} completions and {} column rows; expected one of each per row",
                prompts.len(),
                completions.len(),
                columns.len()
            );
        }
        Ok(RewardBatch {
            prompts,
            completions,
            columns,
        })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn prompts(&self) -> &'a [String] {
        self.prompts
    }

    pub fn completions(&self) -> &'a [String] {
        self.completions
    }

    pub fn columns(&self) -> &'a [Columns] {
        self.columns
    }
}

/// A reward function, TRL style: one score per row, `None` where it does not apply
/// (TRL's `None`, which TRL turns into NaN).
///
/// Implementations must be thread-safe: the trainer may score from a worker thread.
pub trait RewardFn: Send + Sync {
    /// The name in metrics (`rewards/<name>/mean`) and errors; unique within a run.
    fn name(&self) -> &str;

    /// One entry per row of `batch`, in order.
    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>>;
}

impl std::fmt::Debug for dyn RewardFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RewardFn({})", self.name())
    }
}

/// A reward function from a Rust closure, for rewards written in Rust inside the trainer
/// (or in tests).
pub struct FnReward<F> {
    name: String,
    func: F,
}

impl<F> FnReward<F>
where
    F: Fn(&RewardBatch<'_>) -> Result<Vec<Option<f32>>> + Send + Sync,
{
    pub fn new(name: impl Into<String>, func: F) -> Self {
        FnReward {
            name: name.into(),
            func,
        }
    }
}

impl<F> RewardFn for FnReward<F>
where
    F: Fn(&RewardBatch<'_>) -> Result<Vec<Option<f32>>> + Send + Sync,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        (self.func)(batch)
    }
}
