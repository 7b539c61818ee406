//! Datasets for DPO, reward modelling, GRPO and PPO, in TRL's column conventions.
//!
//! * Reading: `.jsonl` (one object per line) and `.json` (an array of objects; a `.json` file whose
//!   first character is `{` is read as JSON Lines, as HF `datasets` does). Every error is one line
//!   that names the file and the line (JSON Lines) or the row index from 0 (JSON array).
//! * Preference rows ([`PreferenceExample`]): TRL's standard `prompt`/`chosen`/`rejected` strings,
//!   TRL's conversational layout (lists of `{role, content}` messages, with an explicit `prompt` or
//!   an implicit one shared by `chosen` and `rejected`, split as TRL's `extract_prompt` does) and
//!   the sharegpt layout of LLaMA-Factory's `dpo_en_demo.json`.
//! * Prompt rows ([`PromptExample`]) for GRPO/PPO: `prompt` plus every other column, kept for the
//!   reward functions.
//! * Tokenization as TRL 1.16's `DPOTrainer._prepare_dataset` (see [`tokenize_pair`]) and
//!   `GRPOTrainer._tokenize_prompts` (see [`tokenize_prompt`]), with the tokenizer and the chat
//!   template behind the [`TextCodec`] trait so this module needs no model code.
//! * SFT rows (`prompt`/`completion`, `messages`, `text`) and their trained tokens: [`sft`].
//! * Batching ([`batch::pad_right`], [`batch::pad_left`], [`batch::collate_pairs`]) and seeded
//!   epoch shuffling ([`batch::epoch_order`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod batch;
pub mod sft;

// ---------------------------------------------------------------------------------------------
// Tokenizer interface
// ---------------------------------------------------------------------------------------------

/// What data preparation needs from a tokenizer + chat template (implemented by the engine).
pub trait TextCodec {
    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (usually a BOS), as `tokenizer(text)` does in transformers.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>>;
    fn eos_id(&self) -> Option<u32>;
    fn bos_id(&self) -> Option<u32>;
    /// Renders messages with the model's chat template (None if the model has none).
    fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Option<Result<String>>;
}

/// One chat turn, as in TRL's conversational datasets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where a row came from (for error messages)
// ---------------------------------------------------------------------------------------------

/// Position of a row inside its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// JSON Lines: line number, counted from 1 as editors do.
    Line(usize),
    /// JSON array: index of the element, counted from 0 as `dataset[i]` does.
    Row(usize),
}

/// File + position of a row; its `Display` ("data.jsonl line 7", "data.json row 3") starts
/// every error about the row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub place: Place,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.place {
            Place::Line(n) => write!(f, "{} line {n}", self.file),
            Place::Row(i) => write!(f, "{} row {i}", self.file),
        }
    }
}

/// One JSON object read from a dataset file.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub origin: Origin,
    pub columns: Map<String, Value>,
}

// ---------------------------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------------------------

/// Reads every row of a `.jsonl` or `.json` file (by extension). Errors name the file and the
/// line or row: empty file, bytes that are not UTF-8, invalid JSON, a row that is not an object.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let file: Arc<str> = path.display().to_string().into();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let is_jsonl = match ext.as_deref() {
        Some("jsonl") => true,
        Some("json") => false,
        _ => bail!("{file}: unsupported dataset file extension (expected .jsonl or .json)"),
    };
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{file}: cannot read the file: {e}"))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes); // UTF-8 byte-order mark
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let rows = match first {
        None => bail!("{file}: the file is empty"),
        Some(b'{') => parse_jsonl(&file, bytes)?,
        Some(_) if is_jsonl => parse_jsonl(&file, bytes)?,
        Some(_) => parse_json_array(&file, bytes)?,
    };
    if rows.is_empty() {
        bail!("{file}: the file has no rows");
    }
    Ok(rows)
}

fn parse_jsonl(file: &Arc<str>, bytes: &[u8]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let origin = Origin {
            file: file.clone(),
            place: Place::Line(i + 1),
        };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            anyhow!(
                "{origin}: not valid UTF-8 (bad byte at byte {} of the line)",
                e.valid_up_to() + 1
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            anyhow!(
                "{origin}: invalid JSON at column {}: {}",
                e.column(),
                json_error_text(&e)
            )
        })?;
        match value {
            Value::Object(columns) => rows.push(Row { origin, columns }),
            other => bail!("{origin}: expected a JSON object, found {}", kind(&other)),
        }
    }
    Ok(rows)
}

fn parse_json_array(file: &Arc<str>, bytes: &[u8]) -> Result<Vec<Row>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        anyhow!("{file} line {line}: not valid UTF-8")
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        anyhow!(
            "{file}: invalid JSON at line {} column {}: {}",
            e.line(),
            e.column(),
            json_error_text(&e)
        )
    })?;
    let items = match value {
        Value::Array(items) => items,
        other => bail!(
            "{file}: expected a JSON array of objects (or one object per line), found {}",
            kind(&other)
        ),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let origin = Origin {
                file: file.clone(),
                place: Place::Row(i),
            };
            match item {
                Value::Object(columns) => Ok(Row { origin, columns }),
                other => bail!("{origin}: expected a JSON object, found {}", kind(&other)),
            }
        })
        .collect()
}

/// serde_json's message without its " at line L column C" suffix (we print our own position).
fn json_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// "a string", "a number", ... for type errors.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// Rows in TRL's formats
// ---------------------------------------------------------------------------------------------

/// A prompt or a completion: plain text (TRL's "standard" format) or chat messages ("conversational").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
}

/// The prompt side of a row.
pub type Prompt = Content;
/// A completion (chosen or rejected answer).
pub type Completion = Content;

impl Content {
    pub fn is_conversational(&self) -> bool {
        matches!(self, Content::Messages(_))
    }
}

/// One preference pair, normalised from any supported layout. When the prompt is messages the
/// completions are messages too (the assistant turns that follow it), and likewise for text.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceExample {
    pub prompt: Prompt,
    pub chosen: Completion,
    pub rejected: Completion,
    /// TRL's optional `margin` column (used by the reward-model loss).
    pub margin: Option<f32>,
    pub origin: Origin,
}

/// One prompt for GRPO/PPO; every other column of the row is kept for the reward functions.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptExample {
    pub prompt: Prompt,
    pub extra: Map<String, Value>,
    pub origin: Origin,
}

/// Reads a preference dataset (see [`parse_preference`] for the layouts).
pub fn load_preferences(path: &Path) -> Result<Vec<PreferenceExample>> {
    read_rows(path)?.iter().map(parse_preference).collect()
}

/// Reads a prompt dataset for GRPO/PPO (see [`parse_prompt`]).
pub fn load_prompts(path: &Path) -> Result<Vec<PromptExample>> {
    read_rows(path)?.into_iter().map(parse_prompt).collect()
}

/// Normalises one preference row. Layouts, tried in this order:
/// 1. sharegpt (LLaMA-Factory): `conversations` = [{from, value}] with `from` in system/human/gpt
///    (ending with a human turn), `chosen`/`rejected` = {from: "gpt", value}.
/// 2. explicit prompt (TRL): `prompt`, `chosen`, `rejected`, all strings or all message lists.
/// 3. implicit prompt (TRL): only `chosen`/`rejected`; the prompt is their common prefix, split
///    as TRL's `extract_prompt` does (messages: shared leading turns; strings: shared leading
///    characters, a space just before the split goes with the completions).
pub fn parse_preference(row: &Row) -> Result<PreferenceExample> {
    let origin = &row.origin;
    let cols = &row.columns;
    let margin = match cols.get("margin") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64().map(|m| m as f32),
        Some(other) => bail!(
            "{origin}: column \"margin\" must be a number, found {}",
            kind(other)
        ),
    };
    for name in ["chosen", "rejected"] {
        column(row, name)?;
    }
    let (prompt, chosen, rejected) = if cols.contains_key("conversations")
        && !cols.contains_key("prompt")
    {
        sharegpt_pair(row)?
    } else if cols.contains_key("prompt") {
        let prompt = content_column(row, "prompt")?;
        let chosen = content_column(row, "chosen")?;
        let rejected = content_column(row, "rejected")?;
        for (name, c) in [("chosen", &chosen), ("rejected", &rejected)] {
            if c.is_conversational() != prompt.is_conversational() {
                bail!(
                    "{origin}: column \"prompt\" is {} but column \"{name}\" is {}; use one format per row",
                    describe(&prompt),
                    describe(c)
                );
            }
        }
        (prompt, chosen, rejected)
    } else {
        implicit_prompt(row)?
    };
    Ok(PreferenceExample {
        prompt,
        chosen,
        rejected,
        margin,
        origin: origin.clone(),
    })
}

/// Normalises one GRPO/PPO prompt row: `prompt` (string or messages) + the other columns.
pub fn parse_prompt(row: Row) -> Result<PromptExample> {
    let prompt = content_column(&row, "prompt")?;
    let Row {
        origin,
        mut columns,
    } = row;
    columns.remove("prompt");
    Ok(PromptExample {
        prompt,
        extra: columns,
        origin,
    })
}

fn describe(c: &Content) -> &'static str {
    match c {
        Content::Text(_) => "a string",
        Content::Messages(_) => "a list of messages",
    }
}

/// The column's value, or an error naming the column and the columns the row has.
fn column<'a>(row: &'a Row, name: &str) -> Result<&'a Value> {
    row.columns.get(name).ok_or_else(|| {
        let found: Vec<&str> = row.columns.keys().map(String::as_str).collect();
        anyhow!(
            "{}: missing column \"{name}\" (found: {})",
            row.origin,
            if found.is_empty() {
                "no columns".to_string()
            } else {
                found.join(", ")
            }
        )
    })
}

/// A prompt/chosen/rejected column: a non-empty string or a non-empty list of messages.
fn content_column(row: &Row, name: &str) -> Result<Content> {
    let origin = &row.origin;
    match column(row, name)? {
        Value::String(s) => {
            if s.trim().is_empty() {
                bail!("{origin}: column \"{name}\" is empty");
            }
            Ok(Content::Text(s.clone()))
        }
        Value::Array(items) => {
            let messages = items
                .iter()
                .enumerate()
                .map(|(i, m)| message(origin, name, i, m))
                .collect::<Result<Vec<_>>>()?;
            check_messages(origin, name, &messages)?;
            Ok(Content::Messages(messages))
        }
        other => bail!(
            "{origin}: column \"{name}\" must be a string or a list of {{role, content}} messages, found {}",
            kind(other)
        ),
    }
}

/// A list of messages must not be empty nor hold only empty contents.
fn check_messages(origin: &Origin, name: &str, messages: &[Message]) -> Result<()> {
    if messages.is_empty() {
        bail!("{origin}: column \"{name}\" is an empty list of messages");
    }
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        bail!("{origin}: column \"{name}\" is empty (every message has empty content)");
    }
    Ok(())
}

/// One `{role, content}` message (other keys are ignored).
fn message(origin: &Origin, name: &str, index: usize, v: &Value) -> Result<Message> {
    let Value::Object(m) = v else {
        bail!(
            "{origin}: column \"{name}\" message {index} must be an object with \"role\" and \"content\", found {}",
            kind(v)
        );
    };
    let field = |key: &str| -> Result<String> {
        match m.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!(
                "{origin}: column \"{name}\" message {index}: \"{key}\" must be a string, found {}",
                kind(other)
            ),
            None => bail!("{origin}: column \"{name}\" message {index}: missing \"{key}\""),
        }
    };
    Ok(Message {
        role: field("role")?,
        content: field("content")?,
    })
}

/// LLaMA-Factory's sharegpt ranking layout (`dpo_en_demo.json`).
fn sharegpt_pair(row: &Row) -> Result<(Prompt, Completion, Completion)> {
    let origin = &row.origin;
    let Value::Array(turns) = column(row, "conversations")? else {
        bail!(
            "{origin}: column \"conversations\" must be a list of {{from, value}} turns, found {}",
            kind(&row.columns["conversations"])
        );
    };
    let mut prompt = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let (from, value) = sharegpt_turn(origin, "conversations", Some(i), turn)?;
        let role = match from.as_str() {
            "system" if i == 0 => "system",
            "system" => bail!("{origin}: column \"conversations\" turn {i}: a system turn may only come first"),
            "human" | "user" => "user",
            "gpt" | "assistant" => "assistant",
            other => bail!(
                "{origin}: column \"conversations\" turn {i}: unsupported \"from\" value \"{other}\" \
                 (expected system, human or gpt)"
            ),
        };
        prompt.push(Message::new(role, value));
    }
    check_messages(origin, "conversations", &prompt)?;
    if prompt.last().map(|m| m.role.as_str()) != Some("user") {
        bail!("{origin}: column \"conversations\" must end with a human turn (the prompt of the pair)");
    }
    let answer = |name: &str| -> Result<Completion> {
        let (from, value) = sharegpt_turn(origin, name, None, column(row, name)?)?;
        if from != "gpt" && from != "assistant" {
            bail!("{origin}: column \"{name}\": \"from\" must be \"gpt\", found \"{from}\"");
        }
        if value.trim().is_empty() {
            bail!("{origin}: column \"{name}\" is empty");
        }
        Ok(Content::Messages(vec![Message::new("assistant", value)]))
    };
    let chosen = answer("chosen")?;
    let rejected = answer("rejected")?;
    Ok((Content::Messages(prompt), chosen, rejected))
}

/// `{from, value}` of a sharegpt turn; `index` is the position inside `conversations`.
fn sharegpt_turn(
    origin: &Origin,
    name: &str,
    index: Option<usize>,
    v: &Value,
) -> Result<(String, String)> {
    let at = match index {
        Some(i) => format!("column \"{name}\" turn {i}"),
        None => format!("column \"{name}\""),
    };
    let Value::Object(m) = v else {
        bail!(
            "{origin}: {at} must be an object with \"from\" and \"value\", found {}",
            kind(v)
        );
    };
    let field = |key: &str| -> Result<String> {
        match m.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!(
                "{origin}: {at}: \"{key}\" must be a string, found {}",
                kind(other)
            ),
            None => bail!("{origin}: {at}: missing \"{key}\""),
        }
    };
    Ok((field("from")?, field("value")?))
}

/// TRL's `extract_prompt`: the prompt is the longest common prefix of `chosen` and `rejected`
/// (whole turns for messages, characters for strings). As in TRL, when one is a prefix of the
/// other the split falls one element before the end of the shorter one.
fn implicit_prompt(row: &Row) -> Result<(Prompt, Completion, Completion)> {
    let origin = &row.origin;
    let chosen = content_column(row, "chosen")?;
    let rejected = content_column(row, "rejected")?;
    let no_prompt = || {
        let found: Vec<&str> = row.columns.keys().map(String::as_str).collect();
        anyhow!(
            "{origin}: no \"prompt\" column and \"chosen\"/\"rejected\" share no leading part to use \
             as the prompt (found: {})",
            found.join(", ")
        )
    };
    let empty_part = |name: &str| {
        anyhow!("{origin}: column \"{name}\" has nothing left after removing the prompt it shares with the other answer")
    };
    match (chosen, rejected) {
        (Content::Messages(c), Content::Messages(r)) => {
            let split = extract_split(&c, &r, |_| false);
            if split == 0 || c[..split].iter().all(|m| m.content.trim().is_empty()) {
                return Err(no_prompt());
            }
            let (prompt, chosen, rejected) = (c[..split].to_vec(), c[split..].to_vec(), r[split..].to_vec());
            if chosen.is_empty() {
                return Err(empty_part("chosen"));
            }
            if rejected.is_empty() {
                return Err(empty_part("rejected"));
            }
            Ok((Content::Messages(prompt), Content::Messages(chosen), Content::Messages(rejected)))
        }
        (Content::Text(c), Content::Text(r)) => {
            let cc: Vec<char> = c.chars().collect();
            let rc: Vec<char> = r.chars().collect();
            let split = extract_split(&cc, &rc, |ch| *ch == ' ');
            let prompt: String = cc[..split].iter().collect();
            let chosen: String = cc[split..].iter().collect();
            let rejected: String = rc[split..].iter().collect();
            if prompt.trim().is_empty() {
                return Err(no_prompt());
            }
            if chosen.is_empty() {
                return Err(empty_part("chosen"));
            }
            if rejected.is_empty() {
                return Err(empty_part("rejected"));
            }
            Ok((Content::Text(prompt), Content::Text(chosen), Content::Text(rejected)))
        }
        (c, _) => bail!(
            "{origin}: column \"chosen\" is {} but column \"rejected\" is not; use one format per row",
            describe(&c)
        ),
    }
}

/// Split index of TRL's `extract_prompt` loop: the first position where the sequences differ,
/// moved back by one when the element before it is a space (`is_space`); without a difference,
/// the last index of the shorter sequence (where Python's loop variable stops).
fn extract_split<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> usize {
    let n = a.len().min(b.len());
    match (0..n).find(|&i| a[i] != b[i]) {
        Some(i) if i > 0 && is_space(&a[i - 1]) => i - 1,
        Some(i) => i,
        None => n.saturating_sub(1),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------------

/// Length limits, in tokens. `Default` means no truncation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Longest prompt + completion. The prompt is never cut by it: a prompt that leaves no room
    /// for a completion is an error naming the row (TRL 1.16 silently drops such rows).
    pub max_length: Option<usize>,
    /// Longest prompt, applied first (TRL 0.x's `max_prompt_length`; TRL 1.16 has none).
    pub max_prompt_length: Option<usize>,
    /// How `max_prompt_length` shortens a prompt: true keeps its last tokens (the question, next
    /// to the answer), false keeps its first tokens. Completions always keep their start.
    pub keep_end: bool,
}

impl TokenizeOptions {
    fn check(&self) -> Result<()> {
        if self.max_length == Some(0) {
            bail!("max_length must be at least 1");
        }
        if self.max_prompt_length == Some(0) {
            bail!("max_prompt_length must be at least 1");
        }
        Ok(())
    }
}

/// Token ids of one pair. `prompt ++ chosen` and `prompt ++ rejected` are the sequences the
/// model sees (TRL's `prompt_ids`, `chosen_ids`, `rejected_ids`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedPair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl TokenizedPair {
    /// Length of the longer of the two full sequences (the reward trainer of TRL skips pairs
    /// longer than `max_length` instead of truncating them: tokenize with `max_length: None`
    /// and filter on this).
    pub fn longest(&self) -> usize {
        self.prompt.len() + self.chosen.len().max(self.rejected.len())
    }
}

/// Tokenizes a pair as TRL 1.16's `DPOTrainer._prepare_dataset`:
/// * text rows: `chosen`/`rejected` get the EOS token unless they already end with it; then
///   `prompt`, `prompt + chosen` and `prompt + rejected` are encoded as whole strings with special
///   tokens (a BOS if the tokenizer adds one);
/// * message rows: the prompt is rendered with the generation prompt, `prompt + chosen` and
///   `prompt + rejected` as whole conversations, each encoded without special tokens (as
///   `apply_chat_template(tokenize=True)`); no EOS is added (the template closes the turn);
/// * the prompt is the common prefix of the encoded prompt with both full sequences (they can
///   differ at the boundary when tokens merge across it or a template renders a prompt alone
///   differently) and the completions are the rest of each full sequence.
///
/// Then [`TokenizeOptions`] truncation.
pub fn tokenize_pair(
    codec: &dyn TextCodec,
    ex: &PreferenceExample,
    opts: &TokenizeOptions,
) -> Result<TokenizedPair> {
    opts.check()?;
    let origin = &ex.origin;
    let (prompt_ids, full_chosen, full_rejected) = match (&ex.prompt, &ex.chosen, &ex.rejected) {
        (Content::Text(p), Content::Text(c), Content::Text(r)) => {
            let with_eos = |completion: &str| -> Result<Vec<u32>> {
                let mut ids = encode(codec, origin, &format!("{p}{completion}"), true)?;
                if let Some(eos) = codec.eos_id() {
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                    }
                }
                Ok(ids)
            };
            (encode(codec, origin, p, true)?, with_eos(c)?, with_eos(r)?)
        }
        (Content::Messages(p), Content::Messages(c), Content::Messages(r)) => {
            let prompt_text = render(codec, origin, p, true)?;
            let full = |completion: &[Message]| -> Result<Vec<u32>> {
                let conversation: Vec<Message> = p.iter().chain(completion).cloned().collect();
                encode(
                    codec,
                    origin,
                    &render(codec, origin, &conversation, false)?,
                    false,
                )
            };
            (
                encode(codec, origin, &prompt_text, false)?,
                full(c)?,
                full(r)?,
            )
        }
        _ => bail!("{origin}: prompt, chosen and rejected must all be strings or all be messages"),
    };
    let split =
        common_prefix(&prompt_ids, &full_chosen).min(common_prefix(&prompt_ids, &full_rejected));
    let mut pair = TokenizedPair {
        prompt: prompt_ids[..split].to_vec(),
        chosen: full_chosen[split..].to_vec(),
        rejected: full_rejected[split..].to_vec(),
    };
    for (name, ids) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
        if ids.is_empty() {
            bail!("{origin}: the {name} completion has no tokens after tokenization");
        }
    }
    truncate_prompt(origin, &mut pair.prompt, opts)?;
    if let Some(max) = opts.max_length {
        let room = max - pair.prompt.len(); // > 0: checked by truncate_prompt
        pair.chosen.truncate(room);
        pair.rejected.truncate(room);
    }
    Ok(pair)
}

/// [`tokenize_pair`] over a dataset; the first failing row stops it.
pub fn tokenize_preferences(
    codec: &dyn TextCodec,
    examples: &[PreferenceExample],
    opts: &TokenizeOptions,
) -> Result<Vec<TokenizedPair>> {
    examples
        .iter()
        .map(|ex| tokenize_pair(codec, ex, opts))
        .collect()
}

/// Tokenizes a GRPO/PPO prompt as TRL 1.16's `GRPOTrainer._tokenize_prompts`: text is encoded
/// with special tokens; messages are rendered with the generation prompt and encoded without.
/// Then `max_prompt_length` truncation, and an error if the prompt leaves no room within
/// `max_length` (pass `max_length: None` when only the completion length is bounded).
pub fn tokenize_prompt(
    codec: &dyn TextCodec,
    ex: &PromptExample,
    opts: &TokenizeOptions,
) -> Result<Vec<u32>> {
    opts.check()?;
    let origin = &ex.origin;
    let mut ids = match &ex.prompt {
        Content::Text(p) => encode(codec, origin, p, true)?,
        Content::Messages(m) => encode(codec, origin, &render(codec, origin, m, true)?, false)?,
    };
    truncate_prompt(origin, &mut ids, opts)?;
    Ok(ids)
}

/// `max_prompt_length` (keep_end / keep_start), then the room check against `max_length`.
fn truncate_prompt(origin: &Origin, prompt: &mut Vec<u32>, opts: &TokenizeOptions) -> Result<()> {
    if let Some(max) = opts.max_prompt_length {
        if prompt.len() > max {
            if opts.keep_end {
                prompt.drain(..prompt.len() - max);
            } else {
                prompt.truncate(max);
            }
        }
    }
    if let Some(max) = opts.max_length {
        if prompt.len() >= max {
            bail!(
                "{origin}: the prompt has {} tokens{}, which leaves no room for a completion within \
                 max_length = {max}; raise max_length or set max_prompt_length below it",
                prompt.len(),
                if opts.max_prompt_length.is_some() { " after max_prompt_length" } else { "" }
            );
        }
    }
    Ok(())
}

fn encode(codec: &dyn TextCodec, origin: &Origin, text: &str, special: bool) -> Result<Vec<u32>> {
    codec
        .encode(text, special)
        .map_err(|e| anyhow!("{origin}: tokenization failed: {e:#}"))
}

fn render(
    codec: &dyn TextCodec,
    origin: &Origin,
    messages: &[Message],
    generation_prompt: bool,
) -> Result<String> {
    match codec.render_chat(messages, generation_prompt) {
        Some(Ok(text)) => Ok(text),
        Some(Err(e)) => Err(anyhow!("{origin}: chat template failed: {e:#}")),
        None => Err(anyhow!(
            "{origin}: the row holds chat messages but the model has no chat template"
        )),
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests;
