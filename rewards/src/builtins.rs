//! Built-in reward functions. Each is built from its config struct in [`crate::config`].

use std::sync::LazyLock;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::Value;

use crate::config::{
    ContainsConfig, ExactAnswerConfig, LengthPenaltyConfig, LengthUnit, MatchMode, RegexConfig,
};
use crate::reward::{RewardBatch, RewardFn};

/// A decimal number: optional minus, digits with optional `,` thousands groups, optional
/// fraction (`1,234.5`, `42`, `-3`, `.5`).
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+").expect("valid number regex")
});

/// Relative tolerance of the numeric comparison: answers are equal when
/// `|pred - gold| <= 1e-6 * max(1, |gold|)`, so `42`, `42.0` and `42.000` all match `42`.
const ANSWER_TOLERANCE: f64 = 1e-6;

/// 1 if the completion's final answer equals the reference answer numerically, 0 if it does not
/// (or the completion has no number), `None` when the row has no usable reference answer.
///
/// The final answer is, in order of preference:
/// 1. the first number inside the last `\boxed{...}` (braces may nest),
/// 2. the first number after the last `####` on its line (GSM8K's answer marker),
/// 3. the last number in the text.
///
/// Numbers are normalised first: `$` signs and LaTeX thin spaces (`\,` `\!`) are dropped,
/// `{,}` becomes `,`, thousands commas are removed, and the value is parsed as a decimal, so
/// `$1,000`, `1000.0` and `1{,}000` are all 1000. Fractions and expressions are not evaluated.
///
/// The reference answer comes from the configured column (default `answer`): a JSON number is
/// used as is; a string goes through the same extraction, so GSM8K's "...#### 42" gives 42.
/// A row without the column (or with one that holds no number) is not applicable (`None`);
/// a batch where no row has the column is an error, as that is a misconfiguration.
#[derive(Debug, Clone)]
pub struct ExactAnswer {
    name: String,
    column: String,
}

impl ExactAnswer {
    pub fn new(config: &ExactAnswerConfig) -> Self {
        ExactAnswer {
            name: config.name.clone().unwrap_or_else(|| "exact_answer".into()),
            column: config.column.clone(),
        }
    }
}

impl RewardFn for ExactAnswer {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        let columns = batch.columns();
        if !columns.is_empty() && columns.iter().all(|c| !c.contains_key(&self.column)) {
            let available: Vec<&str> = columns[0].keys().map(String::as_str).collect();
            bail!(
                "no row has the answer column `{}` (row 0 has: {available:?}); set `column` in the reward config",
                self.column
            );
        }
        Ok(batch
            .completions()
            .iter()
            .zip(columns)
            .map(|(completion, cols)| {
                let gold = cols.get(&self.column).and_then(reference_answer)?;
                let correct =
                    extract_answer(completion).is_some_and(|pred| answers_equal(pred, gold));
                Some(if correct { 1.0 } else { 0.0 })
            })
            .collect())
    }
}

/// The reference answer held in a dataset cell, if any.
fn reference_answer(cell: &Value) -> Option<f64> {
    match cell {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => extract_answer(s),
        _ => None,
    }
}

fn answers_equal(pred: f64, gold: f64) -> bool {
    (pred - gold).abs() <= ANSWER_TOLERANCE * gold.abs().max(1.0)
}

/// The final numeric answer of a text (see [`ExactAnswer`] for the rules).
pub fn extract_answer(text: &str) -> Option<f64> {
    let text = normalise(text);
    if let Some(boxed) = last_boxed(&text) {
        return numbers(boxed).next();
    }
    if let Some(at) = text.rfind("####") {
        let rest = &text[at + 4..];
        let line = rest.split('\n').next().unwrap_or("");
        return numbers(line).next();
    }
    numbers(&text).last()
}

/// Drops `$` and LaTeX spacing so numbers read plainly.
fn normalise(text: &str) -> String {
    text.replace("{,}", ",")
        .replace("\\,", "")
        .replace("\\!", "")
        .replace('$', "")
}

/// The content of the last `\boxed{...}`, matching nested braces; `None` when there is no
/// complete one.
fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The numbers in `text`, in order. A `-` directly after a letter or digit is a hyphen or a
/// subtraction, not a sign (`5-3` reads as 5 and 3).
fn numbers(text: &str) -> impl Iterator<Item = f64> + '_ {
    NUMBER.find_iter(text).filter_map(move |m| {
        let mut s = m.as_str();
        if s.starts_with('-')
            && text[..m.start()]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric)
        {
            s = &s[1..];
        }
        s.replace(',', "").parse::<f64>().ok()
    })
}

/// 1 if the completion matches the pattern (whole text or anywhere, per [`MatchMode`]), else 0.
#[derive(Debug, Clone)]
pub struct RegexMatch {
    name: String,
    regex: Regex,
}

impl RegexMatch {
    pub fn new(config: &RegexConfig) -> Result<Self> {
        let source = match config.mode {
            // `\A` and `\z` anchor at the very start and end whatever `(?m)` says.
            MatchMode::Full => format!(r"\A(?:{})\z", config.pattern),
            MatchMode::Search => config.pattern.clone(),
        };
        let regex = Regex::new(&source)
            .with_context(|| format!("invalid regex pattern {:?}", config.pattern))?;
        Ok(RegexMatch {
            name: config.name.clone().unwrap_or_else(|| "regex".into()),
            regex,
        })
    }
}

impl RewardFn for RegexMatch {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        Ok(batch
            .completions()
            .iter()
            .map(|c| Some(if self.regex.is_match(c) { 1.0 } else { 0.0 }))
            .collect())
    }
}

/// `-scale * max(0, length - target)` (or `-scale * |length - target|` when two-sided), the
/// length counted in characters or whitespace-separated words.
#[derive(Debug, Clone)]
pub struct LengthPenalty {
    name: String,
    target: usize,
    scale: f32,
    unit: LengthUnit,
    two_sided: bool,
}

impl LengthPenalty {
    pub fn new(config: &LengthPenaltyConfig) -> Result<Self> {
        if !(config.scale.is_finite() && config.scale >= 0.0) {
            bail!(
                "length_penalty: `scale` must be a finite number >= 0, got {}",
                config.scale
            );
        }
        Ok(LengthPenalty {
            name: config
                .name
                .clone()
                .unwrap_or_else(|| "length_penalty".into()),
            target: config.target,
            scale: config.scale,
            unit: config.unit,
            two_sided: config.two_sided,
        })
    }

    fn penalty(&self, completion: &str) -> f32 {
        let length = match self.unit {
            LengthUnit::Chars => completion.chars().count(),
            LengthUnit::Words => completion.split_whitespace().count(),
        };
        let distance = if self.two_sided {
            length.abs_diff(self.target)
        } else {
            length.saturating_sub(self.target)
        };
        -self.scale * distance as f32
    }
}

impl RewardFn for LengthPenalty {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        Ok(batch
            .completions()
            .iter()
            .map(|c| Some(self.penalty(c)))
            .collect())
    }
}

/// 1 if the completion contains the text (or, as `excludes`, does not), else 0.
#[derive(Debug, Clone)]
pub struct Contains {
    name: String,
    text: String,
    case_sensitive: bool,
    /// `true` for `contains`, `false` for `excludes`.
    wanted: bool,
}

impl Contains {
    /// `wanted = true` builds `contains`, `false` builds `excludes`.
    pub fn new(config: &ContainsConfig, wanted: bool) -> Result<Self> {
        let kind = if wanted { "contains" } else { "excludes" };
        if config.text.is_empty() {
            bail!("{kind}: `text` must not be empty");
        }
        Ok(Contains {
            name: config.name.clone().unwrap_or_else(|| kind.into()),
            text: if config.case_sensitive {
                config.text.clone()
            } else {
                config.text.to_lowercase()
            },
            case_sensitive: config.case_sensitive,
            wanted,
        })
    }
}

impl RewardFn for Contains {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &RewardBatch<'_>) -> Result<Vec<Option<f32>>> {
        Ok(batch
            .completions()
            .iter()
            .map(|c| {
                let found = if self.case_sensitive {
                    c.contains(&self.text)
                } else {
                    c.to_lowercase().contains(&self.text)
                };
                Some(if found == self.wanted { 1.0 } else { 0.0 })
            })
            .collect())
    }
}
