//! The reward section of the run config: one [`RewardConfig`] per reward function.
//!
//! In `run.toml` (the `type` key picks the function; unknown keys are errors):
//!
//! ```toml
//! [[rewards]]
//! type = "exact_answer"      # 1 if the final number equals the `answer` column's
//! weight = 1.0               # every entry has a weight (default 1.0) and an optional name
//!
//! [[rewards]]
//! type = "regex"
//! pattern = '(?s)<think>.*</think>.*'
//! mode = "full"              # or "search"
//! weight = 0.5
//!
//! [[rewards]]
//! type = "plugin"
//! path = "plugins/libmarker_reward.so"   # relative to the config file
//! config = { marker = "<m>" }
//!
//! [[rewards]]
//! type = "command"                        # any executable speaking JSON lines (crate::command)
//! command = ["python3", "verify.py"]      # run in the config file's directory
//! timeout_secs = 10                       # per completion (default 30)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::builtins::{Contains, ExactAnswer, LengthPenalty, RegexMatch};
use crate::command::{CommandReward, WorkerSpec};
use crate::loader::PluginReward;
use crate::reward::RewardFn;

/// One reward function of the run config, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardConfig {
    /// 1 if the completion's final number equals the answer column's, else 0.
    ExactAnswer(ExactAnswerConfig),
    /// 1 if the completion matches a regular expression, else 0.
    Regex(RegexConfig),
    /// Minus `scale` per character (or word) beyond `target`.
    LengthPenalty(LengthPenaltyConfig),
    /// 1 if the completion contains `text`, else 0.
    Contains(ContainsConfig),
    /// 1 if the completion does not contain `text`, else 0.
    Excludes(ContainsConfig),
    /// A reward compiled as a shared library (see [`crate::plugin`]).
    Plugin(PluginConfig),
    /// An executable scoring completions over JSON lines (see [`crate::command`]).
    Command(CommandConfig),
}

fn default_weight() -> f32 {
    1.0
}

fn default_answer_column() -> String {
    "answer".into()
}

fn default_true() -> bool {
    true
}

fn default_timeout() -> f64 {
    30.0
}

/// `type = "exact_answer"`: see [`ExactAnswer`] for how answers are extracted and compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactAnswerConfig {
    /// Dataset column with the reference answer (default `answer`, GSM8K's "... #### 42").
    #[serde(default = "default_answer_column")]
    pub column: String,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Metric name (default `exact_answer`).
    pub name: Option<String>,
}

/// How a [`RegexConfig`] pattern must match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchMode {
    /// The whole completion must match (Python's `re.fullmatch`). The default.
    #[default]
    Full,
    /// A match anywhere in the completion is enough (Python's `re.search`).
    Search,
}

/// `type = "regex"`: 1 if the completion matches `pattern`, else 0. The syntax is the `regex`
/// crate's (close to Python's `re` without look-around); inline flags such as `(?s)` (dot matches
/// newline), `(?m)` and `(?i)` work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexConfig {
    pub pattern: String,
    #[serde(default)]
    pub mode: MatchMode,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Metric name (default `regex`).
    pub name: Option<String>,
}

/// The unit a [`LengthPenaltyConfig`] counts in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthUnit {
    /// Unicode characters (Rust `char`s). The default.
    #[default]
    Chars,
    /// Runs of non-whitespace separated by whitespace (Python's `len(text.split())`).
    Words,
}

/// `type = "length_penalty"`: reward `-scale * max(0, length - target)`, or
/// `-scale * |length - target|` with `two_sided = true`; the length is in `unit`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthPenaltyConfig {
    pub target: usize,
    /// Penalty per unit of distance from `target` (>= 0).
    pub scale: f32,
    #[serde(default)]
    pub unit: LengthUnit,
    /// Also penalise completions shorter than `target`.
    #[serde(default)]
    pub two_sided: bool,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Metric name (default `length_penalty`).
    pub name: Option<String>,
}

/// `type = "contains"` / `type = "excludes"`: whether the completion contains `text`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainsConfig {
    pub text: String,
    /// Compare case-sensitively (default true); otherwise both sides are lower-cased.
    #[serde(default = "default_true")]
    pub case_sensitive: bool,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Metric name (default `contains` / `excludes`).
    pub name: Option<String>,
}

/// `type = "plugin"`: a reward function in a shared library (see [`crate::plugin`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path of the shared library, relative to the config file's directory.
    pub path: PathBuf,
    /// Passed to the plugin as JSON when it is loaded (`null` when absent).
    pub config: Option<serde_json::Value>,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Metric name (default: the name the plugin reports).
    pub name: Option<String>,
    /// Seconds one completion may take when the plugin runs in a worker process.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
}

/// `type = "command"`: a program scoring one completion per JSON line (see [`crate::command`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Program and arguments, run in the config file's directory.
    pub command: Vec<String>,
    /// Seconds one completion may take; a worker past it is killed and restarted.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Metric name (default: the program's file stem).
    pub name: Option<String>,
}

fn timeout(secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0) {
        bail!("`timeout_secs`: expected a number of seconds > 0, got {secs}");
    }
    Ok(Duration::from_secs_f64(secs.min(1e9)))
}

impl RewardConfig {
    /// The `type` tag, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            RewardConfig::ExactAnswer(_) => "exact_answer",
            RewardConfig::Regex(_) => "regex",
            RewardConfig::LengthPenalty(_) => "length_penalty",
            RewardConfig::Contains(_) => "contains",
            RewardConfig::Excludes(_) => "excludes",
            RewardConfig::Plugin(_) => "plugin",
            RewardConfig::Command(_) => "command",
        }
    }

    pub fn weight(&self) -> f32 {
        match self {
            RewardConfig::ExactAnswer(c) => c.weight,
            RewardConfig::Regex(c) => c.weight,
            RewardConfig::LengthPenalty(c) => c.weight,
            RewardConfig::Contains(c) | RewardConfig::Excludes(c) => c.weight,
            RewardConfig::Plugin(c) => c.weight,
            RewardConfig::Command(c) => c.weight,
        }
    }

    /// Builds the function. A relative plugin `path` is taken relative to `base_dir`.
    pub fn build(&self, base_dir: &Path) -> Result<Box<dyn RewardFn>> {
        Ok(match self {
            RewardConfig::ExactAnswer(c) => Box::new(ExactAnswer::new(c)),
            RewardConfig::Regex(c) => Box::new(RegexMatch::new(c)?),
            RewardConfig::LengthPenalty(c) => Box::new(LengthPenalty::new(c)?),
            RewardConfig::Contains(c) => Box::new(Contains::new(c, true)?),
            RewardConfig::Excludes(c) => Box::new(Contains::new(c, false)?),
            RewardConfig::Plugin(c) => {
                let path = base_dir.join(&c.path);
                let config = c.config.clone().unwrap_or(serde_json::Value::Null);
                let mut plugin = PluginReward::load(&path, &config)?;
                if let Some(name) = &c.name {
                    plugin.set_name(name.clone());
                }
                Box::new(plugin)
            }
            RewardConfig::Command(c) => {
                let spec = WorkerSpec {
                    argv: c.command.clone(),
                    cwd: Some(base_dir.to_path_buf()),
                    timeout: timeout(c.timeout_secs)?,
                    handshake: false,
                };
                if c.command.is_empty() {
                    bail!("`command`: expected a program, e.g. [\"python3\", \"verify.py\"]");
                }
                Box::new(CommandReward::start(c.name.clone(), spec)?)
            }
        })
    }

    /// As [`build`](Self::build), but a plugin runs in a worker process, `worker` (the `rlhf`
    /// binary) with arguments `reward-worker --reward <this entry as JSON> --base-dir <dir>`,
    /// so that its aborts, exits and hangs cannot take the trainer down.
    pub fn build_isolated(&self, base_dir: &Path, worker: &Path) -> Result<Box<dyn RewardFn>> {
        let RewardConfig::Plugin(c) = self else {
            return self.build(base_dir);
        };
        let spec = WorkerSpec {
            argv: vec![
                worker.display().to_string(),
                "reward-worker".into(),
                "--reward".into(),
                serde_json::to_string(self)?,
                "--base-dir".into(),
                base_dir.display().to_string(),
            ],
            cwd: None,
            timeout: timeout(c.timeout_secs)?,
            handshake: true,
        };
        Ok(Box::new(CommandReward::start(c.name.clone(), spec)?))
    }
}
